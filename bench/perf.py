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
- ``memory floor``: 3 x expert-weight bytes (read forward, read backward, write gradients)
  divided by the copy bandwidth measured now.
Times are the best of ``repeats`` interleaved rounds (shared machines drift; compare ratios).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from bench.models.config import MoEConfig
from bench.models.experts import grouped_expert_ffn
from bench.models.moe import FeedForward, MoELayer
from bench.runtime import tune_cpu_allocator

D_MODEL, D_FF, CAPACITY_FACTOR, SEQ_LEN = 256, 1024, 1.25, 256


@dataclass
class LayerRow:
    tokens: int
    num_experts: int
    impl: str
    ms: float
    vs_dense: float
    fraction_dropped: float | None = None


def best_time_ms(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` wall time of each function, rounds interleaved so drift hits all."""
    for fn in fns.values():  # warm-up: allocator, MKL packing, autograd graph caches
        fn()
    best = {name: math.inf for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], (time.perf_counter() - start) * 1e3)
    return best


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
    tune_cpu_allocator()
    torch.manual_seed(0)
    bandwidth = copy_bandwidth_gbs()
    rows: list[LayerRow] = []
    bounds = []
    peer_available = True
    for T in tokens_list:
        x = torch.randn(T, D_MODEL, requires_grad=True)
        x_seq = x.detach().view(T // SEQ_LEN, SEQ_LEN, D_MODEL).requires_grad_()
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
            w1 = layers["ours"].w1.detach().clone().requires_grad_()
            w2 = layers["ours"].w2.detach().clone().requires_grad_()
            counts = [T // E] * E
            fns["matmul floor"] = _train_step(
                torch.nn.ParameterList([w1, w2]), x, lambda: grouped_expert_ffn(x, w1, w2, counts, "relu"))
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
            bounds.append(dict(tokens=T, num_experts=E, memory_floor_ms=round(3 * weight_bytes / bandwidth / 1e6, 1)))
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
    last = None
    for r in result["rows"]:
        key = (r["tokens"], r["num_experts"])
        if last is not None and key != last:
            b = bounds[last]
            lines.append(f"{'':>7} {'':>4} {'memory floor':<13} {b['memory_floor_ms']:>8.1f}")
            lines.append("")
        last = key
        dropped = "" if r["fraction_dropped"] is None else f"{100 * r['fraction_dropped']:7.1f}%"
        lines.append(f"{r['tokens']:>7} {r['num_experts']:>4} {r['impl']:<13} {r['ms']:>8.1f} "
                     f"{r['vs_dense']:>8.2f} {dropped:>8}")
    if last is not None:
        lines.append(f"{'':>7} {'':>4} {'memory floor':<13} {bounds[last]['memory_floor_ms']:>8.1f}")
    if not result["peer_available"]:
        lines.append("\n(peer skipped: pip install 'moe-bench[peer]' for HuggingFace transformers)")
    return "\n".join(lines)
