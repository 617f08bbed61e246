"""Shared experts (DeepSeekMoE 2024) and fine-grained experts (granularity G, Krajewski et al. 2024):
the derived shapes, the layer, and exact parameter and FLOP counts (hand-computed and FlopCounterMode)."""
from __future__ import annotations

import json

import pytest
import torch

from bench.config import ConfigError
from bench.flops import measure_forward_flops, model_cost
from bench.models import build_model, model_config
from bench.models.config import match_lstm_to_moe_rnn
from bench.models.moe import MoELayer

B, T, S = 2, 16, 12
EXACT = dict(capacity_factor=None, eval_capacity_factor=None, dispatch="sorted")  # as tests/test_flops.py
# d_model 32, 2 layers (the second one MoE), d_ff 64, vocab 50, 32 positions
SHAPES = dict(d_model=32, n_heads=2, d_ff=64, n_layers=2)


def _cfg(family, **over):
    return model_config(family, "tiny", overrides={**SHAPES, **over}, vocab_size=50, max_seq_len=32)


# ---------------------------------------------------------------------------------------------
# derived shapes: one step in model_config, recorded in the resolved config


@pytest.mark.parametrize("family, G, expected", [
    # tiny preset: 8 experts, dense d_ff 1024. switch: top-1 of width 1024; moe: top-2 of width 512
    ("switch", 1, (8, 1, 1024, "switch")),
    ("switch", 2, (16, 2, 512, "topk")),  # the default switch router becomes topk for 2 choices
    ("switch", 4, (32, 4, 256, "topk")),
    ("moe", 2, (16, 4, 256, "topk")),
    ("moe", 4, (32, 8, 128, "topk")),
])
def test_granularity_derives_experts_top_k_and_width(family, G, expected):
    cfg = model_config(family, "tiny", {"granularity": G})
    m = cfg.moe
    assert (m.num_experts, m.top_k, m.d_expert, m.router) == expected
    assert m.granularity == G  # the user's setting stays, as a record of the split
    assert m.top_k * m.d_expert == cfg.d_ff  # the experts a token visits are one dense FFN wide
    assert m.renormalize == (family == "moe")  # switch-derived gates stay softmax probabilities


def test_shared_experts_share_the_dense_width_with_the_routed_ones():
    # switch + 1 shared: 1 routed + 1 shared expert of 1024 / 2 = 512
    m = model_config("switch", "tiny", {"shared_experts": 1}).moe
    assert (m.num_experts, m.top_k, m.d_expert, m.shared_experts, m.router) == (8, 1, 512, 1, "switch")
    # DeepSeekMoE-like: 8 x 4 fine experts, top-4 routed + 4 shared: 1024 / (4 + 4) = 128
    m = model_config("switch", "tiny", {"granularity": 4, "shared_experts": 4}).moe
    assert (m.num_experts, m.top_k, m.d_expert, m.shared_experts) == (32, 4, 128, 4)


def test_explicit_d_expert_is_split_not_matched():
    m = model_config("switch", "tiny", {"d_expert": 512, "granularity": 4, "shared_experts": 1}).moe
    assert (m.num_experts, m.top_k, m.d_expert) == (32, 4, 128)  # 512 / 4; the shared expert is 128 wide too


def test_the_resolved_config_is_not_split_again():
    from bench.config import from_dict, to_dict
    from bench.models.config import ModelConfig

    cfg = model_config("moe", "tiny", {"granularity": 2})
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg  # what resume and evaluate rebuild from a record


@pytest.mark.parametrize("over, message", [
    ({"granularity": 3}, "top_k x granularity + shared_experts = 1 x 3 + 0 = 3 experts, and d_ff=1024 is not "
                         "divisible by 3"),
    ({"granularity": 2, "shared_experts": 1}, "= 1 x 2 + 1 = 3 experts, and d_ff=1024 is not divisible by 3"),
    ({"d_expert": 100, "granularity": 8}, "granularity=8 does not divide the expert width d_expert=100"),
    ({"granularity": 0}, "granularity=0 is not allowed: must be >= 1"),
    ({"shared_experts": -1}, "shared_experts=-1 is not allowed: must be >= 0"),
    ({"granularity": 2, "router": "switch"}, "top_k=2 is not allowed with router='switch'"),
])
def test_bad_splits_are_refused_naming_the_values(over, message):
    with pytest.raises(ConfigError) as e:
        model_config("switch", "tiny", over)
    assert message in str(e.value)


