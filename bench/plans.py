"""Experiment plans: a comparison defined once, as data (``sweeps/NAME.yaml`` or any YAML path).

A plan names a task, its arms (each a set of ``--set`` style settings on a model family), one
tier per scale (model preset, training-FLOPs budget, seeds), and its claims: which arm is
compared with which, on what metric, in which direction, beside what the paper reports::

    # moe-bench reproduce my-plan.yaml --tier tiny
    name: my-plan
    title: Switch vs dense on my corpus
    task: tinyshakespeare-char
    baseline: dense
    settings: {eval_every: 50}            # every arm, every tier
    tiers:
      tiny: {preset: tiny, budget_flops: 4e12, seeds: 2}
    arms:
      - {label: dense, model: dense}
      - {label: switch, model: switch, settings: {capacity_factor: 1.25}}
    claims:
      - {text: Switch beats dense at equal FLOPs, kind: better, a: switch, b: dense,
         metric: val_loss, direction: lower}

Runs of a plan live in the group ``repro-NAME-TIER`` and are tagged with their arm, so
``bench.runner`` can skip finished ones and ``bench.report`` can judge the claims from the store.
This module only describes plans; it imports neither the trainer nor the report.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from bench.config import ConfigError, from_dict, yaml_number

PLANS_DIR = Path(__file__).resolve().parents[1] / "sweeps"
# The smallest effect that matters, per metric (a claim whose interval lies inside +-delta is
# "no-effect"). Loss in nats per token; BLEU points; ratios as fractions.
DEFAULT_DELTA = {"val_loss": 0.01, "loss_at_equal_time": 0.01, "val_bleu": 0.5, "test_bleu": 0.5,
                 "val_chrf": 0.5, "step_speedup": 0.05, "tokens_per_second": 0.05,  # relative: a / b - 1
                 "fraction_dropped": 0.01, "max_over_mean_load": 0.1, "max_violation": 0.05}


@dataclass
class Arm:
    label: str  # unique in the plan, e.g. "switch cf=1.25"
    model: str  # model family: dense, switch, moe, moe-rnn, lstm
    settings: dict[str, Any] = field(default_factory=dict)  # --set style, after the plan's and tier's
    # "flops": the tier's training-FLOPs budget (compute-matched). "baseline_tokens": as many
    # tokens as that budget buys the baseline arm, i.e. the same steps (a bigger model's role).
    # "equal_time": the tokens this arm trains in the baseline's training time, from the tokens/s
    # both measured together (``--throughput`` records in the store): a wall-clock-matched arm.
    budget: Literal["flops", "baseline_tokens", "equal_time"] = "flops"
    tier_settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # tier -> settings, applied last
    paper: str = ""  # what the paper reports for this arm (the report's "paper" column)
    # Sparse upcycling and dense continuation: start from the finished run of this (earlier) arm
    # with the same seed (`train --init-from`); the tier's FLOP budget then counts that run's too.
    init_from: Optional[str] = None
    budget_fraction: float = 1.0  # budget "flops": this share of the tier's budget (a first stage)

    def problems(self) -> list[str]:
        from bench.models.config import FAMILIES

        p = [] if self.model in FAMILIES else [
            f"model={self.model!r} is not allowed: expected one of {', '.join(FAMILIES)}"]
        if not 0 < self.budget_fraction <= 1:
            p.append(f"budget_fraction={self.budget_fraction} is not allowed: expected a share in (0, 1]")
        if self.budget_fraction != 1 and self.budget != "flops":
            p.append(f"budget_fraction applies to budget 'flops' only, not budget={self.budget!r}")
        return p


@dataclass
class Tier:
    budget_flops: Optional[float] = None  # training FLOPs per run (plans compare arms at equal compute)
    # Another budget kind instead, e.g. {steps: 500} (`moe-bench compare --budget-steps`); one of the two.
    budget: Optional[dict[str, float]] = None
    preset: str = "tiny"  # model size preset
    seeds: int = 2
    first_seed: int = 0  # seeds first_seed .. first_seed + seeds - 1 (distinct plans, distinct seeds)
    settings: dict[str, Any] = field(default_factory=dict)  # every arm at this tier
    arms: Optional[list[str]] = None  # the arms run at this tier (default: all)
    note: str = ""  # why this tier is sized as it is (shown by --list and in the report)
    # Seed counts at which this tier's claims were judged when an undecided look raised the count,
    # e.g. [5, 10]; the last is `seeds`. The report gives the false-verdict rate of that rule.
    looks: list[int] = field(default_factory=list)

    def problems(self) -> list[str]:
        p = []
        from bench.models.config import PRESETS

        if self.preset not in PRESETS:
            p.append(f"preset={self.preset!r} is not allowed: expected one of {', '.join(PRESETS)}")
        if (self.budget_flops is None) == (self.budget is None):
            p.append("give exactly one of budget_flops (training FLOPs per run) or budget (e.g. {steps: 500})")
        elif self.budget_flops is not None and self.budget_flops <= 0:
            p.append(f"budget_flops={self.budget_flops} is not allowed: must be > 0")
        elif self.budget is not None:
            from bench.tracking.records import BUDGET_KINDS

            kind, value = next(iter(self.budget.items())) if len(self.budget) == 1 else (None, None)
            if kind not in BUDGET_KINDS or not isinstance(value, (int, float)) or value <= 0:
                p.append(f"budget={self.budget!r} is not allowed: expected one of {', '.join(BUDGET_KINDS)} "
                         "with a value > 0, e.g. {steps: 500}")
        if self.seeds < 1:
            p.append(f"seeds={self.seeds} is not allowed: must be >= 1")
        if self.first_seed < 0:
            p.append(f"first_seed={self.first_seed} is not allowed: must be >= 0")
        if self.looks and (not all(isinstance(n, int) and n >= 2 for n in self.looks)
                           or any(a >= b for a, b in zip(self.looks, self.looks[1:])) or self.looks[-1] != self.seeds):
            p.append(f"looks={self.looks} is not allowed: increasing seed counts of at least 2 that end at "
                     f"seeds={self.seeds}, e.g. [5, 10]")
        return p

    def budget_spec(self) -> dict[str, Any]:
        """{"kind": ..., "value": ...} of this tier's per-run budget."""
        if self.budget_flops is not None:
            return {"kind": "flops", "value": float(self.budget_flops)}
        kind, value = next(iter(self.budget.items()))
        return {"kind": kind, "value": value}

    def seed_list(self, n: int | None = None) -> list[int]:
        return list(range(self.first_seed, self.first_seed + (n or self.seeds)))


