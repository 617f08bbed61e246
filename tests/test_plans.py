"""Plans: the shipped plan files, validation of a user's plan, matched budgets, resumable runs."""
from __future__ import annotations

import json

from pathlib import Path
import pytest
import yaml

from bench.config import ConfigError, parse_override
from bench.data.tasks import load_task
from bench.flops import model_cost
from bench.models import model_config
from bench.plans import all_plans, load_plan, parse_plan
from bench.runner.arms import arm_budget, plan_runs, planned_config, run_plan
from bench.tracking.records import ResultsStore, RunRecord
from tests.train.conftest import SMALL


def test_shipped_plans_cover_the_papers_arms():
    plans = all_plans()
    assert sorted(plans) == ["balancing", "capacity", "expert-choice", "granularity", "moe-rnn", "shared-experts",
                             "switch-experts", "switch-lr", "switch-vs-dense", "translation", "upcycling"]
    svd = plans["switch-vs-dense"]
    assert [a.label for a in svd.arms] == ["dense", "dense-wide", "switch cf=1.0", "switch cf=1.25", "switch cf=2.0",
                                           "switch cf=1.25 equal-time", "moe cf=1.0", "moe cf=1.25", "moe cf=2.0"]
    assert svd.tiers["tiny"].seeds == 3 and svd.tiers["ref"].seeds >= 5
    assert [a.settings["num_experts"] for a in plans["switch-experts"].arms[1:]] == [1, 2, 4, 8, 16, 32, 64]
    assert [a.settings["capacity_factor"] for a in plans["capacity"].arms] == [0.5, 0.75, 1.0, 1.25, 1.5, 2.0]
    assert {a.model for a in plans["moe-rnn"].arms} == {"lstm", "moe-rnn"}
    assert {a.model for a in plans["translation"].arms} == {"dense", "switch", "moe-rnn", "lstm"}
    with pytest.raises(ConfigError, match="plan 'nope' is not known; shipped plans: balancing, capacity, expert-choice, granularity"):
        load_plan("nope")


def test_each_reference_tier_has_its_own_seeds_and_headline_claims():
    plans = all_plans()
    seeds = {name: set(p.tiers["ref"].seed_list()) for name, p in plans.items()}
    names = sorted(seeds)
    for i, a in enumerate(names):  # arms of different plans are different runs: independent evidence
        for b in names[i + 1:]:
            assert not seeds[a] & seeds[b], (a, b)
    for name in ("switch-vs-dense", "switch-experts", "moe-rnn"):
        assert len(seeds[name]) >= 5
        headline = [c for c in plans[name].claims if c.headline]
        assert headline and all(set(c.arms()) & {a.label for a in plans[name].tier_arms("ref")} for c in headline)


def test_switch_lr_differs_from_switch_vs_dense_ref_only_in_the_learning_rate():
    lr_plan, svd = load_plan("switch-lr"), load_plan("switch-vs-dense")

    def resolved(plan, label):
        arm = plan.arm(label)
        return planned_config(plan, arm, "ref", arm_budget(plan, arm, "ref"))

    for family, svd_label in (("dense", "dense"), ("switch", "switch cf=1.25")):
        reference = resolved(svd, svd_label)
        assert reference["run"]["optim"]["lr"] == 2.0e-3
        for rate in ("1e-3", "2e-3", "4e-3"):
            cfg = resolved(lr_plan, f"{family} lr {rate}")
            assert cfg["run"]["optim"]["lr"] == float(rate)
            assert cfg["model"] == reference["model"]  # same shape, experts and capacity as the ref answer
            assert cfg["run"]["budget"] == reference["run"]["budget"]
            assert cfg["run"]["train"] == reference["run"]["train"]


@pytest.mark.parametrize("tier", ["tiny", "ref", "small", "base"])
def test_granularity_arms_split_the_experts_at_equal_active_flops(tier):
    plan = load_plan("granularity")
    task = load_task(plan.task)
    dense = None
    for arm in plan.tier_arms(tier):
        model = planned_config(plan, arm, tier, arm_budget(plan, arm, tier))["model"]
        cfg = model_config(arm.model, plan.tiers[tier].preset,
                           {k: model[k] for k in ("d_model", "n_heads", "d_ff", "n_layers")} | arm.settings,
                           vocab_size=65, max_seq_len=256)
        assert to_dict_moe(cfg) == to_dict_moe_of(model)  # the plan's arm resolves as model_config does
        cost = model_cost(cfg, task.seq_len)
        if arm.model == "dense":
            dense = cost
            continue
        G, m = arm.settings["granularity"], model["moe"]
        experts = {"tiny": 8, "ref": 8, "small": 16, "base": 128}[tier]
        assert (m["num_experts"], m["top_k"], m["d_expert"] * G) == (experts * G, G, model["d_ff"])
        # equal active FLOPs: only the router (2 x d_model x E*G per MoE layer) differs from dense
        router = cost.forward_breakdown["router"]
        assert cost.forward_flops_per_token - dense.forward_flops_per_token == pytest.approx(router)


def _resolved(plan, tier: str):
    """label -> (ModelConfig, Cost) of every arm of ``plan``'s ``tier``, as the runner resolves them."""
    from bench.config import from_dict
    from bench.models.config import ModelConfig

    task = load_task(plan.task)
    out = {}
    for arm in plan.tier_arms(tier):
        cfg = from_dict(ModelConfig, planned_config(plan, arm, tier, arm_budget(plan, arm, tier))["model"])
        src = task.src_len if task.type == "translation" else None
        out[arm.label] = cfg, model_cost(cfg, task.tgt_len if src else task.seq_len, task.type, src)
    return out


@pytest.mark.parametrize("tier", ["tiny", "ref"])
def test_balancing_arms_differ_only_in_how_they_balance(tier):
    arms = _resolved(load_plan("balancing"), tier)
    weights = {label: (cfg.moe.balance, cfg.moe.load_balance_weight) for label, (cfg, _) in arms.items()}
    assert weights == {"aux 1e-4": ("aux_loss", 1e-4), "aux 1e-3": ("aux_loss", 1e-3), "aux 1e-2": ("aux_loss", 1e-2),
                       "aux 1e-1": ("aux_loss", 1e-1), "bias": ("bias", 0.0)}  # bias: no balancing loss
    assert {(cfg.moe.router, cfg.moe.top_k, cfg.moe.num_experts) for cfg, _ in arms.values()} == {("topk", 2, 8)}
    assert len({cost.train_flops_per_token for _, cost in arms.values()}) == 1


