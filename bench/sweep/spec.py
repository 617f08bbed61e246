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

Every problem is reported at once, naming the field, the value and what is allowed.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from bench.config import ConfigError, override_pairs, yaml_number
from bench.tracking.records import BUDGET_KINDS, RunRecord

SWEEPS_DIR = Path(__file__).resolve().parents[2] / "sweeps"
SAMPLERS = ("tpe", "random", "grid", "nsga2")
PRUNERS = ("none", "median", "hyperband")
SPECIAL_PARAMS = ("family", "preset")  # searched like config fields, but choose the model/size
TOP_LEVEL = ("name", "description", "task", "family", "preset", "fixed", "space", "sampler", "pruner",
             "budget", "objectives", "n_trials", "seed")


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
}


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


def parse_spec(data: dict[str, Any], overrides: list[str] | None = None, budget: dict[str, Any] | None = None,
               n_trials: int | None = None, source: str | None = None) -> SweepSpec:
    problems: list[str] = []
    for key in data:
        if key not in TOP_LEVEL:
            problems.append(f"{key}: unknown field; allowed: {', '.join(TOP_LEVEL)}")
    data = dict(data)
    fixed = _mapping(data.get("fixed"), "fixed", problems)
    for key, value in override_pairs(overrides or [], problems):
        if key in SPECIAL_PARAMS:
            data[key] = value
        else:
            fixed[key] = value

    spec = SweepSpec(
        name=_string(data.get("name", "sweep"), "name", problems),
        description=str(data.get("description") or ""),
        task=_string(data.get("task"), "task", problems),
        families=_string_list(data.get("family"), "family", problems),
        presets=_string_list(data.get("preset", "tiny"), "preset", problems),
        fixed=fixed,
        space=_parse_space(data.get("space"), problems),
        sampler=_named(data.get("sampler", "tpe"), "sampler", SAMPLERS, problems),
        pruner=_named(data.get("pruner", "none"), "pruner", PRUNERS, problems),
        budget=_parse_budget(budget or data.get("budget"), problems, from_cli=budget is not None),
        objectives=_parse_objectives(data.get("objectives", ["quality"]), problems),
        n_trials=_optional_positive_int(n_trials if n_trials is not None else data.get("n_trials"), "n_trials",
                                        problems),
        seed=_int(data.get("seed", 0), "seed", problems),
        source=source,
    )
    _check_names(spec, problems)
    if problems:  # later checks assume the shapes above
        raise ConfigError(problems, f"sweep spec {source or spec.name}")
    _check_consistency(spec, problems)
    if problems:
        raise ConfigError(problems, f"sweep spec {source or spec.name}")
    return spec


def _check_names(spec: SweepSpec, problems: list[str]) -> None:
    from bench.models.config import FAMILIES, PRESETS

    for f in spec.families:
        if f not in FAMILIES:
            problems.append(f"family: {f!r} is not allowed; expected one of {', '.join(FAMILIES)}")
    for p in spec.presets:
        if p not in PRESETS:
            problems.append(f"preset: {p!r} is not allowed; expected one of {', '.join(PRESETS)}")
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


# -- field parsers (each appends problems instead of raising) -------------------------------------
def _string(value: Any, name: str, problems: list[str]) -> str:
    if not isinstance(value, str) or not value.strip():
        problems.append(f"{name}: {value!r} is not allowed; expected a non-empty string")
        return ""
    return value


def _string_list(value: Any, name: str, problems: list[str]) -> list[str]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str) and v for v in values):
        problems.append(f"{name}: {value!r} is not allowed; expected a name or a non-empty list of names")
        return []
    return list(dict.fromkeys(values))


