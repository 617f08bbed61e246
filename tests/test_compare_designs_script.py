"""scripts/compare_designs.py: two designs of a plan tier compared seed by seed, against hand-computed intervals."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.tracking import ResultsStore
from tests.report.test_report import rec

ROOT = Path(__file__).resolve().parents[1]


def design(r, warmup):
    r.config["run"] = {"optim": {"lr": 2e-3, "warmup_steps": warmup}}
    return r


def test_paired_effects_per_arm_and_the_settings_that_changed(tmp_path):
    before, after = f"sqlite:///{tmp_path}/before.db", f"sqlite:///{tmp_path}/after.db"
    with ResultsStore(before) as s:
        for seed, loss in enumerate((2.3, 2.4, 2.5)):
            s.save(design(rec("dense", seed, loss, family="dense"), 40))
        s.save(design(rec("switch cf=1.25", 0, 2.2), 40))
    with ResultsStore(after) as s:
        for seed, loss in enumerate((2.1, 2.3, 2.2)):
            s.save(design(rec("dense", seed, loss, family="dense"), 400))
        s.save(design(rec("switch cf=1.25", 0, 2.25), 400))
        s.save(design(rec("switch cf=1.25", 1, 2.0), 400))  # no partner in the earlier design
    out = subprocess.run([sys.executable, str(ROOT / "scripts/compare_designs.py"), "repro-switch-vs-dense-tiny",
                          "--before", before, "--after", after, "--at-step", "50"], capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": ""}, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[1] == "settings, every arm: run.optim.warmup_steps 40 -> 400"
    rows = {(line[:18].strip(), line[19:41].strip()): line[41:].split(None, 1) for line in lines[3:]}
    # dense: -0.2, -0.1, -0.3: mean -0.2, sd 0.1, t(0.975, 2) = 4.3027 -> half-width 0.24841
    n, rest = rows[("dense", "val_loss")]
    assert n == "3" and rest.split() == ["2.4", "+-", "0.1", "2.2", "+-", "0.1", "-0.2", "[-0.4484,", "+0.04841]"]
    # the curve's loss at step 50 is the final loss + 0.5 in these records: the same differences
    assert rows[("dense", "val loss at step 50")][1].split()[-3:] == ["-0.2", "[-0.4484,", "+0.04841]"]
    n, rest = rows[("switch cf=1.25", "val_loss")]
    assert n == "1" and rest.split() == ["2.2", "2.125", "+-", "0.177", "+0.05", "(1", "seed)"]


def test_a_store_without_the_group_is_named(tmp_path):
    empty = f"sqlite:///{tmp_path}/empty.db"
    ResultsStore(empty).close()
    out = subprocess.run([sys.executable, str(ROOT / "scripts/compare_designs.py"), "repro-translation-ref",
                          "--before", empty, "--after", empty], capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": ""}, timeout=120)
    assert out.returncode == 1 and f"no finished runs of group repro-translation-ref in {empty}" in out.stderr
