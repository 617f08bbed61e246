"""Sweep tests: tiny transformers on real Tiny Shakespeare, every study in a tmp SQLite file."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml



# A transformer small enough for a trial to take a second or two on 2 cores.
TINY_FIXED = {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64, "batch_size": 4, "eval_every": 5,
              "eval_batches": 2, "eval_batch_size": 256, "warmup_steps": 2, "precision": "32"}


@pytest.fixture
def write_spec(tmp_path):
    """write_spec(name, **fields) -> path of a study YAML with tiny fixed settings."""

    def write(name: str, **fields) -> Path:
        data = {"task": "tinyshakespeare-char", "family": "switch", "budget": {"steps": 10},
                "objectives": ["quality"], **fields}
        fixed = {**TINY_FIXED, **fields.get("fixed", {})}
        data["fixed"] = {k: v for k, v in fixed.items() if k not in fields.get("space", {})}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
        return path

    return write