def _mapping(value: Any, name: str, problems: list[str]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(f"{name}: {value!r} is not allowed; expected a mapping of config field to value")
        return {}
    return {k: yaml_number(v) for k, v in value.items()}


def _int(value: Any, name: str, problems: list[str]) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        problems.append(f"{name}: {value!r} is not allowed; expected an integer")
        return 0
    return value


def _optional_positive_int(value: Any, name: str, problems: list[str]) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        problems.append(f"{name}: {value!r} is not allowed; expected an integer >= 1")
        return None
    return value


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _named(value: Any, name: str, allowed: tuple[str, ...], problems: list[str]) -> dict[str, Any]:
    """``tpe`` or ``{name: tpe, ...options}`` -> {"name": "tpe", ...}."""
    cfg = {"name": value} if isinstance(value, str) else dict(value) if isinstance(value, dict) else None
    if cfg is None or cfg.get("name") not in allowed:
        got = cfg.get("name") if cfg else value
        problems.append(f"{name}: {got!r} is not allowed; expected one of {', '.join(allowed)}")
        return {"name": allowed[0]}
    return cfg


def _parse_budget(value: Any, problems: list[str], from_cli: bool = False) -> dict[str, Any]:
    if value is None:
        return {}
    if from_cli or (isinstance(value, dict) and set(value) == {"kind", "value"}):
        pairs = [(value.get("kind"), value.get("value"))]
    elif isinstance(value, dict):
        pairs = list(value.items())
    else:
        problems.append(f"budget: {value!r} is not allowed; expected e.g. {{flops: 4e13}}")
        return {}
    if len(pairs) != 1:
        problems.append(f"budget: {value!r} gives {len(pairs)} budgets; give exactly one of {', '.join(BUDGET_KINDS)}")
        return {}
    kind, raw = pairs[0]
    number = _number(raw)
    if kind not in BUDGET_KINDS:
        problems.append(f"budget: kind {kind!r} is not allowed; expected one of {', '.join(BUDGET_KINDS)}")
        return {}
    if number is None or number <= 0:
        problems.append(f"budget.{kind}: {raw!r} is not allowed; expected a number > 0")
        return {}
    return {"kind": kind, "value": int(number) if kind == "steps" else number}


def _parse_objectives(value: Any, problems: list[str]) -> list[Objective]:
    items = value if isinstance(value, list) else [value]
    objectives = []
    for item in items:
        metric, direction = (item, None) if isinstance(item, str) else (
            (item.get("metric"), item.get("direction")) if isinstance(item, dict) else (None, None))
        if metric not in OBJECTIVES:
            problems.append(f"objectives: {item!r} is not allowed; metrics: {', '.join(OBJECTIVES)} "
                            "(optionally {metric: NAME, direction: maximize|minimize})")
            continue
        direction = direction or OBJECTIVES[metric][0]
        if direction not in ("maximize", "minimize"):
            problems.append(f"objectives.{metric}.direction: {direction!r} is not allowed; expected maximize or minimize")
            continue
        objectives.append(Objective(metric, direction))
    if not items:
        problems.append("objectives: give at least one, e.g. [quality]")
    return objectives


def _parse_space(value: Any, problems: list[str]) -> list[Param]:
    if value is None:
        return []
    if not isinstance(value, dict):
        problems.append(f"space: {value!r} is not allowed; expected a mapping of field to values or range")
        return []
    params = []
    for name, dist in value.items():
        param = _parse_param(str(name), dist, problems)
        if param is not None:
            params.append(param)
    if params:
        _check_space_keys(params, problems)
    return params


def _parse_param(name: str, dist: Any, problems: list[str]) -> Param | None:
    where = f"space.{name}"
    if isinstance(dist, list):
        dist = {"type": "categorical", "choices": dist}
    if not isinstance(dist, dict):
        problems.append(f"{where}: {dist!r} is not allowed; expected a list of values or "
                        "{type: int|float, low: L, high: H[, log: true][, step: S]}")
        return None
    kind = dist.get("type", "categorical" if "choices" in dist else None)
    if kind == "categorical":
        choices = dist.get("choices")
        if not isinstance(choices, list) or not choices:
            problems.append(f"{where}.choices: {choices!r} is not allowed; expected a non-empty list")
            return None
        bad = [c for c in choices if c is not None and not isinstance(c, (str, int, float, bool))]
        if bad:
            problems.append(f"{where}.choices: {bad[0]!r} is not allowed; values must be numbers, strings, "
                            "booleans or null")
            return None
        return Param(name, "categorical", tuple(yaml_number(c) for c in choices))
    if kind not in ("int", "float"):
        problems.append(f"{where}.type: {kind!r} is not allowed; expected categorical, int or float")
        return None
    low, high, step = _number(dist.get("low")), _number(dist.get("high")), dist.get("step")
    log = dist.get("log", False)
    start = len(problems)
    if low is None or high is None or low > high:
        problems.append(f"{where}: low={dist.get('low')!r}, high={dist.get('high')!r} is not allowed; "
                        "expected numbers with low <= high")
    elif kind == "int" and (low != int(low) or high != int(high)):
        problems.append(f"{where}: an int range needs integer bounds, got low={low:g}, high={high:g}")
    if not isinstance(log, bool):
        problems.append(f"{where}.log: {log!r} is not allowed; expected true or false")
    elif log and low is not None and low <= 0:
        problems.append(f"{where}: log=true needs low > 0, got {low:g}")
    if step is not None and (_number(step) is None or _number(step) <= 0):
        problems.append(f"{where}.step: {step!r} is not allowed; expected a number > 0")
    elif step is not None and log:
        problems.append(f"{where}: step and log=true cannot be combined (Optuna)")
    if len(problems) > start:
        return None
    return Param(name, kind, low=low, high=high, log=log, step=_number(step) if step is not None else None)


def _check_space_keys(params: list[Param], problems: list[str]) -> None:
    """Every searched name must be a config field (or family/preset), checked like --set keys."""
    from bench.train.config import split_overrides

    for p in params:
        if p.name in SPECIAL_PARAMS:
            continue
        try:
            split_overrides({p.name: p.edge_values()[0]})
        except ConfigError as e:
            problems.extend(f"space.{p.name}: {msg}" for msg in e.problems)


__all__ = ["SweepSpec", "Param", "Objective", "OBJECTIVES", "SAMPLERS", "PRUNERS", "load_spec", "parse_spec",
           "find_spec", "SWEEPS_DIR", "shipped_studies"]
