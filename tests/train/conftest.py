"""Training tests: real corpora from ../shared/data, tiny models, everything written under tmp_path."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("MOE_BENCH_DATA") or (REPO / ".." / "shared" / "data")).resolve()

# A transformer small enough to train a few steps per second on 2 cores.
SMALL = ["d_model=32", "n_layers=2", "n_heads=2", "d_ff=64", "num_experts=4", "batch_size=4",
         "eval_every=5", "eval_batches=2", "warmup_steps=2", "precision=32"]
# precision=32: bf16 autocast is slower than fp32 for matmuls this small on a CPU.


@pytest.fixture
def run_env(tmp_path, monkeypatch):
    if not (SHARED_DATA / "tinyshakespeare" / "input.txt").is_file():
        pytest.skip(f"shared data not found at {SHARED_DATA} (set MOE_BENCH_DATA)")
    monkeypatch.setenv("MOE_BENCH_DATA", str(SHARED_DATA))
    monkeypatch.setenv("MOE_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MOE_BENCH_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("MOE_BENCH_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return {"storage": f"sqlite:///{tmp_path / 'runs.db'}", "tmp": tmp_path}
