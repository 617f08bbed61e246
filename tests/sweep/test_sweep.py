"""Sweeps end to end: every trial a real (tiny) training run with its record in the same store."""
from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from bench.config import ConfigError
from bench.data.sources import DataError
from bench.runner.search import run_sweep
from bench.sweep import load_spec
from bench.sweep.study import open_study, trial_counts
from bench.sweep.show import format_study, load_existing_study, study_summary
from bench.tracking.records import ResultsStore

QUIET = {"progress": False, "log": lambda msg: None}


def records_of(storage: str, study: str):
    return ResultsStore(storage).list(group=study)


def test_three_trial_sweep_writes_three_records(run_env, write_spec):
    path = write_spec("three", sampler="random", n_trials=3,
                      space={"num_experts": [2, 4], "lr": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True}})
    result = run_sweep(load_spec(str(path)), storage=run_env["storage"], **QUIET)
    assert (result.completed, result.pruned, result.failed) == (3, 0, 0)
    study = load_existing_study("three", run_env["storage"])
    records = {r.run_id: r for r in records_of(run_env["storage"], "three")}
    assert len(records) == 3 and all(r.status == "finished" for r in records.values())
    for t in study.trials:  # each trial's value is its run's headline quality, its params its config
        record = records[t.user_attrs["run_id"]]
        assert t.value == pytest.approx(record.metrics["quality"])
        assert record.config["model"]["moe"]["num_experts"] == t.params["num_experts"]
        assert record.config["run"]["optim"]["lr"] == pytest.approx(t.params["lr"])
        assert record.extra["study"] == "three" and record.extra["trial"] == t.number
        assert record.budget == {"kind": "steps", "value": 10} and record.steps == 10  # compute-matched


def test_grid_sweep_covers_exactly_its_grid(run_env, write_spec):
    path = write_spec("grid", sampler="grid", space={"num_experts": [2, 4], "capacity_factor": [1.0, None]})
    result = run_sweep(load_spec(str(path)), storage=run_env["storage"], **QUIET)
    assert result.completed == 4
    study = load_existing_study("grid", run_env["storage"])
    seen = sorted((t.params["num_experts"], str(t.params["capacity_factor"])) for t in study.trials)
    assert seen == sorted((e, str(c)) for e, c in itertools.product([2, 4], [1.0, None]))
    # Running the same command again adds nothing: the grid is done.
    run_sweep(load_spec(str(path)), storage=run_env["storage"], **QUIET)
    assert len(load_existing_study("grid", run_env["storage"]).trials) == 4


def test_failed_trial_is_recorded_with_its_reason_and_the_sweep_goes_on(run_env, write_spec, monkeypatch):
    import bench.train.run as run_module

    real_train = run_module.train

    def flaky_train(task, family, preset, overrides, **kw):
        if overrides["num_experts"] == 4:
            raise RuntimeError("CPU out of memory (simulated)")
        return real_train(task, family, preset, overrides, **kw)

    monkeypatch.setattr(run_module, "train", flaky_train)
    path = write_spec("flaky", sampler="grid", space={"num_experts": [2, 4, 8]})
    result = run_sweep(load_spec(str(path)), storage=run_env["storage"], **QUIET)
    assert (result.completed, result.failed) == (2, 1)
    summary = study_summary(load_existing_study("flaky", run_env["storage"]))
    failed = [t for t in summary["trials"] if t["state"] == "fail"]
    assert len(failed) == 1 and failed[0]["params"] == {"num_experts": 4}
    assert failed[0]["error"] == "RuntimeError: CPU out of memory (simulated)"
    assert "CPU out of memory (simulated)" in format_study(summary, run_env["storage"])


def test_nan_loss_fails_the_trial_not_the_sweep(run_env, write_spec):
    # lr=1e6 blows the weights up within a few steps: FloatingPointError from the training step.
    path = write_spec("nan", sampler="grid", space={"lr": [1e-3, 1e6]},
                      fixed={"grad_clip": 0, "warmup_steps": 0})
    result = run_sweep(load_spec(str(path)), storage=run_env["storage"], **QUIET)
    assert (result.completed, result.failed) == (1, 1)
    failed = [t for t in load_existing_study("nan", run_env["storage"]).trials if t.state.name == "FAIL"]
    assert failed[0].params == {"lr": 1e6}
    assert failed[0].user_attrs["error"].startswith("FloatingPointError: training loss is nan")
    record = ResultsStore(run_env["storage"]).get(failed[0].user_attrs["run_id"])
    assert record.status == "failed" and "FloatingPointError" in record.error


