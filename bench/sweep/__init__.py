"""Search spaces: study specs (``spec``), the study in the results database (``study``) and study
reports (``show``). ``bench.runner.search`` runs them."""
from bench.sweep.spec import SweepSpec, load_spec, parse_spec

__all__ = ["SweepSpec", "load_spec", "parse_spec"]
