"""Shared fixtures: a seeded torch RNG for every test and tiny model configs for CPU tests."""
from __future__ import annotations

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
