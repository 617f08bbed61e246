"""The GPU path end to end: every expert kernel in bf16 on CUDA against the fp32 CPU layer, the
kernel ``auto`` picks there, and a bf16 training run from the CLI. Skipped without CUDA (the same
code runs on the CPU in tests/test_moe.py, tests/test_perf_device.py and the training tests)."""
from __future__ import annotations

import pytest
import torch

from bench.models.config import MoEConfig
from bench.models.moe import MoELayer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

D, FF, E = 64, 128, 8


def _pair(kernel: str, **moe):
    torch.manual_seed(0)
    cpu = MoELayer(D, FF, MoEConfig(num_experts=E, dispatch=kernel, **moe)).train()
    gpu = MoELayer(D, FF, MoEConfig(num_experts=E, dispatch=kernel, **moe)).cuda().train()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu


@pytest.mark.parametrize("kernel", ["sorted", "padded", "grouped_mm"])
@pytest.mark.parametrize("capacity_factor", [1.25, None])
def test_kernels_in_bf16_on_cuda_match_the_fp32_cpu_layer(kernel, capacity_factor):
    cpu, gpu = _pair(kernel, capacity_factor=capacity_factor, router="topk", top_k=2, renormalize=True)
    x = torch.randn(4, 32, D)
    y_ref, aux_ref = cpu(x)
    y_ref.square().mean().backward()
    xg = x.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, aux = gpu(xg)
    y.float().square().mean().backward()
    # Routing runs in fp32 under autocast (selective precision), so the same assignments are
    # kept and only the expert matmuls carry bf16 rounding.
    assert torch.equal(aux.stats["kept_per_expert"].cpu(), aux_ref.stats["kept_per_expert"])
    scale = y_ref.abs().max()
    assert (y.float().cpu() - y_ref).abs().max() < 3e-2 * scale
    for name in ("w1", "w2"):
        ref = getattr(cpu, name).grad
        assert (getattr(gpu, name).grad.cpu() - ref).abs().max() < 5e-2 * ref.abs().max(), name


def test_auto_takes_grouped_mm_on_hopper_in_bf16_only():
    layer = MoELayer(D, FF, MoEConfig(num_experts=E)).cuda()
    hopper = torch.cuda.get_device_capability()[0] >= 9
    assert (layer.kernel_for(4096, torch.bfloat16, torch.device("cuda")) == "grouped_mm") == hopper
    assert layer.kernel_for(4096, torch.float32, torch.device("cuda")) != "grouped_mm"


def test_bf16_switch_training_run_on_cuda_from_the_cli(run_env):
    from bench.cli import main
    from bench.tracking.records import ResultsStore

    settings = ["d_model=32", "n_layers=2", "n_heads=2", "d_ff=64", "num_experts=4", "batch_size=4",
                "eval_every=5", "eval_batches=2", "warmup_steps=2", "precision=bf16-mixed"]
    assert main(["train", "--task", "tinyshakespeare-char", "--model", "switch", "--budget-steps", "6",
                 "--storage", run_env["storage"]] + [a for o in settings for a in ("--set", o)]) == 0
    (record,) = ResultsStore(run_env["storage"]).list()
    assert record.status == "finished" and record.steps == 6
    assert record.timings["device"] == torch.cuda.get_device_name() and record.timings["precision"] == "bf16-mixed"
    assert 0 < record.metrics["val_loss"] < 10


@pytest.mark.parametrize("router,top_k", [("switch", 1), ("topk", 2)])
def test_dropless_grouped_mm_layer_step_never_waits_for_the_gpu(router, top_k):
    """Forward + backward of a dropless grouped-GEMM layer issues no host synchronisation: counts
    stay on the device (no bincount, no boolean selection, no .tolist())."""
    layer = MoELayer(D, FF, MoEConfig(num_experts=E, capacity_factor=None, router=router, top_k=top_k,
                                      renormalize=top_k > 1, dispatch="grouped_mm")).cuda().train()
    x = torch.randn(4, 32, D, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        layer(x)  # warm-up: lazy initialisation may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, aux = layer(x)
        (y.float().square().mean() + aux.loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
