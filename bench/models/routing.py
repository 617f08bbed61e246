"""Routers and their auxiliary losses.

Gating is a set of pure functions over router logits (fairseq ``top1gating`` / fairscale
``top2gating`` style) so each piece can be tested against hand-computed values; ``Router`` only
owns the weights. Every router returns the same ``Routing`` record.

Sources:
- Switch routing, load-balancing loss, capacity: Fedus, Zoph & Shazeer 2021, eqs. 1-6.
- Router z-loss: Zoph et al. 2022 (ST-MoE), eq. 5.
- Noisy top-k gating, importance and load losses: Shazeer et al. 2017, eqs. 3-11.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.models.config import MoEConfig


@dataclass
class Routing:
    """Where each (token, choice) goes. Shapes: T routed tokens, k choices per token."""

    expert_index: Tensor  # (T, k) int64; column 0 is the token's first choice
    gates: Tensor  # (T, k) float32 combine weights; 0 for dropped assignments
    position: Tensor  # (T, k) int64 slot of the assignment in its expert's buffer (per group)
    keep: Tensor  # (T, k) bool; False = over capacity, dropped (the residual carries the token)
    capacity: Optional[int]  # slots per expert per group; None = dropless
    group_size: int  # tokens per routing group (the last group may be partial)
    losses: dict[str, Tensor] = field(default_factory=dict)  # unweighted aux losses, scalars
    metrics: dict[str, Tensor] = field(default_factory=dict)  # detached statistics


# ---------------------------------------------------------------------------------------------
# auxiliary losses


def load_balancing_loss(probs: Tensor, expert_index: Tensor) -> Tensor:
    """Switch eq. 4: N * sum_i f_i * P_i.

    f_i: fraction of assignments (all k choices, before capacity drops) sent to expert i;
    P_i: mean router probability of expert i. Equals 1 under perfectly uniform routing.
    probs: (T, E); expert_index: (T, k).
    """
    num_experts = probs.shape[-1]
    counts = torch.bincount(expert_index.reshape(-1), minlength=num_experts).to(probs.dtype)
    f = counts / expert_index.numel()
    P = probs.mean(dim=0)
    return num_experts * torch.sum(f * P)


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE eq. 5: mean over tokens of logsumexp(logits)^2; keeps router logits small."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def cv_squared(x: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation, population variance (as tf.nn.moments in Shazeer's code).

    Zero for a single expert (nothing to balance)."""
    if x.numel() <= 1:
        return x.new_zeros(())
    x = x.float()
    return x.var(unbiased=False) / (x.mean().square() + eps)


def smooth_load(clean_logits: Tensor, noisy_logits: Tensor, noise_std: Tensor, k: int) -> Tensor:
    """Shazeer eqs. 8-10: differentiable load estimate sum_x P(x, i).

    P(x, i) = Phi((clean_i - kth_excluding(noisy, k, i)) / noise_std_i): the probability that
    expert i would still be in the top k if only its own noise were re-drawn. The k-th largest
    noisy logit excluding i is the (k+1)-th overall if i is currently in the top k, else the k-th.
    """
    num_experts = clean_logits.shape[-1]
    top = noisy_logits.topk(min(k + 1, num_experts), dim=-1).values
    threshold_if_in = top[:, k:k + 1] if k < num_experts else torch.full_like(top[:, :1], -math.inf)
    threshold_if_out = top[:, k - 1:k]
    is_in = noisy_logits > threshold_if_in
    normal = torch.distributions.Normal(0.0, 1.0)
    p_in = normal.cdf((clean_logits - threshold_if_in) / noise_std)
    p_out = normal.cdf((clean_logits - threshold_if_out) / noise_std)
    return torch.where(is_in, p_in, p_out).sum(dim=0)


# ---------------------------------------------------------------------------------------------
# gating: logits -> (expert_index, gates, dense probs)


def softmax_topk_gating(logits: Tensor, k: int, renormalize: bool = False):
    """Switch (k=1) and GShard-style top-k: p = softmax(logits); keep the k largest p.

    Returns expert_index (T, k), gates (T, k), probs (T, E)."""
    probs = logits.softmax(dim=-1)
    # topk even for k = 1: max would be faster (8192 x 32 probs: 0.2 vs 1.0 ms on 2 CPU cores) but
    # breaks exact ties differently, and ties do occur in training (the demo's switch run then
    # ends at 2.2067 instead of 2.2084), so every committed switch result would stop reproducing.
    gates, expert_index = probs.topk(k, dim=-1)
    if renormalize:
        gates = gates / gates.sum(dim=-1, keepdim=True)
    return expert_index, gates, probs


