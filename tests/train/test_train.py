"""End-to-end training: budgets, run records, W&B offline, resume, translation BLEU, CLI."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import sacrebleu

from bench.config import ConfigError
from bench.flops import model_cost
from bench.models import model_config
from bench.tracking.records import ResultsStore
from bench.tracking.wandb_setup import read_offline_run_info, read_offline_run_keys
from bench.train.run import resume_run, train
from tests.train.conftest import SMALL

TASK = "tinyshakespeare-char"


def _train(run_env, family="dense", budget=None, extra=(), **kw):
    return train(TASK, family, "tiny", overrides=SMALL + list(extra),
                 budget=budget or {"kind": "steps", "value": 10}, storage=run_env["storage"], progress=False, **kw)


def test_steps_budget_record_and_offline_wandb(run_env):
    record = _train(run_env, "switch", {"kind": "steps", "value": 10})
    assert record.status == "finished" and record.steps == 10
    # FLOPs spent = steps x batch x seq_len x train FLOPs/token from bench.flops
    cfg = model_config("switch", "tiny", [o for o in SMALL if o.split("=")[0] in
                                          ("d_model", "n_layers", "n_heads", "d_ff", "num_experts")],
                       vocab_size=65, max_seq_len=256)
    cost = model_cost(cfg, 256)
    assert record.tokens_seen == 10 * 4 * 256
    assert record.train_flops == pytest.approx(10 * 4 * 256 * cost.train_flops_per_token)
    assert record.params["active"] == cost.active_params and record.params["total"] == cost.total_params
    m = record.metrics
    assert m["quality"] == pytest.approx(math.exp(-m["val_loss"]))
    assert m["quality_per_active_param"] == pytest.approx(m["quality"] / (cost.active_params / 1e6))
    assert m["val_bits_per_char"] == pytest.approx(m["val_loss"] / math.log(2))
    assert len(record.expert_stats) == 1 and len(record.expert_stats[0]["tokens_per_expert"]) == 4
    # the learning curve lives in the record: one point per evaluation (eval_every=5), equal to the CSV's
    assert [p["step"] for p in record.curve] == [5, 10]
    assert [p["tokens"] for p in record.curve] == [5 * 1024, 10 * 1024]
    assert record.curve[-1]["flops"] == pytest.approx(record.train_flops)
    # the machine's load was sampled at the start (at least): what the report judges a quiet run by
    t = record.timings
    assert t["load_samples"] >= 1 and 0 <= t["load_avg_mean"] <= t["load_avg_max"] and t["cpus"] >= 1
    # and the process's CPU share over training: CPU seconds / (wall x threads), pooled as thread-seconds
    assert t["threads"] >= 1 and t["cpu_seconds"] > 0 and t["cpu_thread_seconds"] > 0
    assert t["cpu_share"] == pytest.approx(t["cpu_seconds"] / t["cpu_thread_seconds"]) and 0 < t["cpu_share"] < 1.5
    from bench.runtime import machine_id

    assert t.get("machines") == ([machine_id()] if machine_id() else None)  # where it trained
    import csv

    with open(record.paths["csv_file"]) as f:
        csv_losses = [float(r["val/loss"]) for r in csv.DictReader(f) if r.get("val/loss")]
    assert [p["loss"] for p in record.curve] == pytest.approx(csv_losses[:2])
    # the stored record equals the returned one
    stored = ResultsStore(run_env["storage"]).get(record.run_id)
    assert stored.status == "finished" and stored.metrics["val_loss"] == m["val_loss"]
    assert stored.config["model"]["family"] == "switch" and stored.seed == 0
    assert Path(record.paths["csv_file"]).is_file()
    # a finished run keeps its record, CSV and W&B files, not its (large) checkpoint
    assert record.paths["checkpoint_dir"] is None and not (Path(record.paths["run_dir"]) / "checkpoints").exists()
    info = read_offline_run_info(record.paths["wandb_dir"])
    assert info["name"] == record.name and info["job_type"] == "train" and info["group"] == f"train-{TASK}"
    assert info["tags"] == ["switch", TASK, "tiny"]
    assert info["config"]["params"]["active"] == record.params["active"] < record.params["total"]
    assert info["config"]["flops_per_token"]["train_per_token"] == record.flops["train_per_token"]
    keys = read_offline_run_keys(record.paths["wandb_dir"])
    assert "val_loss" not in keys and "val/loss" in keys  # each metric once

    for key in ("train/loss", "train/lr", "train/tokens_per_sec", "train/flops_spent", "val/loss",
                "val/quality", "val/quality_per_active_param", "moe/layer0/fraction_dropped",
                "moe/layer0/router_entropy", "moe/layer0/z_loss"):
        assert key in keys, key


@pytest.mark.parametrize("kind,value,expected_steps", [
    ("tokens", 3 * 1024 + 1, 4),  # 1024 tokens a step: the 4th step crosses the budget
    ("flops", None, 3),
])
def test_token_and_flop_budgets_stop_when_spent(run_env, kind, value, expected_steps):
    if kind == "flops":
        cfg = model_config("dense", "tiny", ["d_model=32", "n_layers=2", "n_heads=2", "d_ff=64"],
                           vocab_size=65, max_seq_len=256)
        value = 3 * 1024 * model_cost(cfg, 256).train_flops_per_token  # exactly 3 steps
    record = _train(run_env, "dense", {"kind": kind, "value": value})
    assert record.steps == expected_steps
    assert record.budget == {"kind": kind, "value": float(value)}


def test_seconds_budget_stops(run_env):
    record = _train(run_env, "dense", {"kind": "seconds", "value": 1.0})
    assert record.status == "finished"
    assert 1.0 <= record.timings["train_seconds"] < 10


class _InterruptAt(pl.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


def test_resume_after_interruption_matches_uninterrupted_run(run_env):
    full = _train(run_env, "switch", {"kind": "steps", "value": 15}, seed=3)
    cut = _train(run_env, "switch", {"kind": "steps", "value": 15}, seed=3,
                 extra_callbacks=[_InterruptAt(12)])
    assert cut.status == "interrupted" and cut.steps == 12
    resumed = resume_run(cut.run_id, storage=run_env["storage"], progress=False)
    assert resumed.status == "finished" and resumed.steps == 15
    assert resumed.metrics["val_loss"] == pytest.approx(full.metrics["val_loss"], abs=1e-6)
    assert resumed.train_flops == pytest.approx(full.train_flops)
    # the curve survives the interruption: the checkpoint carries the points before it
    assert [p["step"] for p in resumed.curve] == [p["step"] for p in full.curve] == [5, 10, 15]
    assert [p["loss"] for p in resumed.curve] == pytest.approx([p["loss"] for p in full.curve], abs=1e-6)
    assert resumed.paths["checkpoint_dir"] is None  # finished: its checkpoint is gone
    assert resumed.timings["wall_seconds"] > cut.timings["wall_seconds"]  # both segments count
    assert resumed.timings["load_samples"] > cut.timings["load_samples"]  # load samples pooled too
    assert not (Path(resumed.paths["run_dir"]) / "RUNNING.pid").exists()
    with pytest.raises(ConfigError, match="already finished: nothing to resume"):
        resume_run(cut.run_id, storage=run_env["storage"], progress=False)


class _PeekAtStore(pl.Callback):
    """What the store holds about the (only) run while it trains, at one step."""

    def __init__(self, storage: str, step: int):
        self.storage, self.step, self.seen = storage, step, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and self.seen is None:
            (self.seen,) = ResultsStore(self.storage).list()


def test_progress_is_in_the_store_while_the_run_trains(run_env):
    peek = _PeekAtStore(run_env["storage"], 12)  # evaluations at steps 5 and 10 (eval_every 5)
    done = _train(run_env, "switch", {"kind": "steps", "value": 15}, extra_callbacks=[peek])
    seen = peek.seen
    assert seen.status == "running" and seen.steps == 10 and seen.tokens_seen == done.tokens_seen * 10 // 15
    assert [p["step"] for p in seen.curve] == [5, 10] and seen.curve == done.curve[:2]
    assert seen.train_flops == pytest.approx(done.train_flops * 10 / 15)
    # timings up to that evaluation: what a run killed outright keeps, and its resumed segment adds to
    assert 0 < seen.timings["wall_seconds"] < done.timings["wall_seconds"]
    assert 0 < seen.timings["train_seconds"] < done.timings["train_seconds"]
    assert seen.timings["load_samples"] >= 1 and seen.timings["cpu_seconds"] > 0


def test_progress_saving_survives_the_pickling_of_ddp_spawn():
    """strategy=ddp_spawn pickles the callbacks into the ranks: the closure over the launcher's
    record and store does not travel (it cannot be pickled), and the copy saves nothing."""
    import pickle

    from bench.train.callbacks import SaveProgress

    saved = []
    progress = SaveProgress(lambda: saved.append(1))  # a local closure, as train() makes it
    copy = pickle.loads(pickle.dumps(progress))
    assert copy.save is None and progress.save is not None

    class Fit:  # the trainer state SaveProgress looks at, after an evaluation in fit
        sanity_checking, is_global_zero = False, True
        state = type("State", (), {"fn": "fit"})()

    copy.on_validation_end(Fit(), None)
    progress.on_validation_end(Fit(), None)
    assert saved == [1]  # only the launcher's own callback saved


def test_a_corrupt_checkpoint_leaves_the_interrupted_record_as_it_was(run_env):
    cut = _train(run_env, "dense", {"kind": "steps", "value": 15}, extra_callbacks=[_InterruptAt(12)])
    ckpt = Path(cut.paths["checkpoint_dir"]) / "last.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # truncated
    with pytest.raises(ConfigError, match="cannot be read .* its record is unchanged"):
        resume_run(cut.run_id, storage=run_env["storage"], progress=False)
    stored = ResultsStore(run_env["storage"]).get(cut.run_id)
    assert stored.status == "interrupted" and stored.steps == 12 and stored.curve == cut.curve


def test_keep_checkpoints_keeps_the_final_checkpoint(run_env):
    kept = _train(run_env, "dense", {"kind": "steps", "value": 6}, keep_checkpoints=True)
    assert (Path(kept.paths["checkpoint_dir"]) / "last.ckpt").is_file()


def test_translation_bleu_equals_sacrebleu_on_written_hypotheses(run_env):
    record = train("multi30k-de-en", "dense", "tiny",
                   overrides=SMALL + ["decode_batches=2", "eval_batch_size=4", "beam_size=2", "max_decode_len=12"],
                   budget={"kind": "steps", "value": 6}, storage=run_env["storage"], progress=False)
    assert record.status == "finished"
    hyps = (Path(record.paths["run_dir"]) / "val.hyp.txt").read_text(encoding="utf-8").splitlines()
    assert len(hyps) == 8  # 2 batches of 4
    from bench.data.datamodules import TranslationDataModule
    dm = TranslationDataModule("multi30k-de-en", batch_size=4)
    dm.prepare_data(); dm.setup("validate")
    expected = sacrebleu.corpus_bleu(hyps, [dm.references("val")[: len(hyps)]]).score
    assert record.metrics["val_bleu"] == pytest.approx(expected)
    assert record.metrics["quality"] == pytest.approx(record.metrics["val_bleu"] / 100)
    assert "nrefs:1" in record.metrics["val_bleu_signature"]
    assert record.metrics["val_chrf_signature"].startswith("nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no")


@pytest.mark.parametrize("args,needle", [
    (["--task", "nope", "--model", "dense"], "task='nope' is not allowed"),
    (["--task", TASK, "--model", "sparse"], "model='sparse' is not allowed"),
    (["--task", TASK, "--model", "dense", "--preset", "huge"], "preset='huge' is not allowed"),
    (["--task", TASK, "--model", "dense", "--set", "num_expert=3"], "unknown key 'num_expert'"),
    (["--task", TASK, "--model", "dense", "--set", "lr=-1"], "lr=-1"),
    (["--task", TASK, "--model", "dense", "--budget-steps", "3", "--budget-tokens", "9"], "give one budget"),
])
def test_cli_train_bad_input_is_a_clear_error(run_env, args, needle, capsys):
    from bench.cli import main

    assert main(["train", *args, "--storage", run_env["storage"]]) == 2
    err = capsys.readouterr().err
    assert needle in err


def test_cli_train_json_error_is_an_object_on_stdout(run_env, capsys):
    from bench.cli import main

    assert main(["train", "--task", TASK, "--model", "dense", "--set", "lr=-1", "--json",
                 "--storage", run_env["storage"]]) == 2
    out, err = capsys.readouterr()
    error = json.loads(out.strip().splitlines()[-1])
    assert error["status"] == "error" and error["command"] == "train"
    assert any("lr=-1" in p for p in error["problems"]) and "lr=-1" in err


def test_cli_train_summary_is_formatted(run_env, capsys):
    from bench.cli import main

    assert main(["train", "--task", TASK, "--model", "dense", "--budget-steps", "3",
                 "--storage", run_env["storage"]] + [a for o in SMALL for a in ("--set", o)]) == 0
    out = capsys.readouterr().out
    assert "group " not in out and "error " not in out  # None values are left out
    assert re.search(r"val_loss\s+\d\.\d{4}\n", out) and re.search(r"active_params\s+\d{1,3}(,\d{3})+\n", out)
    (record,) = ResultsStore(run_env["storage"]).list()  # the speed says what it was measured on
    assert record.timings["device"].startswith("cpu (") and record.timings["processes"] == 1
    assert record.timings["precision"] == "32-true" and record.timings["denormals_flushed"] is True


def test_cli_train_json_and_runs_table(run_env):
    cmd = [sys.executable, "-m", "bench.cli", "train", "--task", TASK, "--model", "moe", "--budget-steps", "5",
           "--storage", run_env["storage"], "--json"] + [a for o in SMALL for a in ("--set", o)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("val_loss", "quality", "quality_per_active_param", "active_params", "total_params",
                "train_flops", "status"):
        assert key in summary, key
    assert summary["status"] == "finished" and summary["active_params"] < summary["total_params"]
    runs = subprocess.run([sys.executable, "-m", "bench.cli", "runs", "--storage", run_env["storage"]],
                          capture_output=True, text=True, timeout=120)
    assert summary["run_id"] in runs.stdout and "moe" in runs.stdout


def test_missing_data_is_a_clear_error(run_env, monkeypatch, tmp_path, capsys):
    from bench.cli import main

    monkeypatch.setenv("MOE_BENCH_DATA", str(tmp_path / "nowhere"))
    assert main(["train", "--task", TASK, "--model", "dense", "--storage", run_env["storage"]]) == 2
    assert "MOE_BENCH_DATA" in capsys.readouterr().err
    # checked before any work: no record, no run folder, no W&B run left behind
    assert not (tmp_path / "runs").exists() and not (tmp_path / "wandb").exists()
    assert ResultsStore(run_env["storage"]).list() == []


@pytest.mark.slow
def test_ddp_two_cpu_processes(run_env):
    """Lightning's own DDP (gloo, 2 CPU processes): each rank trains on its own batches."""
    record = _train(run_env, "switch", {"kind": "steps", "value": 6}, extra=["devices=2", "strategy=ddp_spawn"])
    assert record.status == "finished" and record.steps == 6
    assert record.tokens_seen == 6 * 4 * 256 * 2  # both ranks' batches count
    assert math.isfinite(record.metrics["val_loss"])


