"""Study specs: what `moe-bench sweep SPEC.yaml` searches, and how.

A spec is a YAML file (see ``sweeps/``)::

    task: tinyshakespeare-char
    family: switch                 # or a list: the family becomes a searched parameter
    preset: tiny                   # or a list (a searched "size")
    fixed: {eval_every: 50}        # --set style overrides applied to every trial
    budget: {flops: 4e13}          # the same per-trial budget, so trials are compute-matched
    space:
      num_experts: [1, 2, 4, 8]    # a list is categorical
      capacity_factor: {type: float, low: 0.5, high: 2.0}
      lr: {type: float, low: 1e-4, high: 3e-3, log: true}
    sampler: grid                  # tpe | random | grid | nsga2 (or {name: tpe, ...})
    pruner: none                   # none | median | hyperband (or {name: median, ...})
    objectives: [quality]          # or e.g. [quality, active_params] (Pareto front)
    n_trials: 4                    # grid: defaults to the grid's size
    seed: 0

Every problem is reported at once, naming the field, the value and what is allowed: the shorthand
above is expanded (``_expand``), then the fields are checked by ``bench.config`` like every config.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import yaml

from bench.config import ConfigError, check, from_dict, override_pairs, yaml_number
from bench.metrics import last_eval_max_violation
from bench.tracking.records import BUDGET_KINDS, RunRecord

SWEEPS_DIR = Path(__file__).resolve().parents[2] / "sweeps"
SAMPLERS = ("tpe", "random", "grid", "nsga2")
PRUNERS = ("none", "median", "hyperband")
SPECIAL_PARAMS = ("family", "preset")  # searched like config fields, but choose the model/size


@dataclass(frozen=True)
class Objective:
    """One quantity a trial reports, read from its run record."""

    metric: str
    direction: str  # "maximize" | "minimize"


def _metric(key: str) -> Callable[[RunRecord], Any]:
    return lambda r: r.metrics.get(key)


# metric name -> (default direction, how to read it from a finished run record, validation-loss driven?)
OBJECTIVES: dict[str, tuple[str, Callable[[RunRecord], Any], bool]] = {
    "quality": ("maximize", _metric("quality"), True),
    "val_loss": ("minimize", _metric("val_loss"), True),
    "val_perplexity": ("minimize", _metric("val_perplexity"), True),
    "quality_per_active_param": ("maximize", _metric("quality_per_active_param"), True),
    "val_bleu": ("maximize", _metric("val_bleu"), False),
    "val_chrf": ("maximize", _metric("val_chrf"), False),
    "active_params": ("minimize", lambda r: r.params.get("active"), False),
    "total_params": ("minimize", lambda r: r.params.get("total"), False),
    "train_flops_per_token": ("minimize", lambda r: r.flops.get("train_per_token"), False),
    "wall_seconds": ("minimize", lambda r: r.timings.get("wall_seconds"), False),
    "train_seconds": ("minimize", lambda r: r.timings.get("train_seconds"), False),
    "tokens_per_second": ("maximize", lambda r: r.timings.get("tokens_per_second"), False),
    # routed families only: e.g. [val_loss, max_violation] is the quality-vs-balance front (Wang et al. 2024)
    "max_violation": ("minimize", lambda r: last_eval_max_violation(r.expert_stats), False),
}
UNROUTED_FAMILIES = ("dense", "lstm")  # no experts: no MaxVio


@dataclass(frozen=True)
class Param:
    """One searched parameter: categorical ``choices``, or an int/float range."""

    name: str
    kind: str  # "categorical" | "int" | "float"
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None

    def suggest(self, trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def edge_values(self) -> list[Any]:
        """Values worth validating before any training: every choice, or both ends of a range."""
        if self.kind == "categorical":
            return list(self.choices)
        cast = int if self.kind == "int" else float
        return [cast(self.low), cast(self.high)]


@dataclass
class SweepSpec:
    name: str
    task: str
    families: list[str]
    presets: list[str] = field(default_factory=lambda: ["tiny"])
    fixed: dict[str, Any] = field(default_factory=dict)
    space: list[Param] = field(default_factory=list)
    sampler: dict[str, Any] = field(default_factory=lambda: {"name": "tpe"})
    pruner: dict[str, Any] = field(default_factory=lambda: {"name": "none"})
    budget: dict[str, Any] = field(default_factory=dict)  # {"kind": ..., "value": ...}
    objectives: list[Objective] = field(default_factory=lambda: [Objective("quality", "maximize")])
    n_trials: int | None = None
    seed: int = 0
    description: str = ""
    source: str | None = None  # the YAML path it came from

    # -- derived -------------------------------------------------------------------------------
    @property
    def all_params(self) -> list[Param]:
        """The searched parameters, with family/preset lists added as categorical ones."""
        extra = []
        names = {p.name for p in self.space}
        if len(self.families) > 1 and "family" not in names:
            extra.append(Param("family", "categorical", tuple(self.families)))
        if len(self.presets) > 1 and "preset" not in names:
            extra.append(Param("preset", "categorical", tuple(self.presets)))
        return extra + list(self.space)

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def grid(self) -> dict[str, list[Any]]:
        return {p.name: list(p.choices) for p in self.all_params}

    def grid_size(self) -> int:
        return math.prod(len(p.choices) for p in self.all_params) if self.all_params else 1

    def target_trials(self) -> int:
        if self.n_trials is not None:
            return self.n_trials
        return self.grid_size() if self.sampler["name"] == "grid" else 20

    def pruning_monitor(self) -> str | None:
        """The logged validation metric the pruner watches (same direction as the objective)."""
        if self.pruner["name"] == "none":
            return None
        return "val/mean_token_prob" if self.objectives[0].direction == "maximize" else "val/loss"

    def fingerprint(self) -> dict[str, Any]:
        """What must not change between the runs of one study (n_trials may grow)."""
        return {
            "task": self.task, "families": self.families, "presets": self.presets, "fixed": self.fixed,
            "space": [vars(p) | {"choices": list(p.choices)} for p in self.all_params],
            "sampler": self.sampler, "pruner": self.pruner, "budget": self.budget,
            "objectives": [vars(o) for o in self.objectives], "seed": self.seed,
        }

    def trial_settings(self, params: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
        """(family, preset, overrides) of the trial with these sampled params."""
        params = dict(params)
        family = params.pop("family", self.families[0])
        preset = params.pop("preset", self.presets[0])
        return family, preset, {**self.fixed, **params}


# -- loading ------------------------------------------------------------------------------------
def shipped_studies() -> list[str]:
    """Names of the search-space studies in sweeps/ (the other YAMLs there are plans of arms)."""
    from bench.plans import is_plan_file

    return sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml") if not is_plan_file(p))


def find_spec(name_or_path: str) -> Path:
    """A YAML path, or the name of a shipped study (``switch-experts`` -> sweeps/switch-experts.yaml)."""
    from bench.plans import is_plan_file

    path = Path(name_or_path)
    if not path.is_file():
        path = SWEEPS_DIR / f"{name_or_path}.yaml"
    if path.is_file():
        if is_plan_file(path):
            raise ConfigError([f"{path} is a plan of fixed arms, not a search space: run it with "
                               f"`moe-bench reproduce {name_or_path}`"], "sweep spec")
        return path
    known = ", ".join(shipped_studies()) or "none"
    raise ConfigError([f"spec={name_or_path!r} is neither a YAML file nor a shipped study "
                       f"(shipped: {known})"], "sweep spec")


def load_spec(name_or_path: str, overrides: list[str] | None = None, budget: dict[str, Any] | None = None,
              n_trials: int | None = None) -> SweepSpec:
    """Read and validate a spec; ``--set`` overrides join its fixed settings (``preset=`` and
    ``family=`` replace those fields), ``--budget-*`` replaces its budget."""
    path = find_spec(name_or_path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError([f"{path} is not valid YAML: {e}"], "sweep spec") from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path} must hold a mapping of spec fields, got {type(data).__name__}"], "sweep spec")
    data.setdefault("name", path.stem)
    return parse_spec(data, overrides, budget, n_trials, source=str(path))


@dataclass
class ParamSpec:
    """One ``space:`` entry as written: a list (categorical) or a typed range."""

    type: Literal["categorical", "int", "float"] = "categorical"
    choices: Optional[list[Any]] = None
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    step: Optional[float] = None

    def problems(self) -> list[str]:
        if self.type == "categorical":
            if not self.choices:
                return [f"choices={self.choices!r} is not allowed: expected a non-empty list"]
            bad = [c for c in self.choices if c is not None and not isinstance(c, (str, int, float, bool))]
            return [f"choices: {bad[0]!r} is not allowed: values must be numbers, strings, booleans or null"] if bad else []
        p = []
        if self.low is None or self.high is None or self.low > self.high:
            p.append(f"low={self.low!r}, high={self.high!r} is not allowed: expected numbers with low <= high")
        elif self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            p.append(f"an int range needs integer bounds, got low={self.low:g}, high={self.high:g}")
        if self.log and self.low is not None and self.low <= 0:
            p.append(f"log=true needs low > 0, got {self.low:g}")
        if self.step is not None and self.step <= 0:
            p.append(f"step={self.step} is not allowed: expected a number > 0")
        elif self.step is not None and self.log:
            p.append("step and log=true cannot be combined (Optuna)")
        return p


@dataclass
class ObjectiveSpec:
    metric: str
    direction: Optional[Literal["maximize", "minimize"]] = None

    def problems(self) -> list[str]:
        if self.metric not in OBJECTIVES:
            return [f"metric={self.metric!r} is not allowed: expected one of {', '.join(OBJECTIVES)}"]
        return []


@dataclass
class SpecFields:
    """A study spec's fields after shorthand is expanded (see ``_expand``), checked by bench.config."""

    task: str
    family: list[str]
    name: str = "sweep"
    description: str = ""
    preset: list[str] = field(default_factory=lambda: ["tiny"])
    fixed: dict[str, Any] = field(default_factory=dict)
    space: dict[str, ParamSpec] = field(default_factory=dict)
    sampler: dict[str, Any] = field(default_factory=lambda: {"name": "tpe"})
    pruner: dict[str, Any] = field(default_factory=lambda: {"name": "none"})
    budget: Optional[dict[str, float]] = None
    objectives: list[ObjectiveSpec] = field(default_factory=lambda: [ObjectiveSpec("quality")])
    n_trials: Optional[int] = None
    seed: int = 0

    def problems(self) -> list[str]:
        from bench.models.config import FAMILIES, PRESETS

        p = [f"family: {f!r} is not allowed; expected one of {', '.join(FAMILIES)}" for f in self.family
             if f not in FAMILIES]
        p += [f"preset: {x!r} is not allowed; expected one of {', '.join(PRESETS)}" for x in self.preset
              if x not in PRESETS]
        if not self.family:
            p.append("family: give a model family or a list of them")
        for name, allowed in (("sampler", SAMPLERS), ("pruner", PRUNERS)):
            if getattr(self, name).get("name") not in allowed:
                p.append(f"{name}: {getattr(self, name).get('name')!r} is not allowed; expected one of "
                         f"{', '.join(allowed)}")
        if self.budget is not None:
            if len(self.budget) != 1:
                p.append(f"budget: {self.budget!r} gives {len(self.budget)} budgets; give exactly one of "
                         f"{', '.join(BUDGET_KINDS)}")
            else:
                ((kind, value),) = self.budget.items()
                if kind not in BUDGET_KINDS:
                    p.append(f"budget: kind {kind!r} is not allowed; expected one of {', '.join(BUDGET_KINDS)}")
                elif value <= 0:
                    p.append(f"budget.{kind}: {value!r} is not allowed; expected a number > 0")
        if self.n_trials is not None and self.n_trials < 1:
            p.append(f"n_trials: {self.n_trials} is not allowed; expected an integer >= 1")
        if not self.objectives:
            p.append("objectives: give at least one, e.g. [quality]")
        return p


