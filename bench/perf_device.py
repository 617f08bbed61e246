"""`moe-bench perf --device DEVICE`: the accelerator benchmark (runs on any device, CPU included).

Two parts, in bf16 autocast unless ``precision="fp32"``:
- ``layer``: forward+backward of our MoE layer (switch router) against the FLOP-matched dense FFN
  at a preset's d_model/d_ff, for each expert count and token batch, with every expert kernel the
  device has (``sorted``, ``padded``, ``grouped_mm`` where torch provides it) and ``auto``;
  capacity factor 1.25 as in Switch, and dropless (every token computed: the full matched cost).
- ``training``: tokens/s and MFU (model FLOPs per second / the device's peak) of the dense and
  switch LMs at the ``small`` and ``base`` presets: moe-bench's Lightning step, and the same step
  in a plain PyTorch loop (what Lightning costs), optionally also with ``torch.compile``.

Model FLOPs are the analytic training FLOPs of ``bench.flops`` (3 x forward, the matched count
the comparisons use; tokens a capacity drops still count). The peak is the vendor's dense bf16
(or fp32) tensor rate for known GPUs (``PEAK_TFLOPS``, or ``peak_tflops=``), and MFU is also
given against the rate of one large matmul measured in the same run, which is what a CPU has.
Training batches are synthetic: token ids drawn from a Zipf-like unigram distribution through
a random bigram table, so routing sees token-dependent inputs (uniform random ids make a router
send most tokens to one expert, which no trained model does); the benchmark reports the experts'
largest load relative to the mean, so a reader sees how balanced the timed steps were.
Times are wall-clock around device-synchronised steps, best of ``repeats`` interleaved rounds.
"""
from __future__ import annotations

import gc
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch

from bench.models.config import PRESETS, MoEConfig
from bench.models.experts import has_grouped_mm
from bench.models.moe import FeedForward, MoELayer
from bench.runtime import best_time_ms, device_name