@pytest.mark.slow
def test_kill_9_then_resume_cli_matches_uninterrupted(run_env):
    """A real `kill -9` of `moe-bench train`, then `--resume`: same final metrics as a clean run."""
    import os
    import signal
    import time

    args = ["--task", TASK, "--model", "switch", "--budget-steps", "120", "--seed", "5",
            "--storage", run_env["storage"], "--json"] + [a for o in SMALL for a in ("--set", o)]
    reference = _train(run_env, "switch", {"kind": "steps", "value": 120}, seed=5)
    proc = subprocess.Popen([sys.executable, "-m", "bench.cli", "train", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    runs = Path(os.environ["MOE_BENCH_RUNS"])
    deadline = time.time() + 120
    killed_run = None
    while time.time() < deadline and proc.poll() is None:
        ckpts = [p for p in runs.glob("*/checkpoints/last.ckpt") if reference.run_id not in str(p)]
        if ckpts:
            time.sleep(0.3)  # let it train past the checkpoint
            os.kill(proc.pid, signal.SIGKILL)
            killed_run = ckpts[0].parent.parent.name
            break
        time.sleep(0.05)
    proc.wait(timeout=30)
    assert killed_run, "the run finished or never checkpointed before it could be killed"
    store = ResultsStore(run_env["storage"])
    killed = store.get(killed_run)
    assert killed.status == "running"  # nobody could record the kill
    # ... but its progress was saved at each evaluation: steps so far and the curve up to the checkpoint
    assert killed.steps >= killed.curve[-1]["step"] > 0 and killed.train_flops > 0
    assert [p["loss"] for p in killed.curve] == pytest.approx([p["loss"] for p in reference.curve[:len(killed.curve)]],
                                                              abs=1e-6)
    resumed = subprocess.run([sys.executable, "-m", "bench.cli", "train", "--resume", killed_run,
                              "--storage", run_env["storage"], "--json"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["status"] == "finished" and summary["steps"] == 120
    assert summary["val_loss"] == pytest.approx(reference.metrics["val_loss"], abs=1e-6)


def test_optimizer_is_fused_adamw_and_clipping_bounds_the_global_norm():
    """The fused AdamW (4-5x faster steps on CPU) and our own clipping hook, which Lightning's
    bf16 plugin would otherwise refuse for a fused optimizer."""
    import torch

    from bench.models import build_model
    from bench.train.config import OptimConfig
    from bench.train.module import LMModule

    cfg = model_config("switch", "tiny", {"d_model": 16, "n_heads": 2, "d_ff": 32, "n_layers": 2, "num_experts": 2},
                       vocab_size=11, max_seq_len=8)
    module = LMModule(build_model(cfg, "lm"), OptimConfig(), active_params=1)
    opt = module.configure_optimizers()["optimizer"]
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True
    params = [p for g in opt.param_groups for p in g["params"]]
    assert {id(p) for p in params} == {id(p) for p in module.parameters()}  # every parameter once
    for p in params:
        p.grad = torch.full_like(p, 3.0)
    module.configure_gradient_clipping(opt, gradient_clip_val=0.5)
    assert torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])) == pytest.approx(0.5, rel=1e-4)
    module.configure_gradient_clipping(opt, gradient_clip_val=None)  # off: untouched
    assert torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])) == pytest.approx(0.5, rel=1e-4)