@pytest.mark.parametrize("tier", ["tiny", "ref"])
def test_shared_experts_arms_activate_four_width_256_experts_at_the_dense_flops(tier):
    arms = _resolved(load_plan("shared-experts"), tier)
    fine, shared = arms["fine G=4"][0].moe, arms["shared + fine"][0].moe
    width = arms["dense"][0].d_ff // 4
    assert (fine.num_experts, fine.top_k, fine.d_expert, fine.shared_experts) == (32, 4, width, 0)
    assert (shared.num_experts, shared.top_k, shared.d_expert, shared.shared_experts) == (24, 3, width, 1)
    dense = arms["dense"][1]
    for label in ("switch", "moe top-2", "fine G=4", "shared + fine"):  # only the router adds FLOPs
        cost = arms[label][1]
        assert cost.forward_flops_per_token - dense.forward_flops_per_token == pytest.approx(
            cost.forward_breakdown["router"]), label


@pytest.mark.parametrize("tier", ["tiny", "ref"])
def test_expert_choice_routes_the_encoder_only_at_the_switch_flops(tier):
    arms = _resolved(load_plan("expert-choice"), tier)
    ec, top1 = arms["expert choice"], arms["switch"]
    assert ec[0].moe.router_for(causal=False) == "expert_choice" and ec[0].moe.router_for(causal=True) == "switch"
    assert ec[0].moe.capacity_factor == 1.0 and top1[0].moe.router == "switch"
    assert ec[1].forward_flops_per_token == top1[1].forward_flops_per_token  # EC at cf 1: one expert row per token


@pytest.mark.parametrize("tier", ["tiny", "ref"])
def test_upcycling_arms_can_start_from_the_half_budget_dense_run(tier):
    from bench.models.upcycle import upcycle_problems

    plan = load_plan("upcycling")
    arms = _resolved(plan, tier)
    first = arms["dense half"][0]
    assert arm_budget(plan, plan.arm("dense half"), tier)["value"] == plan.tiers[tier].budget_flops / 2
    for label in ("dense continued", "upcycled"):
        assert plan.arm(label).init_from == "dense half" and upcycle_problems(first, arms[label][0]) == []
    assert arms["upcycled"][1].train_flops_per_token == arms["switch"][1].train_flops_per_token


def to_dict_moe(cfg):
    return {k: getattr(cfg.moe, k) for k in ("num_experts", "top_k", "d_expert", "granularity", "router")}


def to_dict_moe_of(model):
    return {k: model["moe"][k] for k in ("num_experts", "top_k", "d_expert", "granularity", "router")}


def test_moe_rnn_sparsity_control_uses_every_expert():
    plan = load_plan("moe-rnn")
    arm = plan.arm("moe-rnn E=4")
    model = planned_config(plan, arm, "ref", arm_budget(plan, arm, "ref"))["model"]
    assert model["moe"]["num_experts"] == model["moe"]["top_k"] == 4  # all experts active: no sparsity


@pytest.mark.parametrize("tier", ["tiny", "small", "base"])
def test_wide_dense_arm_has_3_5x_flops_and_the_dense_models_tokens(tier):
    plan = load_plan("switch-vs-dense")
    task = load_task(plan.task)
    preset = plan.tiers[tier].preset

    def cost(label):
        arm = plan.arm(label)
        model = planned_config(plan, arm, tier, arm_budget(plan, arm, tier))["model"]
        cfg = model_config("dense", preset, {k: model[k] for k in ("d_model", "n_heads", "d_ff", "n_layers")},
                           vocab_size=65, max_seq_len=256)
        return model_cost(cfg, task.seq_len).train_flops_per_token

    dense, wide = cost("dense"), cost("dense-wide")
    assert 3.35 <= wide / dense <= 3.55  # T5-Large's ~3.5x T5-Base, relative to each tier's model
    flops = plan.tiers[tier].budget_flops
    assert arm_budget(plan, plan.arm("dense-wide"), tier) == {"kind": "tokens", "value": float(int(flops / dense))}
    assert arm_budget(plan, plan.arm("switch cf=1.0"), tier) == {"kind": "flops", "value": flops}


def test_tiny_and_ref_tiers_train_their_shapes():
    plan = load_plan("switch-vs-dense")
    for arm in plan.arms:
        if arm.budget == "equal_time":  # needs measured throughput (see the equal-time test)
            continue
        cfg = planned_config(plan, arm, "tiny", arm_budget(plan, arm, "tiny"))
        assert cfg["run"]["optim"]["lr"] == 3e-3
        if arm.label != "dense-wide":
            assert (cfg["model"]["d_model"], cfg["model"]["d_ff"]) == (128, 512)
    ref = planned_config(plan, plan.arm("dense"), "ref", arm_budget(plan, plan.arm("dense"), "ref"))
    assert (ref["model"]["d_model"], ref["model"]["d_ff"], ref["run"]["optim"]["lr"]) == (256, 1024, 2e-3)
    # every ref evaluation covers the whole validation split, so curves and final losses share one set
    assert ref["run"]["train"]["eval_batches"] * ref["run"]["train"]["eval_batch_size"] * 256 > 111_000


def test_plan_runs_are_seed_major_skip_finished_pairs_and_reject_bad_input(tmp_path):
    store = ResultsStore(f"sqlite:///{tmp_path / 'r.db'}")
    plan = load_plan("capacity")
    arm = plan.arm("switch cf=1.0")
    config = planned_config(plan, arm, "tiny", arm_budget(plan, arm, "tiny"))
    tags = {"reproduction": "capacity", "arm": "switch cf=1.0"}
    store.save(RunRecord(run_id="x", group=plan.group("tiny"), status="finished", seed=1, config=config, extra=tags))
    # a finished run of an older definition (another budget) does not count as done
    stale = {**config, "run": {**config["run"], "budget": {"kind": "flops", "value": 1.0}}}
    store.save(RunRecord(run_id="old", group=plan.group("tiny"), status="finished", seed=0, config=stale, extra=tags))
    runs = plan_runs(plan, "tiny", store)
    assert [(r.arm.label, r.seed) for r in runs[:2]] == [("switch cf=0.5", 0), ("switch cf=0.75", 0)]
    assert [r.done.run_id for r in runs if r.done] == ["x"] and len(runs) == 12
    ref = plan_runs(plan, "ref", store)  # the ref tier: its own arms and seeds
    assert sorted({r.seed for r in ref}) == [200, 201, 202, 203, 204] and len(ref) == 20
    with pytest.raises(ConfigError, match="arm 'bogus' is not in capacity"):
        plan_runs(plan, "tiny", store, arms=["bogus"])
    with pytest.raises(ConfigError, match="tier 'huge' is not in plan 'capacity'; tiers: tiny, ref, small, base"):
        plan_runs(plan, "huge", store)


