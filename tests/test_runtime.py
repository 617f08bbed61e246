"""bench.runtime: the deterministic-mode fill of uninitialized memory that training turns off."""
from __future__ import annotations

import torch

from bench.runtime import skip_uninitialized_fill
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
