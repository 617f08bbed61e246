"""Expert parallelism (EP): each MoE layer's experts sharded over a process group, tokens
exchanged with ``all_to_all_single`` (GShard / DeepSpeed-MoE / Megatron-Core layout).

With W ranks and EP size M (M divides W and E), ranks ``[i*M, (i+1)*M)`` form EP group i; rank j
of a group holds experts ``[j*E/M, (j+1)*E/M)`` of every MoE layer. The W/M ranks holding the
same shard form its *replica group*. Per MoE layer and step:

1. each rank routes its own tokens (routing, capacity and drops are the same as without EP: a
   rank's tokens are its routing groups either way) and sorts its kept assignments by expert;
2. per-expert counts are exchanged (one small all-to-all), then the rows themselves
   (``all_to_all_single_autograd``, which carries gradients back);
3. the shard owner runs its experts on the rows it received (the same grouped kernel as without
   EP), and the outputs travel back by the reverse all-to-all; the gates are applied at home.

Gradients: DDP all-reduces (averages) the replicated parameters over all W ranks; expert shards
are excluded from DDP. The backward of the all-to-all already brings every EP-group rank's
contribution to a shard's owner, so a shard's gradient is summed over its replica group and
divided by W (``sync_expert_grads``): the same average over W ranks' losses as DDP takes.
Gradient clipping needs the norm over every shard (``clip_grad_norm``).

Checkpoints hold full expert tensors: ``full_state_dict`` gathers the shards and a sharded layer
loads a full tensor by slicing its part, so a run resumes under any EP size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import Tensor, nn

EXPERT_PARAMS = ("w1", "w2")  # a MoELayer's expert banks, (E, ...) each


@dataclass(frozen=True)
class ExpertShard:
    """Where this rank's experts sit: its EP group (``size`` ranks, this one at ``rank``) and the
    replica group of ranks holding the same shard (None when there is one copy)."""

    group: Any  # torch.distributed ProcessGroup
    size: int
    rank: int
    replica_group: Any = None
    world_size: int = 1

    def local(self, num_experts: int) -> slice:
        n = num_experts // self.size
        return slice(self.rank * n, (self.rank + 1) * n)


def new_expert_shards(expert_parallel: int) -> ExpertShard:
    """EP and replica groups over the default process group (every rank must call this, in the
    same order: ``dist.new_group`` is collective)."""
    import torch.distributed as dist

    world, me = dist.get_world_size(), dist.get_rank()
    if expert_parallel < 1 or world % expert_parallel:
        raise ValueError(f"expert_parallel={expert_parallel} must divide the {world} processes")
    mine = replica = None
    for i in range(world // expert_parallel):
        ranks = list(range(i * expert_parallel, (i + 1) * expert_parallel))
        group = dist.new_group(ranks)
        if me in ranks:
            mine = group
    if world > expert_parallel:
        for j in range(expert_parallel):
            ranks = list(range(j, world, expert_parallel))
            group = dist.new_group(ranks)
            if me in ranks:
                replica = group
    return ExpertShard(mine, expert_parallel, me % expert_parallel, replica, world)


def moe_layers(model: nn.Module) -> list:
    # Recognised by their shard hook rather than by class: bench.models.moe imports this module.
    return [m for m in model.modules() if callable(getattr(m, "shard_experts", None))]


def shard_experts(model: nn.Module, shard: ExpertShard) -> int:
    """Keep only this rank's experts in every MoE layer (in place: the Parameter objects stay, so
    an optimizer built before still holds them). Returns the number of layers sharded."""
    layers = moe_layers(model)
    for layer in layers:
        layer.shard_experts(shard)
    return len(layers)


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Qualified names of the sharded expert banks (what DDP must leave alone)."""
    names = []
    for prefix, module in model.named_modules():
        if getattr(module, "expert_shard", None) is not None:
            names += [f"{prefix}.{p}" if prefix else p for p in EXPERT_PARAMS]
    return names


def sharded_parameters(model: nn.Module) -> list[tuple[nn.Parameter, ExpertShard]]:
    out = []
    for layer in moe_layers(model):
        if layer.expert_shard is not None:
            out += [(getattr(layer, p), layer.expert_shard) for p in EXPERT_PARAMS]
    return out


