"""Run configuration: what `moe-bench train` needs beyond the model config.

One ``--set key=value`` namespace covers both: keys of ``ModelConfig`` (``d_model``,
``moe.num_experts`` ...) go to the model; ``optim.*``, ``train.*`` and ``budget.*`` keys (or a
unique last part such as ``lr``) go to this config.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from bench.config import ConfigError, apply_overrides, override_pairs, resolve_key
from bench.models.config import ModelConfig
from bench.tracking.records import BUDGET_KINDS, BudgetKind  # one list for records and runs



@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.1  # AdamW, on matrices only (not norms, biases or embeddings)
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 100
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warmup, to min_lr_ratio
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # global norm; 0 disables

    def problems(self) -> list[str]:
        p = []
        if self.lr <= 0:
            p.append(f"lr={self.lr} is not allowed: must be > 0")
        if self.weight_decay < 0:
            p.append(f"weight_decay={self.weight_decay} is not allowed: must be >= 0")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                p.append(f"{name}={getattr(self, name)} is not allowed: must be in [0, 1)")
        if self.warmup_steps < 0:
            p.append(f"warmup_steps={self.warmup_steps} is not allowed: must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            p.append(f"min_lr_ratio={self.min_lr_ratio} is not allowed: must be in [0, 1]")
        if self.grad_clip < 0:
            p.append(f"grad_clip={self.grad_clip} is not allowed: must be >= 0 (0 = off)")
        return p


@dataclass
class TrainConfig:
    batch_size: int = 16
    precision: Literal["auto", "32", "bf16-mixed"] = "auto"  # auto: bf16-mixed where supported
    eval_every: int = 100  # optimizer steps between evaluations and checkpoints
    eval_batches: int = 10  # batches per intermediate evaluation (the final one uses all)
    # evaluation only: any size gives the same metrics; an upper bound, lowered for models whose
    # activations would not fit (bench.train.module.eval_batch_size)
    eval_batch_size: int = 64
    devices: int = 1  # processes per node (Lightning's devices)
    num_nodes: int = 1
    strategy: Literal["auto", "ddp", "ddp_spawn"] = "auto"
    # expert parallelism: each MoE layer's experts sharded over groups of this many processes
    # (bench/train/expert_parallel.py); 1 = every process holds every expert
    expert_parallel: int = 1
    num_workers: int = 0
    beam_size: int = 1  # translation: final BLEU decoding; 1 = greedy, >1 = beam search (slower)
    max_decode_len: int = 0  # translation: 0 = the task's tgt_len
    decode_batches: int = 0  # translation: limit batches decoded for BLEU (0 = whole split)
    curve_bleu_batches: int = 0  # translation: greedy val BLEU on this many batches at every evaluation (0 = off)

    def problems(self) -> list[str]:
        p = []
        for name in ("batch_size", "eval_every", "eval_batches", "eval_batch_size", "devices", "num_nodes",
                     "expert_parallel", "beam_size"):
            if getattr(self, name) < 1:
                p.append(f"{name}={getattr(self, name)} is not allowed: must be >= 1")
        for name in ("num_workers", "max_decode_len", "decode_batches", "curve_bleu_batches"):
            if getattr(self, name) < 0:
                p.append(f"{name}={getattr(self, name)} is not allowed: must be >= 0")
        if self.expert_parallel > 1:
            world = self.devices * self.num_nodes
            if self.strategy not in ("ddp", "ddp_spawn"):
                p.append(f"expert_parallel={self.expert_parallel} needs strategy=ddp or ddp_spawn (got "
                         f"strategy={self.strategy})")
            if world % self.expert_parallel:
                p.append(f"expert_parallel={self.expert_parallel} is not allowed: it must divide the "
                         f"{world} processes (devices={self.devices} x num_nodes={self.num_nodes})")
        return p


@dataclass
class BudgetConfig:
    kind: BudgetKind = "steps"
    value: float = 500

    def problems(self) -> list[str]:
        if self.value <= 0:
            return [f"value={self.value} is not allowed: the {self.kind} budget must be > 0"]
        return []


@dataclass
class RunConfig:
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)


@dataclass
class _AllKeys:  # only for resolving --set keys across both configs
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)


def split_overrides(overrides: list[str] | dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Route each override to the model config or the run config by its resolved dotted name."""
    problems: list[str] = []
    model, run = {}, {}
    for key, value in override_pairs(overrides, problems):
        try:
            full = resolve_key(_AllKeys(), key)
        except KeyError as e:
            problems.append(e.args[0])
            continue
        if full.startswith("model."):
            model[full[len("model."):]] = value
        else:
            run[full] = value
    if problems:
        raise ConfigError(problems, "overrides")
    return model, run


def run_config(overrides: dict[str, Any] | None = None) -> RunConfig:
    return apply_overrides(RunConfig(), overrides or {}, "run config")


__all__ = ["RunConfig", "OptimConfig", "TrainConfig", "BudgetConfig", "BUDGET_KINDS", "split_overrides",
           "run_config"]
