"""Routers and their auxiliary losses.

Gating is a set of pure functions over router logits (fairseq ``top1gating`` / fairscale
``top2gating`` style) so each piece can be tested against hand-computed values; ``Router`` only
owns the weights. Every router returns the same ``Routing`` record.

Sources:
- Switch routing, load-balancing loss, capacity: Fedus, Zoph & Shazeer 2021, eqs. 1-6.
- Router z-loss: Zoph et al. 2022 (ST-MoE), eq. 5.
- Noisy top-k gating, importance and load losses: Shazeer et al. 2017, eqs. 3-11.
- Hash routing: Roller et al. 2021 ("Hash Layers For Large Sparse Models").
- Expert choice routing: Zhou et al. 2022 ("Mixture-of-Experts with Expert Choice Routing").
- Aux-loss-free balancing (a selection-only bias, MaxVio): Wang et al. 2024 ("Auxiliary-Loss-Free
  Load Balancing Strategy for Mixture-of-Experts"), as in DeepSeek-V3.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.models.config import NONCAUSAL_ROUTING, MoEConfig


@dataclass
class Routing:
    """Where each (token, choice) goes. Shapes: T routed tokens, k choices per token.

    Expert choice fills the same record with k = E: row t lists all E experts in the token's order
    of preference (column 0 still its first choice), ``keep`` says which of them took the token
    (0..E of them), ``position`` is the token's rank among the tokens its expert took."""

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


def counts_below(index: Tensor, n: int, weights: Optional[Tensor] = None) -> Tensor:
    """``torch.bincount(index, weights, minlength=n)`` for indices known to lie in [0, n): on a GPU,
    bincount reads the largest index back to the host to size its output (a sync per call); a
    scatter-add into n zeros does not. int64 counts, or the weights' dtype."""
    index = index.reshape(-1)
    values = torch.ones_like(index) if weights is None else weights.reshape(-1)
    return values.new_zeros(n).index_add_(0, index, values)


def load_balancing_loss(probs: Tensor, expert_index: Tensor) -> Tensor:
    """Switch eq. 4: N * sum_i f_i * P_i.

    f_i: fraction of assignments (all k choices, before capacity drops) sent to expert i;
    P_i: mean router probability of expert i. Equals 1 under perfectly uniform routing.
    probs: (T, E); expert_index: (T, k).
    """
    num_experts = probs.shape[-1]
    counts = counts_below(expert_index, num_experts).to(probs.dtype)
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


def softmax_topk_gating(logits: Tensor, k: int, renormalize: bool = False, bias: Optional[Tensor] = None):
    """Switch (k=1) and GShard-style top-k: p = softmax(logits); keep the k largest p.

    ``bias`` (E,): aux-loss-free balancing (Wang et al. 2024): the experts are the top k of
    p + b, the gates are the unbiased p of those experts (the bias steers selection only).
    Returns expert_index (T, k), gates (T, k), probs (T, E)."""
    probs = logits.softmax(dim=-1)
    if bias is not None:
        expert_index = (probs.detach() + bias).topk(k, dim=-1).indices
        gates = probs.gather(-1, expert_index)
        if renormalize:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return expert_index, gates, probs
    # topk even for k = 1: max would be faster (8192 x 32 probs: 0.2 vs 1.0 ms on 2 CPU cores) but
    # breaks exact ties differently, and ties do occur in training (the demo's switch run then
    # ends at 2.2067 instead of 2.2084), so every committed switch result would stop reproducing.
    gates, expert_index = probs.topk(k, dim=-1)
    if renormalize:
        gates = gates / gates.sum(dim=-1, keepdim=True)
    return expert_index, gates, probs


def noisy_topk_gating(logits: Tensor, k: int, bias: Optional[Tensor] = None):
    """Shazeer eqs. 3-5: G = softmax(KeepTopK(H, k)), H the (noisy) logits.

    Softmax over only the k kept logits equals softmax with the others set to -inf. ``bias`` (E,):
    the kept experts are the top k of H + b, their gates the softmax of their unbiased H.
    Returns expert_index (T, k), gates (T, k), the dense sparse-gate matrix G (T, E)."""
    if bias is None:
        top_logits, expert_index = logits.topk(k, dim=-1)
    else:
        expert_index = (logits.detach() + bias).topk(k, dim=-1).indices
        top_logits = logits.gather(-1, expert_index)
    gates = top_logits.softmax(dim=-1)
    dense = torch.zeros_like(logits).scatter(-1, expert_index, gates)
    return expert_index, gates, dense