def test_a_bad_plan_lists_every_problem_at_once():
    bad = {"name": "x", "title": "x", "task": "tinyshakespeare-char", "baseline": "nope",
           "tiers": {"tiny": {"budget_flops": -1, "preset": "huge", "seeds": 0}},
           "arms": [{"label": "a", "model": "dense"}, {"label": "a", "model": "transformerz", "colour": 1}],
           "claims": [{"text": "t", "kind": "better", "a": "a", "b": "ghost"},
                      {"text": "u", "kind": "trend", "x": {"a": 1}, "metric": "accuracy"}]}
    with pytest.raises(ConfigError) as err:
        parse_plan(bad, "bad.yaml")
    text = str(err.value)
    for expected in ("unknown key 'arms[1].colour'", "arms[1].model='transformerz' is not allowed",
                     "tiers.tiny.preset='huge' is not allowed", "tiers.tiny.budget_flops=-1.0 is not allowed",
                     "tiers.tiny.seeds=0 is not allowed", "baseline='nope' is not an arm", "arm label 'a' appears twice",
                     "claim 't': 'ghost' is not an arm", "a trend claim needs x for at least 3 arms",
                     "metric 'accuracy' has no default delta"):
        assert expected in text, expected
    with pytest.raises(ConfigError, match="title is required\n.*task is required"):
        parse_plan({"name": "x"}, "short.yaml")


def test_shipped_plan_reproduces_and_resumes(run_env):
    kw = dict(seeds=1, storage=run_env["storage"], overrides=SMALL + ["d_expert=64"], arms=["dense", "switch cf=1.25"],
              budget_flops=3e9, progress=False, announce=lambda msg: None)
    first = run_plan("switch-vs-dense", **kw)
    assert sorted(r.extra["arm"] for r in first) == ["dense", "switch cf=1.25"]
    assert all(r.status == "finished" and r.group == "repro-switch-vs-dense-tiny" for r in first)
    assert all(r.budget == {"kind": "flops", "value": 3e9} and r.train_flops >= 3e9 for r in first)
    assert all(r.extra["budget_flops"] == 3e9 and "tier" not in r.extra for r in first)
    assert all(r.curve for r in first)  # learning curves for the report
    from bench.tracking.wandb_setup import read_offline_run_info

    info = read_offline_run_info(next(r for r in first if r.extra["arm"] == "switch cf=1.25").paths["wandb_dir"])
    assert info["name"] == "switch-vs-dense: switch cf=1.25" and info["group"] == "repro-switch-vs-dense-tiny"
    assert info["job_type"] == "reproduce" and "arm:switch cf=1.25" in info["tags"]
    assert "reproduction:switch-vs-dense" in info["tags"] and info["config"]["arm"] == "switch cf=1.25"
    again = run_plan("switch-vs-dense", **kw)  # nothing left to do: the same records
    assert sorted(r.run_id for r in again) == sorted(r.run_id for r in first)
    assert len(ResultsStore(run_env["storage"]).list(group="repro-switch-vs-dense-tiny")) == 2


def test_a_killed_run_is_resumed_and_a_live_one_left_to_its_process(run_env):
    import os

    said = []
    kw = dict(seeds=1, storage=run_env["storage"], overrides=SMALL, arms=["dense"], budget_flops=2e9,
              progress=False, announce=said.append, keep_checkpoints=True)
    (first,) = run_plan("switch-vs-dense", **kw)
    store = ResultsStore(run_env["storage"])
    first.status, first.finished_at = "running", None  # as a run killed with -9 leaves its record
    store.save(first)
    lock = Path(first.paths["run_dir"]) / "RUNNING.pid"
    lock.write_text(str(os.getpid()))  # a live process (this one) is training it: leave it alone
    assert run_plan("switch-vs-dense", **kw) == []
    from bench.tracking.claims import HOST
    assert f"skipping dense (seed 0): process {os.getpid()} on {HOST} (run {first.run_id}) is training it now" in said
    lock.write_text("999999999")  # its process is gone: continue it from its checkpoint, same run id
    said.clear()
    (resumed,) = run_plan("switch-vs-dense", **kw)
    assert any("1 to resume" in m for m in said) and any(f"resuming {first.run_id}" in m for m in said)
    assert resumed.run_id == first.run_id and resumed.status == "finished"
    assert resumed.steps == first.steps and resumed.metrics["val_loss"] == pytest.approx(first.metrics["val_loss"])
    assert [r.run_id for r in store.list(group="repro-switch-vs-dense-tiny")] == [first.run_id]


def _dense_seed0_then_pair(run_env, seed: int):
    """Plan switch-vs-dense's dense arm at 2e9 FLOPs: seed 0 trained, and the planned pair of ``seed``.
    Returns (run_plan's keyword arguments, the seed-0 record, the store, that pair, the announcements)."""
    said = []
    kw = dict(storage=run_env["storage"], overrides=SMALL, arms=["dense"], budget_flops=2e9, progress=False)
    (seed0,) = run_plan("switch-vs-dense", seeds=1, announce=said.append, **kw)
    store = ResultsStore(run_env["storage"])
    (planned,) = [r for r in plan_runs(load_plan("switch-vs-dense"), "tiny", store, seeds=seed + 1, arms=["dense"],
                                       flops=2e9, extra=dict(parse_override(p) for p in SMALL)) if r.seed == seed]
    return kw, seed0, store, planned, said


def test_pairs_taken_or_finished_by_other_processes_are_left_to_them(run_env, capsys):
    """Two commands sharing a plan: before each pair, its claim and its records are looked at again."""
    import dataclasses

    from bench.tracking.claims import Claims

    kw, seed0, store, planned, said = _dense_seed0_then_pair(run_env, 3)
    # Seed 3: a process on another machine holds it (fresh heartbeat).
    Claims(store, host="node-b", pid=7).acquire(planned.key, "remote-run")

    def announce(msg: str) -> None:
        said.append(msg)
        if msg.startswith("[1/2] dense (seed 1)"):  # meanwhile another process finishes seed 2
            store.save(dataclasses.replace(seed0, run_id="other-s2", seed=2))

    said.clear()
    records = run_plan("switch-vs-dense", seeds=4, announce=announce, **kw)
    assert "skipping dense (seed 3): process 7 on node-b (run remote-run) is training it now" in said
    assert "[2/2] dense (seed 2): finished meanwhile by another process (run other-s2)" in said
    assert sorted(r.seed for r in records) == [0, 1, 2]
    assert sorted(r.seed for r in store.list(group="repro-switch-vs-dense-tiny")) == [0, 1, 2]  # seed 3 untouched
    assert Claims(store).holder(planned.key).host == "node-b"  # still theirs; ours were released

    # --status: the same view, without training; a running pair's progress as its record last saved it.
    from bench.runner.status import format_status, plan_status

    store.save(dataclasses.replace(seed0, run_id="remote-run", seed=3, status="running", finished_at=None, steps=7,
                                   train_flops=5e8, curve=[{"step": 5, "loss": 3.25}], metrics={}))

    status = plan_status(load_plan("switch-vs-dense"), "tiny", store, seeds=5, arms=["dense"], flops=2e9,
                         extra=dict(parse_override(p) for p in SMALL))
    assert [(p["seed"], p["state"]) for p in status["pairs"]] == [
        (0, "finished"), (1, "finished"), (2, "finished"), (3, "running"), (4, "to do")]
    assert status["pairs"][3]["by"] == "process 7 on node-b (run remote-run)"
    hours = [r.timings["wall_seconds"] / 3600 for r in records]
    assert status["hours_spent"] == pytest.approx(sum(hours))
    assert status["hours_left"] == pytest.approx(2 * sum(hours) / 3)  # two pairs left at the arm's mean
    text = format_status(status)
    assert text.startswith("switch-vs-dense tier tiny (group repro-switch-vs-dense-tiny): 3 of 5 runs finished")
    assert ("dense     3  running           -      -  process 7 on node-b (run remote-run); 25% of its budget, "
            "step 7, last val loss 3.2500") in text
    from bench.cli import main

    capsys.readouterr()
    args = ["reproduce", "switch-vs-dense", "--status", "--json", "--seeds", "5", "--arm", "dense", "--budget-flops",
            "2e9", "--storage", run_env["storage"]] + [x for pair in SMALL for x in ("--set", pair)]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["pairs"] == status["pairs"]
    assert sorted(r.seed for r in store.list(group="repro-switch-vs-dense-tiny")) == [0, 1, 2, 3]  # nothing trained
    assert all(Claims(store).holder(r.key) is None for r in plan_runs(
        load_plan("switch-vs-dense"), "tiny", store, seeds=3, arms=["dense"], flops=2e9,
        extra=dict(parse_override(p) for p in SMALL)))