def test_redirected_output_gets_progress_lines_and_no_banners(run_env):
    import os

    args = ["--task", TASK, "--model", "dense", "--budget-steps", "4", "--name", "progress-test",
            "--storage", run_env["storage"]] + [a for o in SMALL for a in ("--set", o)]
    env = dict(os.environ, MOE_BENCH_PROGRESS_EVERY="0")  # a line after every step (default: each minute)
    proc = subprocess.run([sys.executable, "-m", "bench.cli", "train", *args], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("progress-test:")]
    assert len(lines) >= 3  # stderr is a pipe, not a terminal: progress lines instead of a bar
    assert lines[0].startswith("progress-test: 25.0% of 4 steps | step 1 | 0.00M tokens | train loss ")
    assert "tokens/s" in lines[0] and "left" in lines[0]
    out = proc.stdout + proc.stderr
    assert "GPU available" not in out and "Tip:" not in out  # Lightning's banners and adverts are off
    assert not [line for line in out.splitlines() if line.startswith("wandb:") and "offline (" not in line]


def test_translation_curve_carries_bleu_at_every_evaluation(run_env):
    record = train("multi30k-de-en", "dense", "tiny",
                   overrides=SMALL + ["decode_batches=1", "eval_batch_size=4", "max_decode_len=8",
                                      "curve_bleu_batches=1"],
                   budget={"kind": "steps", "value": 10}, storage=run_env["storage"], progress=False)
    assert record.status == "finished" and [p["step"] for p in record.curve] == [5, 10]
    assert all(0.0 <= p["bleu"] <= 100.0 for p in record.curve)
    assert "bleu" not in train("multi30k-de-en", "dense", "tiny", overrides=SMALL + ["decode_batches=1",
                               "eval_batch_size=4", "max_decode_len=8"], budget={"kind": "steps", "value": 5},
                               storage=run_env["storage"], progress=False).curve[0]


