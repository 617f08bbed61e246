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
    assert out[1].split() == ["arm", "params", "forward", "backward", "clip", "optimizer", "step", "x", "first"]
    rows = {line[:16].strip(): line[16:].split() for line in out[2:]}
    assert list(rows) == ["dense", "switch cf=1.25"]
    for values in rows.values():
        forward, backward, clip, optimizer, step = map(float, values[1:6])
        assert step == pytest.approx(forward + backward + clip + optimizer, rel=0.05, abs=0.5)  # medians per phase
    assert rows["dense"][-1] == "1.00"
    assert int(rows["switch cf=1.25"][0].replace(",", "")) > int(rows["dense"][0].replace(",", ""))  # E x the FFN


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