def test_a_pair_whose_remote_process_died_is_taken_over_and_its_run_marked_interrupted(run_env):
    import dataclasses
    import datetime as dt

    import sqlalchemy as sa

    from bench.tracking.claims import STALE_AFTER_S, Claims

    kw, seed0, store, planned, said = _dense_seed0_then_pair(run_env, 1)
    # Seed 1 was being trained on node-b, which went silent: its record says "running" forever.
    store.save(dataclasses.replace(seed0, run_id="remote-run", seed=1, status="running", finished_at=None, metrics={}))
    remote = Claims(store, host="node-b", pid=7)
    remote.acquire(planned.key, "remote-run")
    old = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) - dt.timedelta(seconds=STALE_AFTER_S + 60)
    with store.engine.begin() as conn:
        conn.execute(sa.update(remote.table).values(heartbeat_at=old))
    said.clear()
    (seed1,) = [r for r in run_plan("switch-vs-dense", seeds=2, announce=said.append, **kw) if r.seed == 1]
    assert seed1.run_id != "remote-run" and seed1.status == "finished"  # its checkpoint is on node-b: trained again
    lost = store.get("remote-run")
    assert lost.status == "interrupted" and lost.error.startswith("lost: process 7 on node-b (run remote-run) stopped")
    assert "  run remote-run was lost with process 7 on node-b (run remote-run): recorded as interrupted" in said


