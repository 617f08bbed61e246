"""Training tests: tiny model settings (the run_env fixture lives in tests/conftest.py)."""
from __future__ import annotations

# A transformer small enough to train a few steps per second on 2 cores.
SMALL = ["d_model=32", "n_layers=2", "n_heads=2", "d_ff=64", "num_experts=4", "batch_size=4",
         "eval_every=5", "eval_batches=2", "warmup_steps=2", "precision=32"]
# precision=32: bf16 autocast is slower than fp32 for matmuls this small on a CPU.
