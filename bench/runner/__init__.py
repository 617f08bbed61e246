"""The one runner of experiments: a plan's arms (``arms``) and a search space's trials (``search``),
with one failure policy (``failures``) and one way to continue what was stopped.

``run_file(PATH)`` runs any experiment file: a plan of arms or a search space.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.config import ConfigError
from bench.runner.arms import compare, comparison_plan, run_plan


def experiment_kind(path_or_name: str) -> tuple[str, Path]:
    """("plan" | "search", the file) for an experiment file or a shipped name in sweeps/."""
    import yaml

    from bench.plans import PLANS_DIR

    path = Path(path_or_name)
    if not path.is_file() and (PLANS_DIR / f"{path_or_name}.yaml").is_file():
        path = PLANS_DIR / f"{path_or_name}.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError([f"cannot read {path_or_name}: {e}"], "run") from None
    if isinstance(data, dict) and "arms" in data:
        return "plan", path
    if isinstance(data, dict) and "space" in data:
        return "search", path
    raise ConfigError([f"{path_or_name} has neither arms: (a plan: moe-bench reproduce) nor space: (a study: "
                       "moe-bench sweep)"], "run")


def run_file(path_or_name: str, storage: str | None = None, data_dir: str | None = None,
             progress: bool = True, **options: Any):
    """Run an experiment file: a plan's arms (``run_plan`` options: tier, seeds, arms, ...) or a
    search space's trials (``run_sweep`` options: study_name, ...); returns the plan's records or
    the ``SweepResult``. Resumable either way."""
    kind, path = experiment_kind(path_or_name)
    if kind == "plan":
        return run_plan(str(path), storage=storage, data_dir=data_dir, progress=progress, **options)
    from bench.runner.search import run_sweep  # Optuna loads only for a search
    from bench.sweep import load_spec

    return run_sweep(load_spec(str(path)), storage=storage, data_dir=data_dir, progress=progress, **options)


__all__ = ["compare", "comparison_plan", "experiment_kind", "run_file", "run_plan"]