@pytest.mark.slow
def test_two_reproduce_commands_split_a_plan(run_env):
    """Two real processes started together on one plan: every pair trained exactly once."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "bench.cli", "reproduce", "switch-vs-dense", "--seeds", "2", "--arm", "dense",
           "--arm", "switch cf=1.25", "--budget-flops", "2e9", "--storage", run_env["storage"]]
    for pair in SMALL:
        cmd += ["--set", pair]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-1500:] for e in errs)
    records = ResultsStore(run_env["storage"]).list(group="repro-switch-vs-dense-tiny")
    assert sorted((r.extra["arm"], r.seed) for r in records) == [("dense", 0), ("dense", 1), ("switch cf=1.25", 0),
                                                                  ("switch cf=1.25", 1)]
    assert all(r.status == "finished" for r in records)
    assert sum("is training it now" in e or "finished meanwhile" in e for e in errs) >= 1, errs  # they did meet


def test_a_users_plan_runs_with_one_command_and_appears_in_the_report(run_env, tmp_path, capsys):
    from bench.cli import main

    plan = {"name": "my-comparison", "title": "My two arms", "task": "tinyshakespeare-char", "baseline": "dense",
            "settings": dict(parse_override(p) for p in SMALL),
            "tiers": {"tiny": {"budget_flops": 2e9, "seeds": 1}},
            "arms": [{"label": "dense", "model": "dense"},
                     {"label": "switch", "model": "switch", "settings": {"d_expert": 64}}],
            "claims": [{"text": "Switch beats dense", "kind": "better", "a": "switch", "b": "dense",
                        "metric": "val_loss", "direction": "lower"}]}
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(plan))
    assert main(["reproduce", str(path), "--storage", run_env["storage"]]) == 0
    out = capsys.readouterr().out
    assert "My two arms (tier tiny)" in out and "Switch beats dense" in out and "1 seed: no interval" in out
    records = ResultsStore(run_env["storage"]).list(group="repro-my-comparison-tiny")
    assert sorted(r.extra["arm"] for r in records) == ["dense", "switch"]
    assert {r.extra["plan_file"] for r in records} == {str(path)}
    # the comparison itself reaches W&B: one summary run in the plan's group with its tables
    from bench.tracking.wandb_setup import read_offline_artifacts, read_offline_run_info, read_offline_tables

    summaries = run_env["tmp"] / "runs" / "_summaries"
    info = read_offline_run_info(summaries)
    assert info["group"] == "repro-my-comparison-tiny" and info["job_type"] == "reproduce"
    assert info["name"] == "My two arms (tiny): summary" and info["config"]["plan"] == "my-comparison"
    tables = read_offline_tables(summaries)
    arms = {row[0]: dict(zip(tables["arms"]["columns"], row)) for row in tables["arms"]["data"]}
    by_arm = {r.extra["arm"]: r for r in records}
    assert arms["switch"]["mean"] == pytest.approx(by_arm["switch"].metrics["val_loss"])
    assert arms["dense"]["active_params"] == by_arm["dense"].params["active"]
    assert [row[:2] for row in tables["claims"]["data"]] == [["Switch beats dense", "inconclusive"]]
    assert sorted(row[2] for row in tables["runs"]["data"]) == sorted(r.run_id for r in records)
    assert main(["reproduce", str(path), "--storage", run_env["storage"]]) == 0  # nothing new trained ...
    assert len(list(summaries.rglob("*.wandb"))) == 1  # ... so no second summary run

    assert main(["report", "--storage", run_env["storage"], "--out", str(tmp_path / "out"), "--no-plots",
                 "--wandb"]) == 0
    report = (tmp_path / "out" / "REPORT.md").read_text()
    assert "My two arms — `my-comparison`, tier `tiny`" in report
    assert "| my-comparison | tiny | 2e+09 | 2 | Switch beats dense |" in report
    claims = __import__("json").loads((tmp_path / "out" / "claims.json").read_text())
    (mine,) = [c for c in claims if c["reproduction"] == "my-comparison"]
    assert mine["verdict"] == "inconclusive" and mine["n_seeds"] == 1 and mine["metric"] == "val_loss"
    (report_run,) = [p.parent for p in summaries.rglob("*.wandb") if "report" in read_offline_run_info(p)["job_type"]]
    assert read_offline_artifacts(report_run)["moe-bench-report"] == {"type": "report",
                                                                     "files": ["REPORT.md", "claims.json"]}
    (row,) = [r for r in read_offline_tables(report_run)["claims"]["data"] if r[0] == "my-comparison"]
    assert row[-1] == "inconclusive" and row[3] == "Switch beats dense"


def test_throughput_is_measured_per_arm_and_feeds_the_equal_time_claim(run_env, tmp_path):
    from bench.report import throughput_records
    from bench.throughput import measure_throughput
    from bench.tracking.records import throughput_by_arm

    plan = parse_plan({"name": "speed", "title": "speed", "task": "tinyshakespeare-char", "baseline": "dense",
                       "settings": dict(parse_override(p) for p in SMALL),
                       "tiers": {"tiny": {"budget_flops": 2e9, "seeds": 1}},
                       "arms": [{"label": "dense", "model": "dense"},
                                {"label": "switch", "model": "switch", "settings": {"d_expert": 64}},
                                {"label": "switch cf=2", "model": "switch",
                                 "settings": {"d_expert": 64, "capacity_factor": 2.0}}]}, "speed.yaml")
    said = []
    records = measure_throughput(plan, "tiny", storage=run_env["storage"], repeats=2, steps=3, warmup=2,
                                 announce=said.append)
    assert [(r.extra["arm"], r.seed) for r in records] == [
        ("dense", 0), ("switch", 0), ("switch cf=2", 0), ("dense", 1), ("switch", 1), ("switch cf=2", 1)]
    # timed dropless, the two switch arms are one model: the user is told their gap is noise
    assert said[0] == ("  note: switch, switch cf=2 time the same model (dropless, their capacity does not count; a "
                       "training setting such as the learning rate never does): their tokens/s differ by noise alone, "
                       "and the report does not judge a speed claim between them")
    assert all(r.metrics["tokens_per_second"] > 0 and r.extra["kind"] == "throughput" for r in records)
    assert records[1].extra["dropless"] is True and records[0].extra["dropless"] is False
    # the process's CPU share over each measurement: what the report judges a busy machine by
    assert all(0 < r.timings["cpu_share"] < 1.5 for r in records)
    store = ResultsStore(run_env["storage"])
    speeds = throughput_by_arm(throughput_records(store)[("speed", "tiny")])
    assert sorted(speeds) == ["dense", "switch", "switch cf=2"] and len(speeds["dense"]) == 2
    # a throughput measurement is never mistaken for a finished training run of its arm
    assert all(r.done is None for r in plan_runs(plan, "tiny", store))


def test_a_config_field_added_later_at_its_default_keeps_finished_runs():
    from bench.runner.arms import same_config

    plan = load_plan("capacity")
    arm = plan.arm("switch cf=1.0")
    wanted = planned_config(plan, arm, "tiny", arm_budget(plan, arm, "tiny"))
    older = json_copy(wanted)
    del older["run"]["train"]["beam_size"]  # a record written before the field existed
    del older["model"]["moe"]["jitter_eps"]
    assert same_config(older, wanted)
    changed = json_copy(wanted)
    changed["run"]["train"]["beam_size"] = 4  # the plan asks for a non-default value: re-run
    assert not same_config(older, changed)
    assert not same_config({**wanted, "run": {**wanted["run"], "extra_field": 1}}, wanted)  # a removed field
    lr = json_copy(wanted)
    lr["run"]["optim"]["lr"] = 1.0
    assert not same_config(lr, wanted)


def json_copy(d):
    import json

    return json.loads(json.dumps(d))


def test_an_equal_time_arm_waits_for_throughput_then_gets_the_baselines_time_in_tokens(tmp_path):
    from bench.runner.arms import NeedsThroughput, throughput_medians

    store = ResultsStore(f"sqlite:///{tmp_path / 't.db'}")
    plan = load_plan("switch-vs-dense")
    runs = plan_runs(plan, "ref", store)
    assert {r.arm.label for r in runs} == {"dense", "switch cf=1.25"}  # the equal-time arm waits ...
    assert runs.waiting[0][0] == "switch cf=1.25 equal-time" and "--throughput" in runs.waiting[0][1]
    with pytest.raises(NeedsThroughput, match="measure both arms' tokens/s first"):  # ... or says why, if asked for
        plan_runs(plan, "ref", store, arms=["switch cf=1.25 equal-time"])
    for arm, tps in (("dense", 1000.0), ("dense", 1200.0), ("dense", 1100.0), ("switch cf=1.25 equal-time", 800.0)):
        store.save(RunRecord(run_id=f"{arm}-{tps}", group=plan.group("ref"), status="finished",
                             metrics={"tokens_per_second": tps},
                             extra={"reproduction": plan.name, "arm": arm, "tier": "ref", "kind": "throughput"}))
    assert throughput_medians(store, plan, "ref") == {"dense": 1100.0, "switch cf=1.25 equal-time": 800.0}
    runs = plan_runs(plan, "ref", store)
    equal = next(r for r in runs if r.arm.label == "switch cf=1.25 equal-time")
    dense_tokens = arm_budget(plan, plan.arm("dense-wide"), "ref")["value"]  # the FLOP budget in dense tokens
    assert equal.budget == {"kind": "tokens", "value": float(int(dense_tokens * 800 / 1100))}


def test_compare_is_a_plan_run_by_the_runner_with_any_budget_kind(run_env, capsys):
    from bench.cli import main

    args = ["compare", "--task", "tinyshakespeare-char", "--models", "dense", "switch", "--budget-steps", "6",
            "--seeds", "2", "--group", "cmp", "--storage", run_env["storage"]]
    assert main(args + [a for o in SMALL + ["d_expert=64"] for a in ("--set", o)]) == 0
    out = capsys.readouterr().out
    assert "dense vs switch on tinyshakespeare-char (tier cli)" in out
    assert "switch reaches a lower validation loss than dense at the same budget" in out and "2 seeds" in out
    records = ResultsStore(run_env["storage"]).list(group="cmp")
    assert sorted((r.extra["arm"], r.seed) for r in records) == [("dense", 0), ("dense", 1), ("switch", 0), ("switch", 1)]
    assert all(r.budget == {"kind": "steps", "value": 6} and r.steps == 6 for r in records)
    assert all(r.extra["comparison"] == "cmp" and "reproduction" not in r.extra for r in records)  # not a report plan
    from bench.tracking.wandb_setup import read_offline_run_info, read_offline_tables

    summary = run_env["tmp"] / "runs" / "_summaries"
    assert read_offline_run_info(summary)["job_type"] == "compare" and read_offline_run_info(summary)["group"] == "cmp"
    assert len(read_offline_tables(summary)["runs"]["data"]) == 4
    # the same command again: every pair is finished with the same config, nothing retrains
    assert main(args + [a for o in SMALL + ["d_expert=64"] for a in ("--set", o)]) == 0
    assert "4 runs (4 already finished)" in capsys.readouterr().err
    assert len(ResultsStore(run_env["storage"]).list(group="cmp")) == 4


def test_a_tier_takes_exactly_one_budget():
    base = {"name": "x", "title": "x", "task": "tinyshakespeare-char", "baseline": "a",
            "arms": [{"label": "a", "model": "dense"}]}
    for tier, message in (({"seeds": 1}, "give exactly one of budget_flops"),
                          ({"budget_flops": 1e9, "budget": {"steps": 5}}, "give exactly one of budget_flops"),
                          ({"budget": {"joules": 5}}, "expected one of flops, tokens, steps, seconds")):
        with pytest.raises(ConfigError, match=message):
            parse_plan({**base, "tiers": {"t": tier}}, "t.yaml")
    assert parse_plan({**base, "tiers": {"t": {"budget": {"steps": 5}}}}, "t.yaml").tiers["t"].budget_spec() == {
        "kind": "steps", "value": 5}


def test_run_dispatches_a_plan_to_reproduce_and_a_space_to_sweep(monkeypatch, tmp_path, capsys):
    from bench import cli

    calls = []
    real_main = cli.main
    monkeypatch.setattr(cli, "main", lambda argv: calls.append(argv) or 0)
    assert cli.cmd_run(cli.build_parser().parse_args(["run", "capacity", "--tier", "ref", "--seeds", "1"])) == 0
    assert cli.cmd_run(cli.build_parser().parse_args(["run", "switch-tpe", "--n-trials", "2"])) == 0
    assert calls == [["reproduce", "capacity", "--tier", "ref", "--seeds", "1"], ["sweep", "switch-tpe", "--n-trials", "2"]]
    monkeypatch.setattr(cli, "main", real_main)
    odd = tmp_path / "odd.yaml"
    odd.write_text("task: x\n")
    assert cli.main(["run", str(odd)]) == 2
    assert "has neither arms: (a plan" in capsys.readouterr().err


@pytest.mark.parametrize("error, trained", [("fatal", 1), ("ordinary", 2)])
def test_one_failure_policy_a_fatal_error_stops_the_plan_an_ordinary_one_does_not(run_env, monkeypatch, error, trained):
    """bench.runner.failures: a DataError would fail every arm the same way, so the plan stops at
    the first; a NaN loss is that run's own failure, so it is recorded and the next arm runs."""
    import bench.train.run as run_module
    from bench.data.sources import DataError

    attempts, store = [], ResultsStore(run_env["storage"])

    def failing_train(task, family, preset, overrides, *, run_id, seed, **kw):
        attempts.append(family)
        record = RunRecord(run_id=run_id, task=task, family=family, preset=preset, seed=seed, group=kw["group"],
                           budget=kw["budget"], extra=dict(kw["tags"]))
        record.finish("failed", "boom")
        store.save(record)  # train() records the failure before raising
        raise DataError("train.txt is missing") if error == "fatal" else FloatingPointError("training loss is nan")

    monkeypatch.setattr(run_module, "train", failing_train)
    said = []
    kw = dict(seeds=1, storage=run_env["storage"], overrides=SMALL, arms=["dense", "switch cf=1.25"], budget_flops=2e9,
              progress=False, announce=said.append, include_failed=True)
    if error == "fatal":
        with pytest.raises(DataError, match="train.txt is missing"):
            run_plan("switch-vs-dense", **kw)
    else:
        records = run_plan("switch-vs-dense", **kw)
        assert [r.status for r in records] == ["failed", "failed"]
        assert "  dense (seed 0) failed: FloatingPointError: training loss is nan; the other runs go on" in said
    assert attempts == ["dense", "switch"][:trained]


