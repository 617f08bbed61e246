"""Cross-entropy of a model's output layer, computed over row chunks of its input.

``output_cross_entropy(hidden, head, targets)`` equals
``F.cross_entropy(head(hidden).float().reshape(-1, V), targets.reshape(-1), ignore_index=-100)``
(within float rounding), with its gradients, but never holds more than ``chunk_rows(V)`` rows of
logits at once: B x T x V fp32 logits are 3.2 GB for 64 x 256 tokens of a 49k-word vocabulary,
and the softmax over them (plus its copies) made evaluation memory grow with vocab x batch.

- One chunk covers everything (small vocabularies, the usual case): the plain loss, unchanged.
- Without gradients (evaluation): a loop summing each chunk's loss.
- With gradients (training): ``_ChunkedLinearCE`` computes each chunk's gradients with respect to
  the hidden states and the output weight while its logits exist (softmax - one-hot, the exact
  gradient of the mean cross-entropy) and keeps only those; backward scales them by the incoming
  gradient. The same matmuls as autograd's, so no recomputation; tied embeddings receive the
  weight gradient like any other use of the weight.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100
# Largest fp32 logits block of one chunk; a chunk's loss and gradient work peaks at about 2-3x
# this. Each chunk adds a pass over the V x C weight gradient, so chunks must keep many rows: at
# a 49k vocabulary, chunks of 1-2k rows trained the output layer as fast as unchunked or faster,
# 339 rows (a 64 MiB bound) mostly slower (docs/performance.md). A training batch of 16 x 256
# tokens stays one chunk, i.e. the plain loss, up to a 16k vocabulary.
LOGITS_CHUNK_BYTES = 256 * 2**20


def chunk_rows(vocab_size: int, budget_bytes: int | None = None) -> int:
    """Rows of logits per chunk: as many fp32 rows of ``vocab_size`` as fit ``budget_bytes``
    (default LOGITS_CHUNK_BYTES)."""
    return max(1, (budget_bytes or LOGITS_CHUNK_BYTES) // (4 * vocab_size))


def output_cross_entropy(hidden: Tensor, head: nn.Linear, targets: Tensor, ignore_index: int = IGNORE_INDEX,
                         rows: int | None = None) -> Tensor:
    """Mean cross-entropy of ``head(hidden)`` (..., V) against ``targets`` (...), positions equal to
    ``ignore_index`` left out; ``rows`` per chunk (default ``chunk_rows(V)``)."""
    if head.bias is not None:
        raise ValueError("output_cross_entropy expects a bias-free output layer (bench.models.transformer.output_head)")
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    rows = rows or chunk_rows(head.out_features)
    if h.shape[0] <= rows:
        return F.cross_entropy(head(h).float(), t, ignore_index=ignore_index)
    if torch.is_grad_enabled() and (h.requires_grad or head.weight.requires_grad):
        return _ChunkedLinearCE.apply(h, head.weight, t, rows, ignore_index)
    total, count, _, _ = _chunked(h, head.weight, t, rows, ignore_index, with_grad=False)
    return total / count


def _chunked(h: Tensor, weight: Tensor, t: Tensor, rows: int, ignore_index: int, with_grad: bool):
    """(summed loss, number of scored positions, d mean-loss / d h, d mean-loss / d weight)."""
    valid = t != ignore_index
    count = valid.sum()
    grad_h = torch.empty_like(h) if with_grad else None
    grad_w = torch.zeros_like(weight) if with_grad else None
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], rows):
        part = slice(start, start + rows)
        # One rows x V buffer per chunk, turned into log-probabilities and then gradients in place:
        # a second one per chunk fragments the heap (which bench.runtime keeps) into gigabytes.
        logp = F.linear(h[part], weight).float()  # bf16 under autocast, then fp32: as head(h).float()
        logp -= torch.logsumexp(logp, dim=-1, keepdim=True)
        total += F.nll_loss(logp, t[part], ignore_index=ignore_index, reduction="sum")
        if with_grad:
            grad_logits = _mean_ce_grad(logp, t[part], valid[part], count)
            grad_h[part] = grad_logits.mm(weight)  # autocast runs it in the compute dtype, as autograd would
            _add_matmul_(grad_w, grad_logits.t(), h[part])
            del grad_logits
        del logp
    return total, count, grad_h, grad_w


def _add_matmul_(out: Tensor, a: Tensor, b: Tensor) -> None:
    """out += a @ b: in place (no V x C temporary per chunk) unless autocast is on, whose compute
    dtype applies to out-of-place matmuls only."""
    if torch.is_autocast_enabled(a.device.type):
        out += a.mm(b)
    else:
        out.addmm_(a, b)


def _mean_ce_grad(logp: Tensor, t: Tensor, valid: Tensor, count: Tensor) -> Tensor:
    """d(mean cross-entropy) / d(logits) for one chunk, in place of ``logp``: (softmax - one-hot) / count
    on scored rows, 0 on ignored ones."""
    p = logp.exp_()
    scored = valid.nonzero().squeeze(1)
    p[scored, t[scored]] -= 1.0
    return p.mul_((valid / count.clamp(min=1)).unsqueeze(1).to(p.dtype))


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, t: Tensor, rows: int, ignore_index: int) -> Tensor:
        total, count, grad_h, grad_w = _chunked(h, weight, t, rows, ignore_index, with_grad=True)
        ctx.save_for_backward(grad_h, grad_w)
        return total / count

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), grad_w * grad_out.to(grad_w.dtype), None, None, None


__all__ = ["IGNORE_INDEX", "LOGITS_CHUNK_BYTES", "chunk_rows", "output_cross_entropy"]