@pytest.mark.parametrize("seed", [-1, 2**40])
def test_out_of_range_seed_is_refused_before_any_work(run_env, seed, capsys):
    from bench.cli import main

    assert main(["train", "--task", TASK, "--model", "dense", "--seed", str(seed), "--storage", run_env["storage"]]) == 2
    assert f"seed={seed} is not allowed" in capsys.readouterr().err
    assert ResultsStore(run_env["storage"]).list() == []  # nothing recorded


def test_resume_with_a_mistyped_store_creates_nothing(tmp_path, capsys):
    from bench.cli import main

    missing = tmp_path / "typo.db"
    assert main(["train", "--resume", "x", "--storage", f"sqlite:///{missing}"]) == 2
    assert "no results store at" in capsys.readouterr().err and not missing.exists()


def test_unwritable_runs_folder_is_one_clear_error(run_env, monkeypatch, tmp_path, capsys):
    from bench.cli import main

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    monkeypatch.setenv("MOE_BENCH_RUNS", str(locked / "runs"))
    monkeypatch.setattr("os.access", lambda path, mode: False)  # as root, chmod alone does not deny writes
    assert main(["train", "--task", TASK, "--model", "dense", "--storage", run_env["storage"]]) == 2
    assert "which is not writable: set MOE_BENCH_RUNS" in capsys.readouterr().err
    assert ResultsStore(run_env["storage"]).list() == []