def hash_table(vocab_size: int, num_experts: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Roller et al. 2021's random hash, balanced over the vocabulary: a random permutation of the
    token ids dealt to the experts in turn, so each expert owns floor or ceil(V / E) ids.
    Returns table (V,) int64: token id -> expert."""
    perm = torch.randperm(vocab_size, generator=generator)
    table = torch.empty(vocab_size, dtype=torch.long)
    table[perm] = torch.arange(vocab_size) % num_experts
    return table


def frequency_hash_table(counts: Tensor, num_experts: int) -> Tensor:
    """Roller et al. 2021's balanced assignment: token ids in decreasing training frequency, each
    to the expert with the least total frequency so far (greedy longest-processing-time: no
    expert ends above the mean load plus the largest single count; ties to the lower index). Ids
    never seen in training are then dealt to the experts holding the fewest ids, so they spread.
    counts (V,) occurrences of each id in the training split -> table (V,) int64."""
    import heapq

    counts = counts.to(torch.float64).cpu().tolist()
    seen = sorted((i for i, c in enumerate(counts) if c > 0), key=lambda i: (-counts[i], i))
    heap = [(0.0, e) for e in range(num_experts)]  # (total frequency, expert)
    table = torch.empty(len(counts), dtype=torch.long)
    held = [0] * num_experts
    for i in seen:
        load, e = heapq.heappop(heap)
        table[i], held[e] = e, held[e] + 1
        heapq.heappush(heap, (load + counts[i], e))
    for i in (i for i, c in enumerate(counts) if c <= 0):
        e = min(range(num_experts), key=lambda x: (held[x], x))
        table[i], held[e] = e, held[e] + 1
    return table


def hash_gating(token_ids: Tensor, table: Tensor) -> tuple[Tensor, Tensor]:
    """Hash layer (Roller et al. 2021): the expert is table[token id], fixed, no router.

    The paper's layer output is the chosen expert's FFN output itself: gate 1.
    token_ids (T,) -> expert_index (T, 1), gates (T, 1) float32 ones."""
    expert_index = table[token_ids].unsqueeze(-1)
    return expert_index, torch.ones(expert_index.shape, dtype=torch.float32, device=expert_index.device)


def expert_choice_gating(probs: Tensor, k: int, capacity_factor: float, group_size: Optional[int] = None):
    """Expert choice (Zhou et al. 2022): in each routing group of S tokens every expert
    takes the c tokens with the highest router probability, c = ceil(k * S / E * capacity_factor)
    (Switch eq. 3; the paper's capacity factor is k * capacity_factor: the mean number of experts
    per token), at most S. The gate of (token, expert) is the token's softmax probability of that
    expert; a token gets 0..E experts. A partial last group keeps c (its experts take at most all
    of its tokens).

    probs (T, E) -> Routing fields: expert_index (T, E) each token's experts by descending
    probability, gates (T, E) (0 where the expert did not take the token), keep (T, E),
    position (T, E) the token's rank among its expert's c tokens, capacity c, group size S.
    Not causal: whether expert e takes token t depends on every other token of the group."""
    T, E = probs.shape
    S = T if group_size is None or group_size >= T else max(group_size, 1)
    c = min(expert_capacity(S, E, k, capacity_factor), S)
    pad = -T % S
    scores = probs.detach()
    if pad:  # padding rows score -inf: never taken while real tokens are left
        scores = torch.cat([scores, scores.new_full((pad, E), -math.inf)])
    G = (T + pad) // S
    top = scores.view(G, S, E).transpose(1, 2).topk(c, dim=-1).indices  # (G, E, c) rows within the group
    rows = (top + torch.arange(G, device=probs.device).view(G, 1, 1) * S).reshape(-1)  # (G*E*c,)
    experts = torch.arange(E, device=probs.device).view(1, E, 1).expand(G, E, c).reshape(-1)
    ranks = torch.arange(c, device=probs.device).expand(G, E, c).reshape(-1)
    taken = torch.zeros(T + pad, E, dtype=torch.bool, device=probs.device)
    taken[rows, experts] = True
    rank = torch.full((T + pad, E), c, dtype=torch.long, device=probs.device)
    rank[rows, experts] = ranks
    order = scores[:T].argsort(dim=-1, descending=True, stable=True)  # (T, E) token's preference order
    keep = taken[:T].gather(1, order)
    position = rank[:T].gather(1, order)
    gates = probs.gather(1, order) * keep
    return order, gates, keep, position, c, S


def expert_choice_margin(probs: Tensor, capacity: int, group_size: int) -> Optional[Tensor]:
    """Expert choice's selection margin: per expert and group, the gap between the probability of
    the c-th token it took and the (c+1)-th it did not; mean over experts and full groups.
    None when every group's tokens all fit (c >= S)."""
    T, E = probs.shape
    G = T // group_size  # full groups only: a partial group has no (c+1)-th token to compare
    if capacity >= group_size or G == 0:
        return None
    scores = probs.detach()[: G * group_size].view(G, group_size, E).transpose(1, 2)
    top = scores.topk(capacity + 1, dim=-1).values  # (G, E, c+1)
    return (top[..., capacity - 1] - top[..., capacity]).mean()


# ---------------------------------------------------------------------------------------------
# aux-loss-free balancing


def balance_bias_update(bias: Tensor, load: Tensor, rate: float) -> Tensor:
    """Wang et al. 2024, Algorithm 1: b_i <- b_i + u * sign(mean_j load_j - load_i), with load_i
    the tokens assigned to expert i in the training step. Overloaded experts go down by u,
    underloaded ones up by u, exactly balanced ones stay."""
    load = load.to(bias.dtype)
    return bias + rate * torch.sign(load.mean() - load)


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


NUM_POSITION_BUCKETS = 4  # routing-health: fraction dropped per quarter of the sequence

class Router(nn.Module):
    """Router weights for one MoE layer and the routing decision.

    Routers (``cfg.router``; in causal stacks ``cfg.causal_router`` when set): ``switch`` / ``topk``
    / ``noisy_topk`` (token choice), ``hash`` (no weights: a fixed token-id table, needs
    ``vocab_size`` and the token ids), ``expert_choice`` (refused in causal stacks unless
    ``allow_noncausal_routing``). ``balance='bias'`` adds the selection-only bias buffer
    ``balance_bias`` (saved in checkpoints, not a parameter) and counts the training loads that
    ``update_balance_bias`` turns into its next value."""

    def __init__(self, d_model: int, cfg: MoEConfig, causal: bool = False, vocab_size: Optional[int] = None):
        super().__init__()
        self.cfg = cfg
        self.causal = causal  # capacity slots token by token (see slot_positions)
        self.kind = cfg.router_for(causal)
        if self.kind == "expert_choice" and causal and not cfg.allow_noncausal_routing:
            raise ValueError(NONCAUSAL_ROUTING)
        E = cfg.num_experts
        if self.kind == "hash":
            if vocab_size is None:
                raise ValueError("router='hash' maps token ids to experts: the MoE layer needs the vocabulary size")
            self.weight = None
            # Drawn like the weights (the run's seed), one table per layer; a buffer, so checkpoints keep it.
            self.register_buffer("hash_table", hash_table(vocab_size, E))
        else:
            self.weight = nn.Parameter(torch.empty(E, d_model))
        # Shazeer 2017 initialises W_g and W_noise to zero (uniform routing with noise at start).
        self.noise_weight = nn.Parameter(torch.zeros(E, d_model)) if self.kind == "noisy_topk" else None
        if cfg.balance == "bias":
            self.register_buffer("balance_bias", torch.zeros(E))
            self.register_buffer("load_since_update", torch.zeros(E), persistent=False)
        else:
            self.register_buffer("balance_bias", None)
        self.reset_parameters()

    def reset_parameters(self, init_scale: float = 0.1) -> None:
        if self.weight is None:
            return
        if self.kind == "noisy_topk":
            nn.init.zeros_(self.weight)
        else:
            std = math.sqrt(init_scale / self.weight.shape[1])
            nn.init.trunc_normal_(self.weight, std=std, a=-2 * std, b=2 * std)

    @torch.no_grad()
    def update_balance_bias(self) -> bool:
        """One aux-loss-free step (``balance_bias_update``) from the loads counted since the last
        one, then reset the count. Call once per optimizer step; False (no change) without a bias
        or without routed tokens. Under torch.distributed the loads of all processes are summed,
        so every replica takes the same step."""
        if self.balance_bias is None:
            return False
        load = self.load_since_update
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load)
        if load.sum() == 0:
            return False
        self.balance_bias.copy_(balance_bias_update(self.balance_bias, load, self.cfg.bias_update_rate))
        load.zero_()
        return True

    def forward(self, x: Tensor, token_ids: Optional[Tensor] = None,
                position_bucket: Optional[Tensor] = None) -> Routing:
        """x: (T, d) routed tokens; token_ids (T,) their ids (hash routing); position_bucket (T,)
        their quarter of the sequence, for the dropped-by-position metric only."""
        cfg = self.cfg
        factor = cfg.capacity_factor if self.training else cfg.eval_capacity_factor
        if self.kind == "hash":
            if token_ids is None:
                raise ValueError("router='hash' routes by token id: call the MoE layer with token_ids")
            expert_index, gates = hash_gating(token_ids, self.hash_table)
            position, keep, capacity, group_size = assign_capacity(
                expert_index, gates, cfg.num_experts, factor, cfg.group_size, cfg.drop_policy, self.causal)
            metrics = routing_metrics(None, expert_index, keep, cfg.num_experts, position_bucket=position_bucket)
            return Routing(expert_index, gates * keep, position, keep, capacity, group_size, {}, metrics)
        # Selective precision (Switch §2.4): the router runs in float32 even inside bf16
        # autocast, because the softmax/exponent of bf16 logits is too coarse and unstable.
        with torch.autocast(device_type=x.device.type, enabled=False):
            x32 = x.float()
            if self.training and cfg.jitter_eps > 0:
                x32 = x32 * torch.empty_like(x32).uniform_(1 - cfg.jitter_eps, 1 + cfg.jitter_eps)
            logits = F.linear(x32, self.weight.float())  # (T, E)
            losses = {"z_loss": router_z_loss(logits)}
            if self.kind == "expert_choice":  # balanced by construction: no balancing loss
                probs = logits.softmax(dim=-1)
                expert_index, gates, keep, position, capacity, group_size = expert_choice_gating(
                    probs, cfg.top_k, factor, cfg.group_size)
                metrics = routing_metrics(probs, expert_index, keep, cfg.num_experts, chosen=keep,
                                          dropped=~keep.any(dim=1, keepdim=True),
                                          margin=expert_choice_margin(probs, capacity, group_size),
                                          position_bucket=position_bucket)
                return Routing(expert_index, gates, position, keep, capacity, group_size, losses, metrics)
            bias = self.balance_bias
            if self.kind == "noisy_topk":
                noisy = logits
                if self.training:
                    # The 1e-2 floor keeps the load estimator's division finite (as in Shazeer's code).
                    noise_std = F.softplus(F.linear(x32, self.noise_weight.float())) + 1e-2
                    noisy = logits + torch.randn_like(logits) * noise_std
                expert_index, gates, probs = noisy_topk_gating(noisy, cfg.top_k, bias)
                selection_probs = noisy.detach().softmax(dim=-1)  # what the margin is measured on
                if self.training and cfg.top_k < cfg.num_experts:
                    load = smooth_load(logits, noisy, noise_std, cfg.top_k)
                else:  # no noise: the load is the (non-differentiable) assignment count
                    load = counts_below(expert_index, cfg.num_experts).float()
            else:
                expert_index, gates, probs = softmax_topk_gating(logits, cfg.top_k, cfg.renormalize, bias)
                selection_probs = probs.detach()
                load = counts_below(expert_index, cfg.num_experts).float()
            losses["load_balance"] = load_balancing_loss(probs, expert_index)
            losses["importance"] = cv_squared(probs.sum(dim=0))
            losses["load"] = cv_squared(load)
        if bias is not None and self.training:  # the loads of this step, for update_balance_bias
            self.load_since_update += counts_below(expert_index, cfg.num_experts)
        position, keep, capacity, group_size = assign_capacity(
            expert_index, gates, cfg.num_experts, factor, cfg.group_size, cfg.drop_policy, self.causal)
        gates = gates * keep
        metrics = routing_metrics(probs, expert_index, keep, cfg.num_experts,
                                  margin=topk_margin(selection_probs, cfg.top_k), position_bucket=position_bucket)
        return Routing(expert_index, gates, position, keep, capacity, group_size, losses, metrics)


