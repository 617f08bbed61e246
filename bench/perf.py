"""`moe-bench perf`: layer-level speed of our MoE layer against FLOP-matched dense and a peer.

For each token batch and expert count it times forward+backward of
- ``dense``: the FLOP-matched dense FFN (d_model -> d_ff -> d_model),
- ``ours``: ``MoELayer`` with the switch router at capacity factor 1.25 (default ``auto`` kernel),
- ``ours-sorted`` / ``ours-padded``: the same layer with each kernel forced,
- ``peer``: HuggingFace transformers' ``SwitchTransformersSparseMLP`` (optional extra ``peer``),
  which enforces capacity per *sequence*: ceil(seq_len / E * 1.25),
and prints two bounds beside them, measured in the same run:
- ``matmul floor``: our grouped expert matmuls alone on perfectly balanced blocks of T/E rows
  (what small per-expert matmuls cost on this CPU, with no routing at all),
- ``in-cache floor``: the same matmuls (and activation) with one expert's weights and gradient
  buffers reused for every expert, so they stay in cache: what the arithmetic of small
  per-expert matmuls costs once weight traffic is taken away,
- ``memory floor``: 3 x expert-weight bytes (read forward, read backward, write gradients)
  divided by the copy bandwidth measured now.
On a CPU, MKL does not overlap streaming the next expert's weights with the current expert's
arithmetic, so ``in-cache floor + memory floor`` (printed as ``no-overlap``) is what the
per-expert loop can reach; at E = 128 that sum is well above the dense FFN (README, Speed).
Times are the best of ``repeats`` interleaved rounds (shared machines drift; compare ratios).
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from bench.models.config import MoEConfig
from bench.models.experts import grouped_expert_ffn
from bench.models.moe import FeedForward, MoELayer
from bench.runtime import apply_cpu_settings, best_time_ms

D_MODEL, D_FF, CAPACITY_FACTOR, SEQ_LEN = 256, 1024, 1.25, 256


@dataclass
class LayerRow:
    tokens: int
    num_experts: int
    impl: str
    ms: float
    vs_dense: float
    fraction_dropped: float | None = None


def copy_bandwidth_gbs(mbytes: int = 256) -> float:
    src = torch.empty(mbytes * 2**20 // 4)
    src.fill_(1.0)
    dst = torch.empty_like(src)
    ms = best_time_ms({"copy": lambda: dst.copy_(src)}, 5)["copy"]
    return 2 * src.numel() * 4 / (ms / 1e3) / 1e9  # read + write


def _train_step(module: torch.nn.Module, x: torch.Tensor, forward: Callable) -> Callable[[], None]:
    def step() -> None:
        module.zero_grad(set_to_none=True)  # as a training loop does: no gradient accumulation
        x.grad = None
        forward().sum().backward()
    return step


def _matmul_floor_step(layer: MoELayer, x: torch.Tensor, counts: list[int]):
    """(step, weights): the grouped kernel alone on blocks of ``counts`` rows, with copies of
    the layer's expert weights. The ParameterList holds the very tensors the kernel uses: one
    built from plain tensors wraps new Parameters, whose .grad zero_grad would clear while the
    kernel's tensors kept accumulating gradients (an extra pass over all weights per step)."""
    weights = torch.nn.ParameterList([layer.w1.detach().clone(), layer.w2.detach().clone()])
    return _train_step(weights, x, lambda: grouped_expert_ffn(x, weights[0], weights[1], counts, "relu")), weights