def test_routing_stats_are_logged_once_at_the_step_they_were_measured(run_env):
    import csv

    record = _train(run_env, "switch", {"kind": "steps", "value": 6}, extra=["eval_every=20"])  # stats every 2 steps
    with open(record.paths["csv_file"]) as f:
        rows = list(csv.DictReader(f))
    routed = [int(r["step"]) for r in rows if r.get("moe/layer0/fraction_dropped")]
    assert routed == [1, 3, 5]  # not repeated in the next step's row (as if measured there too)


def test_resume_finds_a_task_given_by_path_and_refuses_a_changed_one(run_env, tmp_path):
    import shutil

    own = tmp_path / "my-shakespeare.yaml"
    shutil.copy(Path(__file__).resolve().parents[2] / "tasks" / f"{TASK}.yaml", own)
    cut = train(str(own), "dense", "tiny", overrides=SMALL, budget={"kind": "steps", "value": 10},
                storage=run_env["storage"], progress=False, extra_callbacks=[_InterruptAt(6)])
    assert cut.status == "interrupted" and cut.config["task_file"]["path"] == str(own.resolve())
    own.write_text(own.read_text() + "\n# edited\n")
    with pytest.raises(ConfigError, match="changed since run .* started"):
        resume_run(cut.run_id, storage=run_env["storage"], progress=False)
    own.write_text(own.read_text().replace("\n# edited\n", ""))
    resumed = resume_run(cut.run_id, storage=run_env["storage"], progress=False)
    assert resumed.status == "finished" and resumed.steps == 10


