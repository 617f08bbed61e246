"""FLOP and parameter accounting: analytic counts against the built models and FlopCounterMode."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from bench.flops import measure_forward_flops, model_cost
from bench.models import FAMILIES, build_model, model_config
from bench.models.config import match_lstm_to_moe_rnn, match_sparse_to_dense
from bench.models.moe import MoELayer

TASKS = ("lm", "translation")
B, T, S = 2, 16, 12
DROPLESS = dict(capacity_factor=None, eval_capacity_factor=None)
# the sorted kernel multiplies exactly the kept assignments (padded also multiplies padding rows)
EXACT = dict(DROPLESS, dispatch="sorted")


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("family", FAMILIES)
def test_total_params_match_model(family, task, tie, tiny_cfg):
    cfg = tiny_cfg(family, tie_embeddings=tie)
    model = build_model(cfg, task)
    cost = model_cost(cfg, T, task)
    assert cost.total_params == n_params(model)
    assert cost.total_params_no_embed == cost.total_params - cost.embedding_params


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("family", FAMILIES)
def test_active_params(family, task, tiny_cfg):
    cfg = tiny_cfg(family)
    model = build_model(cfg, task)
    # independent count: drop (E - k) experts' weights (w1[e] and w2[e]) from every MoE layer
    inactive = 0
    for m in model.modules():
        if isinstance(m, MoELayer):
            per_expert = m.w1[0].numel() + m.w2[0].numel()
            inactive += (m.cfg.num_experts - m.cfg.top_k) * per_expert
    if family in ("switch", "moe", "moe-rnn"):
        assert inactive > 0
    assert model_cost(cfg, T, task).active_params == n_params(model) - inactive


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("family", FAMILIES)
def test_measured_forward_flops_match_analytic(family, task, tiny_cfg):
    # dropless + sorted kernel: every assignment is computed once, no padding rows;
    # train mode: the noisy router's noise projection runs
    extra = EXACT if family in ("switch", "moe", "moe-rnn") else {}
    cfg = tiny_cfg(family, **extra)
    model = build_model(cfg, task).train()
    if task == "lm":
        inputs = (torch.randint(0, cfg.vocab_size, (B, T)),)
        cost = model_cost(cfg, T, task)
    else:
        inputs = (torch.randint(0, cfg.vocab_size, (B, S)), torch.randint(0, cfg.vocab_size, (B, T)))
        cost = model_cost(cfg, T, task, src_len=S)
    measured = measure_forward_flops(model, *inputs)
    analytic = cost.forward_flops_per_token * B * T
    assert measured > 0
    assert measured == pytest.approx(analytic, rel=0.02)


def test_forward_flops_hand_computed_dense_lm():
    cfg = model_config("dense", "tiny", overrides=dict(d_model=32, n_heads=2, d_ff=64, n_layers=2),
                       vocab_size=50, max_seq_len=32)
    C, f, V, L, seq = 32, 64, 50, 2, 16
    # per layer: qkv + out proj 8*C*C = 8192; QK^T and AV over 16 keys 4*seq*C = 2048;
    # FFN 4*C*f = 8192 -> 18432; two layers 36864; output projection 2*C*V = 3200 -> 40064
    per_layer = 8 * C * C + 4 * seq * C + 4 * C * f
    expected = L * per_layer + 2 * C * V
    cost = model_cost(cfg, seq, "lm")
    assert cost.forward_flops_per_token == expected == 40064
    assert cost.train_flops_per_token == 3 * expected


@pytest.mark.parametrize("family", FAMILIES)
def test_train_flops_are_three_forwards(family):
    cost = model_cost(model_config(family, "tiny"), 128)
    assert cost.train_flops_per_token == 3 * cost.forward_flops_per_token
    assert cost.as_dict()["train_flops_per_token"] == 3 * cost.forward_flops_per_token


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("preset", ["tiny", "small"])
@pytest.mark.parametrize("family", ["switch", "moe"])
def test_sparse_presets_flop_matched_to_dense(family, preset, task):
    dense = model_config("dense", preset)
    sparse = model_config(family, preset)
    seq = 256
    fd = model_cost(dense, seq, task).forward_flops_per_token
    fs = model_cost(sparse, seq, task).forward_flops_per_token
    assert fs == pytest.approx(fd, rel=0.01)
    # the only difference is the router: 2 * d_model * E FLOPs per MoE layer (per stack)
    moe_layers = sum(sparse.is_moe_layer(i) for i in range(sparse.n_layers))
    stacks = 2 if task == "translation" else 1  # src_len = seq_len, so S/T = 1
    router = 2 * sparse.d_model * sparse.moe.num_experts * moe_layers * stacks
    assert fs - fd == pytest.approx(router)
    assert router > 0


@pytest.mark.parametrize("num_experts", [4, 32])
@pytest.mark.parametrize("family", ["switch", "moe"])
def test_match_sparse_to_dense(family, num_experts):
    dense = model_config("dense", "tiny", overrides=dict(d_ff=512))
    sparse = match_sparse_to_dense(dense, family, num_experts)
    assert sparse.family == family and sparse.moe.num_experts == num_experts
    assert sparse.moe.top_k == {"switch": 1, "moe": 2}[family]
    assert sparse.expert_width * sparse.moe.top_k == dense.d_ff
    fd = model_cost(dense, 128).forward_flops_per_token
    fs = model_cost(sparse, 128).forward_flops_per_token
    assert fs == pytest.approx(fd, rel=0.01)
    with pytest.raises(ValueError):
        match_sparse_to_dense(dense, "lstm", 4)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("preset", ["tiny", "small", "base"])
def test_lstm_matched_to_moe_rnn(preset, task):
    moe_rnn = model_config("moe-rnn", preset)
    lstm = match_lstm_to_moe_rnn(moe_rnn)
    assert lstm.family == "lstm" and lstm.d_model == moe_rnn.d_model and lstm.n_layers == moe_rnn.n_layers
    # noisy top-k: k*f + E, e.g. tiny: 4*256 + 16 = 1040
    assert lstm.d_ff == moe_rnn.moe.top_k * moe_rnn.expert_width + moe_rnn.moe.num_experts
    f_moe = model_cost(moe_rnn, 64, task).forward_flops_per_token
    f_lstm = model_cost(lstm, 64, task).forward_flops_per_token
    assert f_lstm == pytest.approx(f_moe, rel=0.01)
    assert model_config("lstm", preset) == lstm


def test_lstm_match_for_plain_topk_router():
    moe_rnn = model_config("moe-rnn", "tiny", overrides=dict(router="topk", num_experts=15))
    lstm = match_lstm_to_moe_rnn(moe_rnn)
    assert lstm.d_ff == 4 * 256 + 8  # one router matrix: k*f + ceil(E/2) = 1024 + ceil(7.5)
    f_moe = model_cost(moe_rnn, 64).forward_flops_per_token
    assert model_cost(lstm, 64).forward_flops_per_token == pytest.approx(f_moe, rel=0.01)


def test_executed_flops_include_capacity_padding(tiny_cfg):
    cfg = tiny_cfg("switch", capacity_factor=1.25)
    cost = model_cost(cfg, T)
    expert = 4 * cfg.d_model * cfg.expert_width
    # one MoE layer: executed experts run 1.25 slots per token instead of 1
    assert cost.executed_forward_flops_per_token - cost.forward_flops_per_token == pytest.approx(0.25 * expert)
    dropless = model_cost(dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **DROPLESS)), T)
    assert dropless.executed_forward_flops_per_token == dropless.forward_flops_per_token


@pytest.mark.parametrize("family, padded", [("switch", True), ("moe-rnn", False), ("dense", False)])
def test_cli_flops_mentions_capacity_padding_only_with_a_capacity(family, padded, capsys):
    from bench.cli import main

    assert main(["flops", "--task", "tinyshakespeare-char", "--model", family]) == 0
    out = capsys.readouterr().out
    assert ("with capacity padding" in out) == padded
    assert ("dropless" in out) == (family == "moe-rnn")


def test_cli_flops_describes_expert_choice_without_a_top_k(capsys):
    from bench.cli import main

    assert main(["flops", "--task", "multi30k-de-en", "--model", "switch", "--set", "router=expert_choice",
                 "--set", "causal_router=switch", "--set", "capacity_factor=2.0"]) == 0
    out = capsys.readouterr().out
    assert ("8 experts of width 1024, expert_choice router (each expert takes capacity factor x tokens / experts), "
            "causal stacks: switch router, top-1, capacity factor 2.0") in out
    assert "every expert computes its full capacity; token choice (causal stacks) with capacity padding" in out


@pytest.mark.parametrize("family, preset, task, want", [
    # 4 x (MoE layers a token passes) x k x d_model: out and back, forward and backward
    ("switch", "tiny", "lm", 4 * 2 * 1 * 256),  # 4 layers, every 2nd MoE, top-1
    ("moe", "tiny", "lm", 4 * 2 * 2 * 256),  # top-2
    ("moe-rnn", "tiny", "lm", 4 * 1 * 4 * 256),  # one MoE between the LSTMs, k = 4
    ("switch", "tiny", "translation", 4 * (2 * 40 / 20 + 2) * 1 * 256),  # encoder layers run by src_len/tgt_len
    ("dense", "tiny", "lm", 0),
])
def test_all_to_all_volume_per_token(family, preset, task, want):
    cfg = model_config(family, preset, vocab_size=100, max_seq_len=64)
    cost = model_cost(cfg, 20, task, src_len=40 if task == "translation" else None)
    assert cost.all_to_all_values_per_token == pytest.approx(want)
    sent = cost.all_to_all_bytes_per_step(tokens_per_rank=1000, bytes_per_value=2, expert_parallel=4)
    assert sent == pytest.approx({"volume": want * 1000 * 2, "off_rank": want * 1000 * 2 * 3 / 4})