@dataclass
class Claim:
    text: str
    kind: Literal["better", "not-worse", "trend"] = "better"
    metric: str = "val_loss"
    direction: Literal["lower", "higher"] = "lower"  # better: a's metric vs b's; trend: as x grows
    a: Optional[str] = None  # better / not-worse: the arm claimed better (or not worse) ...
    b: Optional[str] = None  # ... than this one
    x: dict[str, float] = field(default_factory=dict)  # trend: arm label -> x
    log_x: bool = False  # trend: slope per doubling of x (log2 x), e.g. expert counts
    delta: Optional[float] = None  # smallest effect that matters; default per metric (DEFAULT_DELTA)
    paper: str = ""  # what the paper reports
    headline: bool = False  # a headline claim: the reference tier must decide it

    def problems(self) -> list[str]:
        p = []
        if self.kind in ("better", "not-worse") and not (self.a and self.b):
            p.append(f"a claim of kind {self.kind!r} needs arms a and b ({self.text!r})")
        if self.kind == "trend" and len(self.x) < 3:
            p.append(f"a trend claim needs x for at least 3 arms ({self.text!r})")
        if self.delta is None and self.metric not in DEFAULT_DELTA:
            p.append(f"claim {self.text!r}: metric {self.metric!r} has no default delta; set delta")
        return p

    @property
    def effect_delta(self) -> float:
        return self.delta if self.delta is not None else DEFAULT_DELTA[self.metric]

    def arms(self) -> list[str]:
        return [self.a, self.b] if self.kind != "trend" else list(self.x)