def test_warmup_and_evaluation_beyond_the_budget_are_warned(run_env, capsys):
    from bench.data.tasks import load_task
    from bench.train.run import expected_steps, resolve_configs, schedule_warnings

    task = load_task(TASK)
    cfg, rc = resolve_configs(task, "dense", "tiny", SMALL + ["warmup_steps=100", "eval_every=50"],
                              {"kind": "tokens", "value": 4 * 256 * 30})  # batch 4 x 256 tokens: 30 steps
    assert expected_steps(task, cfg, rc) == 30
    warnings = schedule_warnings(task, cfg, rc)
    assert len(warnings) == 2 and "warmup_steps=100 is not shorter than the whole run (~30 steps" in warnings[0]
    assert "eval_every=50 is longer than the run (~30 steps)" in warnings[1]
    flops = 30 * 4 * 256 * model_cost(cfg, 256).train_flops_per_token
    cfg, rc = resolve_configs(task, "dense", "tiny", SMALL, {"kind": "flops", "value": flops})
    assert expected_steps(task, cfg, rc) == 30 and schedule_warnings(task, cfg, rc) == []
    # Upcycled: the dense run's FLOPs count against the budget, so only 10 of the 30 steps are left.
    assert expected_steps(task, cfg, rc, inherited_flops=flops * 2 / 3) == 10
    cfg, rc = resolve_configs(task, "dense", "tiny", SMALL + ["warmup_steps=20"], {"kind": "flops", "value": flops})
    assert schedule_warnings(task, cfg, rc) == []
    assert "warmup_steps=20 is not shorter than the whole run (~10 steps" in schedule_warnings(
        task, cfg, rc, inherited_flops=flops * 2 / 3)[0]


def test_resuming_a_run_that_is_still_running_is_refused(run_env):
    import os

    cut = _train(run_env, "dense", {"kind": "steps", "value": 10}, extra_callbacks=[_InterruptAt(6)])
    store = ResultsStore(run_env["storage"])
    cut.status = "running"  # as a live process's record reads
    store.save(cut)
    lock = Path(cut.paths["run_dir"]) / "RUNNING.pid"
    lock.write_text(str(os.getpid()))  # this test process is alive
    with pytest.raises(ConfigError, match="is still running .* two processes write one run"):
        resume_run(cut.run_id, storage=run_env["storage"], progress=False)
    lock.write_text("999999999")  # its process is gone (kill -9): resume is allowed
    assert resume_run(cut.run_id, storage=run_env["storage"], progress=False).status == "finished"


