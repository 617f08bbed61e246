"""Config validation: every problem named with field, value and what is allowed, all at once."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest

from bench.config import ConfigError, apply_overrides, check, from_dict, parse_override, resolve_key
from bench.flops import model_cost
from bench.models.config import FAMILIES, PRESETS, MoEConfig, ModelConfig, model_config


def config_error(*args, **kwargs) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        model_config(*args, **kwargs)
    return info.value


def test_config_error_is_value_error_with_problem_list():
    err = config_error("switch", "tiny", overrides={"num_experts": 0})
    assert isinstance(err, ValueError)
    assert isinstance(err.problems, list) and len(err.problems) == 1
    assert err.problems[0] in str(err)


def test_num_experts_below_one():
    err = config_error("switch", "tiny", overrides={"num_experts": 0})
    assert "moe.num_experts=0" in str(err)
    assert ">= 1" in str(err)


def test_top_k_above_num_experts():
    err = config_error("moe", "tiny", overrides={"num_experts": 4, "top_k": 5})
    msg = str(err)
    assert "moe.top_k=5" in msg and "num_experts=4" in msg and "[1, num_experts=4]" in msg


def test_switch_router_must_be_top1():
    err = config_error("switch", "tiny", overrides={"top_k": 2})
    assert "moe.top_k=2" in str(err) and "router='switch'" in str(err)


@pytest.mark.parametrize("key,value,shown", [
    ("capacity_factor", 0, "moe.capacity_factor=0.0"),
    ("capacity_factor", -1.5, "moe.capacity_factor=-1.5"),
    ("eval_capacity_factor", 0.0, "moe.eval_capacity_factor=0.0"),
])
def test_capacity_factor_must_be_positive(key, value, shown):
    err = config_error("switch", "tiny", overrides={key: value})
    assert shown in str(err)
    assert "must be > 0" in str(err) and "null for dropless" in str(err)


def test_capacity_factor_null_is_dropless():
    cfg = model_config("switch", "tiny", overrides=["capacity_factor=null", "eval_capacity_factor=None"])
    assert cfg.moe.capacity_factor is None and cfg.moe.eval_capacity_factor is None


def test_d_model_not_divisible_by_n_heads():
    err = config_error("dense", "tiny", overrides={"d_model": 30, "n_heads": 4})
    msg = str(err)
    assert "d_model=30" in msg and "n_heads=4" in msg and "divisible" in msg


def test_unknown_family():
    err = config_error("gpt", "tiny")
    msg = str(err)
    assert "'gpt'" in msg
    assert all(f in msg for f in FAMILIES)


def test_unknown_preset():
    err = config_error("dense", "huge")
    msg = str(err)
    assert "preset='huge'" in msg
    assert all(p in msg for p in PRESETS)


def test_unknown_family_and_preset_reported_together():
    err = config_error("gpt", "huge")
    assert len(err.problems) == 2
    assert "'gpt'" in err.problems[0] and "'huge'" in err.problems[1]


def test_unknown_override_key_lists_valid_keys():
    err = config_error("switch", "tiny", overrides={"num_expert": 4})
    msg = str(err)
    assert "unknown key 'num_expert'" in msg
    assert "valid keys:" in msg
    for key in ("d_model", "n_heads", "moe.num_experts", "moe.capacity_factor", "moe.router"):
        assert key in msg


def test_unique_suffix_override_keys_resolve():
    cfg = model_config("switch", "tiny", overrides={"num_experts": 4, "moe.capacity_factor": 1.5})
    assert cfg.moe.num_experts == 4 and cfg.moe.capacity_factor == 1.5
    cfg = model_config("moe", "tiny", overrides=["num_experts=16", "top_k=4", "drop_policy=probability",
                                                 "capacity_factor=null", "eval_capacity_factor=null"])
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.drop_policy) == (16, 4, "probability")
    # an exact top-level name wins over suffix matching ('dropout' vs 'moe.expert_dropout')
    cfg = model_config("switch", "tiny", overrides={"dropout": 0.0})
    assert cfg.dropout == 0.0 and cfg.moe.expert_dropout == 0.0


@dataclass
class _Inner:
    size: int = 1


@dataclass
class _Outer:
    a: _Inner = field(default_factory=_Inner)
    b: _Inner = field(default_factory=_Inner)
    width: int = 2


@dataclass
class _Top:
    outer: _Outer = field(default_factory=_Outer)


def test_ambiguous_override_key():
    with pytest.raises(KeyError, match="ambiguous"):
        resolve_key(_Outer(), "size")
    with pytest.raises(ConfigError) as info:
        apply_overrides(_Outer(), {"size": 3})
    msg = str(info.value)
    assert "'size'" in msg and "ambiguous" in msg and "a.size" in msg and "b.size" in msg


def test_dotted_suffix_resolves_uniquely():
    assert resolve_key(_Top(), "a.size") == "outer.a.size"
    assert resolve_key(_Top(), "width") == "outer.width"
    top = apply_overrides(_Top(), {"a.size": 5, "width": 7})
    assert top.outer.a.size == 5 and top.outer.b.size == 1 and top.outer.width == 7


@pytest.mark.parametrize("overrides,needles", [
    (["d_model=abc"], ["d_model='abc'", "an integer"]),
    ({"d_model": "abc"}, ["d_model='abc'", "an integer"]),
    ({"n_layers": 2.5}, ["n_layers=2.5", "an integer"]),
    ({"d_model": True}, ["d_model=True", "an integer"]),
    ({"dropout": "high"}, ["dropout='high'", "a number"]),
    ({"tie_embeddings": "yes"}, ["tie_embeddings='yes'", "true or false"]),
    ({"router": "sinkhorn"}, ["moe.router='sinkhorn'", "'switch'", "'topk'", "'noisy_topk'", "'hash'",
                              "'expert_choice'"]),
    ({"capacity_factor": "big"}, ["moe.capacity_factor='big'", "float or null"]),
])
def test_bad_value_types(overrides, needles):
    err = config_error("switch", "tiny", overrides=overrides)
    for needle in needles:
        assert needle in str(err), needle


def test_several_problems_reported_together():
    err = config_error("moe", "tiny", overrides={
        "num_experts": 0, "d_model": 30, "n_heads": 4, "dropout": 1.5, "n_layers": "two"})
    msg = str(err)
    for needle in ("moe.num_experts=0", "d_model=30", "dropout=1.5", "n_layers='two'"):
        assert needle in msg, needle
    assert len(err.problems) >= 4


def test_apply_overrides_reports_unknown_key_and_bad_value_together():
    with pytest.raises(ConfigError) as info:
        apply_overrides(ModelConfig(), {"num_expert": 4, "d_model": "abc", "n_heads": 0})
    msg = str(info.value)
    assert "unknown key 'num_expert'" in msg
    assert "d_model='abc'" in msg and "n_heads=0" in msg


def test_override_must_look_like_key_value():
    err = config_error("dense", "tiny", overrides=["d_model"])
    assert "key=value" in str(err) and "'d_model'" in str(err)


def test_parse_override_yaml_scalars():
    assert parse_override("moe.num_experts=8") == ("moe.num_experts", 8)
    assert parse_override("dropout=0.25") == ("dropout", 0.25)
    assert parse_override("tie_embeddings=false") == ("tie_embeddings", False)
    assert parse_override("capacity_factor=None") == ("capacity_factor", None)
    assert parse_override("router=topk") == ("router", "topk")


def test_from_dict_nested_and_unknown_keys():
    cfg = from_dict(ModelConfig, {"d_model": 64, "moe": {"num_experts": 2}})
    assert cfg.d_model == 64 and cfg.moe.num_experts == 2 and cfg.moe.top_k == 1
    with pytest.raises(ConfigError) as info:
        from_dict(ModelConfig, {"moe": {"experts": 2}, "width": 3, "d_model": "wide"})
    msg = str(info.value)
    assert "unknown key 'moe.experts'" in msg and "moe.num_experts" in msg and "moe.router" in msg
    assert "unknown key 'width'" in msg and "d_model" in msg
    assert "d_model='wide'" in msg
    assert len(info.value.problems) == 3


def test_check_nested_problems_with_dotted_names():
    problems = check(ModelConfig(d_model=30, n_heads=4, moe=MoEConfig(num_experts=0)))
    assert any(p.startswith("moe.num_experts=0") for p in problems)
    assert any(p.startswith("d_model=30") for p in problems)
    assert check(ModelConfig()) == []


def test_rnn_needs_two_layers():
    err = config_error("moe-rnn", "tiny", overrides={"n_layers": 1})
    assert "n_layers=1" in str(err) and ">= 2" in str(err)


def test_task_sizes_are_applied():
    cfg = model_config("dense", "tiny", vocab_size=65, max_seq_len=128)
    assert (cfg.vocab_size, cfg.max_seq_len) == (65, 128)


def test_zero_task_sizes_are_rejected():
    err = config_error("dense", "tiny", vocab_size=0, max_seq_len=0)
    assert "vocab_size=0" in str(err) and "max_seq_len=0" in str(err)


@pytest.mark.parametrize("family,base,overrides", [
    ("switch", "dense", {"d_ff": 512}),
    ("moe", "dense", {"d_ff": 512}),
    ("moe", "dense", {"d_ff": 512, "d_model": 128, "n_heads": 2, "n_layers": 2}),
    ("lstm", "moe-rnn", {"top_k": 2}),
    ("lstm", "moe-rnn", {"num_experts": 32, "d_model": 128}),
])
def test_overridden_configs_stay_flop_matched(family, base, overrides):
    sparse = model_config(family, "tiny", overrides=overrides)
    ref = model_config(base, "tiny", overrides=overrides)
    a = model_cost(sparse, 128).forward_flops_per_token
    b = model_cost(ref, 128).forward_flops_per_token
    assert a == pytest.approx(b, rel=0.01)
    if family in ("switch", "moe"):
        assert sparse.expert_width * sparse.moe.top_k == ref.d_ff == 512


def test_presets_are_flop_matched_without_overrides():
    for family, base in (("switch", "dense"), ("moe", "dense"), ("lstm", "moe-rnn")):
        a = model_cost(model_config(family, "tiny"), 128).forward_flops_per_token
        b = model_cost(model_config(base, "tiny"), 128).forward_flops_per_token
        assert a == pytest.approx(b, rel=0.01)


def test_model_config_reports_unknown_key_and_bad_value_together():
    err = config_error("dense", "tiny", overrides={"num_expert": 4, "d_model": "abc"})
    assert "unknown key 'num_expert'" in str(err)
    assert "d_model='abc'" in str(err)


def test_exponent_without_dot_is_a_number():
    # YAML 1.1 would read these as strings: `--set lr=3e-4` must still be a float.
    from bench.config import parse_override

    assert parse_override("lr=3e-4") == ("lr", 3e-4)
    assert parse_override("budget=4E13") == ("budget", 4e13)
    assert parse_override("name=e5") == ("name", "e5")


def test_probability_drop_policy_with_capacity_is_refused_in_causal_models():
    with pytest.raises(ConfigError, match="drop_policy='probability' is not allowed with a capacity limit"):
        model_config("moe", "tiny", overrides=["drop_policy=probability"])


@pytest.mark.parametrize("setting", ["lr=nan", "capacity_factor=.nan", "load_balance_weight=.inf", "grad_clip=-.inf",
                                     "weight_decay=nan"])
def test_nan_and_inf_are_refused_with_the_field_named(setting):
    from bench.train.run import resolve_configs
    from bench.data.tasks import load_task

    field = setting.split("=")[0]
    with pytest.raises(ConfigError, match=f"{field}=.* is not allowed: expected a (finite )?number"):
        resolve_configs(load_task("tinyshakespeare-char"), "switch", "tiny", [setting], None)


def test_a_nan_budget_is_refused(capsys):
    from bench.cli import main

    assert main(["train", "--task", "tinyshakespeare-char", "--model", "dense", "--budget-flops", "nan"]) == 2
    assert "value=nan is not allowed: expected a finite number" in capsys.readouterr().err


def test_dashboard_port_out_of_range_is_one_clear_error(capsys):
    from bench.cli import main

    assert main(["dashboard", "--port", "99999"]) == 2
    assert "port=99999 is not allowed: expected 0-65535" in capsys.readouterr().err