def test_sigusr1_lets_the_current_run_finish_then_stops_the_plan(run_env, monkeypatch):
    """``kill -USR1`` (scripts/stop_reference_queue.sh --after-run): the run being trained finishes
    and is recorded, no other pair starts, and SIGUSR1's handler is put back afterwards."""
    import os
    import signal

    import bench.train.run as run_module

    attempts, store = [], ResultsStore(run_env["storage"])

    def train_then_get_asked(task, family, preset, overrides, *, run_id, seed, **kw):
        attempts.append(family)
        os.kill(os.getpid(), signal.SIGUSR1)  # arrives while the run trains
        record = RunRecord(run_id=run_id, task=task, family=family, preset=preset, seed=seed, group=kw["group"],
                           budget=kw["budget"], extra=dict(kw["tags"]))
        record.finish("finished")
        store.save(record)
        return record

    monkeypatch.setattr(run_module, "train", train_then_get_asked)
    before = signal.getsignal(signal.SIGUSR1)
    said = []
    with pytest.raises(KeyboardInterrupt):
        run_plan("switch-vs-dense", seeds=1, storage=run_env["storage"], overrides=SMALL,
                 arms=["dense", "switch cf=1.25"], budget_flops=2e9, progress=False, announce=said.append)
    assert attempts == ["dense"]
    assert [r.status for r in store.list()] == ["finished"]
    assert ("stopped before [2/2] switch cf=1.25 (seed 0), as asked (SIGUSR1): 1 of 2 runs left; run the same "
            "command again to continue (finished runs are kept)") in said
    assert signal.getsignal(signal.SIGUSR1) is before


def test_run_file_runs_a_users_plan_and_a_search_space_through_the_one_runner(run_env, tmp_path):
    from bench.runner import experiment_kind, run_file

    plan = {"name": "two-arms", "title": "Two arms", "task": "tinyshakespeare-char", "baseline": "dense",
            "settings": dict(parse_override(p) for p in SMALL), "tiers": {"tiny": {"budget_flops": 2e9, "seeds": 1}},
            "arms": [{"label": "dense", "model": "dense"}, {"label": "wider", "model": "dense",
                                                            "settings": {"d_ff": 128}}]}
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    space = {"task": "tinyshakespeare-char", "family": "dense", "budget": {"steps": 4}, "objectives": ["quality"],
             "fixed": {k: v for k, v in (parse_override(p) for p in SMALL) if k not in ("d_ff", "num_experts")},
             "sampler": {"name": "grid"},
             "space": {"d_ff": [64, 128]}}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    assert experiment_kind(str(tmp_path / "plan.yaml"))[0] == "plan"
    assert experiment_kind("switch-tpe")[0] == "search"  # a shipped name
    records = run_file(str(tmp_path / "plan.yaml"), storage=run_env["storage"], progress=False,
                       announce=lambda msg: None)
    assert sorted(r.extra["arm"] for r in records) == ["dense", "wider"] and all(r.status == "finished" for r in records)
    result = run_file(str(tmp_path / "space.yaml"), storage=run_env["storage"], progress=False, log=lambda msg: None)
    assert (result.completed, result.failed) == (2, 0)
    finished = ResultsStore(run_env["storage"]).list(group=result.study_name)
    assert sorted(r.config["model"]["d_ff"] for r in finished) == [64, 128]


