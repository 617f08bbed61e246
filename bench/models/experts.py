"""Grouped expert FFN over token rows already sorted by expert: one autograd node for all experts.

Equivalent to ``for e: y_e = act(x_e @ w1[e]) @ w2[e]`` with autograd, but
- writes each expert's matmul straight into preallocated output and gradient buffers
  (``torch.mm(..., out=...)``), so the backward never stacks E separate weight gradients, and
- keeps one graph node instead of ~6 per expert, which matters at E = 128 on a CPU.
- runs the activation and its gradient on each expert's block right after the matmul that made
  it, while the block is in cache.
This is what a grouped GEMM does on GPUs; on CPUs MKL's large single matmuls make the per-expert
loop over contiguous row blocks the fastest exact (no padding) option — see ``moe-bench perf``.

Shape bucketing (bf16 on CPU): oneDNN builds (JIT-compiles) a kernel for every new matrix shape,
and an expert's row count changes every step. Each expert's block is therefore cut into a multiple
of ``ROW_GRANULE`` rows plus a remainder below it, so only ~A/64 + 64 distinct shapes ever occur
and every one is cached after its first use (no padding, no extra FLOPs, same result). fp32
matmuls use MKL, which has no per-shape cost, and are not cut. Measurements and the alternatives
tried: ``docs/performance.md``.
"""
from __future__ import annotations

import torch
from torch import Tensor

ROW_GRANULE = 64


def _pieces(counts: list[int], granule: int):
    """(expert, start, end, first piece of this expert) over row blocks sorted by expert.

    ``granule`` > 0 cuts each expert's block into whole granules + a remainder (see above)."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            bulk = n - n % granule if granule else n
            if 0 < bulk < n:
                yield e, start, start + bulk, True
                yield e, start + bulk, start + n, False
            else:
                yield e, start, start + n, True
        start += n


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype matmuls on ``x`` run in: autocast's when it is on, else x's own."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def row_granule(dtype: torch.dtype, device: torch.device) -> int:
    """Row bucketing for oneDNN-backed (reduced-precision CPU) matmuls; 0 = none needed."""
    return ROW_GRANULE if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) else 0


class GroupedExpertFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, w2: Tensor, counts: list[int], activation: str,
                granule: int) -> Tensor:
        A, f = x.shape[0], w1.shape[-1]
        pieces = list(_pieces(counts, granule))
        h = x.new_empty(A, f)
        a = h if activation == "relu" else x.new_empty(A, f)  # relu overwrites h: its gradient needs only a > 0
        y = x.new_empty(A, w2.shape[-1])
        for e, s, t, _ in pieces:  # each block goes through both layers while it is in cache
            torch.mm(x[s:t], w1[e], out=h[s:t])  # (n_e, d) @ (d, f)
            if activation == "relu":
                h[s:t].relu_()
            else:
                torch.ops.aten.gelu.out(h[s:t], out=a[s:t])
            torch.mm(a[s:t], w2[e], out=y[s:t])  # (n_e, f) @ (f, d)
        ctx.save_for_backward(x, w1, w2, a, None if activation == "relu" else h)
        ctx.pieces, ctx.activation = pieces, activation
        ctx.idle_experts = [e for e, n in enumerate(counts) if n == 0]
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, w1, w2, a, pre = ctx.saved_tensors
        relu = ctx.activation == "relu"
        grad_y = grad_y.contiguous()
        grad_w1, grad_w2, grad_h, grad_x = (torch.empty_like(t) for t in (w1, w2, a, x))
        if ctx.idle_experts:  # their weight gradients are zero; every other one is written below
            grad_w1[ctx.idle_experts] = 0  # (zeroing only these, not all E x d x f, saves a memset)
            grad_w2[ctx.idle_experts] = 0
        for e, s, t, first in ctx.pieces:
            gy, gh = grad_y[s:t], grad_h[s:t]
            if first:
                torch.mm(a[s:t].t(), gy, out=grad_w2[e])
            else:
                grad_w2[e].addmm_(a[s:t].t(), gy)
            torch.mm(gy, w2[e].t(), out=gh)  # gradient w.r.t. the activation, then through it,
            if relu:  # in place while the block is in cache
                torch.ops.aten.threshold_backward.grad_input(gh, a[s:t], 0, grad_input=gh)
            else:
                torch.ops.aten.gelu_backward.grad_input(gh, pre[s:t], grad_input=gh)
            if first:
                torch.mm(x[s:t].t(), gh, out=grad_w1[e])
            else:
                grad_w1[e].addmm_(x[s:t].t(), gh)
            torch.mm(gh, w1[e].t(), out=grad_x[s:t])
        return grad_x, grad_w1, grad_w2, None, None, None


def grouped_expert_ffn(x: Tensor, w1: Tensor, w2: Tensor, counts: list[int], activation: str,
                       granule: int | None = None) -> Tensor:
    """x: (A, d) rows sorted by expert, counts[e] rows for expert e; w1 (E, d, f), w2 (E, f, d).

    ``granule``: row bucketing (None = ``row_granule`` of the compute dtype; 0 = off)."""
    dtype = compute_dtype(x)  # custom Functions are not autocast: cast here
    x, w1, w2 = x.to(dtype), w1.to(dtype), w2.to(dtype)
    if granule is None:
        granule = row_granule(dtype, x.device)
    return GroupedExpertFFN.apply(x.contiguous(), w1, w2, counts, activation, granule)


def has_grouped_mm() -> bool:
    """torch provides a grouped GEMM (``torch._grouped_mm``; CUDA kernels on sm90+, a CPU fallback)."""
    return hasattr(torch, "_grouped_mm")


def prefers_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    """Where ``auto`` picks the grouped GEMM: bf16 on an NVIDIA GPU of compute capability >= 9.0
    (Hopper: H100/H200), the case its CUDA kernel is written for. On CPUs the per-expert loop
    above stays faster (see docs/performance.md)."""
    return (has_grouped_mm() and device.type == "cuda" and dtype == torch.bfloat16
            and torch.cuda.get_device_capability(device)[0] >= 9)


def grouped_mm_expert_ffn(x: Tensor, w1: Tensor, w2: Tensor, counts: list[int] | Tensor, act) -> Tensor:
    """The same FFN with torch's grouped GEMM: rows sorted by expert, ``offs`` the end row of each
    expert's block (an expert without rows has an empty block). Autograd through torch's op.
    ``counts`` may stay on the device (a tensor): nothing is read back to the host."""
    dtype = compute_dtype(x)
    counts = counts if isinstance(counts, Tensor) else torch.tensor(counts, device=x.device)
    offs = counts.cumsum(0).to(torch.int32)
    h = torch._grouped_mm(x.to(dtype).contiguous(), w1.to(dtype), offs=offs)
    return torch._grouped_mm(act(h), w2.to(dtype), offs=offs)