def noisy_topk_gating(logits: Tensor, k: int):
    """Shazeer eqs. 3-5: G = softmax(KeepTopK(H, k)), H the (noisy) logits.

    Softmax over only the k kept logits equals softmax with the others set to -inf.
    Returns expert_index (T, k), gates (T, k), the dense sparse-gate matrix G (T, E)."""
    top_logits, expert_index = logits.topk(k, dim=-1)
    gates = top_logits.softmax(dim=-1)
    dense = torch.zeros_like(logits).scatter(-1, expert_index, gates)
    return expert_index, gates, dense


# ---------------------------------------------------------------------------------------------
# capacity


def expert_capacity(tokens: int, num_experts: int, k: int, capacity_factor: Optional[float]) -> Optional[int]:
    """Switch eq. 3: ceil(k * tokens / E * capacity_factor); None (dropless) when factor is None.

    Exact rational arithmetic so that e.g. 2048 * 1.1 / 8 does not round up by float error."""
    if capacity_factor is None:
        return None
    return math.ceil(Fraction(k * tokens, num_experts) * Fraction(str(capacity_factor)))


def slot_positions(expert_index: Tensor, gates: Tensor, num_experts: int, group_size: int,
                   drop_policy: str = "position", causal: bool = False) -> Tensor:
    """Slot of each assignment in its expert's buffer, counted within its routing group.

    Priority: all first choices before any second choice (GShard); within one choice rank,
    by token position ("position") or by descending gate ("probability", V-MoE's batch
    prioritized routing). ``causal``: token by token instead (token t's k choices, then token
    t+1's), so no assignment's slot depends on a later token: with GShard's order a token's second
    choice can be dropped because of *later* tokens' first choices, a leak of the future in a
    causal model. Identical for k = 1. Vectorised with a stable sort: no loop over tokens or
    experts. expert_index, gates: (T, k) -> position (T, k).
    """
    if causal and drop_policy != "position":
        raise ValueError(f"drop_policy={drop_policy!r} ranks a group's tokens by gate, so a token's slot depends on "
                         "later tokens: not allowed in a causal model (use drop_policy='position')")
    T, k = expert_index.shape
    S = group_size
    pad = -T % S  # a partial last group is padded with assignments to a null bucket (index E)
    if pad:
        expert_index = torch.cat([expert_index, expert_index.new_full((pad, k), num_experts)])
        gates = torch.cat([gates, gates.new_zeros(pad, k)])
    G = (T + pad) // S
    buckets = num_experts + 1 if pad else num_experts
    if causal:  # token-major: (G, S, k) flattened token by token
        flat = expert_index.view(G, S * k)
        sorted_experts, perm = flat.sort(dim=-1, stable=True)
        counts = torch.zeros(G, buckets, dtype=torch.long, device=flat.device)
        counts.scatter_add_(1, flat, torch.ones_like(flat))
        starts = counts.cumsum(dim=-1) - counts
        rank_in_expert = torch.arange(k * S, device=flat.device).expand(G, -1) - starts.gather(1, sorted_experts)
        pos = torch.empty_like(flat).scatter_(1, perm, rank_in_expert)
        return pos.view(T + pad, k)[:T]
    ranked = expert_index.view(G, S, k).transpose(1, 2)  # (G, k, S) rank-major priority
    order = None
    if drop_policy == "probability":
        order = gates.detach().view(G, S, k).transpose(1, 2).argsort(dim=-1, descending=True, stable=True)
        ranked = ranked.gather(-1, order)
    flat = ranked.reshape(G, k * S)  # (G, kS) experts in priority order
    sorted_experts, perm = flat.sort(dim=-1, stable=True)
    counts = torch.zeros(G, buckets, dtype=torch.long, device=flat.device)
    counts.scatter_add_(1, flat, torch.ones_like(flat))
    starts = counts.cumsum(dim=-1) - counts  # (G, E) first sorted index of each expert
    rank_in_expert = torch.arange(k * S, device=flat.device).expand(G, -1) - starts.gather(1, sorted_experts)
    pos = torch.empty_like(flat).scatter_(1, perm, rank_in_expert).view(G, k, S)
    if order is not None:
        pos = torch.empty_like(pos).scatter_(-1, order, pos)
    return pos.transpose(1, 2).reshape(T + pad, k)[:T]