def test_an_upcycling_plan_starts_each_seed_from_its_own_first_stage(run_env):
    """init_from arms start from the same seed's finished run of the named arm; budget_fraction
    gives that first stage a share of the budget; the total budget counts both stages."""
    budget = 6e9
    plan = parse_plan({"name": "upc", "title": "upc", "task": "tinyshakespeare-char", "baseline": "dense half",
                       "settings": dict(parse_override(p) for p in SMALL),
                       "tiers": {"tiny": {"budget_flops": budget, "seeds": 1}},
                       "arms": [{"label": "dense half", "model": "dense", "budget_fraction": 0.5},
                                {"label": "dense continued", "model": "dense", "init_from": "dense half"},
                                {"label": "upcycled", "model": "switch", "init_from": "dense half",
                                 "settings": {"d_expert": 64}}]}, "upc.yaml")
    store = ResultsStore(run_env["storage"])
    said = []
    # the second stage alone, before its source exists: skipped with the reason, nothing trained
    assert run_plan(plan, "tiny", storage=run_env["storage"], arms=["upcycled"], progress=False,
                    announce=said.append) == []
    assert any("skipping upcycled (seed 0): it starts from 'dense half' (seed 0), which has no finished run" in m
               for m in said)
    records = {r.extra["arm"]: r for r in run_plan(plan, "tiny", storage=run_env["storage"], progress=False,
                                                   announce=said.append)}
    first = records["dense half"]
    assert first.budget == {"kind": "flops", "value": budget / 2} and first.train_flops >= budget / 2
    for label in ("dense continued", "upcycled"):
        r = records[label]
        assert r.config["init_from"]["run_id"] == first.run_id
        assert r.extra["total_train_flops"] == pytest.approx(first.train_flops + r.train_flops)
        assert budget <= r.extra["total_train_flops"] < budget * 1.1  # both stages within the budget's last step
    assert records["upcycled"].family == "switch" and records["dense continued"].family == "dense"
    # nothing left to do on a second call: every pair finished with its planned config
    assert all(r.done is not None for r in plan_runs(plan, "tiny", store))


def test_init_from_must_name_an_earlier_arm_with_budget_left():
    base = {"name": "x", "title": "x", "task": "tinyshakespeare-char", "baseline": "d",
            "tiers": {"tiny": {"budget_flops": 1e12}, "short": {"budget_flops": 1e12, "arms": ["d", "u"]}}}
    with pytest.raises(ConfigError) as err:
        parse_plan({**base, "arms": [{"label": "d", "model": "dense"},
                                     {"label": "u", "model": "switch", "init_from": "d"},
                                     {"label": "v", "model": "switch", "init_from": "w"},
                                     {"label": "w", "model": "dense", "budget_fraction": 1.5}]}, "x.yaml")
    text = str(err.value)
    for expected in ("arm 'u': its budget counts 'd''s FLOPs, which already spend the whole budget",
                     "arm 'v': init_from='w' must name an arm listed before it",
                     "budget_fraction=1.5 is not allowed: expected a share in (0, 1]"):
        assert expected in text, expected
    with pytest.raises(ConfigError, match="tiers.short.arms has 'u' but not 'h', which it starts from"):
        parse_plan({**base, "tiers": {"short": {"budget_flops": 1e12, "arms": ["d", "u"]}},
                    "arms": [{"label": "d", "model": "dense"}, {"label": "h", "model": "dense", "budget_fraction": 0.5},
                             {"label": "u", "model": "switch", "init_from": "h"}]}, "x.yaml")


def test_status_without_a_name_gives_every_plans_progress_at_the_tier(monkeypatch, capsys):
    """One line per shipped plan: runs finished of planned, hours, hours left; a plan with no finished
    run is estimated (starred) at the tier's hours per training FLOP times its budget, or at the
    tier's mean hours per run when it has no FLOP budget."""
    from bench.runner import status as status_mod

    def pair(arm, seed, state, hours=None):
        return {"arm": arm, "seed": seed, "state": state, "hours": hours}

    fake = {"switch-vs-dense": [pair("dense", 0, "finished", 0.25), pair("switch", 0, "finished", 0.5)],
            "switch-experts": [pair("dense", 0, "finished", 0.75), pair("switch E=4", 0, "running"),
                               pair("dense", 1, "to do")],
            "moe-rnn": [pair("lstm", 0, "to do"), pair("lstm", 1, "to do")],
            "translation": [pair("dense", 0, "to do"), pair("dense", 1, "to do")]}
    budgets = {"switch-vs-dense": 1e14, "switch-experts": 2e14, "moe-rnn": 5e13, "translation": None}

    def plan_status(plan, tier, store):
        pairs = fake.get(plan.name, [])
        done = [p["hours"] for p in pairs if p["state"] == "finished"]
        return {"plan": plan.name, "pairs": pairs, "finished": len(done), "total": len(pairs), "planned": len(pairs),
                "budget_flops": budgets[plan.name], "hours_spent": sum(done),
                "hours_left": 0.75 * 2 if plan.name == "switch-experts" else
                (0.0 if pairs and len(done) == len(pairs) else None)}

    monkeypatch.setattr(status_mod, "plan_status", plan_status)
    monkeypatch.setattr(status_mod, "all_plans", lambda: {n: load_plan(n) for n in fake})
    overview = status_mod.tier_overview("ref", store=None)
    assert overview["hours_per_run"] == pytest.approx(0.5)  # (0.25 + 0.5 + 0.75) / 3
    # (0.25 + 0.5) h for 2 x 1e14 FLOPs and 0.75 h for 2e14: 1.5 h / 4e14
    assert overview["hours_per_flop"] * 1e14 == pytest.approx(0.375)
    rnn = next(r for r in overview["plans"] if r["plan"] == "moe-rnn")
    assert (rnn["hours_left"], rnn["estimated_from_others"]) == (pytest.approx(0.375 * 0.5 * 2), True)
    mt = next(r for r in overview["plans"] if r["plan"] == "translation")
    assert (mt["hours_left"], mt["estimated_from_others"]) == (pytest.approx(0.5 * 2), True)
    assert overview["hours_left"] == pytest.approx(0.0 + 1.5 + 0.375 + 1.0)
    assert (overview["finished"], overview["total"]) == (3, 9)
    text = status_mod.format_overview(overview)
    assert text.startswith("tier ref: 3 of 9 runs finished, 1.5 h of machine time; ~2.9 h left")
    assert "switch-experts     1/3      0.8    ~1.5  switch E=4 seed 0" in text
    assert "moe-rnn            0/2      0.0   ~0.4*" in text and "switch-vs-dense    2/2      0.8    done" in text
    assert ("* no run of the plan finished yet: estimated at the tier's pace so far, 0.38 h per 1e14 training "
            "FLOPs (times the plan's budget)") in text