def sync_expert_grads(model: nn.Module) -> None:
    """After backward: each shard's gradient summed over its replica group, divided by the world
    size (see the module docstring)."""
    import torch.distributed as dist

    for p, shard in sharded_parameters(model):
        if p.grad is None:
            continue
        if shard.replica_group is not None:
            dist.all_reduce(p.grad, group=shard.replica_group)
        p.grad.div_(shard.world_size)


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float, model: nn.Module) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the whole model, expert shards of every EP rank
    included: the same total norm (and so the same scale) on every rank."""
    import torch.distributed as dist

    sharded = {id(p): shard for p, shard in sharded_parameters(model)}
    grads = [p for p in parameters if p.grad is not None]
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(grads, max_norm)
    replicated = [p.grad.detach().float() for p in grads if id(p) not in sharded]
    local = [p.grad.detach().float() for p in grads if id(p) in sharded]
    device = grads[0].grad.device
    rep_sq = sum((g.pow(2).sum() for g in replicated), torch.zeros((), device=device))
    shard_sq = sum((g.pow(2).sum() for g in local), torch.zeros((), device=device))
    group = next(iter(sharded.values())).group
    dist.all_reduce(shard_sq, group=group)  # every shard of the EP group
    total = (rep_sq + shard_sq).sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in grads:
        p.grad.mul_(scale.to(p.grad.dtype))
    return total


def _gather_dim0(t: Tensor, shard: ExpertShard) -> Tensor:
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(shard.size)]
    dist.all_gather(parts, t.detach().contiguous(), group=shard.group)
    return torch.cat(parts)


def full_state_dict(model: nn.Module, state: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """``state`` (the model's state_dict, keys under ``prefix``) with every sharded expert bank
    replaced by the full one gathered over its EP group. Collective: every rank calls it."""
    out = dict(state)
    for name, module in model.named_modules():
        shard = getattr(module, "expert_shard", None)
        if shard is None:
            continue
        for p in EXPERT_PARAMS:
            key = f"{prefix}{name}.{p}" if name else f"{prefix}{p}"
            out[key] = _gather_dim0(state[key], shard)
    return out


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state_dict with the per-parameter state of sharded expert banks gathered
    to full size (collective). Parameters are matched by their index in the param groups."""
    state = optimizer.state_dict()
    sharded = {id(p): (p, shard) for p, shard in sharded_parameters(model)}
    if not sharded:
        return state
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        if id(p) not in sharded or i not in state["state"]:
            continue
        shard = sharded[id(p)][1]
        state["state"][i] = {k: _gather_dim0(v, shard) if torch.is_tensor(v) and v.shape == p.shape else v
                             for k, v in state["state"][i].items()}
    return state


def local_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """A saved (full) optimizer state_dict cut to this rank's expert shards."""
    sharded = {id(p): (p, shard) for p, shard in sharded_parameters(model)}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    out = {**state, "state": dict(state["state"])}
    for i, p in enumerate(params):
        if id(p) not in sharded or i not in out["state"]:
            continue
        shard, E = sharded[id(p)][1], None
        entry = {}
        for k, v in out["state"][i].items():
            if torch.is_tensor(v) and v.dim() == p.dim() and v.shape[1:] == p.shape[1:] and v.shape[0] != p.shape[0]:
                E = v.shape[0]
                v = v[shard.local(E)].clone()
            entry[k] = v
        out["state"][i] = entry
    return out


def unshard_experts(model: nn.Module) -> None:
    """Every rank gets every expert back (collective): evaluation and saving then run as without EP."""
    for layer in moe_layers(model):
        shard = layer.expert_shard
        if shard is None:
            continue
        with torch.no_grad():
            for p in EXPERT_PARAMS:
                param = getattr(layer, p)
                param.data = _gather_dim0(param.data, shard)
        layer.expert_shard = None


def dispatch_to_experts(rows: Tensor, expert: Tensor, num_experts: int, shard: ExpertShard, run_local) -> Tensor:
    """Rows sorted by global expert id -> their expert outputs, computed on the experts' ranks.

    ``run_local(rows, counts)`` computes this rank's experts on rows sorted by local expert id
    (``counts[j]`` rows for local expert j)."""
    import torch.distributed as dist
    # torch's differentiable all-to-all (its backward is the reverse exchange)
    from torch.distributed._functional_collectives import all_to_all_single_autograd as exchange

    from bench.models.experts import compute_dtype
    from bench.models.routing import counts_below

    rows = rows.to(compute_dtype(rows))  # the experts compute in it anyway: bf16 halves the traffic
    M, n_local = shard.size, num_experts // shard.size
    counts = counts_below(expert, num_experts)  # (E,) rows this rank sends per expert
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts, group=shard.group)  # (M * n_local,): per source, per local expert
    send = counts.view(M, n_local).sum(1).tolist()
    received = received.view(M, n_local)
    recv = received.sum(1).tolist()  # the one host sync the dispatch needs: the split sizes
    x = exchange(rows.contiguous(), recv, send, shard.group)
    # Received rows are ordered (source rank, local expert): regroup them by local expert.
    local_id = torch.arange(n_local, device=rows.device).repeat(M).repeat_interleave(received.reshape(-1))
    order = torch.argsort(local_id, stable=True)
    y_sorted = run_local(x.index_select(0, order), received.sum(0).tolist())
    y = torch.empty_like(y_sorted).index_copy(0, order, y_sorted)  # back to (source rank, local expert)
    return exchange(y.contiguous(), send, recv, shard.group)


__all__ = ["ExpertShard", "clip_grad_norm", "dispatch_to_experts", "expert_parameter_names", "full_optimizer_state",
           "full_state_dict", "local_optimizer_state", "new_expert_shards", "shard_experts", "sync_expert_grads",
           "unshard_experts"]