# ---------------------------------------------------------------------------------------------
# routing health: detached statistics


def topk_margin(probs: Tensor, k: int) -> Optional[Tensor]:
    """Mean over tokens of p_(k) - p_(k+1), the gap between the k-th and (k+1)-th largest router
    probability: how far each token's last chosen expert is from being swapped for the next one.
    None when k = E (nothing is left out) or there are no tokens."""
    if k >= probs.shape[-1] or probs.shape[0] == 0:
        return None
    top = probs.detach().topk(k + 1, dim=-1).values
    return (top[:, k - 1] - top[:, k]).mean()


def routing_metrics(probs: Optional[Tensor], expert_index: Tensor, keep: Tensor, num_experts: int,
                    chosen: Optional[Tensor] = None, dropped: Optional[Tensor] = None,
                    margin: Optional[Tensor] = None, position_bucket: Optional[Tensor] = None) -> dict[str, Tensor]:
    """Detached statistics worth logging (fairseq gate metadata), the same keys for every router.

    expert_index, keep: (T, k). ``chosen`` (T, k): which entries are assignments (default all;
    expert choice: those an expert took). ``dropped`` (T, j): what counts as dropped (default
    ~keep, the assignments over capacity; expert choice: tokens no expert took). ``probs`` (T, E)
    None for hash routing (no router: no entropy). ``position_bucket`` (T,) in
    [0, NUM_POSITION_BUCKETS): the dropped fraction per bucket.

    Load_i = assignments routed to expert i (before capacity). MaxVio (Wang et al. 2024) =
    (max_i Load_i - mean Load) / mean Load; dead experts: no token kept in this forward pass."""
    with torch.no_grad():
        assigned_index = expert_index if chosen is None else expert_index[chosen]
        assigned = counts_below(assigned_index, num_experts)
        # weights instead of expert_index[keep]: a boolean selection would read its size back to the host
        kept = counts_below(expert_index, num_experts, keep.long())
        drop = ~keep if dropped is None else dropped
        load = assigned.float()
        mean_load = load.mean()
        out = {
            "tokens_per_expert": assigned,
            "kept_per_expert": kept,
            "fraction_dropped": 1.0 - keep.float().mean() if dropped is None else dropped.float().mean(),
            "unused_experts": (assigned == 0).sum(),
            "dead_experts": (kept == 0).sum(),
            "max_load": load.max(),
            "mean_load": mean_load,
            "max_violation": (load.max() - mean_load) / mean_load.clamp_min(1e-9),
        }
        if probs is not None:
            p = probs.clamp_min(1e-9)
            out["router_entropy"] = -(probs * p.log()).sum(-1).mean()
        if margin is not None:
            out["topk_margin"] = margin
        if position_bucket is not None:
            per_token = drop.float().sum(-1)  # (T,) dropped entries of each token
            width = drop.shape[-1] if drop.dim() > 1 else 1
            counts = counts_below(position_bucket, NUM_POSITION_BUCKETS).float() * width
            dropped_count = counts_below(position_bucket, NUM_POSITION_BUCKETS, per_token)
            out["dropped_by_position"] = dropped_count / counts.clamp_min(1)
            out["assignments_by_position"] = counts  # the denominators, to pool several batches
        return out
