"""scripts/gpu_tier.sh, the one-call GPU tier, runs end to end on the CPU (tiny budget), so it is
known to work before a session spends lent GPU time on it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.tracking.records import ResultsStore, is_throughput
from tests.conftest import SHARED_DATA

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_tier_script_trains_reports_and_continues(tmp_path):
    if not (SHARED_DATA / "tinyshakespeare" / "input.txt").is_file():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "MOE_BENCH_DATA": str(SHARED_DATA),
           "MOE_BENCH_RUNS": str(tmp_path / "runs"), "MOE_BENCH_CACHE": str(tmp_path / "cache"),
           "GPU_TIER_ARGS": "--tier tiny --seeds 1 --budget-flops 2e10", "GPU_TIER_SECONDS": "400",
           "GPU_TIER_THROUGHPUT_ARGS": "--repeats 1", "GPU_TIER_THROUGHPUT_SECONDS": "300"}
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_tier.sh")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "reproduce exit: 0" in done.stdout and "| device: CPU" in done.stdout
    # no perf on a CPU; at most 8 files come back from the device machine
    assert {p.name for p in out.iterdir()} == {"gpu-small.db", "reproduce.log", "runs.txt", "report"}
    assert (out / "report" / "REPORT.md").is_file() and (out / "report" / "claims.json").is_file()
    records = ResultsStore(f"sqlite:///{out / 'gpu-small.db'}").list()
    speed = [r for r in records if is_throughput(r)]
    runs = [r for r in records if not is_throughput(r)]
    # the equal-time arm trains because the device's tokens/s were measured first, in the same call
    assert sorted(r.extra["arm"] for r in speed) == ["dense", "switch cf=1.25", "switch cf=1.25 equal-time"]
    assert all(r.timings["device"].startswith("cpu") for r in speed)
    assert sorted(r.extra["arm"] for r in runs) == ["dense", "switch cf=1.25", "switch cf=1.25 equal-time"]
    assert all(r.status == "finished" and r.timings["device"] for r in runs)
    equal_time = next(r for r in runs if r.extra["arm"] == "switch cf=1.25 equal-time")
    dense = next(r for r in runs if r.extra["arm"] == "dense")
    ratio = {r.extra["arm"]: r.metrics["tokens_per_second"] for r in speed}
    expected = ratio["switch cf=1.25 equal-time"] / ratio["dense"]
    # its token budget is what the FLOP budget buys dense, scaled by the measured speed ratio
    dense_tokens = 2e10 / dense.flops["train_per_token"]
    assert equal_time.budget["kind"] == "tokens"
    assert equal_time.budget["value"] == pytest.approx(dense_tokens * expected, rel=1e-3)

    # A second call with the store carried back skips the finished pairs and adds the next seed.
    carried = tmp_path / "carried.db"
    carried.write_bytes((out / "gpu-small.db").read_bytes())
    env.update(GPU_TIER_STORE=str(carried), GPU_TIER_ARGS="--tier tiny --seeds 2 --budget-flops 2e10",
               OUT=str(tmp_path / "out2"))
    again = subprocess.run(["bash", str(REPO / "scripts" / "gpu_tier.sh")], env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stdout[-3000:]
    assert "every arm's throughput: reused" in again.stdout
    assert "6 runs (3 already finished)" in again.stdout
    again_records = ResultsStore(f"sqlite:///{tmp_path / 'out2' / 'gpu-small.db'}").list()
    assert len([r for r in again_records if not is_throughput(r)]) == 6
    assert len([r for r in again_records if is_throughput(r)]) == 3
