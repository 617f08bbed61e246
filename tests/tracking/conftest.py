"""Tracking tests run fully offline: W&B offline into tmp dirs, no credentials, loopback only."""
from __future__ import annotations

import pytest

from bench.tracking import wandb_setup



@pytest.fixture(autouse=True)
def offline_tracking_env(tmp_path, monkeypatch):
    wb = tmp_path / "wandb-env"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(wb / "dir"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(wb / "config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(wb / "cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(wb / "data"))
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_DISABLED", "NETRC",
                "MOE_BENCH_STORAGE", "http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(wandb_setup, "_shown", set())  # once-per-process messages: fresh per test
    return wb