def test_status_counts_machine_hours_so_parallel_one_thread_runs_are_not_double_counted():
    from bench.runner.status import _hours

    def rec(**timings):
        return RunRecord(run_id="r", task="t", family="dense", preset="tiny", seed=0, timings=timings)

    assert _hours(rec(wall_seconds=7200.0, threads=1, cpus=2)) == pytest.approx(1.0)  # half the cores for 2 h
    assert _hours(rec(wall_seconds=3600.0, threads=2, cpus=2)) == pytest.approx(1.0)
    assert _hours(rec(wall_seconds=3600.0, threads=8, cpus=2)) == pytest.approx(1.0)  # oversubscribed: the machine
    assert _hours(rec(wall_seconds=3600.0)) == pytest.approx(1.0)  # older records: whole machine
    assert _hours(rec()) is None


def test_status_without_a_name_from_the_cli_on_an_empty_store(tmp_path, capsys):
    from bench.cli import main
    from bench.plans import all_plans

    # a tier with sequential looks plans its first look's seeds until that look is in
    planned = sum(len(p.tier_arms("ref")) * (p.tier("ref").looks or [p.tier("ref").seeds])[0]
                  for p in all_plans().values() if "ref" in p.tiers)
    assert main(["reproduce", "--status", "--tier", "ref", "--storage", f"sqlite:///{tmp_path / 'r.db'}"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"tier ref: 0 of {planned} runs finished, 0.0 h of machine time; time left unknown")
    assert "switch-experts     0/20     0.0       -" in out


def test_a_tiers_looks_are_increasing_seed_counts_that_end_at_its_seeds():
    from bench.plans import Tier

    assert Tier(budget_flops=1e12, seeds=10, looks=[5, 10]).problems() == []
    for bad in ([5, 8], [10, 5, 10], [1, 10], [5, 5, 10]):
        (problem,) = Tier(budget_flops=1e12, seeds=10, looks=bad).problems()
        assert problem.startswith(f"looks={bad} is not allowed: increasing seed counts of at least 2 that end at seeds=10")


LOOKS_PLAN = """
name: looks-demo
title: Switch vs dense, seeds in two looks
paper: test
task: tinyshakespeare-char
baseline: dense
tiers:
  ref: {preset: tiny, budget_flops: 2.0e9, seeds: 4, looks: [2, 4], first_seed: 10}
arms:
  - {label: dense, model: dense}
  - {label: switch, model: switch}
claims:
  - {text: Switch beats dense, kind: better, a: switch, b: dense, metric: val_loss, direction: lower, headline: true}
"""


@pytest.mark.parametrize("gap, trained_seeds", [((0.1, 0.1001), [10, 11]), ((0.05, -0.05), [10, 11, 12, 13])])
def test_a_tier_with_looks_stops_at_the_first_look_that_decides_every_headline_claim(
        run_env, monkeypatch, tmp_path, gap, trained_seeds):
    """bench.runner.looks: looks [2, 4]; switch ahead of dense by 0.1 in both seeds of the first look is
    decided there (2 of 4 seeds trained); +-0.05 is not, so seeds 12-13 follow. --status says which."""
    import bench.train.run as run_module
    from bench.runner.arms import planned_config
    from bench.runner.status import format_status, plan_status

    path = tmp_path / "looks-demo.yaml"
    path.write_text(LOOKS_PLAN)
    plan = load_plan(str(path))
    store = ResultsStore(run_env["storage"])

    def fake_train(task, family, preset, overrides, *, run_id, seed, **kw):
        arm = next(a for a in plan.arms if a.label == kw["tags"]["arm"])
        loss = 2.0 - (gap[seed % 2] if arm.label == "switch" else 0.0)
        record = RunRecord(run_id=run_id, task=task, family=family, preset=preset, seed=seed, group=kw["group"],
                           budget=kw["budget"], extra=dict(kw["tags"]), metrics={"val_loss": loss},
                           config=planned_config(plan, arm, "ref", kw["budget"]))
        record.finish("finished")
        store.save(record)
        return record

    monkeypatch.setattr(run_module, "train", fake_train)
    said = []
    records = run_plan(str(path), tier="ref", storage=run_env["storage"], progress=False, announce=said.append)
    assert sorted({r.seed for r in records}) == trained_seeds and len(records) == 2 * len(trained_seeds)
    assert said[0] == ("looks at 2, 4 seeds: look 1 (seeds 10-11) first; more seeds only if a headline claim is "
                       "undecided there")
    status = format_status(plan_status(plan, "ref", store))
    if len(trained_seeds) == 2:
        stop = ("look 1 of 2: every headline claim is decided at 2 paired seeds, so the tier stops there (2 of its "
                "4 seeds not trained)")
        assert said[-1] == stop and status.startswith("looks-demo tier ref (group repro-looks-demo-ref): 4 of 4 runs")
        assert status.endswith(stop)
    else:
        assert ("look 1 of 2 (2 seeds) left 1 headline claim(s) undecided (Switch beats dense (inconclusive)): "
                "training up to 4 seeds (seeds 10-13)") in said
        assert status.startswith("looks-demo tier ref (group repro-looks-demo-ref): 8 of 8 runs")
    # run again: nothing to train, the same seeds
    again = run_plan(str(path), tier="ref", storage=run_env["storage"], progress=False, announce=said.append)
    assert sorted(r.run_id for r in again) == sorted(r.run_id for r in records)


def test_a_look_whose_last_runs_other_processes_train_is_left_to_them(tmp_path):
    from types import SimpleNamespace

    from bench.runner.looks import look_seeds

    path = tmp_path / "looks-demo.yaml"
    path.write_text(LOOKS_PLAN)
    plan = load_plan(str(path))
    done = SimpleNamespace(done=object(), busy=None)
    held = SimpleNamespace(done=None, busy="process 7 on host (run x)")
    free = SimpleNamespace(done=None, busy=None)
    store = ResultsStore(f"sqlite:///{tmp_path}/s.db")
    n, why = look_seeds(plan, "ref", store, lambda n: [done, done, done, held])
    assert n == 2 and why == ("look 1 (seeds 10-11) waits for 1 run(s) other processes are training; the one that "
                              "completes the look decides whether the tier goes on")
    n, why = look_seeds(plan, "ref", store, lambda n: [done, free, done, held])
    assert n == 2 and why.startswith("looks at 2, 4 seeds: look 1 (seeds 10-11) first")