def _in_cache_matmuls(x: torch.Tensor, d_ff: int, counts: list[int]) -> Callable[[], None]:
    """Forward+backward matmuls of the grouped kernel on blocks of ``counts`` rows, every block
    using the same (cached) expert weights and gradient buffers: arithmetic without weight traffic."""
    A, d = x.shape
    x = x.detach()
    w1, w2 = torch.randn(d, d_ff) * 0.03, torch.randn(d_ff, d) * 0.03
    gw1, gw2 = torch.empty_like(w1), torch.empty_like(w2)
    h, gh = x.new_empty(A, d_ff), x.new_empty(A, d_ff)
    y, gx, gy = x.new_empty(A, d), x.new_empty(A, d), torch.randn(A, d)
    blocks = [slice(start - n, start) for start, n in zip(itertools.accumulate(counts), counts)]

    def step() -> None:
        for s in blocks:
            torch.mm(x[s], w1, out=h[s])
            h[s].relu_()
            torch.mm(h[s], w2, out=y[s])
        for s in blocks:
            torch.mm(h[s].t(), gy[s], out=gw2)
            torch.mm(gy[s], w2.t(), out=gh[s])
            torch.ops.aten.threshold_backward.grad_input(gh[s], h[s], 0, grad_input=gh[s])
            torch.mm(x[s].t(), gh[s], out=gw1)
            torch.mm(gh[s], w1.t(), out=gx[s])
    return step


def _hf_peer(num_experts: int):
    try:
        from transformers import SwitchTransformersConfig
        from transformers.models.switch_transformers.modeling_switch_transformers import (
            SwitchTransformersSparseMLP,
        )
    except ImportError:
        return None
    cfg = SwitchTransformersConfig(
        d_model=D_MODEL, d_ff=D_FF, num_experts=num_experts, dropout_rate=0.0,
        expert_capacity=math.ceil(SEQ_LEN / num_experts * CAPACITY_FACTOR),
        router_jitter_noise=0.0, dense_act_fn="relu", router_dtype="float32",
    )
    return SwitchTransformersSparseMLP(cfg)