def test_progress_line_of_a_resumed_run_times_only_what_is_left():
    from types import SimpleNamespace

    from bench.train.callbacks import BudgetStop, ProgressLine

    budget = BudgetStop("steps", 100, tracker=None)
    budget.spent.update(steps=60, tokens=60_000, seconds=60.0)  # the run was killed at 60%
    line = ProgressLine(budget, "resumed")
    trainer = SimpleNamespace(callback_metrics={})
    line.on_train_start(trainer, None)
    budget.spent.update(steps=70, tokens=70_000, seconds=70.0)  # 10 steps in this segment ...
    text = line.line(trainer, line._start + 10.0)  # ... took 10 s: 30 steps left = 30 s
    assert text == "resumed: 70.0% of 100 steps | step 70 | 0.07M tokens | 1,000 tokens/s | ~30 s left"


def test_machine_load_samples_at_start_then_every_interval_and_pools_a_resumed_runs_samples(monkeypatch):
    from types import SimpleNamespace

    from bench.train import callbacks
    from bench.train.callbacks import MachineLoad

    clock, loads = [100.0], iter([2.0, 4.0, 3.0])
    monkeypatch.setattr(callbacks.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(callbacks, "load_average", lambda: next(loads))
    monkeypatch.setattr(callbacks, "usable_cpus", lambda: 2)
    # this segment: 45 CPU seconds over 30 s on 2 threads (60 thread-seconds)
    cpu = SimpleNamespace(threads=2, cpu_seconds=lambda: 45.0, thread_seconds=lambda: 60.0)
    monkeypatch.setattr(callbacks, "CpuClock", lambda: cpu)
    monkeypatch.setattr(callbacks, "machine_id", lambda: "bbbb0002")
    load = MachineLoad(every_s=15.0)
    assert load.timings() == {}  # nothing sampled: nothing claimed
    load.on_train_start(None, None)  # sample 2.0 at t=100
    for t in (105.0, 114.9, 115.0, 120.0, 130.0):  # due at 115 (4.0), then at 130 (3.0)
        clock[0] = t
        load.on_train_batch_end(None, None, None, None, 0)
    assert load.samples == [2.0, 4.0, 3.0]
    share = {"cpu_seconds": 45.0, "cpu_thread_seconds": 60.0, "threads": 2, "cpu_share": 0.75, "machines": ["bbbb0002"]}
    assert load.timings() == {"load_avg_mean": 3.0, "load_avg_max": 4.0, "load_samples": 3, "cpus": 2, **share}
    # a resumed run: 1 earlier sample of 6.0 -> mean (6 + 9) / 4, max 6; an earlier 15 CPU s of 40 thread-s
    # (20 s on 2 threads) -> share (45 + 15) / (60 + 40)
    earlier = {"wall_seconds": 20.0, "load_avg_mean": 6.0, "load_avg_max": 6.0, "load_samples": 1, "cpus": 2,
               "cpu_seconds": 15.0, "cpu_thread_seconds": 40.0, "threads": 2, "cpu_share": 0.375,
               "machines": ["aaaa0001"]}  # ... on another machine: the run moved
    assert load.timings(earlier) == {"load_avg_mean": 3.75, "load_avg_max": 6.0, "load_samples": 4, "cpus": 2,
                                     "cpu_seconds": 60.0, "cpu_thread_seconds": 100.0, "threads": 2, "cpu_share": 0.6,
                                     "machines": ["aaaa0001", "bbbb0002"]}
    old = {k: earlier[k] for k in ("wall_seconds", "load_avg_mean", "load_avg_max", "load_samples", "cpus")}
    assert load.timings(old)["cpu_share"] == 0.75  # a record made before the share: this segment's alone
    monkeypatch.setattr(callbacks, "load_average", lambda: None)  # an OS without a load average
    bare = MachineLoad()
    bare.on_train_start(None, None)
    assert bare.timings() == share and bare.timings(earlier)["load_samples"] == 1


def test_machine_id_is_a_stable_hash_of_the_boot(monkeypatch, tmp_path):
    import builtins
    import hashlib
    import os

    from bench.runtime import machine_id

    if os.path.exists("/proc/sys/kernel/random/boot_id"):  # Linux: the same id all boot long
        assert machine_id() == machine_id() and len(machine_id()) == 8
        int(machine_id(), 16)
    boot = tmp_path / "boot_id"
    boot.write_text("bef5461b-d8c7-4e99-9f07-27adbc3f2cb7\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: real_open(
        boot if str(path) == "/proc/sys/kernel/random/boot_id" else path, *a, **k))
    assert machine_id() == hashlib.sha256(b"bef5461b-d8c7-4e99-9f07-27adbc3f2cb7").hexdigest()[:8]
    boot.unlink()  # an OS without a boot id
    assert machine_id() is None