def _expand(data: dict[str, Any]) -> dict[str, Any]:
    """The spec's shorthand as full fields: ``family: switch`` -> a list, ``sampler: tpe`` ->
    ``{name: tpe}``, a space list -> categorical choices, ``objectives: quality`` -> a list of
    ``{metric: ...}``, ``budget: {kind: K, value: V}`` -> ``{K: V}``; YAML's 1e-3-as-string -> numbers."""
    data = {k: v for k, v in data.items()}
    for key in ("family", "preset"):
        if isinstance(data.get(key), str):
            data[key] = [data[key]]
        if isinstance(data.get(key), list):
            data[key] = list(dict.fromkeys(data[key]))
    for key in ("sampler", "pruner"):
        if isinstance(data.get(key), str):
            data[key] = {"name": data[key]}
    if isinstance(data.get("space"), dict):
        space = {}
        for name, dist in data["space"].items():
            if isinstance(dist, list):
                dist = {"type": "categorical", "choices": dist}
            elif isinstance(dist, dict):
                dist = {"type": "categorical", **dist} if "type" not in dist and "choices" in dist else dict(dist)
                for bound in ("low", "high", "step"):
                    if bound in dist:
                        dist[bound] = yaml_number(dist[bound])
            if isinstance(dist, dict) and isinstance(dist.get("choices"), list):
                dist["choices"] = [yaml_number(c) for c in dist["choices"]]
            space[str(name)] = dist
        data["space"] = space
    objectives = data.get("objectives")
    if objectives is not None:
        items = objectives if isinstance(objectives, list) else [objectives]
        data["objectives"] = [{"metric": o} if isinstance(o, str) else o for o in items]
    budget = data.get("budget")
    if isinstance(budget, dict):
        if set(budget) == {"kind", "value"}:
            budget = {budget["kind"]: budget["value"]}
        data["budget"] = {k: yaml_number(v) for k, v in budget.items()}
    if isinstance(data.get("fixed"), dict):
        data["fixed"] = {k: yaml_number(v) for k, v in data["fixed"].items()}
    return data


