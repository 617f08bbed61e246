"""scripts/step_breakdown.py: one row per arm, four phases that add up to the step, on real batches."""
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
