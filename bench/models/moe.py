"""The one MoE implementation every sparse family uses: expert bank, dispatch and combine.

    x (N, d) --Router--> Routing (expert, gate, slot, keep)
             --dispatch--> per-expert buffers --experts--> combine: y_t = sum_j gate_tj * E_j(x_t)
             [+ sum_s Shared_s(x_t): shared experts, every token, when moe.shared_experts > 0]

Tokens over capacity get y = 0 from the MoE; the block's residual connection carries them.
Three kernels compute the experts, with identical results (tested against a per-token loop):
- ``sorted``: sort assignments by expert and run each expert on its contiguous rows with one
  custom autograd node (``experts.py``); computes no padding.
- ``padded``: scatter into an (E, slots, d) buffer and run two batched matmuls (static shapes,
  what TPU/GShard implementations do; the buffer is trimmed to the fullest expert's load).
- ``grouped_mm``: the ``sorted`` layout through torch's grouped GEMM (``torch._grouped_mm``, one
  kernel for every expert; fast on Hopper GPUs in bf16, correct but not faster on a CPU).
- ``auto`` (default): ``grouped_mm`` on a CUDA device of capability >= 9.0 in bf16; otherwise ``sorted`` unless experts average fewer rows than ``auto_padded_below_rows``
  of the compute dtype (16 in fp32, 64 in bf16, where oneDNN's batched matmul wins and small
  per-expert matmuls pay a kernel build per shape). The timings behind these thresholds are in
  ``docs/performance.md``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.models.config import MoEConfig
from bench.models.expert_parallel import dispatch_to_experts
from bench.models.experts import (compute_dtype, grouped_expert_ffn, grouped_mm_expert_ffn, prefers_grouped_mm,
                                  row_granule)
from bench.models.routing import NUM_POSITION_BUCKETS, Router, Routing, counts_below, frequency_hash_table

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}
AUTO_PADDED_BELOW_ROWS = {"fp32": 16, "reduced": 64}  # see the module docstring


def auto_padded_below_rows(dtype: torch.dtype) -> int:
    return AUTO_PADDED_BELOW_ROWS["reduced" if dtype in (torch.bfloat16, torch.float16) else "fp32"]


# torch's trunc_normal_ redraws the *whole* tensor in every rejection round (~6 rounds for 1e8
# values at +-2 sigma): one Switch-Base expert bank (128 x 768 x 3072) took 25 s, so building
# the base preset spent ~5 minutes in init. Above this size only the rejected values are redrawn
# (2.5 s): the same distribution from a different random stream. Smaller tensors -- every
# tiny and small preset weight, so every committed result -- keep torch's stream bit for bit.
REDRAW_REJECTED_ABOVE = 2**25


def trunc_normal_(weight: Tensor, fan_in: int, scale: float) -> Tensor:
    """Switch Transformer init (Table 3): truncated normal, sigma = sqrt(scale / fan_in), +-2 sigma."""
    std = math.sqrt(scale / fan_in)
    if weight.numel() <= REDRAW_REJECTED_ABOVE or not weight.is_contiguous():
        return nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)
    with torch.no_grad():
        flat = weight.normal_(0.0, std).view(-1)
        rejected = (flat.abs() > 2 * std).nonzero().squeeze(1)
        while rejected.numel():
            fresh = torch.empty(rejected.numel(), dtype=flat.dtype, device=flat.device).normal_(0.0, std)
            flat[rejected] = fresh
            rejected = rejected[fresh.abs() > 2 * std]
    return weight


class FeedForward(nn.Module):
    """Dense FFN d_model -> d_ff -> d_model (no biases, as T5/Switch); one expert's shape."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "relu", dropout: float = 0.0,
                 init_scale: float = 0.1):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)
        self.act = ACTIVATIONS[activation]
        self.dropout = nn.Dropout(dropout)
        trunc_normal_(self.w1.weight, d_model, init_scale)
        trunc_normal_(self.w2.weight, d_ff, init_scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(self.dropout(self.act(self.w1(x))))


@dataclass
class MoEAux:
    """What one MoE layer reports per forward: the weighted aux loss (with grad) and detached stats."""

    loss: Tensor
    stats: dict[str, Tensor]


class MoELayer(nn.Module):
    """Router + expert bank. forward(x (..., d), mask) -> (y (..., d), MoEAux)."""

    def __init__(self, d_model: int, d_ff: int, cfg: MoEConfig, activation: str = "relu",
                 init_scale: float = 0.1, causal: bool = False, vocab_size: int | None = None):
        super().__init__()
        self.cfg = cfg
        E = cfg.num_experts
        # causal: in a causal stack a token's routing and dropping depend on earlier tokens only.
        # vocab_size: hash routing's token-id table (the layer is then called with token_ids).
        self.router = Router(d_model, cfg, causal=causal, vocab_size=vocab_size)
        self.router.reset_parameters(init_scale)
        self.w1 = nn.Parameter(trunc_normal_(torch.empty(E, d_model, d_ff), d_model, init_scale))
        self.w2 = nn.Parameter(trunc_normal_(torch.empty(E, d_ff, d_model), d_ff, init_scale))
        self.activation = activation
        self.act = ACTIVATIONS[activation]
        self.expert_dropout = nn.Dropout(cfg.expert_dropout)
        # Shared experts (DeepSeekMoE): S always-on experts of width d_ff, every routed token, added
        # to the routed output. S experts side by side are one FFN of width S*d_ff (one matmul pair);
        # each expert's second matmul keeps its own fan-in d_ff for the init.
        self.expert_shard = None  # expert parallelism: this rank's part of the experts (shard_experts)
        self._register_load_state_dict_pre_hook(self._load_expert_shard)
        self.shared = None
        if cfg.shared_experts:
            self.shared = FeedForward(d_model, cfg.shared_experts * d_ff, activation, cfg.expert_dropout, init_scale)
            trunc_normal_(self.shared.w2.weight, d_ff, init_scale)

    def forward(self, x: Tensor, mask: Tensor | None = None,
                token_ids: Tensor | None = None) -> tuple[Tensor, MoEAux]:
        """x (..., T, d) or (N, d); mask (..., T) True = real token; token_ids (..., T): the input
        ids at these positions (hash routing needs them; other routers ignore them)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, d)
        rows = flat if mask is None else flat[mask.reshape(-1)]  # padding is not routed
        if rows.shape[0] == 0 and self.expert_shard is not None:  # still joins the other ranks' exchange
            return self._empty_expert_parallel(x)
        if rows.shape[0] == 0:  # nothing to route (an all-padding batch)
            return torch.zeros_like(x), MoEAux(x.new_zeros((), dtype=torch.float32), self._empty_stats())
        # quarter of the sequence each row sits in, for the dropped-by-position metric
        seq_len = shape[-2] if x.dim() >= 3 else flat.shape[0]
        bucket = torch.arange(flat.shape[0], device=x.device) % seq_len * NUM_POSITION_BUCKETS // seq_len  # (N,)
        ids = None if token_ids is None else token_ids.reshape(-1)
        if mask is not None:
            bucket = bucket[mask.reshape(-1)]
            ids = None if ids is None else ids[mask.reshape(-1)]
        routing = self.router(rows, token_ids=ids, position_bucket=bucket)
        y_rows, slots = self.combine(rows, routing)
        if self.shared is not None:  # dropped tokens too: only the routed experts have a capacity
            y_rows = y_rows + self.shared(rows).to(y_rows.dtype)
        if mask is None:
            y = y_rows
        else:
            y = flat.new_zeros(flat.shape, dtype=y_rows.dtype).index_put((mask.reshape(-1),), y_rows)
        loss = self.aux_loss(routing.losses, x)
        stats = {name: v.detach() for name, v in routing.losses.items()}
        stats.update(routing.metrics)
        stats["routed_tokens"] = torch.tensor(rows.shape[0])
        stats["slots_computed"] = torch.tensor(slots)  # expert rows actually multiplied
        return y.view(shape), MoEAux(loss, stats)

    def aux_loss(self, losses: dict[str, Tensor], like: Tensor) -> Tensor:
        """The weighted sum of the router's aux losses. Hash routing has none, expert choice only the
        z-loss; with balance='bias' the balancing losses are reported but not trained on."""
        cfg = self.cfg
        weights = {"load_balance": cfg.load_balance_weight, "z_loss": cfg.z_loss_weight,
                   "importance": cfg.importance_weight, "load": cfg.load_weight}
        total = None
        for name, weight in weights.items():  # the order of the sum as before: same float results
            if name in losses and (cfg.balance != "bias" or name == "z_loss"):
                term = weight * losses[name]
                total = term if total is None else total + term
        return like.new_zeros((), dtype=torch.float32) if total is None else total

    def update_balance_bias(self) -> bool:
        """Aux-loss-free balancing: one bias step from this step's loads (``Router.update_balance_bias``)."""
        return self.router.update_balance_bias()

    def _empty_stats(self) -> dict[str, Tensor]:
        zero, counts = torch.tensor(0.0), torch.zeros(self.cfg.num_experts, dtype=torch.long)
        E = torch.tensor(self.cfg.num_experts)
        buckets = torch.zeros(NUM_POSITION_BUCKETS)
        return dict(load_balance=zero, z_loss=zero, importance=zero, load=zero, tokens_per_expert=counts,
                    kept_per_expert=counts, fraction_dropped=zero, router_entropy=zero,
                    unused_experts=E, dead_experts=E, max_load=zero, mean_load=zero, max_violation=zero,
                    dropped_by_position=buckets, assignments_by_position=buckets,
                    routed_tokens=torch.tensor(0), slots_computed=torch.tensor(0))

    def combine(self, x: Tensor, routing: Routing) -> tuple[Tensor, int]:
        """y_t = sum_j gate_tj * expert_{e_tj}(x_t) over kept assignments. x: (T, d)."""
        T, k = routing.expert_index.shape
        token = torch.arange(T, device=x.device).repeat_interleave(k)  # (A,) kept assignments
        expert, gate = routing.expert_index.reshape(-1), routing.gates.reshape(-1)
        position = routing.position.reshape(-1)
        if routing.capacity is not None:  # selecting the kept ones reads their number back to the host;
            keep = routing.keep.reshape(-1)  # dropless token choice keeps all and skips that sync
            token, expert, gate, position = token[keep], expert[keep], gate[keep], position[keep]
        if self.expert_shard is not None:  # expert parallel: the experts' ranks compute them
            order = torch.argsort(expert, stable=True)
            token, expert, gate = token[order], expert[order], gate[order]
            kernel = "grouped_mm" if self.kernel_for(token.numel(), compute_dtype(x), x.device) == "grouped_mm" \
                else "sorted"  # the padded kernel's static buffers have no use once rows are exchanged
            out = dispatch_to_experts(x.index_select(0, token), expert, self.cfg.num_experts, self.expert_shard,
                                      lambda rows, counts: self._run_experts(rows, counts, kernel))
            slots = token.numel()
        elif (kernel := self.kernel_for(token.numel(), compute_dtype(x), x.device)) in ("sorted", "grouped_mm"):
            order = torch.argsort(expert, stable=True)
            token, expert, gate = token[order], expert[order], gate[order]
            out, slots = self._sorted_experts(x.index_select(0, token), expert, kernel)
        else:
            group = token // routing.group_size
            num_groups = -(-T // routing.group_size)
            out, slots = self._padded_experts(x, token, expert, position, group, num_groups)
        weighted = out * gate.unsqueeze(-1).to(out.dtype)
        return x.new_zeros(x.shape, dtype=out.dtype).index_add_(0, token, weighted), slots

    def kernel_for(self, assignments: int, dtype: torch.dtype, device: torch.device | None = None) -> str:
        """The configured kernel; for ``auto``: torch's grouped GEMM on Hopper GPUs in bf16, else
        padded only when experts average few rows."""
        if self.cfg.dispatch != "auto":
            return self.cfg.dispatch
        if device is not None and prefers_grouped_mm(device, dtype):
            return "grouped_mm"
        return "padded" if assignments < auto_padded_below_rows(dtype) * self.cfg.num_experts else "sorted"

    def _sorted_experts(self, rows: Tensor, expert: Tensor, kernel: str = "sorted") -> tuple[Tensor, int]:
        """rows (A, d) sorted by ``expert``: each expert runs on its contiguous block."""
        counts = counts_below(expert, self.cfg.num_experts)
        # the grouped GEMM takes the counts on the device; the per-expert loop needs them on the host
        return self._run_experts(rows, counts if kernel == "grouped_mm" else counts.tolist(), kernel), rows.shape[0]

    def _run_experts(self, rows: Tensor, counts: list[int] | Tensor, kernel: str = "sorted") -> Tensor:
        """The experts this module holds (all, or its shard) on rows sorted by expert, counts[e] each."""
        if kernel == "grouped_mm":
            return grouped_mm_expert_ffn(rows, self.w1, self.w2, counts, lambda h: self.expert_dropout(self.act(h)))
        if self.training and self.cfg.expert_dropout > 0:  # plain autograd path, with dropout
            w1s, w2s = self.w1.unbind(0), self.w2.unbind(0)  # unbind: one stacked grad, not E
            outs = [torch.matmul(self.expert_dropout(self.act(torch.matmul(chunk, w1s[e]))), w2s[e])
                    for e, chunk in enumerate(rows.split(counts)) if counts[e]]
            return torch.cat(outs) if outs else rows.new_zeros(0, self.w2.shape[-1])
        return grouped_expert_ffn(rows, self.w1, self.w2, counts, self.activation)

    # --- expert parallelism (bench/models/expert_parallel.py) ---------------------------------
    def shard_experts(self, shard) -> None:
        """Keep only this rank's experts (in place: the Parameters stay the same objects)."""
        E = self.cfg.num_experts
        if E % shard.size:
            raise ValueError(f"expert_parallel={shard.size} must divide the {E} experts of every MoE layer")
        with torch.no_grad():
            for name in ("w1", "w2"):
                p = getattr(self, name)
                p.data = p.data[shard.local(E)].clone()
        self.expert_shard = shard

    def _load_expert_shard(self, state_dict, prefix, *args) -> None:
        """Checkpoints hold every expert: a sharded layer loads its slice of them."""
        if self.expert_shard is None:
            return
        for name in ("w1", "w2"):
            t = state_dict.get(prefix + name)
            if t is not None and t.shape[0] == self.cfg.num_experts != getattr(self, name).shape[0]:
                state_dict[prefix + name] = t[self.expert_shard.local(self.cfg.num_experts)]

    def _empty_expert_parallel(self, x: Tensor) -> tuple[Tensor, MoEAux]:
        """No token to route on this rank: send nothing, compute what the others send, stay in the graph
        (the backward's all-to-all needs this rank too)."""
        d = x.shape[-1]
        none = x.new_zeros(0, d)
        out = dispatch_to_experts(none, torch.zeros(0, dtype=torch.long, device=x.device), self.cfg.num_experts,
                                  self.expert_shard, self._run_experts)
        y = torch.zeros_like(x) + 0 * out.sum()
        return y, MoEAux(x.new_zeros((), dtype=torch.float32) + 0 * out.sum().float(), self._empty_stats())

    def _padded_experts(self, x: Tensor, token: Tensor, expert: Tensor, position: Tensor,
                        group: Tensor, num_groups: int) -> tuple[Tensor, int]:
        E, d = self.cfg.num_experts, x.shape[-1]
        # Trim the buffer to the fullest expert (<= capacity): same result, fewer wasted FLOPs.
        used = int(position.max()) + 1 if position.numel() else 0
        # bf16 on CPU: oneDNN builds a kernel per bmm shape; rounding the slot count up to a
        # multiple of 8 keeps the shapes few and cached (see experts.py). Extra slots stay zero.
        if row_granule(compute_dtype(x), x.device):
            used = -(-used // 8) * 8
        slot = expert * (num_groups * used) + group * used + position  # (A,)
        buf = x.new_zeros(E * num_groups * used, d).index_copy_(0, slot, x[token])
        h = buf.view(E, num_groups * used, d)  # (E, G*C, d)
        h = torch.bmm(self.expert_dropout(self.act(torch.bmm(h, self.w1))), self.w2)
        return h.reshape(-1, d)[slot], buf.shape[0]


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """The model's MoE layers in registration order (a seq2seq model: encoder, then decoder)."""
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def use_frequency_hash(model: nn.Module, counts_for: Callable[[str], Tensor]) -> int:
    """``hash_assignment='frequency'``: replace every hash router's random table with the balanced
    one of Roller et al. 2021 (``frequency_hash_table``) from ``counts_for(name)``, the training
    token counts of the stack the router's layer reads (``name``: its module path, e.g.
    ``encoder.1.ffn.router``). The tables follow from the data alone, so a resumed run or a saved
    model has the same ones (they are buffers). Returns how many tables were set."""
    n = 0
    for name, module in model.named_modules():
        if isinstance(module, Router) and module.kind == "hash" and module.cfg.hash_assignment == "frequency":
            table = frequency_hash_table(counts_for(name), module.cfg.num_experts)
            if table.shape != module.hash_table.shape:
                raise ValueError(f"{name}: token counts over {table.numel()} ids, the hash table has "
                                 f"{module.hash_table.numel()}")
            module.hash_table.copy_(table)
            n += 1
    return n


def update_balance_biases(model: nn.Module) -> int:
    """Aux-loss-free balancing (balance='bias'): one bias update in every MoE layer, from the loads
    of the training step just taken. The trainer calls it once after each optimizer step (never in
    evaluation); returns how many layers changed their bias (0 for any other model)."""
    return sum(layer.update_balance_bias() for layer in moe_layers(model))