def test_cpu_clock_measures_the_share_of_its_threads_this_process_used(monkeypatch):
    import time

    import torch

    from bench.runtime import CpuClock

    cpu, wall = [10.0], [100.0]
    monkeypatch.setattr(time, "process_time", lambda: cpu[0])
    monkeypatch.setattr(time, "monotonic", lambda: wall[0])
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    clock = CpuClock()
    assert clock.share() is None  # no time has passed: no share
    cpu[0], wall[0] = 13.0, 102.0  # 3 CPU seconds in 2 s on 2 threads
    assert (clock.cpu_seconds(), clock.thread_seconds(), clock.share()) == (3.0, 4.0, 0.75)
    monkeypatch.undo()
    # real clocks: a sleeping process uses (almost) none of its threads, however loaded the machine is
    # (a busy loop's share is not asserted: on a loaded CI machine it depends on the scheduler)
    clock = CpuClock()
    time.sleep(0.3)
    assert clock.share() < 0.2


def test_terminal_progress_bar_counts_the_budget_not_epochs(capsys):
    from types import SimpleNamespace

    from bench.train.callbacks import BudgetBar, BudgetStop

    budget = BudgetStop("flops", 1e12, tracker=None)
    budget.spent.update(steps=60, tokens=60_000, flops=6e11, seconds=60.0)  # resumed at 60%
    bar = BudgetBar(budget, "run-a")
    trainer = SimpleNamespace(is_global_zero=True, callback_metrics={"val/loss": 1.5})
    bar.on_train_start(trainer, None)
    budget.spent.update(steps=70, tokens=70_000, flops=7.25e11, seconds=70.0)
    bar.on_train_batch_end(trainer, None, None, None, 0)
    bar.on_train_end(trainer, None)
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("run-a (1e+12 flops):  72%|")  # percent of the FLOPs budget
    assert last.endswith("], step 70 | 0.07M tokens | val loss 1.5000 | 1,000 tokens/s")
    assert "Epoch" not in last and "v_num" not in last


def test_an_unexpected_failure_is_one_line_and_debug_shows_the_traceback(run_env, capsys):
    from bench.cli import main

    args = ["train", "--task", TASK, "--model", "dense", "--budget-steps", "20", "--storage", run_env["storage"]]
    args += [a for o in SMALL + ["lr=1e6", "grad_clip=0", "warmup_steps=0"] for a in ("--set", o)]
    assert main(args) == 1  # lr=1e6 blows the weights up: the loss turns nan
    err = capsys.readouterr().err
    assert "moe-bench train: failed: FloatingPointError: training loss is nan" in err
    assert "moe-bench --debug train ...` for the traceback" in err and "Traceback" not in err
    (record,) = ResultsStore(run_env["storage"]).list()
    assert record.status == "failed" and "FloatingPointError" in record.extra["traceback"]
    with pytest.raises(FloatingPointError):
        main(["--debug"] + args)


@pytest.mark.parametrize("env, worker", [
    ({}, False), ({"LOCAL_RANK": "0", "NODE_RANK": "0"}, False), ({"RANK": "0", "SLURM_PROCID": "0"}, False),
    ({"LOCAL_RANK": "1"}, True), ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, True), ({"RANK": "3"}, True),
    ({"SLURM_PROCID": "2"}, True),
])
def test_launched_worker_is_any_rank_but_global_zero(monkeypatch, env, worker):
    from bench.train.run import launched_worker

    for var in ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert launched_worker() is worker


def test_each_run_of_a_process_gets_its_own_id_after_a_launch(run_env, monkeypatch):
    """The run id handed to launched ranks (MOE_BENCH_RUN_ID) is withdrawn after the run: the next
    run in the same process is a new run, not the previous one again."""
    from bench.train.run import RUN_ID_ENV

    monkeypatch.delenv(RUN_ID_ENV, raising=False)
    first = train(TASK, "dense", "tiny", overrides=SMALL, budget={"kind": "steps", "value": 2},
                  storage=run_env["storage"], progress=False)
    second = train(TASK, "dense", "tiny", overrides=SMALL, budget={"kind": "steps", "value": 2},
                   storage=run_env["storage"], progress=False)
    assert first.run_id != second.run_id and RUN_ID_ENV not in __import__("os").environ
