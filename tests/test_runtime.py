"""bench.runtime: the deterministic-mode fill of uninitialized memory that training turns off, and
the flushing of float32 denormals."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from bench.runtime import denormals_flushed, flush_denormals, skip_uninitialized_fill
from bench.train.loss import output_cross_entropy


def _fill(monkeypatch, on: bool) -> None:
    monkeypatch.setattr(torch.utils.deterministic, "fill_uninitialized_memory", on)


def test_skip_uninitialized_fill_turns_the_fill_off_unless_the_environment_keeps_it(monkeypatch):
    _fill(monkeypatch, True)  # restored after the test: the flag is process-wide
    monkeypatch.setenv("MOE_BENCH_FILL_UNINITIALIZED", "1")
    assert skip_uninitialized_fill() is False
    assert torch.utils.deterministic.fill_uninitialized_memory is True
    monkeypatch.delenv("MOE_BENCH_FILL_UNINITIALIZED")
    assert skip_uninitialized_fill() is True
    assert torch.utils.deterministic.fill_uninitialized_memory is False


def _loss_and_grads(tiny_cfg, family: str, fill: bool, monkeypatch) -> tuple[float, list[torch.Tensor]]:
    from bench.models import build_model

    _fill(monkeypatch, fill)
    torch.manual_seed(0)
    model = build_model(tiny_cfg(family, capacity_factor=1.0) if family == "switch" else tiny_cfg(family), "lm")
    x = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = output_cross_entropy(out.hidden, out.head, x, -100) + out.aux_loss
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_training_step_is_bit_identical_with_and_without_the_fill(tiny_cfg, monkeypatch):
    """The fill changes only memory that is read before it is written: a step of each family, in
    deterministic mode as training runs, gives the same loss and gradients bit for bit either way
    (a read of uninitialized memory would give NaN with the fill and garbage without)."""
    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        for family in ("dense", "switch", "moe", "moe-rnn"):
            loss_on, grads_on = _loss_and_grads(tiny_cfg, family, True, monkeypatch)
            loss_off, grads_off = _loss_and_grads(tiny_cfg, family, False, monkeypatch)
            assert loss_on == loss_off and torch.isfinite(torch.tensor(loss_on)), family
            assert len(grads_on) == len(grads_off) > 0
            assert all(torch.equal(a, b) for a, b in zip(grads_on, grads_off)), family
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])


def test_flush_denormals_turns_values_below_the_normal_range_into_zero_unless_the_environment_keeps_them(monkeypatch):
    tiny = torch.tensor([1e-39, 1e-30])  # a float32 denormal and a small normal number
    try:
        monkeypatch.setenv("MOE_BENCH_FLUSH_DENORMALS", "0")
        assert flush_denormals() is False and denormals_flushed() is False
        assert (tiny * 1.0).tolist() == pytest.approx([1e-39, 1e-30], rel=1e-3)
        monkeypatch.delenv("MOE_BENCH_FLUSH_DENORMALS")
        assert flush_denormals() is True and denormals_flushed() is True
        out = tiny * 1.0
        assert out[0].item() == 0.0 and out[1].item() == pytest.approx(1e-30, rel=1e-6)
    finally:  # the setting is per thread and outlives the test
        torch.set_flush_denormal(False)


def test_flushing_before_the_thread_pool_starts_reaches_every_intra_op_thread(tmp_path):
    """The CLI flushes first thing because threads copy the setting when torch creates them; a
    fresh process checks that a 2-thread elementwise op then flushes every element."""
    code = ("import torch\nfrom bench.runtime import apply_cpu_settings\napply_cpu_settings()\n"
            "torch.set_num_threads(2)\nx = torch.full((1 << 20,), 1e-39)\nprint(int((x * 1.0 != 0).sum()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "MOE_BENCH_FLUSH_DENORMALS": "1"})
    assert out.stdout.strip() == "0"