def parse_spec(data: dict[str, Any], overrides: list[str] | None = None, budget: dict[str, Any] | None = None,
               n_trials: int | None = None, source: str | None = None) -> SweepSpec:
    """A validated SweepSpec; every problem (fields, names, consistency, the configs at the edges of
    the space) is reported at once, before any training."""
    problems: list[str] = []
    data = dict(data)
    data.setdefault("name", "sweep")
    fixed = data.get("fixed") if isinstance(data.get("fixed"), dict) else data.get("fixed") or {}
    if isinstance(fixed, dict):
        fixed = dict(fixed)
        for key, value in override_pairs(overrides or [], problems):
            if key in SPECIAL_PARAMS:
                data[key] = value
            else:
                fixed[key] = value
        data["fixed"] = fixed
    if budget is not None:
        data["budget"] = {budget["kind"]: budget["value"]}
    if n_trials is not None:
        data["n_trials"] = n_trials
    for key in ("task", "family"):
        if key not in data:
            problems.append(f"{key}: required")
    if problems:
        raise ConfigError(problems, f"sweep spec {source or data.get('name')}")
    fields = from_dict(SpecFields, _expand(data), problems=problems)
    problems.extend(check(fields))
    space = [Param(name, p.type, tuple(p.choices or ()), p.low, p.high, p.log, p.step)
             for name, p in fields.space.items() if isinstance(p, ParamSpec)]
    _check_space_keys(space, problems)
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)), f"sweep spec {source or data.get('name')}")
    ((kind, value),) = fields.budget.items() if fields.budget else ((None, None),)
    spec = SweepSpec(
        name=fields.name, description=fields.description, task=fields.task, families=fields.family,
        presets=fields.preset, fixed=fields.fixed, space=space, sampler=fields.sampler, pruner=fields.pruner,
        budget={} if kind is None else {"kind": kind, "value": int(value) if kind == "steps" else float(value)},
        objectives=[Objective(o.metric, o.direction or OBJECTIVES[o.metric][0]) for o in fields.objectives],
        n_trials=fields.n_trials, seed=fields.seed, source=source)
    _check_names(spec, problems)
    if problems:  # later checks assume the shapes above
        raise ConfigError(problems, f"sweep spec {source or spec.name}")
    _check_consistency(spec, problems)
    if problems:
        raise ConfigError(problems, f"sweep spec {source or spec.name}")
    return spec


