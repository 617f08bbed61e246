"""scripts/pool_pairs.py: one comparison replicated in two plans, pooled over disjoint paired seeds (hand-computed)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.tracking import ResultsStore
from tests.report.test_report import rec

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts/pool_pairs.py"), *args], capture_output=True,
                          text=True, env={"PYTHONPATH": str(ROOT), "PATH": ""}, timeout=120)


def store_with_two_replications(tmp_path, second_seeds=(10, 11)):
    url = f"sqlite:///{tmp_path}/s.db"
    with ResultsStore(url) as s:
        for seed, (a, b) in zip((0, 1, 2), ((2.0, 2.1), (2.1, 2.3), (2.2, 2.3))):
            switch = rec("switch", seed, a, repro="one")
            switch.config["run"] = {"optim": {"lr": 1e-3}}
            s.save(switch)
            s.save(rec("dense", seed, b, repro="one", family="dense"))
        for seed, (a, b) in zip(second_seeds, ((2.0, 2.05), (2.0, 2.15))):
            switch = rec("switch lr 2e-3", seed, a, repro="two")
            switch.config["run"] = {"optim": {"lr": 2e-3}}
            s.save(switch)
            dense = rec("dense lr 2e-3", seed, b, repro="two", family="dense")
            dense.timings["threads"] = 1
            s.save(dense)
    return url


def test_each_replication_then_the_pooled_effect(tmp_path):
    url = store_with_two_replications(tmp_path)
    out = run("--storage", url, "--lower-better", "--pair", "repro-one-tiny", "switch", "dense",
              "--pair", "repro-two-tiny", "switch lr 2e-3", "dense lr 2e-3")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    # one: B - A = 0.1, 0.2, 0.1: mean 0.13333, sd 0.057735, t(0.975, 2) 4.3027 -> half-width 0.14342
    assert lines[1].startswith("repro-one-tiny: switch vs dense: +0.1333 [-0.01009, +0.2768] over 3 seeds")
    assert lines[2] == "  per seed: 0: +0.1, 1: +0.2, 2: +0.1"
    assert lines[4] == "  per seed: 10: +0.05, 11: +0.15"
    # pooled 0.1, 0.2, 0.1, 0.05, 0.15: mean 0.12, sd 0.057009, t(0.975, 4) 2.7764 -> half-width 0.070786
    assert lines[5].startswith("pooled: +0.12 [+0.04921, +0.1908] over 5 seeds")
    assert lines[6] == "settings that differ between the groups' A (or B) arms: "
    assert lines[7] == "  run.optim.lr: repro-one-tiny/switch: 0.001; repro-two-tiny/switch lr 2e-3: 0.002"
    assert "model.family" not in out.stdout  # A arms are both switch, B arms both dense
    assert "trained by repro-two-tiny/switch lr 2e-3: threads ?" in out.stdout
    assert any(line.startswith("  trained by repro-one-tiny/switch: threads ?") for line in lines)


def test_a_seed_in_two_groups_is_refused(tmp_path):
    url = store_with_two_replications(tmp_path, second_seeds=(2, 3))
    out = run("--storage", url, "--lower-better", "--pair", "repro-one-tiny", "switch", "dense",
              "--pair", "repro-two-tiny", "switch lr 2e-3", "dense lr 2e-3")
    assert out.returncode == 1
    assert "seed 2 is in both repro-one-tiny and repro-two-tiny" in out.stderr


def test_a_missing_arm_is_named_with_the_arms_there_are(tmp_path):
    url = store_with_two_replications(tmp_path)
    out = run("--storage", url, "--pair", "repro-one-tiny", "switch E=8", "dense")
    assert out.returncode == 1
    assert "repro-one-tiny has no finished runs of arm(s) switch E=8" in out.stderr
    assert "(its arms: dense, switch)" in out.stderr
