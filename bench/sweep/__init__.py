"""Optuna sweeps: study specs (``spec``), the trial loop (``runner``) and study reports (``show``)."""
from bench.sweep.runner import SweepResult, run_sweep
from bench.sweep.spec import SweepSpec, load_spec, parse_spec

__all__ = ["SweepSpec", "SweepResult", "load_spec", "parse_spec", "run_sweep"]