def layer_benchmark(tokens_list=(2048, 8192), experts_list=(8, 32, 128), repeats: int = 5,
                    with_peer: bool = True, progress: Callable[[str], None] | None = None) -> dict:
    if with_peer:
        bad = [T for T in tokens_list if T % SEQ_LEN]
        if bad:
            from bench.config import ConfigError

            raise ConfigError([f"--tokens {' '.join(map(str, bad))}: the HF peer runs sequences of {SEQ_LEN}, so "
                               f"token counts must be multiples of {SEQ_LEN} (or leave the peer out: --no-peer)"],
                              "perf")
    apply_cpu_settings()
    torch.manual_seed(0)
    bandwidth = copy_bandwidth_gbs()
    rows: list[LayerRow] = []
    bounds = []
    peer_available = True
    for T in tokens_list:
        x = torch.randn(T, D_MODEL, requires_grad=True)
        x_seq = x.detach().view(T // SEQ_LEN, SEQ_LEN, D_MODEL).requires_grad_() if with_peer else None
        dense = FeedForward(D_MODEL, D_FF)
        for E in experts_list:
            if progress:
                progress(f"tokens={T} experts={E}")
            fns, layers = {}, {}
            fns["dense"] = _train_step(dense, x, lambda: dense(x))
            for impl, kernel in (("ours", "auto"), ("ours-sorted", "sorted"), ("ours-padded", "padded")):
                layer = MoELayer(D_MODEL, D_FF, MoEConfig(num_experts=E, capacity_factor=CAPACITY_FACTOR,
                                                           dispatch=kernel))
                layers[impl] = layer
                fns[impl] = _train_step(layer, x, lambda layer=layer: layer(x)[0])
            counts = [T // E] * E
            fns["matmul floor"], _ = _matmul_floor_step(layers["ours"], x, counts)
            fns["in-cache floor"] = _in_cache_matmuls(x, D_FF, counts)
            peer = _hf_peer(E) if with_peer else None
            if peer is None:
                peer_available = False
            else:
                fns["peer (HF)"] = _train_step(peer, x_seq, lambda peer=peer: peer(x_seq))
            times = best_time_ms(fns, repeats)
            dropped = {}
            with torch.no_grad():
                for impl, layer in layers.items():
                    dropped[impl] = float(layer(x)[1].stats["fraction_dropped"])
                if peer is not None:
                    mask = peer.router(x_seq)[0]
                    dropped["peer (HF)"] = float((mask.sum(-1) == 0).float().mean())
            for impl, ms in times.items():
                rows.append(LayerRow(T, E, impl, round(ms, 1), round(ms / times["dense"], 2),
                                     dropped.get(impl)))
            weight_bytes = 2 * E * D_MODEL * D_FF * 4
            memory_ms = 3 * weight_bytes / bandwidth / 1e6
            # MKL does not overlap weight streaming with arithmetic: their sum is what the
            # per-expert loop can reach (the layer adds routing, gather and combine on top).
            no_overlap_ms = times["in-cache floor"] + memory_ms
            bounds.append(dict(tokens=T, num_experts=E, memory_floor_ms=round(memory_ms, 1),
                               no_overlap_bound_ms=round(no_overlap_ms, 1),
                               no_overlap_bound_vs_dense=round(no_overlap_ms / times["dense"], 2)))
    return dict(
        d_model=D_MODEL, d_ff=D_FF, capacity_factor=CAPACITY_FACTOR, peer_seq_len=SEQ_LEN,
        threads=torch.get_num_threads(), copy_bandwidth_gbs=round(bandwidth, 1),
        peer_available=peer_available, rows=[asdict(r) for r in rows], bounds=bounds,
    )


def format_layer_table(result: dict) -> str:
    lines = [
        f"MoE layer forward+backward, d_model={result['d_model']}, d_ff={result['d_ff']}, switch router, "
        f"capacity factor {result['capacity_factor']}, {result['threads']} threads, best of rounds",
        f"copy bandwidth {result['copy_bandwidth_gbs']} GB/s; peer capacity is per sequence of "
        f"{result['peer_seq_len']} tokens",
        "",
        f"{'tokens':>7} {'E':>4} {'impl':<13} {'ms':>8} {'x dense':>8} {'dropped':>8}",
    ]
    bounds = {(b["tokens"], b["num_experts"]): b for b in result["bounds"]}

    def bound_lines(key) -> list[str]:
        b = bounds[key]
        return [f"{'':>7} {'':>4} {'memory floor':<13} {b['memory_floor_ms']:>8.1f}",
                f"{'':>7} {'':>4} {'no-overlap':<13} {b['no_overlap_bound_ms']:>8.1f} "
                f"{b['no_overlap_bound_vs_dense']:>8.2f}  (in-cache floor + memory floor)"]

    last = None
    for r in result["rows"]:
        key = (r["tokens"], r["num_experts"])
        if last is not None and key != last:
            lines += bound_lines(last) + [""]
        last = key
        dropped = "" if r["fraction_dropped"] is None else f"{100 * r['fraction_dropped']:7.1f}%"
        lines.append(f"{r['tokens']:>7} {r['num_experts']:>4} {r['impl']:<13} {r['ms']:>8.1f} "
                     f"{r['vs_dense']:>8.2f} {dropped:>8}")
    if last is not None:
        lines += bound_lines(last)
    if not result["peer_available"]:
        lines.append("\n(peer skipped: pip install 'moe-bench[peer]' for HuggingFace transformers)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# training throughput: moe-bench's Lightning step vs a hand-written PyTorch loop


def _synthetic_batches(vocab: int, batch: int, seq: int, n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, vocab, (n, batch, seq + 1), generator=g)
    return [(d[:, :-1].contiguous(), d[:, 1:].contiguous()) for d in data]


def _text_batches(batch: int, seq: int, n: int, seed: int = 0):
    """Real Tiny Shakespeare batches when the corpus is available locally, else None.

    Random tokens are a poor stand-in for an MoE: a model trained on them learns to ignore its
    input, every token then routes to the same expert and most are dropped."""
    try:
        from bench.data.datamodules import LMDataModule

        dm = LMDataModule("tinyshakespeare-char", batch_size=batch, seq_len=seq, seed=seed, allow_download=False)
        dm.prepare_data()
        dm.setup("fit")
        it = iter(dm.train_dataloader())
        return [next(it) for _ in range(n)], dm.vocab_size
    except Exception:
        return None


def _plain_loop_tokens_per_sec(model, batches, bf16: bool, warmup: int) -> float:
    import torch.nn.functional as F

    from bench.train.module import adamw

    opt = adamw(list(model.parameters()), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))  # as a good loop would
    model.train()
    start = None
    for i, (x, y) in enumerate(batches):
        if i == warmup:
            start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
            loss = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).float(), y.reshape(-1)) + out.aux_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    n = len(batches) - warmup
    return n * batches[0][0].numel() / (time.perf_counter() - start), None