def test_missing_data_stops_the_sweep_and_the_trial_is_retried(run_env, write_spec, monkeypatch, tmp_path):
    path = write_spec("nodata", sampler="grid", space={"num_experts": [2, 4]})
    good = os.environ["MOE_BENCH_DATA"]
    monkeypatch.setenv("MOE_BENCH_DATA", str(tmp_path / "empty"))
    with pytest.raises(DataError, match="is missing"):
        run_sweep(load_spec(str(path)), storage=run_env["storage"], **QUIET)
    monkeypatch.setenv("MOE_BENCH_DATA", good)
    result = run_sweep(load_spec(str(path)), storage=run_env["storage"], **QUIET)
    assert result.completed == 2
    states = sorted(t["state"] for t in study_summary(load_existing_study("nodata", run_env["storage"]))["trials"])
    assert states == ["complete", "complete", "interrupted"]  # the stopped trial ran again, not a third point


def test_pruned_trial_is_recorded_as_pruned_with_its_last_value(run_env, write_spec):
    path = write_spec("prune", sampler="random", n_trials=2, budget={"steps": 20},
                      pruner={"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
                      space={"lr": {"type": "float", "low": 1e-8, "high": 1e-2, "log": True}})
    spec = load_spec(str(path))
    study = open_study(spec, ResultsStore(run_env["storage"]).url, "prune")
    study.enqueue_trial({"lr": 5e-3})  # learns: sets the median
    study.enqueue_trial({"lr": 1e-8})  # cannot learn: below the median at its first evaluation
    result = run_sweep(spec, storage=run_env["storage"], **QUIET)
    assert (result.completed, result.pruned) == (1, 1)
    pruned = load_existing_study("prune", run_env["storage"]).trials[1]
    assert pruned.state.name == "PRUNED" and pruned.params == {"lr": 1e-8}
    assert pruned.value == pruned.intermediate_values[0]  # its last reported value, at the first evaluation
    record = ResultsStore(run_env["storage"]).get(pruned.user_attrs["run_id"])
    assert record.status == "pruned" and record.steps == 5  # stopped after one of four evaluations
    assert record.metrics["val_mean_token_prob"] == pytest.approx(pruned.value)


def test_multi_objective_study_reports_its_pareto_set(run_env, write_spec):
    path = write_spec("pareto", sampler="grid", family=["dense", "switch"], space={"d_model": [16, 32]},
                      objectives=["quality", "active_params"], fixed={"d_ff": 32, "n_heads": 2})
    run_sweep(load_spec(str(path)), storage=run_env["storage"], **QUIET)
    study = load_existing_study("pareto", run_env["storage"])
    assert study.metric_names == ["quality", "active_params"]  # optuna-dashboard's axis labels
    summary = study_summary(study)
    done = [t for t in summary["trials"] if t["state"] == "complete"]
    assert len(done) == 4

    def dominated(a):  # another trial at least as good on both objectives and better on one
        return any(b["values"][0] >= a["values"][0] and b["values"][1] <= a["values"][1] and b["values"] != a["values"]
                   for b in done)

    assert sorted(summary["pareto"]) == sorted(t["number"] for t in done if not dominated(t))
    assert "Pareto set" in format_study(summary, run_env["storage"])


def test_loss_vs_maxvio_front_over_balancing_weights(run_env, write_spec):
    """objectives [val_loss, max_violation]: each trial's MaxVio is its record's last evaluation's."""
    from bench.metrics import last_eval_max_violation

    path = write_spec("balance", sampler="grid", family="moe", space={"load_balance_weight": [1e-4, 1e-1]},
                      objectives=["val_loss", "max_violation"])
    run_sweep(load_spec(str(path)), storage=run_env["storage"], **QUIET)
    study = load_existing_study("balance", run_env["storage"])
    assert study.metric_names == ["val_loss", "max_violation"]
    records = {r.run_id: r for r in records_of(run_env["storage"], "balance")}
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 2
    for t in done:
        r = records[t.user_attrs["run_id"]]
        assert t.values == [pytest.approx(r.metrics["val_loss"]), pytest.approx(last_eval_max_violation(r.expert_stats))]
        assert t.values[1] == pytest.approx(sum(s["eval"]["max_violation"] for s in r.expert_stats) / len(r.expert_stats))


def test_changed_settings_refuse_to_continue_a_study(run_env, write_spec):
    path = write_spec("fixed-settings", sampler="grid", space={"num_experts": [2]})
    run_sweep(load_spec(str(path)), storage=run_env["storage"], **QUIET)
    with pytest.raises(ConfigError, match=r"was created with other settings(.|\n)*budget: study has"):
        run_sweep(load_spec(str(path), budget={"kind": "steps", "value": 11}), storage=run_env["storage"], **QUIET)


def test_cli_show_and_unknown_study(run_env, write_spec):
    path = write_spec("cli", sampler="grid", space={"num_experts": [2, 4]})
    cmd = [sys.executable, "-m", "bench.cli", "sweep"]
    proc = subprocess.run([*cmd, str(path), "--storage", run_env["storage"], "--json"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["counts"]["complete"] == 2 and len(summary["best"]) == 1
    shown = subprocess.run([*cmd, "--show", "cli", "--storage", run_env["storage"]], capture_output=True, text=True,
                           timeout=120)
    assert shown.returncode == 0 and "best trial #" in shown.stdout and "optuna-dashboard sqlite:///" in shown.stdout
    missing = subprocess.run([*cmd, "--show", "nope", "--storage", run_env["storage"]], capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode == 2 and "study 'nope' is not in" in missing.stderr and "cli" in missing.stderr


def _sweep_cmd(path, storage):
    return [sys.executable, "-m", "bench.cli", "sweep", str(path), "--storage", storage]


@pytest.mark.slow
def test_kill_9_mid_sweep_then_same_command_continues_the_killed_trial(run_env, write_spec):
    path = write_spec("killed", sampler="grid", budget={"steps": 60}, space={"num_experts": [1, 2, 4]})
    storage = run_env["storage"]
    proc = subprocess.Popen(_sweep_cmd(path, storage), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, killed = time.time() + 240, None
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.3)
        try:
            trials = optuna.load_study(study_name="killed", storage=storage).trials
        except KeyError:
            continue  # the study does not exist yet
        running = [t for t in trials if t.state.name == "RUNNING" and t.user_attrs.get("run_id")]
        record = ResultsStore(storage).get(running[0].user_attrs["run_id"]) if running else None
        # Kill mid-training: a trial finished, and the next one's run has written its first checkpoint.
        ckpt = record and Path(record.paths.get("checkpoint_dir") or "") / "last.ckpt"
        if any(t.state.name == "COMPLETE" for t in trials) and ckpt and ckpt.is_file():
            os.kill(proc.pid, signal.SIGKILL)
            killed = running[0]
            break
    proc.wait(timeout=30)
    assert killed is not None, "the sweep finished before it could be killed mid-trial"

    done = subprocess.run(_sweep_cmd(path, storage), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "re-queued with the same parameters" in done.stderr
    assert f"continuing run {killed.user_attrs['run_id']} from its last checkpoint" in done.stderr
    study = load_existing_study("killed", storage)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert sorted(t.params["num_experts"] for t in complete) == [1, 2, 4]  # all three, none twice
    assert trial_counts(study).complete == 3
    again = [t for t in complete if t.params == killed.params]
    assert again[0].number != killed.number and again[0].user_attrs["run_id"] == killed.user_attrs["run_id"]
    records = records_of(storage, "killed")  # the killed run was continued, not started over
    assert sorted(r.status for r in records) == ["finished", "finished", "finished"]
    continued = ResultsStore(storage).get(killed.user_attrs["run_id"])
    assert continued.steps == 60 and again[0].value == pytest.approx(continued.metrics["quality"])


def _two_workers(path, storage, spec_name):
    # The parent creates the study (and Optuna's tables) first, as a cluster launcher would.
    open_study(load_spec(str(path)), ResultsStore(storage).url, spec_name)
    # One thread each: two workers share this machine's 2 cores (as they would share a node).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen(_sweep_cmd(path, storage), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, env=env) for _ in range(2)]
    errs = [w.communicate(timeout=600)[1] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(e[-1500:] for e in errs)
    study = load_existing_study(spec_name, storage)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert sorted(t.params["num_experts"] for t in complete) == [1, 2, 4, 8]
    finished = [r for r in records_of(storage, spec_name) if r.status == "finished"]
    assert len(finished) == 4 and len({r.config["model"]["moe"]["num_experts"] for r in finished}) == 4
    return {t.user_attrs["pid"] for t in complete}


@pytest.mark.slow
def test_two_workers_share_one_sqlite_study(run_env, write_spec):
    path = write_spec("pair", sampler="grid", budget={"steps": 20}, space={"num_experts": [1, 2, 4, 8]})
    _two_workers(path, run_env["storage"], "pair")


@pytest.mark.slow
def test_two_workers_share_one_postgresql_study(run_env, write_spec, fresh_postgres_url):
    path = write_spec("pair-pg", sampler="grid", budget={"steps": 20}, space={"num_experts": [1, 2, 4, 8]})
    _two_workers(path, fresh_postgres_url, "pair-pg")
