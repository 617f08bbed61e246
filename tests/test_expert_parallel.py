"""Expert parallelism on 2 CPU processes (gloo): the same numbers as one process holding every expert.

The reference is one process running both ranks' half-batches through the full layer, the loss
being the mean of the two (what DDP optimises: each rank's tokens are its own routing groups).
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.models.config import MoEConfig
from bench.models.expert_parallel import (ExpertShard, clip_grad_norm, full_optimizer_state, full_state_dict,
                                          local_optimizer_state, new_expert_shards, shard_experts,
                                          sync_expert_grads, unshard_experts)
from bench.models.moe import MoELayer

D, F, E, STEPS, LR = 16, 32, 4, 3, 0.05
MODES = {  # name: (capacity_factor, top_k, router, zero router: every token to the same experts, kernel)
    "dropless top-1": (None, 1, "switch", False, "sorted"),
    "capacity top-1": (1.0, 1, "switch", False, "sorted"),
    "capacity top-2": (1.25, 2, "topk", False, "sorted"),
    "one shard idle": (None, 2, "topk", True, "sorted"),  # at the first step
    "grouped GEMM": (1.0, 2, "topk", False, "grouped_mm"),  # torch._grouped_mm on each rank's shard
}


def _layer(mode: str) -> MoELayer:
    cf, k, router, idle, kernel = MODES[mode]
    torch.manual_seed(0)
    layer = MoELayer(D, F, MoEConfig(num_experts=E, top_k=k, capacity_factor=cf, router=router, dispatch=kernel))
    if idle:  # equal logits: every token picks the same two experts (top-2 ties), which sit on one rank
        for p in layer.router.parameters():
            torch.nn.init.zeros_(p)
    return layer


def _loss(layer: MoELayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, aux = layer(x)
    return y.pow(2).mean() + aux.loss, aux.loss, y


def _worker(rank: int, world: int, store: str, mode: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        ref = _layer(mode)
        ep = copy.deepcopy(ref)
        shard = new_expert_shards(world)
        assert shard_experts(ep, shard) == 1 and ep.w1.shape == (E // world, D, F)
        local = shard.local(E)
        g = torch.Generator().manual_seed(1)
        errors, received = [], []
        for step in range(STEPS):
            x = torch.randn(world, 2, 8, D, generator=g)  # the global batch: one half per rank
            ref.zero_grad()
            ref_terms = [_loss(ref, x[r]) for r in range(world)]
            (sum(t[0] for t in ref_terms) / world).backward()
            ep.zero_grad()
            loss, aux, y = _loss(ep, x[rank])
            loss.backward()
            for name, p in ep.named_parameters():  # what DDP does for the replicated parameters
                if name not in ("w1", "w2"):
                    dist.all_reduce(p.grad)
                    p.grad /= world
            sync_expert_grads(ep)
            received.append(bool(ep.w1.grad.abs().sum() > 0))
            errors.append(max(
                (loss - ref_terms[rank][0]).abs().item(), (aux - ref_terms[rank][1]).abs().item(),
                (y - ref_terms[rank][2]).abs().max().item(),
                (ep.w1.grad - ref.w1.grad[local]).abs().max().item(),
                (ep.w2.grad - ref.w2.grad[local]).abs().max().item(),
                max((p.grad - q.grad).abs().max().item() for (n, p), (_, q) in
                    zip(ep.named_parameters(), ref.named_parameters()) if n not in ("w1", "w2"))))
            with torch.no_grad():  # one SGD step each: the next step starts from the updated weights
                for p in list(ref.parameters()) + list(ep.parameters()):
                    p -= LR * p.grad
        # Clipping: the norm over every shard equals the one-process norm.
        norm = clip_grad_norm(list(ep.parameters()), 1e-3, ep).item()
        want = torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 1e-3).item()
        # Checkpoints hold every expert; a sharded layer loads its slice of a full state.
        full = full_state_dict(ep, ep.state_dict())
        same_state = all(torch.allclose(full[k], v, atol=1e-6) for k, v in ref.state_dict().items())
        fresh = _layer(mode)
        shard_experts(fresh, shard)
        fresh.load_state_dict(ref.state_dict())
        loads_slice = torch.equal(fresh.w1, ref.w1[local]) and torch.equal(fresh.w2, ref.w2[local])
        # Optimizer state: gathered to full size, cut back to the shard.
        opt = torch.optim.Adam(fresh.parameters())
        _loss(fresh, x[rank])[0].backward()
        sync_expert_grads(fresh)
        opt.step()
        saved = full_optimizer_state(fresh, opt)
        params = list(fresh.parameters())
        i_w1 = next(i for i, p in enumerate(params) if p is fresh.w1)
        full_shape = tuple(saved["state"][i_w1]["exp_avg"].shape)
        back = local_optimizer_state(fresh, opt, saved)
        round_trip = torch.equal(back["state"][i_w1]["exp_avg"], opt.state[fresh.w1]["exp_avg"])
        unshard_experts(ep)
        unsharded = ep.expert_shard is None and torch.allclose(ep.w1, ref.w1, atol=1e-6)
        results[rank] = dict(errors=errors, received=received, norm=(norm, want), same_state=same_state,
                             loads_slice=loads_slice, full_shape=full_shape, round_trip=round_trip,
                             unsharded=unsharded)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", list(MODES))
def test_two_process_expert_parallel_matches_one_process(mode, tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), mode, results), nprocs=2)
    for rank in (0, 1):
        r = results[rank]
        assert max(r["errors"]) < 1e-5, (rank, r["errors"])  # loss, aux loss, outputs, every gradient
        assert r["norm"][0] == pytest.approx(r["norm"][1], rel=1e-5)
        assert r["same_state"] and r["loads_slice"] and r["unsharded"] and r["round_trip"]
        assert r["full_shape"] == (E, D, F)
    if MODES[mode][3]:  # step 0: every token went to the same two experts (top-2 of tied logits), so
        # one rank's shard received no token (which one is up to topk's tie order)
        assert sorted(results[rank]["received"][0] for rank in (0, 1)) == [False, True]
    else:
        assert all(all(results[rank]["received"]) for rank in (0, 1))


def test_expert_shard_slices():
    shard = ExpertShard(group=None, size=4, rank=2, world_size=8)
    assert shard.local(16) == slice(8, 12)