def _check_names(spec: SweepSpec, problems: list[str]) -> None:
    for where, keys in (("space", [p.name for p in spec.space]), ("fixed", list(spec.fixed))):
        for key in keys:
            if key.split(".")[0] == "budget" or key in ("kind", "value"):
                problems.append(f"{where}.{key}: the budget is the same for every trial (that is what makes "
                                "them compute-matched); set it with budget: or --budget-*")


def _check_consistency(spec: SweepSpec, problems: list[str]) -> None:
    searched = {p.name for p in spec.space}
    for key in spec.fixed:
        if key in searched:
            problems.append(f"fixed.{key}: also in space; a searched field cannot be fixed (remove one)")
    if spec.sampler["name"] == "grid":
        for p in spec.all_params:
            if p.kind != "categorical":
                problems.append(f"space.{p.name}: the grid sampler needs a list of values, got a {p.kind} range")
    if spec.multi_objective and spec.pruner["name"] != "none":
        problems.append(f"pruner: {spec.pruner['name']!r} needs one objective; Optuna cannot prune "
                        f"multi-objective studies (use pruner: none)")
    if spec.pruner["name"] != "none" and not OBJECTIVES[spec.objectives[0].metric][2]:
        problems.append(f"pruner: pruning watches the validation loss during training, which does not "
                        f"predict objective {spec.objectives[0].metric!r}; use quality or val_loss, or pruner: none")
    unrouted = [f for f in spec.families if f in UNROUTED_FAMILIES]
    if unrouted and any(o.metric == "max_violation" for o in spec.objectives):
        problems.append(f"objectives: max_violation measures routed experts' load; family {', '.join(unrouted)} has "
                        "no experts (search switch, moe or moe-rnn)")
    if len({o.metric for o in spec.objectives}) < len(spec.objectives):
        problems.append("objectives: each metric may appear once")
    if not spec.budget:
        problems.append(f"budget: required, e.g. budget: {{flops: 4e13}} (one of {', '.join(BUDGET_KINDS)}) "
                        "— every trial gets the same budget, so trials are compute-matched")
    if problems:
        return
    # Build the configs of the edge values now: a bad value fails here, not after hours of trials.
    from bench.data.tasks import load_task
    from bench.train.run import resolve_configs

    try:
        task = load_task(spec.task)
    except ConfigError as e:
        problems.extend(f"task: {p}" for p in e.problems)
        return
    budget = {"kind": spec.budget["kind"], "value": spec.budget["value"]}
    base = {p.name: p.edge_values()[0] for p in spec.space}
    candidates = [base] + [{**base, p.name: v} for p in spec.space for v in p.edge_values()[1:]]
    for family, preset in itertools.product(spec.families, spec.presets):
        for params in candidates:
            try:
                resolve_configs(task, family, preset, {**spec.fixed, **params}, budget)
            except ConfigError as e:
                where = ", ".join(f"{k}={v}" for k, v in params.items())
                problems.extend(f"{family}/{preset}" + (f" with {where}" if where else "") + f": {p}"
                                for p in e.problems)
    problems[:] = list(dict.fromkeys(problems))


def _check_space_keys(params: list[Param], problems: list[str]) -> None:
    """Every searched name must be a config field (or family/preset), checked like --set keys."""
    from bench.train.config import split_overrides

    for p in params:
        if p.name in SPECIAL_PARAMS or (p.kind == "categorical" and not p.choices) or (
                p.kind != "categorical" and (p.low is None or p.high is None)):
            continue  # (its own problem is reported already)
        try:
            split_overrides({p.name: p.edge_values()[0]})
        except ConfigError as e:
            problems.extend(f"space.{p.name}: {msg}" for msg in e.problems)


__all__ = ["SweepSpec", "Param", "Objective", "OBJECTIVES", "SAMPLERS", "PRUNERS", "load_spec", "parse_spec",
           "find_spec", "SWEEPS_DIR", "shipped_studies"]