def test_moe_rnn_is_split_and_the_lstm_control_counts_shared_experts():
    # moe-rnn tiny: 16 experts of width 256, noisy top-4
    moe_rnn = model_config("moe-rnn", "tiny", {"granularity": 2, "shared_experts": 1})
    assert (moe_rnn.moe.num_experts, moe_rnn.moe.top_k, moe_rnn.expert_width) == (32, 8, 128)
    lstm = model_config("lstm", "tiny", {"granularity": 2, "shared_experts": 1})
    # (k*G + S) * f + E*G (noisy top-k: router and noise projection) = (8 + 1) * 128 + 32 = 1184
    assert lstm.d_ff == match_lstm_to_moe_rnn(moe_rnn).d_ff == 1184
    f_moe = model_cost(moe_rnn, 64).forward_flops_per_token
    assert model_cost(lstm, 64).forward_flops_per_token == pytest.approx(f_moe, rel=1e-3)


# ---------------------------------------------------------------------------------------------
# the layer


def test_shared_experts_add_one_ffn_every_token_goes_through():
    cfg = _cfg("switch", d_expert=16, shared_experts=2, **EXACT).moe
    layer = MoELayer(32, 16, cfg).eval()
    assert tuple(layer.shared.w1.weight.shape) == (2 * 16, 32)  # two experts of width 16 side by side
    x = torch.randn(10, 32)
    y, _ = layer(x)
    shared = layer.shared
    layer.shared = None
    routed, _ = layer(x)
    h = torch.relu(x @ shared.w1.weight.T)  # (10, 2*16): expert s is columns 16s..16s+15
    by_expert = sum(h[:, 16 * s:16 * (s + 1)] @ shared.w2.weight.T[16 * s:16 * (s + 1)] for s in range(2))
    torch.testing.assert_close(y, routed + by_expert)


def test_shared_experts_still_serve_tokens_dropped_by_capacity():
    cfg = _cfg("switch", shared_experts=1, capacity_factor=0.25).moe
    layer = MoELayer(32, 32, cfg).train()
    x = torch.randn(16, 32)
    y, aux = layer(x)
    assert aux.stats["fraction_dropped"] > 0
    dropped = (y - layer.shared(x)).abs().sum(-1) == 0  # the routed part is 0 for a dropped token
    assert dropped.any()
    torch.testing.assert_close(y[dropped], layer.shared(x)[dropped])


# ---------------------------------------------------------------------------------------------
# parameters and FLOPs, by hand and against the built models / FlopCounterMode


def test_params_and_flops_hand_computed():
    # switch, E = 4 x G=2 = 8 experts, top-1 x 2 = 2 routed + 2 shared of width 64 / (2 + 2) = 16
    cfg = _cfg("switch", num_experts=4, granularity=2, shared_experts=2)
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.expert_width) == (8, 2, 16)
    C, V, P = 32, 50, 32
    block = 2 * 2 * C + 4 * C * C  # two LayerNorms + qkv and output projection = 4224
    dense_ffn = 2 * C * 64  # layer 0 = 4096
    router, expert = C * 8, 2 * C * 16  # 256; 1024 per expert
    moe_total = router + 8 * expert + 2 * expert  # 256 + 8192 + 2048 = 10496
    moe_active = router + 2 * expert + 2 * expert  # 256 + 2048 + 2048 = 4352
    embed, final_ln = V * C + P * C, 2 * C  # 2624 (tied head), 64
    cost = model_cost(cfg, T)
    assert cost.total_params == 2 * block + dense_ffn + moe_total + embed + final_ln == 25728
    assert cost.active_params == 2 * block + dense_ffn + moe_active + embed + final_ln == 19584
    assert cost.total_params_no_embed == 25728 - 2624 and cost.active_params_no_embed == 19584 - 2624
    assert cost.total_params == sum(p.numel() for p in build_model(cfg).parameters())
    # forward FLOPs per token at T = 16: attention 8C^2 + 4TC = 10240 per layer; dense FFN 4 C d_ff = 8192;
    # MoE: router 2 C E = 512, 2 routed and 2 shared experts 4 x 4 C w = 8192; output 2 C V = 3200
    assert cost.forward_breakdown == {"attention": 20480, "ffn": 8192, "router": 512, "experts": 4096,
                                      "shared_experts": 4096, "output": 3200}
    assert cost.forward_flops_per_token == 40576
    # the dense model of the same shapes costs 40064 (tests/test_flops.py): only the router is extra
    assert cost.forward_flops_per_token - model_cost(_cfg("dense"), T).forward_flops_per_token == 512


