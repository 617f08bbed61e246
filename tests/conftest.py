"""Shared fixtures: a seeded torch RNG for every test and tiny model configs for CPU tests."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

from bench.models import model_config

# Shrunken shapes per family (the presets are far too big for unit tests). switch/moe experts are
# derived from the preset's d_ff before overrides apply, so d_expert is set explicitly.
TINY_OVERRIDES = {
    "dense": {"d_model": 32, "n_heads": 2, "d_ff": 64, "n_layers": 2},
    "switch": {"d_model": 32, "n_heads": 2, "d_ff": 64, "d_expert": 64, "n_layers": 2, "num_experts": 4},
    "moe": {"d_model": 32, "n_heads": 2, "d_ff": 64, "d_expert": 32, "n_layers": 2, "num_experts": 4},
    "moe-rnn": {"d_model": 32, "d_ff": 32, "n_layers": 2, "num_experts": 4, "top_k": 2},
    "lstm": {"d_model": 32, "d_ff": 96, "n_layers": 2},
}
VOCAB = 50
MAX_LEN = 32

# Training skips torch's NaN fill of uninitialized memory for speed (bench.runtime.skip_uninitialized_fill);
# the suite keeps it, so code that reads memory it never wrote shows NaN here (subprocesses inherit it).
os.environ.setdefault("MOE_BENCH_FILL_UNINITIALIZED", "1")


_LOOPBACK = {"127.0.0.1", "localhost", "::1", None}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """The suite never reaches the internet: name lookups succeed for loopback only, so a stray
    download or W&B call fails loudly instead of hanging (download tests use 127.0.0.1)."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    real_getaddrinfo = socket.getaddrinfo

    def loopback_only(host, *args, **kwargs):
        if host not in _LOOPBACK:
            raise OSError(f"network access is disabled in tests (tried to resolve {host!r})")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", loopback_only)


@pytest.fixture(autouse=True)
def seed():
    """Every test starts from the same torch RNG state."""
    torch.manual_seed(1234)
    return 1234


@pytest.fixture
def tiny_cfg():
    """tiny_cfg(family, **extra_overrides) -> a small validated ModelConfig."""

    def make(family: str, **extra):
        return model_config(family, "tiny", overrides={**TINY_OVERRIDES[family], **extra},
                            vocab_size=VOCAB, max_seq_len=MAX_LEN)

    return make


# Real PostgreSQL (server from .ci/postgres.sh via $MOE_BENCH_TEST_POSTGRES_URL): see tests/postgres.py.
from tests.postgres import fresh_postgres_url, postgres_url  # noqa: E402,F401


REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MOE_BENCH_DATA") or (REPO / ".." / "shared" / "data")).resolve()


@pytest.fixture
def run_env(tmp_path, monkeypatch):
    """Training/sweep tests: real corpora from ../shared/data; caches, runs, W&B and the store under tmp_path."""
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
