"""The arms of one group over seeds: each arm's mean validation curve with a 95% Student-t
interval, and its loss gap to a baseline arm paired by seed (same seed = same initialisation and
data order). The statistics are ``bench.report.stats``'s, so the page and the report agree."""
from __future__ import annotations

import math

from typing import Any

from bench.config import ConfigError
from bench.plans import load_plan
from bench.report.plots import arm_of
from bench.report.stats import curve_band, curve_xy, finite, mean_interval, paired_gap_band
from bench.tracking.records import ResultsStore, RunRecord, is_throughput

X_AXES = ("tokens", "flops", "step")  # keys of the record's evaluation curve points


def _bound(x: float) -> float | None:
    """An interval end, or None where it is unbounded (one seed): the page draws no band there."""
    return x if math.isfinite(x) else None


def by_arm(records: list[RunRecord]) -> dict[str, dict[int, RunRecord]]:
    """arm -> seed -> finished record; a re-run of an arm and seed replaces the older run."""
    out: dict[str, dict[int, RunRecord]] = {}
    for r in sorted(records, key=lambda r: r.started_at or ""):
        if r.status == "finished" and not is_throughput(r):
            out.setdefault(arm_of(r), {})[r.seed] = r
    return out


def mean_band(curves: list[list[tuple[float, float]]]) -> dict[str, list]:
    """Mean and 95% t interval over seeds at the x values every seed evaluated at."""
    band = curve_band(curves)
    return {"x": [b[0] for b in band], "mean": [b[1] for b in band], "low": [_bound(b[2]) for b in band],
            "high": [_bound(b[3]) for b in band]}


def _plan_of(records: list[RunRecord]):
    """The reproduction plan all records belong to, or None (a plain comparison, a user's plan gone)."""
    names = {r.extra.get("reproduction") for r in records}
    if len(names) != 1 or None in names:
        return None
    try:
        return load_plan(names.pop())
    except (ConfigError, OSError):
        return None


def arms(store: ResultsStore, group: str, x: str = "tokens", baseline: str | None = None) -> dict[str, Any]:
    """Per arm of ``group``: seeds, mean curve with interval, final val loss with interval, and
    the paired gap to ``baseline`` (default: the plan's baseline arm, else the first arm)."""
    if x not in X_AXES:
        raise ValueError(f"x={x!r}: expected one of {', '.join(X_AXES)}")
    records = store.list(group=group)
    groups = by_arm(records)
    plan = _plan_of(records)
    order = [a.label for a in plan.arms if a.label in groups] if plan else []
    labels = order + [a for a in groups if a not in order]
    if baseline not in groups:
        baseline = plan.baseline if plan and plan.baseline in groups else (labels[0] if labels else None)
    out: dict[str, Any] = {"group": group, "x": x, "baseline": baseline, "arms": [],
                           "note": None if labels else f"no finished runs in group {group!r}"}
    curves = {arm: {s: curve_xy(r.curve, x) for s, r in seeds.items()} for arm, seeds in groups.items()}
    for arm in labels:
        seeds = groups[arm]
        finals = [v for r in seeds.values() if (v := finite(r.metrics.get("val_loss"))) is not None]
        final = None
        if finals:
            mean, low, high, _ = mean_interval(finals)
            final = {"mean": mean, "low": _bound(low), "high": _bound(high), "n": len(finals)}
        gap = None
        if baseline is not None and arm != baseline:
            band = paired_gap_band(curves[arm], curves[baseline])
            gap = {"x": [b[0] for b in band], "mean": [b[1] for b in band], "low": [_bound(b[2]) for b in band],
                   "high": [_bound(b[3]) for b in band], "n": [b[4] for b in band]}
        out["arms"].append({"arm": arm, "seeds": sorted(seeds), "run_ids": [seeds[s].run_id for s in sorted(seeds)],
                            "curve": mean_band(list(curves[arm].values())), "final_val_loss": final, "gap": gap})
    return out