@dataclass
class Plan:
    name: str
    title: str
    task: str
    baseline: str  # label of the arm the others are compared with
    tiers: dict[str, Tier]
    arms: list[Arm]
    claims: list[Claim] = field(default_factory=list)
    paper: str = ""  # the paper, e.g. "Fedus, Zoph & Shazeer 2021, Switch Transformers"
    settings: dict[str, Any] = field(default_factory=dict)  # every arm, every tier
    plots: list[Literal["experts", "capacity"]] = field(default_factory=list)  # extra report plots
    description: str = ""
    source: str = ""  # file it was read from (set by load_plan)

    def problems(self) -> list[str]:
        labels = [a.label for a in self.arms]
        p = [f"arm label {x!r} appears twice" for x in sorted({x for x in labels if labels.count(x) > 1})]
        known = set(labels)
        if self.baseline not in known:
            p.append(f"baseline={self.baseline!r} is not an arm; arms: {', '.join(labels)}")
        for name, tier in self.tiers.items():
            p += [f"tiers.{name}.arms: {a!r} is not an arm" for a in tier.arms or [] if a not in known]
            if tier.arms is not None and self.baseline not in tier.arms:
                p.append(f"tiers.{name}.arms must include the baseline {self.baseline!r}")
        for c in self.claims:
            p += [f"claim {c.text!r}: {a!r} is not an arm" for a in c.arms() if a and a not in known]
        for i, a in enumerate(self.arms):
            p += [f"arm {a.label!r}: tier_settings names unknown tier {t!r}" for t in a.tier_settings
                  if t not in self.tiers]
            if a.init_from is not None:
                earlier = {x.label: x for x in self.arms[:i]}
                if a.init_from not in earlier:
                    p.append(f"arm {a.label!r}: init_from={a.init_from!r} must name an arm listed before it "
                             f"(its runs start from that arm's finished run of the same seed)")
                elif earlier[a.init_from].budget_fraction >= 1 and a.budget == "flops" and a.budget_fraction >= 1:
                    p.append(f"arm {a.label!r}: its budget counts {a.init_from!r}'s FLOPs, which already spend "
                             f"the whole budget; give {a.init_from!r} a budget_fraction below 1")
                for name, tier in self.tiers.items():
                    if tier.arms is not None and a.label in tier.arms and a.init_from not in tier.arms:
                        p.append(f"tiers.{name}.arms has {a.label!r} but not {a.init_from!r}, which it starts from")
        if not self.tiers:
            p.append("tiers: a plan needs at least one tier")
        return p

    # --- derived -------------------------------------------------------------------------------
    def arm(self, label: str) -> Arm:
        return next(a for a in self.arms if a.label == label)

    def group(self, tier: str) -> str:
        return f"repro-{self.name}-{tier}"

    def tier(self, name: str) -> Tier:
        if name not in self.tiers:
            raise ConfigError([f"tier {name!r} is not in plan {self.name!r}; tiers: {', '.join(self.tiers)}"], "plan")
        return self.tiers[name]

    def tier_arms(self, tier: str) -> list[Arm]:
        chosen = self.tier(tier).arms
        return [a for a in self.arms if chosen is None or a.label in chosen]

    def arm_settings(self, arm: Arm, tier: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The --set style settings one arm trains with: plan, tier, arm, arm-at-tier, then the user's."""
        return {**self.settings, **self.tier(tier).settings, **arm.settings, **arm.tier_settings.get(tier, {}),
                **(extra or {})}

    def claim_arms(self) -> set[str]:
        return {a for c in self.claims for a in c.arms() if a}


def _numbers(obj: Any) -> Any:
    """YAML 1.1 reads 8e12 as a string: convert such values anywhere in a loaded plan."""
    if isinstance(obj, dict):
        return {k: _numbers(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_numbers(v) for v in obj]
    return yaml_number(obj)


def parse_plan(data: Any, source: str = "<plan>") -> Plan:
    """A validated Plan from loaded YAML; every problem is reported at once."""
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: a plan is a mapping with name, title, task, baseline, tiers, arms"], "plan")
    data = dict(_numbers(data), source=str(source))
    missing = [f"{source}: {key} is required" for key in ("name", "title", "task", "baseline", "tiers", "arms")
               if key not in data]
    if missing:
        raise ConfigError(missing, "plan")
    try:
        return from_dict(Plan, data)
    except ConfigError as e:
        raise ConfigError(e.problems, f"plan {source}") from None


def is_plan_file(path: Path) -> bool:
    """A YAML in sweeps/ with arms is a plan; one with a search space is an Optuna study."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and "arms" in data


def plan_names() -> list[str]:
    return sorted(p.stem for p in PLANS_DIR.glob("*.yaml") if is_plan_file(p))


def load_plan(name_or_path: str | Path) -> Plan:
    """A shipped plan by name (``sweeps/NAME.yaml``) or a user's plan file by path."""
    text = str(name_or_path)
    path = Path(text)
    if not (text.endswith((".yaml", ".yml")) or path.is_file()):
        path = PLANS_DIR / f"{text}.yaml"
        if not path.is_file() or not is_plan_file(path):
            raise ConfigError([f"plan {text!r} is not known; shipped plans: {', '.join(plan_names())} "
                               "(or give the path of your own plan file)"], "reproduce")
    if not path.is_file():
        raise ConfigError([f"plan file {text} does not exist"], "reproduce")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError([f"{path} is not valid YAML: {e}"], "plan") from None
    return parse_plan(data, str(path))


def is_shipped(plan: Plan) -> bool:
    return Path(plan.source).resolve() == (PLANS_DIR / f"{plan.name}.yaml").resolve()


def all_plans() -> dict[str, Plan]:
    return {name: load_plan(name) for name in plan_names()}


__all__ = ["Plan", "Arm", "Tier", "Claim", "PLANS_DIR", "DEFAULT_DELTA", "load_plan", "parse_plan", "plan_names",
           "all_plans", "is_plan_file", "is_shipped"]
