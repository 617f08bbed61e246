"""Sparse upcycling (Komatsuzaki et al. 2022): experts copied from the dense FFN, the rest copied, router fresh."""
from __future__ import annotations

import pytest
import torch

from bench.config import ConfigError
from bench.models import build_model, model_config
from bench.models.moe import MoELayer
from bench.models.upcycle import upcycle, upcycle_problems

SHAPES = dict(d_model=32, n_heads=2, d_ff=64, n_layers=2, num_experts=4, dropout=0.0)
DROPLESS = dict(capacity_factor=None, eval_capacity_factor=None)


def _pair(family, task="lm", **over):
    """A trained-looking dense model and a fresh sparse one, upcycled from it."""
    dense_cfg = model_config("dense", "tiny", SHAPES, vocab_size=50, max_seq_len=32)
    torch.manual_seed(0)
    dense = build_model(dense_cfg, task).eval()
    cfg = model_config(family, "tiny", {**SHAPES, **over}, vocab_size=50, max_seq_len=32)
    torch.manual_seed(1)
    sparse = build_model(cfg, task).eval()
    fresh = {k: v.clone() for k, v in sparse.state_dict().items()}
    upcycle(sparse, dense.state_dict(), dense_cfg)
    return dense, sparse, fresh


def test_every_expert_copies_the_dense_ffn_the_router_stays_fresh_the_rest_is_copied():
    dense, sparse, fresh = _pair("switch")  # switch: experts as wide as the dense FFN (64)
    d = dense.state_dict()
    moe = sparse.blocks[1].ffn
    assert isinstance(moe, MoELayer) and moe.cfg.num_experts == 4
    for e in range(4):
        assert torch.equal(moe.w1[e], d["blocks.1.ffn.w1.weight"].t())  # (d_model, d_ff)
        assert torch.equal(moe.w2[e], d["blocks.1.ffn.w2.weight"].t())  # (d_ff, d_model)
    assert torch.equal(moe.router.weight, fresh["blocks.1.ffn.router.weight"])
    copied = [k for k in sparse.state_dict() if not k.startswith("blocks.1.ffn.")]
    assert "blocks.0.ffn.w1.weight" in copied and "embed.tok.weight" in copied
    assert all(torch.equal(sparse.state_dict()[k], d[k]) for k in copied)


def test_top1_switch_layer_gives_gate_times_the_dense_ffn():
    dense, sparse, _ = _pair("switch", **DROPLESS)
    x = torch.randn(20, 32)
    y, _ = sparse.blocks[1].ffn(x)
    gate = sparse.blocks[1].ffn.router(x).gates  # (20, 1): the top-1 softmax probability
    torch.testing.assert_close(y, gate * dense.blocks[1].ffn(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("task", ["lm", "translation"])
def test_renormalised_top2_dropless_model_is_the_dense_model(task):
    # gates sum to 1 over two identical experts: y = (g1 + g2) FFN(x) = FFN(x), at every MoE layer
    dense, sparse, _ = _pair("moe", task, d_expert=64, **DROPLESS)
    ids = torch.randint(0, 50, (3, 16))
    inputs = (ids,) if task == "lm" else (torch.randint(0, 50, (3, 12)), ids)
    torch.testing.assert_close(sparse(*inputs).logits, dense(*inputs).logits, rtol=0, atol=1e-5)


def test_fine_grained_experts_hold_slices_of_the_dense_ffn():
    # granularity 2: 8 experts of width 32; expert j holds hidden units 32 (j mod 2) .. 32 (j mod 2) + 31
    dense, sparse, _ = _pair("switch", d_expert=64, granularity=2, shared_experts=1, **DROPLESS)
    w1, w2 = dense.state_dict()["blocks.1.ffn.w1.weight"].t(), dense.state_dict()["blocks.1.ffn.w2.weight"].t()
    moe = sparse.blocks[1].ffn
    assert moe.w1.shape == (8, 32, 32)
    for e in range(8):
        g = e % 2
        assert torch.equal(moe.w1[e], w1[:, 32 * g:32 * (g + 1)]) and torch.equal(moe.w2[e], w2[32 * g:32 * (g + 1)])
    assert torch.equal(moe.shared.w1.weight, w1[:, :32].t())  # shared expert 0: slice 0
    x = torch.randn(5, 32)
    slices = sum(torch.relu(x @ moe.w1[g]) @ moe.w2[g] for g in range(2))  # the two slices make the FFN
    torch.testing.assert_close(slices, dense.blocks[1].ffn(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("family, over, message", [
    ("switch", dict(d_model=64), "d_model differs: the dense run has d_model=32, this model d_model=64; set "
                                 "d_model=32"),
    ("switch", dict(n_layers=4), "n_layers differs: the dense run has n_layers=2, this model n_layers=4"),
    ("moe", {}, "expert width 32 x granularity 1 = 32 differs from the dense FFN's d_ff=64"),
    ("moe", dict(granularity=2), "expert width 16 x granularity 2 = 32 differs from the dense FFN's d_ff=64: each "
                                 "expert copies (a 1/granularity slice of) the dense FFN; set d_expert=64 (split "
                                 "into 2 slices of 32)"),
    ("moe-rnn", dict(d_model=32), "upcycling initialises switch or moe Transformers"),
])
def test_mismatches_are_refused_naming_them(family, over, message):
    dense_cfg = model_config("dense", "tiny", SHAPES, vocab_size=50, max_seq_len=32)
    shapes = SHAPES if family != "moe-rnn" else {}
    cfg = model_config(family, "tiny", {**shapes, **over}, vocab_size=50, max_seq_len=32)
    assert any(message in p for p in upcycle_problems(dense_cfg, cfg)), upcycle_problems(dense_cfg, cfg)
    if family != "moe-rnn":
        with pytest.raises(ConfigError, match="invalid upcycling"):
            upcycle(build_model(cfg), build_model(dense_cfg).state_dict(), dense_cfg)


def test_the_source_must_be_dense():
    switch = model_config("switch", "tiny", SHAPES, vocab_size=50, max_seq_len=32)
    assert "the source is a switch model: upcycling starts from a dense one" in upcycle_problems(switch, switch)