def lightning_tokens_per_sec(model, batches, bf16: bool, warmup: int, device="cpu") -> tuple[float, float | None]:
    """tokens/s of moe-bench's training step (LMModule in a Lightning Trainer) on ``device``, after
    ``warmup`` untimed steps, and the mean fraction of tokens dropped over the timed steps. On a GPU
    the clock reads after a device sync, and the dropped fractions are read only after the last step
    (a host sync per step would slow what is timed)."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from bench.train.config import OptimConfig
    from bench.train.module import LMModule

    device = torch.device(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    class Clock(pl.Callback):
        start = end = None
        dropped: list = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == warmup:
                sync()
                self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            stats = pl_module.last_moe_stats
            if batch_idx >= warmup and stats:
                self.dropped.append([s["fraction_dropped"] for s in stats])
            if batch_idx == len(batches) - 1:
                sync()
                self.end = time.perf_counter()

    clock = Clock()
    clock.dropped = []
    module = LMModule(model, OptimConfig(warmup_steps=0, schedule="constant"), active_params=1)
    trainer = pl.Trainer(accelerator=device.type, devices=[device.index or 0] if device.type == "cuda" else 1,
                         max_steps=len(batches), precision="bf16-mixed" if bf16 else "32",
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, gradient_clip_val=1.0, num_sanity_val_steps=0,
                         limit_val_batches=0, callbacks=[clock])
    cpu_batches = [(x.cpu(), y.cpu()) for x, y in batches]  # Lightning moves each batch, as in a real run
    trainer.fit(module, train_dataloaders=DataLoader(cpu_batches, batch_size=None, shuffle=False))
    n = len(batches) - warmup
    per_step = [sum(float(f) for f in step) / len(step) for step in clock.dropped]
    dropped = sum(per_step) / len(per_step) if per_step else None
    return n * batches[0][0].numel() / (clock.end - clock.start), dropped


def training_benchmark(steps: int = 12, warmup: int = 20, batch: int = 16, seq: int = 256, vocab: int = 65,
                       progress: Callable[[str], None] | None = None) -> dict:
    """tokens/s: dense tiny LM in a plain AdamW loop vs moe-bench's Lightning step, and the
    FLOP-matched switch (E=8, dropless) in the Lightning step; fp32 and bf16 autocast.

    ``warmup`` untimed steps first: under bf16, oneDNN builds a matmul kernel the first time it
    sees a shape, and the expert matmuls' shapes follow the routing (bucketed, see
    ``bench/models/experts.py``); a training run reaches that steady state within its first
    few dozen steps, so a timing that includes them would describe no real run."""
    import logging
    import warnings

    from bench.flops import model_cost
    from bench.models import build_model, model_config

    apply_cpu_settings()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    text = _text_batches(batch, seq, steps + warmup)
    source = "tinyshakespeare-char" if text else "random tokens"
    batches, vocab = text if text else (_synthetic_batches(vocab, batch, seq, steps + warmup), vocab)
    rows = []
    for bf16 in (False, True):
        for impl, family, runner in (("plain loop", "dense", _plain_loop_tokens_per_sec),
                                     ("moe-bench", "dense", lightning_tokens_per_sec),
                                     ("moe-bench", "switch", lightning_tokens_per_sec)):
            if progress:
                progress(f"{impl} {family} {'bf16' if bf16 else 'fp32'}")
            torch.manual_seed(0)
            # Switch runs dropless here: in its first steps a router sends most tokens to one or
            # two experts (hidden states share a large common direction at init), and with
            # capacity 1.25 most would be dropped, making a timed step look cheap. Dropless
            # computes every token, i.e. the full FLOP-matched cost of a load-balanced run.
            over = {"capacity_factor": None} if family == "switch" else None
            cfg = model_config(family, "tiny", over, vocab_size=vocab, max_seq_len=seq)
            tps, dropped = runner(build_model(cfg, "lm"), batches, bf16, warmup)
            cost = model_cost(cfg, seq)
            rows.append(dict(precision="bf16" if bf16 else "fp32", impl=impl, family=family,
                             tokens_per_sec=round(tps), achieved_gflops=round(tps * cost.train_flops_per_token / 1e9, 1),
                             fraction_dropped=None if dropped is None else round(dropped, 3)))
    for r in rows:
        plain = next(x for x in rows if x["precision"] == r["precision"] and x["impl"] == "plain loop")
        dense = next(x for x in rows if x["precision"] == r["precision"] and x["impl"] == "moe-bench" and x["family"] == "dense")
        r["vs_plain_dense"] = round(r["tokens_per_sec"] / plain["tokens_per_sec"], 2)
        r["vs_moe_bench_dense"] = round(r["tokens_per_sec"] / dense["tokens_per_sec"], 2)
    return dict(batch=batch, seq_len=seq, vocab=vocab, steps=steps, warmup=warmup, data=source, rows=rows)


def format_training_table(result: dict) -> str:
    lines = [f"LM training throughput (tiny preset, batch {result['batch']} x seq {result['seq_len']}, "
             f"{result['steps']} timed steps after {result['warmup']} warm-up, data: {result.get('data')})", "",
             f"{'precision':<9} {'impl':<11} {'model':<7} {'tokens/s':>9} {'GFLOP/s':>8} {'x plain':>8} {'x dense':>8} "
             f"{'dropped':>8}"]
    for r in result["rows"]:
        dropped = "" if r.get("fraction_dropped") is None else f"{100 * r['fraction_dropped']:.1f}%"
        lines.append(f"{r['precision']:<9} {r['impl']:<11} {r['family']:<7} {r['tokens_per_sec']:>9} "
                     f"{r['achieved_gflops']:>8} {r['vs_plain_dense']:>8} {r['vs_moe_bench_dense']:>8} {dropped:>8}")
    return "\n".join(lines)


def decoding_benchmark(batch: int = 64, src_len: int = 24, max_len: int = 40, vocab: int = 8000,
                       beam_size: int = 4, progress: Callable[[str], None] | None = None) -> dict:
    """Sentences/s of greedy and beam decoding for the tiny translation transformers, with the
    key/value cache and re-running the decoder over the prefix (what decoding did before it).

    Random weights never emit EOS, so every sentence decodes exactly ``max_len`` tokens: a fixed
    workload (real outputs stop earlier). Evaluation capacity is dropless so that both paths
    compute the same tokens."""
    from bench.decoding import beam_search, greedy_decode
    from bench.models import build_model, model_config

    g = torch.Generator().manual_seed(0)
    src = torch.randint(3, vocab, (batch, src_len), generator=g)
    rows = []
    for family in ("dense", "switch"):
        over = {"eval_capacity_factor": None} if family == "switch" else None
        torch.manual_seed(0)
        model = build_model(model_config(family, "tiny", over, vocab_size=vocab, max_seq_len=max(128, max_len + 1)),
                            "translation").eval()
        for search in ("greedy", f"beam {beam_size}"):
            n = batch if search == "greedy" else max(batch // beam_size, 1)
            times = {}
            for kv_cache in (True, False):
                if progress:
                    progress(f"{family} {search} decoding, {'KV cache' if kv_cache else 'full prefix'}")
                start = time.perf_counter()
                if search == "greedy":
                    out = greedy_decode(model, src[:n], None, 1, 2, max_len, kv_cache=kv_cache)
                else:
                    out = beam_search(model, src[:n], None, 1, 2, max_len, beam_size=beam_size, kv_cache=kv_cache)
                times[kv_cache] = time.perf_counter() - start
                if kv_cache:
                    cached_out = out
                elif out != cached_out:  # the two paths must decode the same tokens
                    raise RuntimeError(f"{family} {search}: KV-cache and full-prefix decoding disagree")
            rows.append(dict(family=family, search=search, sentences=n, tokens_each=max_len,
                             cached_seconds=times[True], full_prefix_seconds=times[False],
                             cached_sentences_per_sec=round(n / times[True], 1),
                             full_prefix_sentences_per_sec=round(n / times[False], 1),
                             speedup=round(times[False] / times[True], 2)))
    return dict(batch=batch, src_len=src_len, max_len=max_len, vocab=vocab, rows=rows)


def format_decoding_table(result: dict) -> str:
    lines = [f"Translation decoding (tiny preset, random weights, {result['max_len']} tokens per sentence, "
             f"source length {result['src_len']}, vocab {result['vocab']})", "",
             f"{'model':<7} {'search':<8} {'sentences':>9} {'KV cache sent/s':>16} {'full prefix sent/s':>19} "
             f"{'speed-up':>9}"]
    for r in result["rows"]:
        lines.append(f"{r['family']:<7} {r['search']:<8} {r['sentences']:>9} {r['cached_sentences_per_sec']:>16} "
                     f"{r['full_prefix_sentences_per_sec']:>19} {r['speedup']:>8}x")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# evaluation memory: the output layer's cross-entropy with full logits vs in row chunks

def _full_logits_loss(out, y: torch.Tensor) -> torch.Tensor:
    """The LM loss as moe-bench computed it before chunking: B x T x vocab fp32 logits at once."""
    import torch.nn.functional as F

    logits = out.logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


def _chunked_loss(out, y: torch.Tensor) -> torch.Tensor:
    from bench.train.loss import output_cross_entropy

    return output_cross_entropy(out.hidden, out.head, y)


EVAL_LOSSES = {"full logits": _full_logits_loss, "chunked": _chunked_loss}


def _max_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def memory_worker(spec: dict) -> dict:
    """One measurement, run in a fresh process (``python -m bench.perf SPEC``) so that its peak
    resident memory is its own: a synthetic dense LM scores ``spec["batches"]`` batches without
    gradients (evaluation) or takes training steps (forward + backward), with one loss ``impl``.
    Returns the mean loss, the seconds, and the peak RSS above what model and data held before."""
    from bench.models import build_model, model_config

    apply_cpu_settings()
    torch.manual_seed(0)
    cfg = model_config("dense", "tiny", {"d_model": spec["d_model"], "n_layers": spec["n_layers"]},
                       vocab_size=spec["vocab"], max_seq_len=spec["seq"])
    model = build_model(cfg, "lm")
    batches = _synthetic_batches(spec["vocab"], spec["batch"], spec["seq"], spec["batches"])
    train = spec["mode"] == "train"
    model.train(train)
    loss_fn = EVAL_LOSSES[spec["impl"]]
    loss_fn(model(batches[0][0][:1, :8]), batches[0][1][:1, :8]).backward()  # warm-up: imports, first-call costs
    model.zero_grad(set_to_none=False)
    before = _max_rss_mib()
    losses = []
    start = time.perf_counter()
    for x, y in batches:
        with torch.set_grad_enabled(train):
            loss = loss_fn(model(x), y)
        if train:
            loss.backward()
            model.zero_grad(set_to_none=False)  # gradient buffers stay, as in a training loop
        losses.append(float(loss))
    seconds = time.perf_counter() - start
    return dict(loss=sum(losses) / len(losses), seconds=seconds, peak_rss_mib=_max_rss_mib(),
                rise_mib=_max_rss_mib() - before)


def _measure_in_subprocess(spec: dict) -> dict:
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "bench.perf", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement {spec} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def evaluation_benchmark(vocab: int = 49370, batch: int = 64, seq: int = 256, batches: int = 1,
                         train_batch: int = 16, train_steps: int = 2, d_model: int = 128, n_layers: int = 2,
                         progress: Callable[[str], None] | None = None) -> dict:
    """Peak memory and time of a large-vocabulary LM's loss, full logits vs chunked.

    Evaluation: ``batches`` batches of ``batch`` x ``seq`` tokens without gradients (64 x 256 is
    the default eval batch, and 49,370 the Brown corpus's word vocabulary in issue 17); training:
    ``train_steps`` forward + backward steps of ``train_batch`` x ``seq``. Each row runs in its own
    process and reports its peak resident memory (``getrusage`` max RSS) above what the model and
    data held before the first batch; the two losses of a mode must agree."""
    from bench.train.loss import chunk_rows

    rows = []
    for mode, n_batch, n in (("evaluation", batch, batches), ("training", train_batch, train_steps)):
        for impl in EVAL_LOSSES:
            if progress:
                progress(f"{mode}, {impl}")
            spec = dict(mode="train" if mode == "training" else "eval", impl=impl, vocab=vocab, batch=n_batch,
                        seq=seq, batches=n, d_model=d_model, n_layers=n_layers)
            r = _measure_in_subprocess(spec)
            rows.append(dict(mode=mode, impl=impl, batch=n_batch, batches=n, loss=r["loss"], seconds=r["seconds"],
                             peak_rss_mib=round(r["peak_rss_mib"]), rise_mib=round(r["rise_mib"]),
                             logits_mib=round(n_batch * seq * vocab * 4 / 2**20)))
        full, chunked = rows[-2], rows[-1]
        if abs(full["loss"] - chunked["loss"]) > 1e-4 * abs(full["loss"]):
            raise RuntimeError(f"{mode}: full-logits loss {full['loss']} and chunked loss {chunked['loss']} disagree")
        chunked["vs_full_seconds"] = round(chunked["seconds"] / full["seconds"], 2)
        chunked["vs_full_rise"] = round(chunked["rise_mib"] / max(full["rise_mib"], 1), 3)
    return dict(vocab=vocab, seq_len=seq, d_model=d_model, n_layers=n_layers, threads=torch.get_num_threads(),
                chunk_rows=chunk_rows(vocab), rows=rows)


def format_evaluation_table(result: dict) -> str:
    lines = [f"LM loss with a {result['vocab']:,}-token vocabulary (dense, d_model {result['d_model']}, "
             f"{result['n_layers']} layers, seq {result['seq_len']}, {result['threads']} threads): full fp32 logits "
             f"vs chunks of {result['chunk_rows']} rows; peak RSS above the model and data, one process per row", "",
             f"{'mode':<10} {'impl':<11} {'batches':>9} {'logits MiB':>11} {'peak rise MiB':>14} {'seconds':>8} "
             f"{'x full time':>11}"]
    for r in result["rows"]:
        ratio = r.get("vs_full_seconds", "")
        lines.append(f"{r['mode']:<10} {r['impl']:<11} {r['batches']:>3} x {r['batch']:<3} {r['logits_mib']:>11} "
                     f"{r['rise_mib']:>14} {r['seconds']:>8.2f} {ratio:>11}")
    return "\n".join(lines)


if __name__ == "__main__":  # the memory worker: python -m bench.perf SPEC_JSON
    import json
    import sys

    print(json.dumps(memory_worker(json.loads(sys.argv[1]))))
