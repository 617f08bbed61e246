"""Model configuration: one dataclass for every family, named size presets, validation.

Presets give the *dense* shapes (transformer families) and the *moe-rnn* shapes (RNN families);
``switch``/``moe`` and ``lstm`` configs are derived from them with the FLOP-matching helpers
below so that a preset name always means "compute-matched to the same dense model".
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from bench.config import ConfigError, apply_overrides, check, from_dict, override_pairs, resolve_key

FAMILIES = ("dense", "switch", "moe", "moe-rnn", "lstm")
TRANSFORMER_FAMILIES = ("dense", "switch", "moe")
RNN_FAMILIES = ("moe-rnn", "lstm")
SPARSE_FAMILIES = ("switch", "moe", "moe-rnn")


@dataclass
class MoEConfig:
    # --- experts -------------------------------------------------------------------------
    num_experts: int = 8
    top_k: int = 1
    d_expert: Optional[int] = None  # hidden width of each expert; None = the model's d_ff
    moe_every: int = 2  # transformer: every moe_every-th FFN is MoE (Switch paper: every other)
    expert_dropout: float = 0.0  # dropout inside each expert, separate from model dropout
    # --- shared and fine-grained experts (DeepSeekMoE, Dai et al. 2024; Krajewski et al. 2024) ---
    # Applied once, by model_config (``split_experts``): a resolved config's num_experts, top_k and
    # d_expert are already the fine-grained ones; granularity stays as the user set it, a record.
    granularity: int = 1  # G: each expert split into G of width d_expert/G; E x G experts, top-(k x G)
    shared_experts: int = 0  # S: always-on experts of width d_expert, every token, added to the routed output
    # --- router --------------------------------------------------------------------------
    router: Literal["switch", "topk", "noisy_topk", "hash", "expert_choice"] = "switch"
    renormalize: bool = False  # topk: renormalise the k chosen gates to sum to 1 (GShard)
    jitter_eps: float = 0.0  # switch: multiplicative input jitter U[1-eps, 1+eps]; paper 1e-2
    # --- capacity (Switch eq. 3) ----------------------------------------------------------
    capacity_factor: Optional[float] = 1.25  # training; None = dropless
    eval_capacity_factor: Optional[float] = 2.0  # evaluation; None = dropless
    group_size: Optional[int] = None  # tokens per routing group; None = the whole micro-batch
    drop_policy: Literal["position", "probability"] = "position"
    dispatch: Literal["auto", "sorted", "padded", "grouped_mm"] = "auto"  # expert compute kernel (see moe.py)
    # --- auxiliary loss weights -----------------------------------------------------------
    load_balance_weight: float = 1e-2  # Switch eq. 4 alpha
    z_loss_weight: float = 1e-3  # ST-MoE router z-loss; 0 switches it off
    importance_weight: float = 0.0  # Shazeer 2017 eq. 6 w_importance
    load_weight: float = 0.0  # Shazeer 2017 eq. 11 w_load
    # --- hash and expert-choice routers, aux-loss-free balancing (bench/models/routing.py) ----
    # router=hash: Roller et al. 2021; router=expert_choice: Zhou et al. 2022 (not causal).
    causal_router: Optional[Literal["switch", "topk", "noisy_topk", "hash"]] = None  # causal stacks (LM, decoder, LSTMs); None = router
    hash_assignment: Literal["random", "frequency"] = "random"  # hash: ids dealt at random, or balanced by training-split frequency
    allow_noncausal_routing: bool = False  # accept expert choice in a causal stack, which leaks the future
    balance: Literal["aux_loss", "bias"] = "aux_loss"  # bias: Wang et al. 2024 selection-only bias, no balancing loss
    bias_update_rate: float = 1e-3  # u in b_i += u * sign(mean load - load_i), after each optimizer step

    def router_for(self, causal: bool) -> str:
        """The router of an MoE layer in a causal stack (``causal``) or in an encoder."""
        return self.causal_router if causal and self.causal_router else self.router

    def router_problems(self) -> list[str]:
        p = []
        if self.causal_router == "switch" and self.top_k != 1:
            p.append(f"top_k={self.top_k} is not allowed with causal_router='switch': switch routing is top-1")
        if "hash" in (self.router, self.causal_router):
            if self.top_k != 1:
                p.append(f"top_k={self.top_k} is not allowed with router='hash': a hash layer sends each token to the "
                         "one expert its id maps to (Roller et al. 2021); use top_k=1 (the switch family)")
            if self.balance == "bias":
                p.append("balance='bias' is not allowed with router='hash': the hash table is fixed, there are no "
                         "router scores for a bias to steer")
        if self.hash_assignment != "random" and "hash" not in (self.router, self.causal_router):
            p.append(f"hash_assignment={self.hash_assignment!r} is not allowed without router='hash' (or "
                     "causal_router='hash'): it chooses how the hash table deals token ids to experts")
        if self.router == "expert_choice":
            if self.capacity_factor is None or self.eval_capacity_factor is None:
                p.append("router='expert_choice' needs capacity_factor and eval_capacity_factor (no dropless mode): "
                         "each expert takes ceil(top_k x tokens / num_experts x capacity_factor) tokens")
            if self.balance == "bias":
                p.append("balance='bias' is not allowed with router='expert_choice': every expert takes the same "
                         "number of tokens by construction, there is no load to balance")
        if self.bias_update_rate <= 0:
            p.append(f"bias_update_rate={self.bias_update_rate} is not allowed: must be > 0")
        return p

    def problems(self) -> list[str]:
        p = []
        if self.num_experts < 1:
            p.append(f"num_experts={self.num_experts} is not allowed: must be >= 1")
        if self.top_k < 1 or self.top_k > max(self.num_experts, 1):
            p.append(f"top_k={self.top_k} is not allowed: must be in [1, num_experts={self.num_experts}]")
        if self.router == "switch" and self.top_k != 1:
            p.append(f"top_k={self.top_k} is not allowed with router='switch': switch routing is top-1 (use router='topk')")
        if self.moe_every < 1:
            p.append(f"moe_every={self.moe_every} is not allowed: must be >= 1")
        for name in ("capacity_factor", "eval_capacity_factor"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                p.append(f"{name}={v} is not allowed: must be > 0, or null for dropless routing")
        if self.d_expert is not None and self.d_expert < 1:
            p.append(f"d_expert={self.d_expert} is not allowed: must be >= 1 or null (= d_ff)")
        if self.granularity < 1:
            p.append(f"granularity={self.granularity} is not allowed: must be >= 1 (1 = experts as configured)")
        if self.shared_experts < 0:
            p.append(f"shared_experts={self.shared_experts} is not allowed: must be >= 0")
        if self.group_size is not None and self.group_size < 1:
            p.append(f"group_size={self.group_size} is not allowed: must be >= 1 or null")
        if not 0 <= self.expert_dropout < 1:
            p.append(f"expert_dropout={self.expert_dropout} is not allowed: must be in [0, 1)")
        if not 0 <= self.jitter_eps < 1:
            p.append(f"jitter_eps={self.jitter_eps} is not allowed: must be in [0, 1)")
        for name in ("load_balance_weight", "z_loss_weight", "importance_weight", "load_weight"):
            if getattr(self, name) < 0:
                p.append(f"{name}={getattr(self, name)} is not allowed: must be >= 0")
        if self.drop_policy == "probability" and (self.capacity_factor, self.eval_capacity_factor) != (None, None):
            # Every family routes inside a causal stack (LM, translation decoder, LSTM): ranking a
            # group by gate would let later tokens decide which earlier tokens are dropped.
            p.append("drop_policy='probability' is not allowed with a capacity limit: it ranks a group's tokens by "
                     "gate, so later tokens would decide which earlier ones are dropped (a leak in causal models); "
                     "use drop_policy='position', or capacity_factor=null eval_capacity_factor=null (dropless)")
        p.extend(self.router_problems())
        return p


@dataclass
class ModelConfig:
    family: str = "dense"
    # --- shape -----------------------------------------------------------------------------
    d_model: int = 256  # transformer width / LSTM hidden and embedding size
    n_layers: int = 4  # transformer blocks (per stack for seq2seq) / LSTM layers (MoE after the first)
    n_heads: int = 4
    d_ff: int = 1024  # dense FFN width (experts default to it too, see moe.d_expert)
    activation: Literal["relu", "gelu"] = "relu"
    # --- set from the task -----------------------------------------------------------------
    vocab_size: int = 256
    max_seq_len: int = 256
    # --- regularisation and init -----------------------------------------------------------
    dropout: float = 0.1
    init_scale: float = 0.1  # truncated normal, sigma = sqrt(init_scale / fan_in) (Switch Table 3)
    tie_embeddings: bool = True
    moe: MoEConfig = field(default_factory=MoEConfig)

    @property
    def is_sparse(self) -> bool:
        return self.family in SPARSE_FAMILIES

    @property
    def expert_width(self) -> int:
        return self.moe.d_expert or self.d_ff

    @property
    def is_rnn(self) -> bool:
        return self.family in RNN_FAMILIES

    def is_moe_layer(self, index: int) -> bool:
        """Transformer block ``index`` (0-based) holds an MoE FFN: every moe_every-th one."""
        return self.family in ("switch", "moe") and (index + 1) % self.moe.moe_every == 0

    def problems(self) -> list[str]:
        p = []
        if self.family not in FAMILIES:
            p.append(f"family={self.family!r} is not allowed: expected one of {', '.join(FAMILIES)}")
        for name in ("d_model", "n_layers", "n_heads", "d_ff", "vocab_size", "max_seq_len"):
            if getattr(self, name) < 1:
                p.append(f"{name}={getattr(self, name)} is not allowed: must be >= 1")
        if self.n_heads >= 1 and self.d_model % self.n_heads:
            p.append(f"d_model={self.d_model} is not allowed with n_heads={self.n_heads}: d_model must be divisible by n_heads")
        if self.family in RNN_FAMILIES and self.n_layers < 2:
            p.append(f"n_layers={self.n_layers} is not allowed for {self.family}: the MoE/FFN sits between LSTM layers, so >= 2")
        if self.family in RNN_FAMILIES:  # hash/expert choice: transformer families only (not wired into the LSTMs)
            for key in ("router", "causal_router"):
                if getattr(self.moe, key) in ("hash", "expert_choice"):
                    p.append(f"{key}={getattr(self.moe, key)!r} is not allowed for {self.family}: hash and expert-choice "
                             "routing are built into the transformer families (switch, moe) only")
        if not 0 <= self.dropout < 1:
            p.append(f"dropout={self.dropout} is not allowed: must be in [0, 1)")
        if self.init_scale <= 0:
            p.append(f"init_scale={self.init_scale} is not allowed: must be > 0")
        return p


# Size presets. "transformer" is the dense model the transformer families are matched to;
# "rnn" is the moe-rnn model the lstm control is matched to.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # Trains in minutes on a 2-core CPU (3.3M params dense at vocab 65).
    # Dropout 0: on a CPU, dropout's RNG costs about as much as the matmuls (measured: a dense
    # tiny step runs 2x faster without it), and minutes-long budgets do not overfit.
    "tiny": {
        "transformer": dict(d_model=256, n_layers=4, n_heads=4, d_ff=1024, dropout=0.0),
        "rnn": dict(d_model=256, n_layers=2, d_ff=256, dropout=0.0),
        "moe": dict(num_experts=8),
        "rnn_moe": dict(num_experts=16, top_k=4),
    },
    # A few GPU-minutes; an hour-scale CPU run.
    "small": {
        "transformer": dict(d_model=512, n_layers=6, n_heads=8, d_ff=2048),
        "rnn": dict(d_model=512, n_layers=2, d_ff=512),
        "moe": dict(num_experts=16),
        "rnn_moe": dict(num_experts=32, top_k=4),
    },
    # Paper-scale shapes: T5-Base / Switch-Base (d=768, 12 layers, 128 experts) and the
    # Shazeer 2017 LM (512-unit LSTMs, experts 512 -> 1024 -> 512, k = 4).
    "base": {
        "transformer": dict(d_model=768, n_layers=12, n_heads=12, d_ff=3072),
        "rnn": dict(d_model=512, n_layers=2, d_ff=1024),
        "moe": dict(num_experts=128),
        "rnn_moe": dict(num_experts=256, top_k=4),
    },
}

# Router defaults per sparse family (the papers' settings).
FAMILY_MOE_DEFAULTS: dict[str, dict[str, Any]] = {
    "switch": dict(router="switch", top_k=1),
    "moe": dict(router="topk", top_k=2, renormalize=True),
    # Shazeer 2017: noisy top-4, no capacity limit, importance + load losses at 0.1 each.
    "moe-rnn": dict(
        router="noisy_topk", top_k=4, capacity_factor=None, eval_capacity_factor=None,
        load_balance_weight=0.0, z_loss_weight=0.0, importance_weight=0.1, load_weight=0.1,
    ),
}


def model_config(
    family: str,
    preset: str = "tiny",
    overrides: dict[str, Any] | list[str] | None = None,
    vocab_size: int | None = None,
    max_seq_len: int | None = None,
) -> ModelConfig:
    """The validated config of ``family`` at size ``preset``, with task sizes and overrides.

    Shape overrides are applied to the reference model (dense, or moe-rnn for lstm) *before*
    FLOP matching, so ``--set d_ff=2048`` on ``switch`` widens the experts too and the pair
    stays compute-matched; ``moe.*`` overrides apply after the family's router defaults. An
    explicit ``d_ff`` on ``lstm`` sets the control's dense width directly.
    """
    problems = []
    if family not in FAMILIES:
        problems.append(f"model={family!r} is not allowed: expected one of {', '.join(FAMILIES)}")
    if preset not in PRESETS:
        problems.append(f"preset={preset!r} is not allowed: expected one of {', '.join(PRESETS)}")
    pairs = _resolve_overrides(overrides or {}, problems)
    if family not in FAMILIES or preset not in PRESETS:  # nothing to build; report what we have
        raise ConfigError(problems, f"{family} config")
    context = f"{family} config"
    shapes = PRESETS[preset]
    task = {k: v for k, v in dict(vocab_size=vocab_size, max_seq_len=max_seq_len).items() if v is not None}
    late = {k: v for k, v in pairs.items() if k.startswith("moe.") or (family == "lstm" and k == "d_ff")}
    early = {k: v for k, v in pairs.items() if k not in late}
    def apply(cfg: ModelConfig, changes: dict[str, Any]) -> ModelConfig:
        # Collect problems from every stage, so all of them are reported together.
        try:
            return apply_overrides(cfg, changes, context) if changes else cfg
        except ConfigError as e:
            problems.extend(e.problems)
            return cfg

    if family in TRANSFORMER_FAMILIES:
        base = from_dict(ModelConfig, dict(family="dense", **shapes["transformer"]))
        base = apply(base, dict(early, **{k: v for k, v in task.items() if k not in early}))
        cfg = base
        if family != "dense":
            top_k = late.get("moe.top_k", FAMILY_MOE_DEFAULTS[family]["top_k"])
            top_k = top_k if isinstance(top_k, int) and top_k >= 1 else None  # bad values reported below
            cfg = match_sparse_to_dense(base, family, shapes["moe"]["num_experts"], top_k=top_k)
    else:
        moe = dict(FAMILY_MOE_DEFAULTS["moe-rnn"], **shapes["rnn_moe"])
        base = from_dict(ModelConfig, dict(family="moe-rnn", **shapes["rnn"], moe=moe))
        early.update({k: v for k, v in late.items() if k != "d_ff"})  # routing shapes the lstm match
        base = apply(base, dict(early, **{k: v for k, v in task.items() if k not in early}))
        base = split_experts(base, matched=False, problems=problems)  # before the lstm match: it counts them
        late = {k: v for k, v in late.items() if k == "d_ff"}  # moe.* are in: applied again, they would undo the split
        cfg = match_lstm_to_moe_rnn(base) if family == "lstm" else base
    cfg = apply(cfg, late)
    if family in ("switch", "moe"):
        cfg = split_experts(cfg, matched="moe.d_expert" not in late, problems=problems,
                            router_given="moe.router" in late)
    cfg = routing_defaults(cfg, set(pairs), problems)
    problems.extend(check(cfg))  # the split shapes, e.g. an explicit router='switch' with top_k > 1
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)), context)
    return cfg


BALANCING_WEIGHTS = ("load_balance_weight", "importance_weight", "load_weight")

NONCAUSAL_ROUTING = (
    "router='expert_choice' is not causal: each expert takes the top tokens of the whole routing group, "
    "so whether a token gets an expert depends on later tokens of its sequence (a leak of the future in a "
    "causal LM or decoder). Use it where the whole input is visible, the translation encoder "
    "(router=expert_choice causal_router=switch routes the decoder by token choice), or accept the leak "
    "explicitly with allow_noncausal_routing=true (the run's config then records it)")


def routing_defaults(cfg: ModelConfig, given: set[str], problems: list[str]) -> ModelConfig:
    """Settings that follow from the router and balancing choice (model_config applies them once;
    ``given``: the keys the user set, e.g. ``moe.load_balance_weight``).

    - balance='bias' (Wang et al. 2024) trains without a balancing loss: the balancing-loss
      weights become 0 in the resolved config (so the record says what ran); a nonzero one set
      explicitly is refused. The z-loss is not a balancing loss and stays.
    - router='expert_choice': eval_capacity_factor defaults to capacity_factor, so evaluation gives
      each expert the share of tokens it was trained with."""
    m = cfg.moe
    changes: dict[str, Any] = {}
    if m.balance == "bias":
        for name in BALANCING_WEIGHTS:
            value = getattr(m, name)
            if f"moe.{name}" in given and isinstance(value, (int, float)) and value:
                problems.append(f"{name}={value} is not allowed with balance='bias': aux-loss-free balancing "
                                "trains without a balancing loss (Wang et al. 2024); drop it, or use balance=aux_loss")
            changes[name] = 0.0
    if m.router == "expert_choice" and "moe.eval_capacity_factor" not in given:
        changes["eval_capacity_factor"] = m.capacity_factor
    return dataclasses.replace(cfg, moe=dataclasses.replace(m, **changes)) if changes else cfg


def task_problems(cfg: ModelConfig, task_type: str) -> list[str]:
    """Problems of a model config on a task type: expert choice in a causal stack (every layer of
    an LM, the decoder of a translation model) leaks the future unless explicitly accepted."""
    m = cfg.moe
    if cfg.is_sparse and m.router_for(causal=True) == "expert_choice" and not m.allow_noncausal_routing:
        where = "a causal LM" if task_type == "lm" else "the translation decoder"
        return [f"{NONCAUSAL_ROUTING} (here: {where})"]
    return []


# FLOP matching (Switch paper: a sparse model is matched to a dense one by equal forward FLOPs;
# bench.flops counts what these shapes cost, the tests check the match).
def match_sparse_to_dense(dense: ModelConfig, family: str, num_experts: int, top_k: int | None = None) -> ModelConfig:
    """The ``switch`` or ``moe`` config FLOP-matched to ``dense``: same d_model and depth.

    switch: top-1, each expert as wide as the dense FFN. moe: top-2 (or ``top_k``), experts of
    1/k the dense width, so the k experts a token visits cost one dense FFN. Only the router is extra
    (2 * d_model * E FLOPs per MoE layer, well under 1% at these shapes).
    """
    if family not in ("switch", "moe"):
        raise ValueError(f"family={family!r}: expected 'switch' or 'moe'")
    moe = dataclasses.replace(dense.moe, **FAMILY_MOE_DEFAULTS[family], num_experts=num_experts)
    if top_k is not None:
        moe.top_k = top_k
    moe.d_expert = max(1, dense.d_ff // moe.top_k)
    return dataclasses.replace(dense, family=family, moe=moe)


def split_experts(cfg: ModelConfig, matched: bool, problems: list[str], router_given: bool = False) -> ModelConfig:
    """Fine-grained and shared experts: the one step that applies ``moe.granularity`` and sizes
    ``moe.shared_experts`` (model_config calls it once; a resolved config is never split again).

    Granularity G (Krajewski et al. 2024; DeepSeekMoE's fine-grained expert segmentation): E experts
    of width W with top-k become E*G experts of width W/G with top-(k*G): the same expert FLOPs per
    token; the router grows to E*G x d_model. W/G must be a whole number. S shared experts
    (DeepSeekMoE's shared expert isolation) have the resolved width too. ``matched`` (switch/moe
    experts sized from the dense d_ff, no explicit d_expert): the k*G routed and S shared experts a
    token visits share the dense FFN's width, d_expert = d_ff / (k*G + S) exactly, so the model stays
    FLOP-matched to dense (only the router is extra); with G = 1 and S = 0 nothing changes. A
    default switch router becomes ``topk`` when k*G > 1 (the same softmax gates, not renormalised).
    """
    m = cfg.moe
    G, S = m.granularity, m.shared_experts
    if not cfg.is_sparse or G < 1 or S < 0 or (G == 1 and S == 0):  # bad values are reported by check
        return cfg
    top_k = m.top_k * G
    if matched:
        visited = top_k + S
        if cfg.d_ff % visited:
            problems.append(
                f"granularity={G}, shared_experts={S} with top_k={m.top_k} do not divide the dense FFN: a token "
                f"visits top_k x granularity + shared_experts = {m.top_k} x {G} + {S} = {visited} experts, and "
                f"d_ff={cfg.d_ff} is not divisible by {visited}; choose values that divide it, or set d_expert "
                "(the width before the split; the model is then not FLOP-matched to dense)")
            return cfg
        width = cfg.d_ff // visited
    else:
        if cfg.expert_width % G:
            problems.append(f"granularity={G} does not divide the expert width d_expert={cfg.expert_width}: "
                            f"each expert is split into {G} experts of equal width; choose a divisor of "
                            f"{cfg.expert_width} or another d_expert")
            return cfg
        width = cfg.expert_width // G
    router = "topk" if m.router == "switch" and top_k > 1 and not router_given else m.router
    moe = dataclasses.replace(m, num_experts=m.num_experts * G, top_k=top_k, d_expert=width, router=router)
    return dataclasses.replace(cfg, moe=moe)


def match_lstm_to_moe_rnn(moe_rnn: ModelConfig) -> ModelConfig:
    """The ``lstm`` control for a ``moe-rnn``: a dense FFN of equal training-forward FLOPs.

    k routed and S shared experts of width f cost (k+S)*4Cf, the router 2CE (+2CE noise
    projection), so the dense width is (k+S)*f + E (noisy top-k) or (k+S)*f + E/2 (rounded up)."""
    m = moe_rnn.moe
    router_mats = 2 if m.router_for(causal=True) == "noisy_topk" else 1  # the LSTMs' MoE is a causal stack
    d_ff = (m.top_k + m.shared_experts) * moe_rnn.expert_width + math.ceil(router_mats * m.num_experts / 2)
    return dataclasses.replace(moe_rnn, family="lstm", d_ff=d_ff,
                               moe=dataclasses.replace(m, d_expert=moe_rnn.expert_width))


def _resolve_overrides(overrides: dict[str, Any] | list[str], problems: list[str]) -> dict[str, Any]:
    """``["num_experts=8"]`` or ``{"num_experts": 8}`` -> ``{"moe.num_experts": 8}``."""
    resolved = {}
    for key, value in override_pairs(overrides, problems):
        try:
            resolved[resolve_key(ModelConfig(), key)] = value
        except KeyError as e:
            problems.append(e.args[0])
    return resolved