@pytest.mark.parametrize("G", [1, 2, 4])
def test_router_flops_grow_with_granularity_and_nothing_else(G):
    dense = model_cost(_cfg("dense"), T).forward_flops_per_token
    cost = model_cost(_cfg("switch", granularity=G), T)
    assert cost.forward_breakdown["router"] == 2 * 32 * 8 * G  # 2 x d_model x (E x G), the tiny preset's E = 8
    assert cost.forward_flops_per_token - dense == cost.forward_breakdown["router"]


@pytest.mark.parametrize("task", ["lm", "translation"])
@pytest.mark.parametrize("family, over", [
    ("switch", dict(granularity=2)),
    ("moe", dict(granularity=4)),
    ("switch", dict(shared_experts=1)),
    ("switch", dict(granularity=2, shared_experts=2)),
    ("moe-rnn", dict(granularity=2, shared_experts=1, d_ff=32, top_k=2)),
])
def test_measured_flops_and_params_match_analytic(family, over, task):
    shapes = SHAPES if family != "moe-rnn" else dict(d_model=32, n_layers=2)
    cfg = model_config(family, "tiny", overrides={**shapes, "num_experts": 4, **over, **EXACT},
                       vocab_size=50, max_seq_len=32)
    model = build_model(cfg, task).train()
    if task == "lm":
        inputs, cost = (torch.randint(0, 50, (B, T)),), model_cost(cfg, T, task)
    else:
        inputs = (torch.randint(0, 50, (B, S)), torch.randint(0, 50, (B, T)))
        cost = model_cost(cfg, T, task, src_len=S)
    assert cost.total_params == sum(p.numel() for p in model.parameters())
    inactive = sum((m.cfg.num_experts - m.cfg.top_k) * (m.w1[0].numel() + m.w2[0].numel())
                   for m in model.modules() if isinstance(m, MoELayer))
    assert cost.active_params == cost.total_params - inactive
    assert measure_forward_flops(model, *inputs) == pytest.approx(cost.forward_flops_per_token * B * T, rel=1e-9)


def test_cli_flops_shows_the_split_and_the_shared_experts(capsys):
    from bench.cli import main

    args = ["flops", "--task", "tinyshakespeare-char", "--model", "switch", "--set", "granularity=2",
            "--set", "shared_experts=2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    # tiny: 8 experts x 2 = 16, top-1 x 2 = 2 routed + 2 shared of 1024 / (2 + 2) = 256
    assert "16 experts (granularity 2: 8 x 2) + 2 shared of width 256, topk router, top-2" in out
    (by_part,) = [line for line in out.splitlines() if "forward FLOPs by part" in line]
    assert "experts 14.2%, shared_experts 14.2%" in by_part  # 2 x 256 routed = 2 x 256 shared columns
    assert main(args + ["--json"]) == 0
    cost = json.loads(capsys.readouterr().out)
    moe = cost["config"]["moe"]
    assert (moe["num_experts"], moe["top_k"], moe["d_expert"], moe["granularity"], moe["shared_experts"]) == (
        16, 2, 256, 2, 2)
    # two MoE layers (of 4), each: 2 experts x 4 x d_model 256 x width 256, routed and shared alike
    assert cost["forward_breakdown"]["shared_experts"] == cost["forward_breakdown"]["experts"] == 2 * 2 * 4 * 256 * 256
