"""The output layer's cross-entropy in row chunks equals the full-logits loss, with its gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.models import build_model
from bench.train.config import OptimConfig
from bench.train.loss import LOGITS_CHUNK_BYTES, chunk_rows, output_cross_entropy
from bench.train.module import LMModule, TranslationModule
from tests.conftest import VOCAB

B, T = 3, 10


def _batch(task: str):
    g = torch.Generator().manual_seed(0)
    if task == "lm":
        ids = torch.randint(0, VOCAB, (B, T + 1), generator=g)
        return ids[:, :-1], ids[:, 1:]
    tgt_mask = torch.ones(B, T, dtype=torch.bool)
    tgt_mask[1, 6:] = False  # a shorter sentence: its padding is ignored by the loss
    src = torch.randint(3, VOCAB, (B, 7), generator=g)
    return dict(src=src, src_mask=torch.ones_like(src, dtype=torch.bool),
                tgt_in=torch.randint(3, VOCAB, (B, T), generator=g),
                tgt_out=torch.randint(3, VOCAB, (B, T), generator=g), tgt_mask=tgt_mask)


def _full_logits_loss(out, targets):
    """The loss as it was: B x T x vocab fp32 logits, then cross-entropy."""
    return F.cross_entropy(out.logits.reshape(-1, VOCAB).float(), targets.reshape(-1), ignore_index=-100)


@pytest.mark.parametrize("tied", (True, False))
@pytest.mark.parametrize("family,task", [("dense", "lm"), ("switch", "lm"), ("moe-rnn", "lm"),
                                         ("dense", "translation"), ("moe-rnn", "translation")])
def test_chunked_loss_and_gradients_equal_the_full_logits_ones(family, task, tied, tiny_cfg):
    model = build_model(tiny_cfg(family, tie_embeddings=tied), task).train()
    module = (LMModule if task == "lm" else TranslationModule)(model, OptimConfig(), 1)
    out, targets = module.forward_batch(_batch(task))  # one forward: noisy routers draw their noise once
    if task == "translation":
        assert (targets == -100).sum() == 4
    params = [p for p in model.parameters() if p.requires_grad]
    expected = _full_logits_loss(out, targets)
    expected_grads = torch.autograd.grad(expected, params, retain_graph=True, allow_unused=True)
    head_grad = next(e for p, e in zip(params, expected_grads) if p is model.head.weight)
    assert head_grad.abs().max() > 1e-3  # gradients far above the tolerance below
    for rows in (7, 13, None):  # 30 rows: 5 chunks with a partial last one, 3 chunks, one chunk (the plain loss)
        loss = output_cross_entropy(out.hidden, out.head, targets, rows=rows)
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        for p, g, e in zip(params, grads, expected_grads):
            assert (g is None) == (e is None)
            if g is not None:
                torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)  # summation order differs
        with torch.no_grad():  # evaluation: no gradients, the same number
            torch.testing.assert_close(output_cross_entropy(out.hidden, out.head, targets, rows=rows), expected,
                                       rtol=1e-6, atol=1e-6)
    tok = model.embed.tok if hasattr(model.embed, "tok") else model.embed
    assert (model.head.weight is tok.weight) == tied  # tied: the embedding gets the output layer's gradient


def test_one_chunk_is_the_plain_loss_and_small_vocabularies_stay_in_one():
    head = torch.nn.Linear(8, VOCAB, bias=False)
    h, t = torch.randn(30, 8, requires_grad=True), torch.randint(0, VOCAB, (30,))
    assert type(output_cross_entropy(h, head, t).grad_fn).__name__ == "NllLossBackward0"
    assert type(output_cross_entropy(h, head, t, rows=29).grad_fn).__name__ == "_ChunkedLinearCEBackward"
    assert chunk_rows(49370) == LOGITS_CHUNK_BYTES // (4 * 49370) == 1359
    # a 16 x 256 training batch is one chunk up to a 16k vocabulary (char, 8k BPE ...)
    assert chunk_rows(65) >= chunk_rows(8000) >= chunk_rows(16384) == 4096 > chunk_rows(16385)


def test_ignored_positions_and_autocast():
    head = torch.nn.Linear(8, VOCAB, bias=False)
    h = torch.randn(2, 12, 8, requires_grad=True)
    t = torch.randint(0, VOCAB, (2, 12))
    t[:, 9:] = -100
    expected = F.cross_entropy(head(h).reshape(-1, VOCAB), t.reshape(-1))
    loss = output_cross_entropy(h, head, t, rows=5)
    torch.testing.assert_close(loss, expected)
    (g,) = torch.autograd.grad(loss, h)
    assert (g[:, 9:] == 0).all() and (g[:, :9] != 0).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 matmuls, fp32 softmax: as head(h).float()
        full = F.cross_entropy(head(h).float().reshape(-1, VOCAB), t.reshape(-1))
        chunked = output_cross_entropy(h, head, t, rows=5)
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)


def test_bias_is_refused():
    with pytest.raises(ValueError, match="bias-free output layer"):
        output_cross_entropy(torch.randn(4, 8), torch.nn.Linear(8, 5), torch.zeros(4, dtype=torch.long))