# Dense tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, matched against
# torch.cuda.get_device_name in order (first substring found wins).
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989.4, "fp32": 66.9}),
    ("H100 PCIe", {"bf16": 756.0, "fp32": 51.2}),
    ("H100", {"bf16": 989.4, "fp32": 66.9}),
    ("GH200", {"bf16": 989.4, "fp32": 66.9}),
    ("A100", {"bf16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.1, "fp32": 91.6}),
    ("L4", {"bf16": 121.0, "fp32": 30.3}),
    ("A10", {"bf16": 125.0, "fp32": 31.2}),
    ("RTX 4090", {"bf16": 165.2, "fp32": 82.6}),
]


def spec_peak_tflops(device: torch.device, precision: str) -> float | None:
    """The data-sheet peak of a known GPU, else None (CPUs, unknown GPUs: give --peak-tflops)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS:
        if key in name:
            return peaks[precision]
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def matmul_tflops(device: torch.device, precision: str, n: int | None = None) -> float:
    """The rate of one large square matmul (the device's practical peak), measured now."""
    n = n or (8192 if device.type == "cuda" else 2048)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = best_time_ms({"mm": lambda: torch.mm(a, b)}, 5, device)["mm"]
    return 2 * n**3 / (ms / 1e3) / 1e12


def kernels_on(device: torch.device) -> list[str]:
    return ["sorted", "padded"] + (["grouped_mm"] if has_grouped_mm() else [])


def _layer_step(module: torch.nn.Module, x: torch.Tensor, call, device, precision) -> Callable[[], None]:
    def step() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        with autocast(device, precision):
            out = call()
        out.float().sum().backward()
    return step


@dataclass
class _LayerCase:
    impl: str
    kernel: str
    capacity_factor: float | None


def device_layer_benchmark(device: str | torch.device = "cuda", preset: str = "base",
                           tokens_list=(8192, 65536), experts_list=(8, 32, 128), precision: str = "bf16",
                           repeats: int = 5, progress: Callable[[str], None] | None = None) -> dict:
    """Layer forward+backward, ms and ratio to the FLOP-matched dense FFN (see the module docstring)."""
    device = torch.device(device)
    shape = PRESETS[preset]["transformer"]
    d_model, d_ff = shape["d_model"], shape["d_ff"]
    torch.manual_seed(0)
    cases = [_LayerCase("auto", "auto", 1.25), _LayerCase("auto dropless", "auto", None)]
    cases += [_LayerCase(k, k, 1.25) for k in kernels_on(device)]
    rows = []
    for T in tokens_list:
        x = torch.randn(T, d_model, device=device, requires_grad=True)
        dense = FeedForward(d_model, d_ff).to(device)
        for E in experts_list:
            if progress:
                progress(f"layer tokens={T} experts={E}")
            fns = {"dense": _layer_step(dense, x, lambda: dense(x), device, precision)}
            layers = {}
            for case in cases:
                cfg = MoEConfig(num_experts=E, capacity_factor=case.capacity_factor, dispatch=case.kernel)
                layer = layers[case.impl] = MoELayer(d_model, d_ff, cfg).to(device)
                fns[case.impl] = _layer_step(layer, x, lambda layer=layer: layer(x)[0], device, precision)
            times = best_time_ms(fns, repeats, device)
            dropped, kernel = {}, {}
            with torch.no_grad(), autocast(device, precision):
                for impl, layer in layers.items():
                    dropped[impl] = float(layer(x)[1].stats["fraction_dropped"])
                    kernel[impl] = layer.kernel_for(T, torch.bfloat16 if precision == "bf16" else torch.float32,
                                                    device)
            for impl, ms in times.items():
                rows.append(dict(tokens=T, num_experts=E, impl=impl, kernel=kernel.get(impl), ms=ms,
                                 vs_dense=round(ms / times["dense"], 2), fraction_dropped=dropped.get(impl)))
    return dict(device=device_name(device), preset=preset, d_model=d_model, d_ff=d_ff, precision=precision,
                repeats=repeats, rows=rows)


def format_device_layer_table(result: dict) -> str:
    lines = [f"MoE layer forward+backward on {result['device']}, {result['precision']}, preset {result['preset']} "
             f"(d_model {result['d_model']}, d_ff {result['d_ff']}), switch router, capacity factor 1.25 unless "
             f"dropless, best of {result['repeats']}", "",
             f"{'tokens':>7} {'E':>4} {'impl':<14} {'kernel':<11} {'ms':>9} {'x dense':>8} {'dropped':>8}"]
    last = None
    for r in result["rows"]:
        if last is not None and (r["tokens"], r["num_experts"]) != last:
            lines.append("")
        last = (r["tokens"], r["num_experts"])
        dropped = "" if r["fraction_dropped"] is None else f"{100 * r['fraction_dropped']:.1f}%"
        lines.append(f"{r['tokens']:>7} {r['num_experts']:>4} {r['impl']:<14} {r['kernel'] or '':<11} "
                     f"{r['ms']:>9.2f} {r['vs_dense']:>8.2f} {dropped:>8}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# training throughput and MFU

def zipf_bigram_batches(vocab: int, batch: int, seq: int, n: int, seed: int = 0,
                        device: str | torch.device = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` (input, target) LM batches from a random bigram chain with Zipf-like unigram rates:
    each token's successors are 32 ids drawn with probability ~ 1/rank (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    rates = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    successors = torch.multinomial(rates.expand(vocab, -1), 32, replacement=True, generator=g)  # (V, 32)
    tokens = torch.empty(n * batch, seq + 1, dtype=torch.long)
    tokens[:, 0] = torch.multinomial(rates, n * batch, replacement=True, generator=g)
    for t in range(seq):
        pick = torch.randint(0, 32, (n * batch,), generator=g)
        tokens[:, t + 1] = successors[tokens[:, t], pick]
    tokens = tokens.view(n, batch, seq + 1).to(device)
    return [(d[:, :-1].contiguous(), d[:, 1:].contiguous()) for d in tokens]


def _max_over_mean_load(model) -> float | None:
    from bench.models.moe import moe_layers

    worst = None
    for layer in moe_layers(model):
        counts = getattr(layer, "_bench_last_counts", None)
        if counts is not None:
            load = float(counts.max() / counts.mean().clamp_min(1e-9))
            worst = load if worst is None else max(worst, load)
    return worst


def _record_loads(model) -> None:
    """Keep each MoE layer's tokens per expert of its last forward (a forward hook)."""
    from bench.models.moe import moe_layers

    def hook(layer, _inputs, output) -> None:  # no .item() here: a host sync per layer would skew the timing
        layer._bench_last_counts = output[1].stats["tokens_per_expert"].float()

    for layer in moe_layers(model):
        layer.register_forward_hook(hook)


def plain_step_runner(model, batches, precision: str, device: torch.device, warmup: int) -> float:
    """tokens/s of the Lightning step's work in a plain loop: forward, chunked loss + aux, backward,
    clip at 1.0, fused AdamW."""
    from bench.train.loss import output_cross_entropy
    from bench.train.module import adamw

    opt = adamw(list(model.parameters()), lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95))
    model.train()
    start = None
    for i, (x, y) in enumerate(batches):
        if i == warmup:
            synchronize(device)
            start = time.perf_counter()
        with autocast(device, precision):
            out = model(x)
            loss = output_cross_entropy(out.hidden, out.head, y) + out.aux_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    synchronize(device)
    return (len(batches) - warmup) * batches[0][0].numel() / (time.perf_counter() - start)


def lightning_step_runner(model, batches, precision: str, device: torch.device, warmup: int) -> float:
    """tokens/s of moe-bench's own training step (LMModule in a Lightning Trainer)."""
    from bench.perf import lightning_tokens_per_sec

    return lightning_tokens_per_sec(model, batches, precision == "bf16", warmup, device)[0]


RUNNERS = {"moe-bench": lightning_step_runner, "plain loop": plain_step_runner}


def device_training_benchmark(device: str | torch.device = "cuda", presets=("small", "base"),
                              families=("dense", "switch"), batch: int = 32, seq: int = 1024, vocab: int = 32000,
                              steps: int = 20, warmup: int = 10, precision: str = "bf16", compile: bool = False,
                              peak_tflops: float | None = None, overrides: dict | None = None,
                              progress: Callable[[str], None] | None = None) -> dict:
    """Training tokens/s and MFU per preset and family (see the module docstring). ``overrides``
    go to every model (e.g. smaller shapes for a CPU test)."""
    import logging
    import warnings

    from bench.flops import model_cost
    from bench.models import build_model, model_config

    device = torch.device(device)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    measured = matmul_tflops(device, precision)
    spec = peak_tflops or spec_peak_tflops(device, precision)
    batches = zipf_bigram_batches(vocab, batch, seq, steps + warmup, device=device)
    variants = [(impl, False) for impl in RUNNERS] + ([("plain loop", True)] if compile else [])
    rows = []
    for preset in presets:
        for family in families:
            for impl, compiled in variants:
                name = impl + (" + torch.compile" if compiled else "")
                if progress:
                    progress(f"training {preset} {family} {name}")
                torch.manual_seed(0)
                # Switch runs dropless: the full matched cost of a balanced model (a capacity
                # drops tokens in early, unbalanced steps and would make a step look cheap).
                over = dict(overrides or {}, **({"capacity_factor": None} if family != "dense" else {}))
                cfg = model_config(family, preset, over, vocab_size=vocab, max_seq_len=seq)
                with device:  # parameters made where they train: a base switch has 3.6B of them
                    model = build_model(cfg, "lm")
                _record_loads(model)
                if compiled:
                    # Graph breaks at the routing's data-dependent sizes are expected: one line each
                    # would bury the table.
                    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
                    model.compile()
                row = dict(preset=preset, family=family, impl=name)
                try:
                    tps = RUNNERS[impl](model, batches, precision, device, warmup)
                except Exception as e:  # e.g. torch.compile without a working compiler: say so, go on
                    rows.append(dict(row, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
                    continue
                cost = model_cost(cfg, seq)
                achieved = tps * cost.train_flops_per_token / 1e12
                rows.append(dict(row, tokens_per_sec=round(tps), model_tflops=achieved,
                                 mfu_spec=None if spec is None else round(achieved / spec, 4),
                                 mfu_measured=round(achieved / measured, 4),
                                 active_params=cost.active_params, total_params=cost.total_params,
                                 max_over_mean_load=_max_over_mean_load(model)))
                del model
                gc.collect()  # the trainer and optimizer of this row hold the model through cycles
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return dict(device=device_name(device), precision=precision, batch=batch, seq_len=seq, vocab=vocab, steps=steps,
                warmup=warmup, peak_tflops=spec, matmul_tflops=measured, rows=rows)


def format_device_training_table(result: dict) -> str:
    peak = f"{result['peak_tflops']} TFLOP/s data-sheet peak" if result["peak_tflops"] else "no data-sheet peak"
    lines = [f"LM training on {result['device']}, {result['precision']}, batch {result['batch']} x seq "
             f"{result['seq_len']}, vocab {result['vocab']}, {result['steps']} timed steps after {result['warmup']}; "
             f"{peak}; one large matmul ran at {result['matmul_tflops']:.3g} TFLOP/s", "",
             f"{'preset':<6} {'model':<7} {'impl':<26} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>7} "
             f"{'MFU/mm':>7} {'max load':>9}"]
    for r in result["rows"]:
        head = f"{r['preset']:<6} {r['family']:<7} {r['impl']:<26}"
        if "error" in r:
            lines.append(f"{head} failed: {r['error']}")
            continue
        mfu = "" if r["mfu_spec"] is None else f"{100 * r['mfu_spec']:.1f}%"
        load = "" if r["max_over_mean_load"] is None else f"{r['max_over_mean_load']:.2f}x"
        lines.append(f"{head} {r['tokens_per_sec']:>10,} {r['model_tflops']:>8.3g} {mfu:>7} "
                     f"{100 * r['mfu_measured']:>6.1f}% {load:>9}")
    lines.append("\nMFU: model FLOPs (bench.flops, 3 x forward) per second / data-sheet peak; MFU/mm: / the measured "
                 "matmul rate; max load: the busiest expert's tokens / the mean, last step, worst layer")
    return "\n".join(lines)
