"""Reproductions: the arm plans, matched budgets, resumability, and a real (tiny) end-to-end run."""
from __future__ import annotations

import pytest

from bench.config import ConfigError
from bench.data.tasks import load_task
from bench.flops import model_cost
from bench.models import model_config
from bench.reproduce import REPRODUCTIONS, arm_budget, plan, planned_config, reproduction, run_reproduction
from bench.tracking.records import ResultsStore, RunRecord
from tests.train.conftest import SMALL


def test_reproductions_cover_the_papers_arms():
    assert list(REPRODUCTIONS) == ["switch-vs-dense", "switch-experts", "capacity", "moe-rnn", "translation"]
    svd = reproduction("switch-vs-dense")
    assert [a.label for a in svd.arms] == ["dense", "dense-wide", "switch cf=1.0", "switch cf=1.25", "switch cf=2.0",
                                           "moe cf=1.0", "moe cf=1.25", "moe cf=2.0"]
    assert svd.seeds == 3 and reproduction("switch-experts").seeds == 3
    assert [a.overrides["num_experts"] for a in reproduction("switch-experts").arms[1:]] == [1, 2, 4, 8, 16, 32, 64]
    assert [a.overrides["capacity_factor"] for a in reproduction("capacity").arms] == [0.5, 0.75, 1.0, 1.25, 1.5, 2.0]
    assert {a.family for a in reproduction("moe-rnn").arms} == {"lstm", "moe-rnn"}
    assert reproduction("translation").task == "multi30k-de-en"
    with pytest.raises(ConfigError, match="expected one of switch-vs-dense"):
        reproduction("nope")


@pytest.mark.parametrize("preset", ["tiny", "small", "base"])
def test_wide_dense_arm_has_3_5x_flops_and_the_dense_models_tokens(preset):
    from bench.models.config import ModelConfig

    repro = reproduction("switch-vs-dense")
    task = load_task(repro.task)

    def cost(label):
        arm = repro.arm(label)
        model = planned_config(repro, arm, preset, arm_budget(repro, arm, preset))["model"]
        cfg = model_config("dense", preset, {k: model[k] for k in ("d_model", "n_heads", "d_ff", "n_layers")},
                           vocab_size=65, max_seq_len=256)
        assert isinstance(cfg, ModelConfig)
        return model_cost(cfg, task.seq_len).train_flops_per_token

    dense, wide = cost("dense"), cost("dense-wide")
    assert 3.35 <= wide / dense <= 3.55  # T5-Large's ~3.5x T5-Base, relative to each preset's model
    flops = repro.budgets[preset]
    assert arm_budget(repro, repro.arm("dense-wide"), preset) == {"kind": "tokens", "value": float(int(flops / dense))}
    assert arm_budget(repro, repro.arm("switch cf=1.0"), preset) == {"kind": "flops", "value": flops}


def test_tiny_transformer_reproductions_train_the_narrow_shape_with_one_learning_rate():
    for name in ("switch-vs-dense", "switch-experts", "capacity"):
        repro = reproduction(name)
        for arm in repro.arms:
            cfg = planned_config(repro, arm, "tiny", arm_budget(repro, arm, "tiny"))
            assert cfg["run"]["optim"]["lr"] == 3e-3
            if arm.label != "dense-wide":
                assert (cfg["model"]["d_model"], cfg["model"]["d_ff"]) == (128, 512)
    wide = planned_config(reproduction("switch-vs-dense"), reproduction("switch-vs-dense").arm("dense-wide"),
                          "tiny", {"kind": "tokens", "value": 1.0})
    assert (wide["model"]["d_model"], wide["model"]["d_ff"]) == (256, 1024)


def test_plan_is_seed_major_skips_finished_pairs_and_rejects_bad_input(tmp_path):
    store = ResultsStore(f"sqlite:///{tmp_path / 'r.db'}")
    repro = reproduction("capacity")
    arm = repro.arm("switch cf=1.0")
    config = planned_config(repro, arm, "tiny", arm_budget(repro, arm, "tiny"))
    tags = {"reproduction": "capacity", "arm": "switch cf=1.0"}
    store.save(RunRecord(run_id="x", group=repro.group("tiny"), status="finished", seed=1, config=config, extra=tags))
    # a finished run of an older definition (another budget) does not count as done
    stale = {**config, "run": {**config["run"], "budget": {"kind": "flops", "value": 1.0}}}
    store.save(RunRecord(run_id="old", group=repro.group("tiny"), status="finished", seed=0, config=stale, extra=tags))
    runs = plan(repro, "tiny", 2, store)
    assert [(r.arm.label, r.seed) for r in runs[:2]] == [("switch cf=0.5", 0), ("switch cf=0.75", 0)]
    assert [r.done.run_id for r in runs if r.done] == ["x"] and len(runs) == 12
    with pytest.raises(ConfigError, match="arm 'bogus' is not in capacity"):
        plan(repro, "tiny", 1, store, arms=["bogus"])
    with pytest.raises(ConfigError, match="preset='huge' is not allowed"):
        plan(repro, "huge", 1, store)


def test_tiny_reproduction_runs_tags_records_and_resumes(run_env):
    kw = dict(seeds=1, storage=run_env["storage"], overrides=SMALL + ["d_expert=64"], arms=["dense", "switch cf=1.25"],
              budget_flops=3e9, progress=False, announce=lambda msg: None)
    first = run_reproduction("switch-vs-dense", **kw)
    assert sorted(r.extra["arm"] for r in first) == ["dense", "switch cf=1.25"]
    assert all(r.status == "finished" and r.group == "repro-switch-vs-dense-tiny" for r in first)
    assert all(r.budget == {"kind": "flops", "value": 3e9} and r.train_flops >= 3e9 for r in first)
    assert all(r.extra["budget_flops"] == 3e9 for r in first)  # the report keeps budgets apart by this tag
    assert all(r.curve for r in first)  # learning curves for the report
    again = run_reproduction("switch-vs-dense", **kw)  # nothing left to do: the same records
    assert sorted(r.run_id for r in again) == sorted(r.run_id for r in first)
    assert len(ResultsStore(run_env["storage"]).list(group="repro-switch-vs-dense-tiny")) == 2
