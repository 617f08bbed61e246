"""Every model family, LM and translation: shapes, finite loss, gradients, masks, determinism."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.models import FAMILIES, build_model
from bench.models.moe import FeedForward, MoELayer

B, T, S = 2, 8, 10
TASKS = ("lm", "translation")


def make_batch(task: str, vocab: int):
    if task == "lm":
        return dict(idx=torch.randint(0, vocab, (B, T)))
    src_mask = torch.ones(B, S, dtype=torch.bool)
    src_mask[1, 7:] = False
    tgt_mask = torch.ones(B, T, dtype=torch.bool)
    tgt_mask[1, 5:] = False
    src = torch.randint(1, vocab, (B, S)).masked_fill(~src_mask, 0)
    tgt_in = torch.randint(1, vocab, (B, T)).masked_fill(~tgt_mask, 0)
    return dict(src=src, tgt_in=tgt_in, src_mask=src_mask, tgt_mask=tgt_mask)


def forward(model, batch):
    if "idx" in batch:
        return model(batch["idx"])
    return model(batch["src"], batch["tgt_in"], batch["src_mask"], batch["tgt_mask"])


def lm_loss(out, batch):
    V = out.logits.shape[-1]
    if "idx" in batch:
        targets = batch["idx"].roll(-1, dims=1)
        return F.cross_entropy(out.logits.reshape(-1, V), targets.reshape(-1))
    targets = batch["tgt_in"].roll(-1, dims=1).masked_fill(~batch["tgt_mask"], -100)
    return F.cross_entropy(out.logits.reshape(-1, V), targets.reshape(-1), ignore_index=-100)


def n_moe_layers(model) -> int:
    return sum(isinstance(m, MoELayer) for m in model.modules())


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_backward(family, task, tiny_cfg):
    cfg = tiny_cfg(family)
    model = build_model(cfg, task).train()
    batch = make_batch(task, cfg.vocab_size)
    out = forward(model, batch)
    assert out.logits.shape == (B, T, cfg.vocab_size) == (B, T, 50)
    assert torch.isfinite(out.logits).all()
    loss = lm_loss(out, batch) + out.aux_loss
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("family", FAMILIES)
def test_moe_layers_and_aux_outputs(family, task, tiny_cfg):
    cfg = tiny_cfg(family)
    model = build_model(cfg, task).train()
    out = forward(model, make_batch(task, cfg.vocab_size))
    stacks = 2 if task == "translation" else 1
    # transformers: n_layers = 2, moe_every = 2 -> block 1 is MoE; RNNs: one mixture per stack
    expected = {"dense": 0, "lstm": 0}.get(family, stacks)
    assert n_moe_layers(model) == expected
    assert len(out.moe_stats) == expected
    if expected == 0:
        assert out.aux_loss.item() == 0.0
        assert not out.aux_loss.requires_grad
        assert any(isinstance(m, FeedForward) for m in model.modules())
    else:
        assert out.aux_loss.item() > 0 and out.aux_loss.requires_grad


@pytest.mark.parametrize("family", ["switch", "moe", "moe-rnn"])
def test_translation_masks_reach_moe_layers(family, tiny_cfg):
    cfg = tiny_cfg(family)
    model = build_model(cfg, "translation").eval()
    batch = make_batch("translation", cfg.vocab_size)
    out = forward(model, batch)
    encoder_stats, decoder_stats = out.moe_stats
    assert int(encoder_stats["routed_tokens"]) == int(batch["src_mask"].sum()) == 17
    assert int(decoder_stats["routed_tokens"]) == int(batch["tgt_mask"].sum()) == 13


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("family", FAMILIES)
def test_seeded_builds_are_identical(family, task, tiny_cfg):
    cfg = tiny_cfg(family)
    batch = make_batch(task, cfg.vocab_size)
    outs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        model = build_model(cfg, task)
        torch.manual_seed(99)  # same dropout / router noise in training mode
        outs.append((model.state_dict(), forward(model.train(), batch).logits))
    (sd0, y0), (sd1, y1), (sd2, y2) = outs
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    assert torch.equal(y0, y1)
    assert not torch.equal(y0, y2)  # the seed does matter


# Padding after a sentence must not change its translation: the encoder masks padded keys, the MoE
# does not route padded rows, cross-attention masks padded memory, and the LSTM decoder does not
# start from an encoder state that ran over the padding.
PAD_FAMILIES = FAMILIES


@pytest.mark.parametrize("family", PAD_FAMILIES)
def test_translation_is_invariant_to_source_padding(family, tiny_cfg):
    cfg = tiny_cfg(family)
    V = cfg.vocab_size
    model = build_model(cfg, "translation").eval()
    with torch.no_grad():  # make embeddings large enough that any leak is far above float noise
        for m in model.modules():
            if isinstance(m, torch.nn.Embedding):
                m.weight.mul_(50.0)
    src = torch.randint(1, V, (1, 6))
    tgt_in = torch.randint(1, V, (1, 5))
    short = model(src, tgt_in, torch.ones(1, 6, dtype=torch.bool), torch.ones(1, 5, dtype=torch.bool))
    padded_src = torch.cat([src, torch.randint(1, V, (1, 4))], dim=1)  # 4 padding positions
    src_mask = torch.tensor([[True] * 6 + [False] * 4])
    long = model(padded_src, tgt_in, src_mask, torch.ones(1, 5, dtype=torch.bool))
    torch.testing.assert_close(long.logits, short.logits, rtol=1e-4, atol=1e-4)


def test_sequence_longer_than_max_seq_len_raises(tiny_cfg):
    model = build_model(tiny_cfg("dense"), "lm")
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_unknown_task_type_raises(tiny_cfg):
    with pytest.raises(ValueError, match="'classification'"):
        build_model(tiny_cfg("dense"), "classification")


def test_moe_every_places_moe_blocks(tiny_cfg):
    cfg = tiny_cfg("switch", n_layers=4, moe_every=2)
    model = build_model(cfg, "lm")
    kinds = [type(b.ffn).__name__ for b in model.blocks]
    assert kinds == ["FeedForward", "MoELayer", "FeedForward", "MoELayer"]
    cfg = tiny_cfg("moe", n_layers=3, moe_every=1)
    assert all(isinstance(b.ffn, MoELayer) for b in build_model(cfg, "lm").blocks)


def test_short_cpu_attention_runs_in_fp32_under_bf16_autocast():
    """Short sequences attend in fp32 on CPU (the bf16 kernel is several times slower there):
    same result as fp32 attention, bf16 out under autocast, gradients reach q, k and v."""
    import torch.nn.functional as F

    from bench.models.transformer import CPU_FP32_ATTENTION_MAX_LEN, attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 7, 8, generator=g).requires_grad_() for _ in range(3))
    mask = torch.ones(3, 1, 1, 7, dtype=torch.bool)
    mask[0, ..., 5:] = False
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, False, 0.0)
        long = attention(*(t.bfloat16().repeat(1, 1, 20, 1) for t in (q, k, v)), None, True, 0.0)
    assert y.dtype == torch.bfloat16 and long.dtype == torch.bfloat16 and 7 * 20 > CPU_FP32_ATTENTION_MAX_LEN
    torch.testing.assert_close(y.float(), ref, atol=2e-2, rtol=2e-2)  # bf16 inputs, fp32 math
    y.float().sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v))
    torch.testing.assert_close(attention(q, k, v, mask, False, 0.0), ref)  # fp32 stays fp32, unchanged
