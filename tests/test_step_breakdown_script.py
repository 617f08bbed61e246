"""scripts/step_breakdown.py and scripts/init_scale_pilot.py: their tables, on real batches."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_step_breakdown_prints_each_arms_phases_and_ratio(run_env):
    out = subprocess.run([sys.executable, str(ROOT / "scripts/step_breakdown.py"), "switch-vs-dense", "tiny", "dense",
                          "switch cf=1.25", "--steps", "2", "--warmup", "1"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300, check=True).stdout.splitlines()
    assert out[0].startswith("switch-vs-dense tier tiny: median ms per phase over 2 steps")
    assert out[0].endswith("bf16 autocast, denormals flushed")
    assert out[1].split() == ["arm", "params", "forward", "backward", "clip", "optimizer", "step", "x", "first",
                              "last", "loss"]
    rows = {line[:16].strip(): line[16:].split() for line in out[2:]}
    assert list(rows) == ["dense", "switch cf=1.25"]
    for values in rows.values():
        forward, backward, clip, optimizer, step = map(float, values[1:6])
        assert step == pytest.approx(forward + backward + clip + optimizer, rel=0.05, abs=0.5)  # medians per phase
        assert 0 < float(values[-1]) < 10  # the last step's training loss (characters: ~4.2 at init)
    assert rows["dense"][-2] == "1.00"
    assert int(rows["switch cf=1.25"][0].replace(",", "")) > int(rows["dense"][0].replace(",", ""))  # E x the FFN


def test_step_breakdown_starts_an_arm_from_a_checkpoints_weights_and_optimizer_state(run_env, tmp_path):
    import torch

    from bench.data.tasks import load_task
    from bench.models import build_model
    from bench.plans import load_plan
    from bench.train.module import LMModule, adamw, param_groups
    from bench.train.run import resolve_configs

    plan = load_plan("switch-vs-dense")
    cfg, rc = resolve_configs(load_task(plan.task), "dense", "tiny", plan.arm_settings(plan.arm("dense"), "tiny"), None)
    torch.manual_seed(5)
    module = LMModule(build_model(cfg, "lm"), rc.optim, active_params=1)
    opt = adamw(param_groups(module.model, rc.optim.weight_decay), lr=rc.optim.lr)
    sum(p.sum() for p in module.parameters()).backward()
    opt.step()  # so the checkpoint has Adam state to load, as a training run's does
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": module.state_dict(), "optimizer_states": [opt.state_dict()], "global_step": 7}, ckpt)

    def breakdown(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "scripts/step_breakdown.py"), "switch-vs-dense", "tiny",
                               "dense", "--steps", "1", "--warmup", "0", *extra], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)

    done = breakdown("--checkpoint", f"dense={ckpt}", "--denormals", "keep")
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    assert out[0] == "dense: from 7 steps of training" and out[1].endswith("denormals kept")
    wrong = breakdown("--checkpoint", f"switch={ckpt}")
    assert wrong.returncode != 0 and "--checkpoint names arms not timed here: ['switch']" in wrong.stderr


def test_init_scale_pilot_prints_a_loss_per_scale_at_three_points(run_env):
    out = subprocess.run([sys.executable, str(ROOT / "scripts/init_scale_pilot.py"), "switch-vs-dense", "dense", "0.1",
                          "1.0", "--tier", "tiny", "--steps", "3", "--val-batches", "1"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300, check=True).stdout.splitlines()
    assert len(out) == 2
    for line, scale in zip(out, ("0.1", "1")):
        assert line.startswith(f"switch-vs-dense dense init_scale {scale} (lr ")
        losses = [float(part.split()[-1]) for part in line.split(": validation loss ")[1].rsplit(" (", 1)[0].split(", ")]
        assert len(losses) == 3 and all(0 < v < 10 for v in losses)
    assert out[0] != out[1]  # the scale changed the model