def assign_capacity(expert_index: Tensor, gates: Tensor, num_experts: int,
                    capacity_factor: Optional[float], group_size: Optional[int] = None,
                    drop_policy: str = "position", causal: bool = False) -> tuple[Tensor, Tensor, Optional[int], int]:
    """Slots and keep-mask for every assignment. Returns (position, keep, capacity, group_size).

    Tokens are cut into groups of ``group_size`` in order (None: one group); each group has
    its own capacity counters. When group_size does not divide the tokens (padding removed from
    a batch), the last group is partial and keeps the full group's capacity."""
    T, k = expert_index.shape
    S = T if group_size is None or group_size >= T else group_size
    S = max(S, 1)
    capacity = expert_capacity(S, num_experts, k, capacity_factor)
    if capacity is None:  # dropless: slots only order the expert buffers; keep GShard's order, as before
        causal = False
    position = slot_positions(expert_index, gates, num_experts, S, drop_policy, causal)
    capacity = expert_capacity(S, num_experts, k, capacity_factor)
    keep = position < capacity if capacity is not None else torch.ones_like(position, dtype=torch.bool)
    return position, keep, capacity, S


# ---------------------------------------------------------------------------------------------
# the router module: owns weights, calls the pure functions


class Router(nn.Module):
    """Router weights for one MoE layer (switch / topk / noisy_topk) and the routing decision."""

    def __init__(self, d_model: int, cfg: MoEConfig, causal: bool = False):
        super().__init__()
        self.cfg = cfg
        self.causal = causal  # capacity slots token by token (see slot_positions)
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, d_model))
        # Shazeer 2017 initialises W_g and W_noise to zero (uniform routing with noise at start).
        self.noise_weight = nn.Parameter(torch.zeros(cfg.num_experts, d_model)) if cfg.router == "noisy_topk" else None
        self.reset_parameters()

    def reset_parameters(self, init_scale: float = 0.1) -> None:
        if self.cfg.router == "noisy_topk":
            nn.init.zeros_(self.weight)
        else:
            std = math.sqrt(init_scale / self.weight.shape[1])
            nn.init.trunc_normal_(self.weight, std=std, a=-2 * std, b=2 * std)

    def forward(self, x: Tensor) -> Routing:
        """x: (T, d) routed tokens."""
        cfg = self.cfg
        # Selective precision (Switch §2.4): the router runs in float32 even inside bf16
        # autocast, because the softmax/exponent of bf16 logits is too coarse and unstable.
        with torch.autocast(device_type=x.device.type, enabled=False):
            x32 = x.float()
            if self.training and cfg.jitter_eps > 0:
                x32 = x32 * torch.empty_like(x32).uniform_(1 - cfg.jitter_eps, 1 + cfg.jitter_eps)
            logits = F.linear(x32, self.weight.float())  # (T, E)
            losses = {"z_loss": router_z_loss(logits)}
            if cfg.router == "noisy_topk":
                noisy = logits
                if self.training:
                    # The 1e-2 floor keeps the load estimator's division finite (as in Shazeer's code).
                    noise_std = F.softplus(F.linear(x32, self.noise_weight.float())) + 1e-2
                    noisy = logits + torch.randn_like(logits) * noise_std
                expert_index, gates, probs = noisy_topk_gating(noisy, cfg.top_k)
                if self.training and cfg.top_k < cfg.num_experts:
                    load = smooth_load(logits, noisy, noise_std, cfg.top_k)
                else:  # no noise: the load is the (non-differentiable) assignment count
                    load = torch.bincount(expert_index.reshape(-1), minlength=cfg.num_experts).float()
            else:
                expert_index, gates, probs = softmax_topk_gating(logits, cfg.top_k, cfg.renormalize)
                load = torch.bincount(expert_index.reshape(-1), minlength=cfg.num_experts).float()
            losses["load_balance"] = load_balancing_loss(probs, expert_index)
            losses["importance"] = cv_squared(probs.sum(dim=0))
            losses["load"] = cv_squared(load)
        factor = cfg.capacity_factor if self.training else cfg.eval_capacity_factor
        position, keep, capacity, group_size = assign_capacity(
            expert_index, gates, cfg.num_experts, factor, cfg.group_size, cfg.drop_policy, self.causal)
        gates = gates * keep
        metrics = routing_metrics(probs, expert_index, keep, cfg.num_experts)
        return Routing(expert_index, gates, position, keep, capacity, group_size, losses, metrics)


def routing_metrics(probs: Tensor, expert_index: Tensor, keep: Tensor, num_experts: int) -> dict[str, Tensor]:
    """Detached statistics worth logging (fairseq gate metadata)."""
    with torch.no_grad():
        assigned = torch.bincount(expert_index.reshape(-1), minlength=num_experts)
        kept = torch.bincount(expert_index[keep], minlength=num_experts)
        p = probs.clamp_min(1e-9)
        return {
            "tokens_per_expert": assigned,
            "kept_per_expert": kept,
            "fraction_dropped": 1.0 - keep.float().mean(),
            "router_entropy": -(probs * p.log()).sum(-1).mean(),
            "unused_experts": (assigned == 0).sum(),
        }
