"""scripts/step_breakdown.py, settings_pilot.py and init_scale_pilot.py: their tables, on real batches."""
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


def test_settings_pilot_compares_variants_over_paired_seeds(run_env):
    def pilot(*args):
        return subprocess.run([sys.executable, str(ROOT / "scripts/settings_pilot.py"), "switch-vs-dense", "dense",
                               "--tier", "tiny", "--steps", "3", "--val-batches", "1", *args], capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)

    done = pilot("--variant", "", "--variant", "warmup_steps=2 lr=1e-2", "--seeds", "3", "4")
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    runs = [line for line in out if line.startswith("switch-vs-dense dense ")]
    assert [r.split(" (lr ")[0] for r in runs] == ["switch-vs-dense dense as planned", "switch-vs-dense dense warmup_steps 2 lr 0.01"] * 2
    assert "(lr 0.01, seed 4)" in runs[3] and ", seed 3)" in runs[0]
    last = {r: float(r.split(", step 3 ")[1].split()[0]) for r in runs}
    assert out[4] == "at step 3, over seeds 3 4:"
    planned = [last[r] for r in runs[0::2]]
    diffs = [last[b] - last[a] for a, b in zip(runs[0::2], runs[1::2])]

    def mean_sd(line):  # "... <mean> +- <sd>" at the end of a summary line
        mean, _, sd = line.rsplit(" ", 3)[1:]
        return float(mean), float(sd)

    # printed losses are rounded to 3 decimals: compare within rounding
    assert out[5].startswith("  as planned: validation loss ")
    assert mean_sd(out[5]) == pytest.approx((sum(planned) / 2, abs(planned[0] - planned[1]) / 2 ** 0.5), abs=2e-3)
    assert out[6].startswith("  warmup_steps 2 lr 0.01: validation loss ") and ("minus as planned, paired: " in out[6])
    assert mean_sd(out[6]) == pytest.approx((sum(diffs) / 2, abs(diffs[0] - diffs[1]) / 2 ** 0.5), abs=2e-3)
    assert runs[0] != runs[1] and runs[0] != runs[2]  # the variant and the seed change the model
    bad = pilot("--variant", "lr")
    assert bad.returncode != 0 and "--variant takes KEY=VALUE pairs separated by spaces, got 'lr'" in bad.stderr
