"""Sparse upcycling (Komatsuzaki et al. 2022): a switch/moe Transformer initialised from a trained dense one.

    problems = upcycle_problems(dense_cfg, cfg)   # shapes that do not match, each named
    upcycle(model, dense_state, dense_cfg)        # model: freshly built from cfg; copies in place

Every tensor outside the MoE layers is copied from the dense model (embeddings, attention, norms,
the FFNs that stay dense); every expert of an MoE layer is a copy of the dense FFN at that
position; the router keeps its fresh initialisation (paper, Sec. 3).

Fine-grained experts (granularity G, see ``config.split_experts``): experts are d_ff / G wide, so
the dense FFN's hidden units are cut into G slices of d_ff / G (FFN(x) = sum of the G slices'
outputs, the activation being elementwise) and expert j holds slice j mod G: every slice appears
E times. Shared experts hold slices too (shared expert s: slice s mod G); with G = 1 each is a
whole copy. Only without them and with G = 1 is the model the dense one at step 0 (top-k gates
renormalised to sum to 1, dropless: y = sum_j g_j FFN(x) = FFN(x); a top-1 switch gives p * FFN(x)).
A dense target (``model=dense``) gets every tensor: a continuation of the dense run with a fresh
optimizer, the baseline the upcycling plan compares with. Plain torch, no Lightning.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from bench.config import ConfigError
from bench.models.config import ModelConfig
from bench.models.moe import MoELayer

# Shapes an upcycled model must share with its dense source (every copied tensor depends on them).
SAME_SHAPE = ("d_model", "n_layers", "n_heads", "d_ff", "vocab_size", "max_seq_len", "activation", "tie_embeddings")


def upcycle_problems(dense: ModelConfig, cfg: ModelConfig) -> list[str]:
    """Why ``cfg`` cannot start from a trained ``dense`` model (empty: it can)."""
    p = []
    if dense.family != "dense":
        p.append(f"the source is a {dense.family} model: upcycling starts from a dense one")
    if cfg.family not in ("switch", "moe", "dense"):
        p.append(f"model={cfg.family!r}: upcycling initialises switch or moe Transformers (or dense: a continuation)")
    for name in SAME_SHAPE:
        a, b = getattr(dense, name), getattr(cfg, name)
        if a != b:
            p.append(f"{name} differs: the dense run has {name}={a}, this model {name}={b}; set {name}={a}")
    if cfg.family in ("switch", "moe"):
        G = cfg.moe.granularity
        if cfg.expert_width * G != dense.d_ff:
            fix = f"set d_expert={dense.d_ff}" + (f" (split into {G} slices of {dense.d_ff // G})" if G > 1 else "")
            width = cfg.expert_width
            p.append(f"expert width {width} x granularity {G} = {width * G} differs from the dense FFN's "
                     f"d_ff={dense.d_ff}: each expert copies (a 1/granularity slice of) the dense FFN; {fix}")
    return p


def upcycle(model: nn.Module, dense_state: dict[str, Tensor], dense: ModelConfig) -> None:
    """Load ``dense_state`` (a dense model's state_dict) into the sparse ``model`` as described above."""
    cfg: ModelConfig = model.cfg
    problems = upcycle_problems(dense, cfg)
    if problems:
        raise ConfigError(problems, "upcycling")
    target = model.state_dict()
    layers = {name: m for name, m in model.named_modules() if isinstance(m, MoELayer)}
    new: dict[str, Tensor] = {}
    for key, value in target.items():
        if any(key.startswith(name + ".") for name in layers):
            continue  # expert banks below; the router stays fresh
        src = dense_state.get(key)
        if src is None or src.shape != value.shape:  # a guard: the config checks above cover every known case
            problems.append(f"{key}: the dense model has {'no such tensor' if src is None else tuple(src.shape)}, "
                            f"this model {tuple(value.shape)}")
        else:
            new[key] = src
    G, f = cfg.moe.granularity, cfg.expert_width
    for name, layer in layers.items():
        w1, w2 = dense_state.get(f"{name}.w1.weight"), dense_state.get(f"{name}.w2.weight")
        if w1 is None or w2 is None:
            problems.append(f"{name}: the dense model has no FFN there to copy")
            continue
        w1, w2 = w1.t(), w2.t()  # (d_model, d_ff), (d_ff, d_model): the expert banks' layout
        slices = [(w1[:, g * f:(g + 1) * f], w2[g * f:(g + 1) * f]) for g in range(G)]
        E = layer.cfg.num_experts
        new[f"{name}.w1"] = torch.stack([slices[e % G][0] for e in range(E)])  # (E, d_model, f)
        new[f"{name}.w2"] = torch.stack([slices[e % G][1] for e in range(E)])  # (E, f, d_model)
        if layer.shared is not None:  # S experts side by side: one FFN of width S*f
            S = layer.cfg.shared_experts
            new[f"{name}.shared.w1.weight"] = torch.cat([slices[s % G][0] for s in range(S)], dim=1).t()  # (S*f, d)
            new[f"{name}.shared.w2.weight"] = torch.cat([slices[s % G][1] for s in range(S)], dim=0).t()  # (d, S*f)
    if problems:
        raise ConfigError(problems, "upcycling")
    model.load_state_dict({**target, **new})
