"""Per-arm statistics over seeds, and a plain verdict per qualitative claim of the papers.

A claim "A is better than B" is **reproduced** when the mean gap in the claimed direction is
larger than the seed spread (the larger of the two arms' max-min ranges), **not reproduced**
when the gap goes the other way by more than the spread, and **mixed** otherwise (within seed
noise). With one seed of each arm there is no spread to judge a gap against: the verdict is
**mixed** and says so (the issue's rule: reproduced only when the gap exceeds the spread).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable

from bench.tracking.records import RunRecord

REPRODUCED, NOT_REPRODUCED, MIXED, NO_DATA = "reproduced", "not reproduced", "mixed", "no data"


@dataclass
class ArmStats:
    label: str
    records: list[RunRecord]
    values: dict[str, list[float]] = field(default_factory=dict)  # metric -> one value per seed

    def mean(self, key: str) -> float | None:
        vals = self.values.get(key) or []
        return statistics.mean(vals) if vals else None

    def half_range(self, key: str) -> float | None:
        vals = self.values.get(key) or []
        return (max(vals) - min(vals)) / 2 if len(vals) > 1 else None

    @property
    def n(self) -> int:
        return len(self.records)

    @property
    def first(self) -> RunRecord:
        return self.records[0]


def _mean_layers(stats: list[dict], fn: Callable[[dict], float | None]) -> float | None:
    vals = [v for v in (fn(s) for s in stats) if v is not None and math.isfinite(v)]
    return statistics.mean(vals) if vals else None


def _max_over_mean(layer: dict) -> float | None:
    load = layer.get("tokens_per_expert") or []
    total = sum(load)
    return max(load) / (total / len(load)) if load and total > 0 else None


def record_values(r: RunRecord) -> dict[str, float]:
    """The numbers a report compares, from one finished run record."""
    m = r.metrics
    out = {
        "val_loss": m.get("val_loss"), "quality": m.get("quality"), "val_bleu": m.get("val_bleu"),
        "val_chrf": m.get("val_chrf"), "test_bleu": m.get("test_bleu"), "test_chrf": m.get("test_chrf"),
        "tokens_per_second": r.timings.get("tokens_per_second"), "wall_seconds": r.timings.get("wall_seconds"),
        "steps": r.steps, "tokens": r.tokens_seen, "train_flops": r.train_flops,
        "fraction_dropped": _mean_layers(r.expert_stats, lambda s: s.get("fraction_dropped")),
        "max_over_mean_load": _mean_layers(r.expert_stats, _max_over_mean),
    }
    if m.get("val_loss") is not None:
        out["val_perplexity"] = math.exp(min(m["val_loss"], 50.0))
    return {k: float(v) for k, v in out.items() if v is not None}


def arm_stats(records: list[RunRecord], order: list[str] | None = None) -> dict[str, ArmStats]:
    """Finished records grouped by their ``arm`` tag, in ``order`` (the reproduction's arm order)."""
    newest: dict[tuple[str, int], RunRecord] = {}  # a re-run of an arm/seed replaces the older run
    for r in sorted(records, key=lambda r: r.started_at):
        if r.status == "finished" and r.extra.get("arm"):
            newest[(r.extra["arm"], r.seed)] = r
    groups: dict[str, list[RunRecord]] = {}
    for (arm, _), r in newest.items():
        groups.setdefault(arm, []).append(r)
    labels = [a for a in (order or sorted(groups)) if a in groups]
    out = {}
    for label in labels:
        rs = sorted(groups[label], key=lambda r: r.seed)
        stats = ArmStats(label, rs)
        for r in rs:
            for k, v in record_values(r).items():
                stats.values.setdefault(k, []).append(v)
        out[label] = stats
    return out


def add_step_speedups(arms: dict[str, ArmStats], baseline: str) -> None:
    """Per seed: baseline's steps / steps this arm needs to reach the baseline's mean final
    validation loss (interpolated on its evaluation curve); 0.0 when it never gets there."""
    from bench.report.plots import speedup_to_target

    base = arms.get(baseline)
    if base is None or base.mean("val_loss") is None:
        return
    target, base_steps = base.mean("val_loss"), base.mean("steps")
    for arm in arms.values():
        speedups = []
        for r in arm.records:
            step = speedup_to_target(r.curve + [{"step": r.steps, "loss": r.metrics.get("val_loss")}], target)
            speedups.append(base_steps / step if step else 0.0)
        arm.values["step_speedup"] = speedups


@dataclass
class Claim:
    text: str
    paper: str  # what the paper reports, in words and numbers
    verdict: str
    evidence: str  # our numbers


def compare(arms: dict[str, ArmStats], a: str, b: str, key: str, higher_better: bool) -> tuple[str, str]:
    """(verdict, evidence) for "arm a is better than arm b on key"."""
    if a not in arms or b not in arms or arms[a].mean(key) is None or arms[b].mean(key) is None:
        return NO_DATA, f"needs finished runs of {a!r} and {b!r}"
    ma, mb = arms[a].mean(key), arms[b].mean(key)
    gain = (ma - mb) if higher_better else (mb - ma)
    spreads = [2 * s for s in (arms[a].half_range(key), arms[b].half_range(key)) if s is not None]
    spread = max(spreads) if spreads else 0.0
    seeds = min(arms[a].n, arms[b].n)
    evidence = (f"{a} {_num(ma)} vs {b} {_num(mb)} ({key}, mean of {seeds} seed(s)); gap {_num(gain, '+')} in the "
                f"claimed direction; seed spread {_num(spread)}")
    if not spreads:
        return MIXED, evidence + " — one seed of each: no spread to judge the gap against (run more seeds)"
    if gain > spread:
        return REPRODUCED, evidence
    if gain < -spread:
        return NOT_REPRODUCED, evidence
    return MIXED, evidence + " — within seed noise"


def _num(x: float, sign: str = "") -> str:
    """4 decimals for losses and ratios, whole numbers for throughputs."""
    return format(x, f"{sign},.0f") if abs(x) >= 100 else format(x, f"{sign}.4f")


def trend(arms: dict[str, ArmStats], xs: dict[str, float], key: str, decreasing: bool) -> tuple[str, str]:
    """(verdict, evidence) for "key falls (or rises) as x grows" across the arms in xs."""
    pts = [(x, arms[a].mean(key), arms[a].half_range(key) or 0.0) for a, x in xs.items()
           if a in arms and arms[a].mean(key) is not None]
    if len(pts) < 3:
        return NO_DATA, "needs at least 3 finished arms"
    pts.sort()
    rho = _spearman([p[0] for p in pts], [p[1] for p in pts])
    sign = -1 if decreasing else 1
    ends = pts[-1][1] - pts[0][1]
    spread = 2 * max(p[2] for p in pts)
    evidence = (", ".join(f"{x:g}: {_num(y)}" for x, y, _ in pts) + f" ({key}); Spearman rho {rho:+.2f}; "
                f"last-first {_num(ends, '+')}, seed spread {_num(spread)}")
    if sign * rho >= 0.8 and sign * ends > spread:
        return REPRODUCED, evidence
    if sign * rho <= 0 and -sign * ends > spread:
        return NOT_REPRODUCED, evidence
    return MIXED, evidence


def _spearman(xs: list[float], ys: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for rank, i in enumerate(order):
            r[i] = float(rank)
        return r

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / var if var else 0.0


def all_seeds(arms: dict[str, ArmStats], label: str, key: str, test: Callable[[float], bool],
              what: str) -> tuple[str, str]:
    """(verdict, evidence) for a per-seed property: every seed -> reproduced, none -> not, else mixed."""
    if label not in arms or not arms[label].values.get(key):
        return NO_DATA, f"needs finished runs of {label!r}"
    vals = arms[label].values[key]
    ok = [test(v) for v in vals]
    evidence = f"{label}: {what} " + ", ".join(f"{v:.3g}" for v in vals) + f" (holds for {sum(ok)}/{len(ok)} seeds)"
    if all(ok):
        return REPRODUCED, evidence
    if not any(ok):
        return NOT_REPRODUCED, evidence
    return MIXED, evidence


def claim(text: str, paper: str, result: tuple[str, str]) -> Claim:
    return Claim(text, paper, result[0], result[1])


def fmt(value: Any, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


__all__ = ["ArmStats", "Claim", "arm_stats", "add_step_speedups", "compare", "trend", "all_seeds", "claim",
           "record_values", "REPRODUCED", "NOT_REPRODUCED", "MIXED", "NO_DATA"]
