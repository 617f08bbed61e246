"""Claim statistics: effects with 95% confidence intervals over paired seeds, and verdicts.

A seed fixes the initialisation and the data order of every arm, so two arms' runs with the same
seed form a pair; their difference cancels the data-order noise both share. Every claim is an
*effect oriented in the paper's direction* (positive = the paper's claim holds), estimated as the
mean over seeds with a Student-t interval:

- ``paired_difference``: "arm a is better than arm b" -> per-seed gain, e.g. b's loss - a's loss.
- ``paired_slope``: "the metric falls as x grows" -> per seed, the least-squares slope of the
  metric on x (log2 x for expert counts) across the arms; the effect is the mean slope, signed so
  that the paper's direction is positive.

Verdicts (``verdict``): **reproduced** when the interval excludes 0 in the paper's direction,
**refuted** when it excludes 0 the other way, **no-effect** when it lies inside +-delta (the
smallest effect that matters, stated per metric), **inconclusive** otherwise. A non-inferiority
claim ("a matches b") is reproduced when the interval's low end is above -delta and refuted when
its high end is below -delta.

The report also states the smallest effect detectable at that n (two-sided 5% test, 80% power)
given the observed seed-to-seed standard deviation of the paired differences, and for an
inconclusive claim how many paired seeds would decide it if the observed mean and spread held
(``seeds_to_decide``): a planning figure, not a promise. Adding seeds *because* a claim was
inconclusive is optional stopping, which raises the false-verdict rate: a plan tier that did so
lists its ``looks`` (e.g. [5, 10]) and the report states that rule's rate under no effect
(``sequential_false_verdict_rate``).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from itertools import pairwise
from typing import Any, Sequence

REPRODUCED, REFUTED, NO_EFFECT, INCONCLUSIVE, NO_DATA = "reproduced", "refuted", "no-effect", "inconclusive", "no-data"
VERDICTS = (REPRODUCED, REFUTED, NO_EFFECT, INCONCLUSIVE, NO_DATA)
CONFIDENCE = 0.95
POWER = 0.80


def t_quantile(p: float, df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(p, df))


@lru_cache(maxsize=None)
def sequential_false_verdict_rate(looks: tuple[int, ...], trials: int = 200_000, seed: int = 0) -> float:
    """Under no effect, the chance that a claim judged at ``looks[0]`` paired seeds, and again at each
    later count while its 95% t interval still holds 0, excludes 0 at some look (simulated with
    normal per-seed effects; the interval's scale does not matter). One look: 0.05."""
    import numpy as np

    x = np.random.default_rng(seed).standard_normal((trials, max(looks)))
    decided = np.zeros(trials, bool)
    for n in looks:
        head = x[:, :n]
        half = t_quantile(1 - (1 - CONFIDENCE) / 2, n - 1) * head.std(1, ddof=1) / math.sqrt(n)
        decided |= np.abs(head.mean(1)) > half
    return float(decided.mean())


@dataclass
class Effect:
    """An effect in the paper's direction (positive = as the paper claims), over paired seeds."""

    estimate: float | None
    ci_low: float | None
    ci_high: float | None
    n_seeds: int
    per_seed: dict[int, float] = field(default_factory=dict)
    sd: float | None = None
    detectable: float | None = None  # smallest |effect| this n detects with 80% power at 5%
    p_value: float | None = None  # two-sided one-sample t-test of the per-seed effects against 0

    def as_dict(self) -> dict:
        return asdict(self)


def half_width(sd: float, n: int, confidence: float = CONFIDENCE) -> float:
    """Half the Student-t interval of a mean of n values with standard deviation sd."""
    return t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float, float | None]:
    """(mean, low, high, sd) of a Student-t interval; with one value the interval is unbounded."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_interval needs at least one value")
    mean = statistics.fmean(values)
    if n == 1:
        return mean, -math.inf, math.inf, None
    sd = statistics.stdev(values)
    half = half_width(sd, n, confidence)
    return mean, mean - half, mean + half, sd


def detectable_effect(sd: float | None, n: int, confidence: float = CONFIDENCE, power: float = POWER) -> float | None:
    """Smallest true mean effect a paired t-test at this n finds with the given power (normal-shift
    approximation with t quantiles: (t_{1-a/2} + t_{power}) * sd / sqrt(n))."""
    if sd is None or n < 2:
        return None
    df = n - 1
    return (t_quantile(0.5 + confidence / 2, df) + t_quantile(power, df)) * sd / math.sqrt(n)


MAX_SEEDS_TO_DECIDE = 100


def seeds_to_decide(effect: Effect, delta: float, kind: str = "better", max_seeds: int = MAX_SEEDS_TO_DECIDE
                    ) -> int | None:
    """The fewest paired seeds at which the interval around the observed mean, with the observed
    seed-to-seed sd, would give a verdict other than inconclusive; None without an sd (fewer than
    two seeds) or when more than ``max_seeds`` would be needed (a mean sitting on a verdict
    boundary, e.g. exactly 0 with delta 0)."""
    if effect.sd is None or effect.estimate is None or effect.n_seeds < 2:
        return None
    for n in range(effect.n_seeds, max_seeds + 1):
        half = half_width(effect.sd, n)
        projected = Effect(effect.estimate, effect.estimate - half, effect.estimate + half, n)
        if verdict(projected, delta, kind) != INCONCLUSIVE:
            return n
    return None


def p_value(mean: float, sd: float | None, n: int) -> float | None:
    """Two-sided p of a one-sample t-test of mean 0 (the interval excludes 0 exactly when p < 0.05);
    None from one value or without spread."""
    if sd is None or n < 2 or sd == 0:
        return None
    from scipy.stats import t

    return float(2 * t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))


def bh_q_values(p_values: Sequence[float | None]) -> list[float | None]:
    """Benjamini-Hochberg adjusted p values (q) over the tests given (None, no test, stays None):
    a verdict with q < 0.05 survives a 5% false-discovery rate across all of them."""
    tested = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    q: list[float | None] = [None] * len(p_values)
    running = 1.0
    for rank in range(len(tested), 0, -1):  # from the largest p down: q_(k) = min_{j>=k} p_(j) m / j
        p, i = tested[rank - 1]
        running = min(running, p * len(tested) / rank)
        q[i] = running
    return q


def effect_from(per_seed: dict[int, float]) -> Effect:
    if not per_seed:
        return Effect(None, None, None, 0)
    vals = [per_seed[s] for s in sorted(per_seed)]
    mean, low, high, sd = mean_interval(vals)
    return Effect(mean, low, high, len(vals), dict(sorted(per_seed.items())), sd, detectable_effect(sd, len(vals)),
                  p_value(mean, sd, len(vals)))


def paired_difference(a: dict[int, float], b: dict[int, float], higher_better: bool) -> Effect:
    """Per-seed gain of arm a over arm b (a - b when higher is better, b - a when lower is)."""
    sign = 1.0 if higher_better else -1.0
    return effect_from({s: sign * (a[s] - b[s]) for s in a if s in b})


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("slope needs at least two distinct x values")
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def paired_slope(values: dict[float, dict[int, float]], decreasing: bool, min_points: int = 3) -> Effect:
    """``values``: x -> {seed: metric}. Per seed with at least ``min_points`` arms, the OLS slope of
    the metric on x; the effect is signed so that the claimed direction is positive."""
    sign = -1.0 if decreasing else 1.0
    seeds = sorted({s for per in values.values() for s in per})
    per_seed = {}
    for s in seeds:
        pts = [(x, per[s]) for x, per in values.items() if s in per]
        if len(pts) >= min_points:
            per_seed[s] = sign * slope([p[0] for p in pts], [p[1] for p in pts])
    return effect_from(per_seed)


def verdict(effect: Effect, delta: float, kind: str = "better") -> str:
    """See the module docstring. ``kind``: "better" (a directional claim) or "not-worse"."""
    if effect.n_seeds < 2 or effect.ci_low is None or not math.isfinite(effect.ci_low):
        return NO_DATA if effect.n_seeds == 0 else INCONCLUSIVE
    low, high = effect.ci_low, effect.ci_high
    if kind == "not-worse":
        if low > -delta:
            return REPRODUCED
        if high < -delta:
            return REFUTED
        return INCONCLUSIVE
    if low > 0:
        return REPRODUCED
    if high < 0:
        return REFUTED
    if -delta < low and high < delta:
        return NO_EFFECT
    return INCONCLUSIVE


# --- evaluation curves -----------------------------------------------------------------------
def finite(value: Any) -> float | None:
    """A finite float, or None for missing/non-numeric/NaN/inf values (bools are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def curve_xy(curve: Any, x: str) -> list[tuple[float, float]]:
    """(x, loss) pairs of one curve sorted by x; points without both values are skipped and a
    repeated x keeps its last evaluation (a resumed run logs the resume step again)."""
    by_x: dict[float, float] = {}
    for point in curve if isinstance(curve, list) else ():
        if isinstance(point, dict):
            px, loss = finite(point.get(x)), finite(point.get("loss"))
        elif isinstance(point, (list, tuple)) and len(point) == 2:
            px, loss = finite(point[0]), finite(point[1])
        else:
            continue
        if px is not None and loss is not None:
            by_x[px] = loss
    return sorted(by_x.items())


def interp(s: list[tuple[float, float]], x: float) -> float:
    """y at x on the curve s ((x, y) sorted by x), linear between points, constant beyond the ends."""
    for (x0, y0), (x1, y1) in pairwise(s):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return s[0][1] if x <= s[0][0] else s[-1][1]


def speedup_to_target(curve_points: Sequence[Any], target_loss: float, x: str = "step") -> float | None:
    """The first ``x`` (step, tokens, flops, seconds) at which a loss curve reaches ``target_loss``
    (loss <= target), linearly interpolated between the last evaluation above the target and the
    first one at or below it; None when the curve never gets there (or is empty).

    ``curve_points``: ``record.curve``-style dicts with ``x`` and "loss" keys (points missing
    either are skipped; points are taken in order of x), or (x, loss) pairs. Dividing the
    baseline's x by this gives the speed-up of one run over the baseline."""
    target = finite(target_loss)
    points = curve_xy(list(curve_points or []), x)
    if target is None:
        return None
    for i, (px, loss) in enumerate(points):
        if loss <= target:
            if i == 0:
                return px
            x0, l0 = points[i - 1]
            return x0 + (l0 - target) / (l0 - loss) * (px - x0)  # l0 > target >= loss
    return None



def _key(x: float) -> float:
    return float(f"{x:.9g}")  # x values computed the same way in every seed compare equal


def curve_band(series: list[list[tuple[float, float]]]) -> list[tuple[float, float, float, float, int]]:
    """(x, mean, ci low, ci high, seeds) of several seeds' curves at the x values every seed
    evaluated at: a 95% t-interval at each x (unbounded with one seed)."""
    series = [s for s in series if s]
    if not series:
        return []
    common = set.intersection(*({_key(x) for x, _ in s} for s in series))
    at: dict[float, list[tuple[float, float]]] = {}
    for s in series:
        for x, y in s:
            if _key(x) in common:
                at.setdefault(_key(x), []).append((x, y))
    out = []
    for points in at.values():
        mean, low, high, _ = mean_interval([y for _, y in points])
        out.append((statistics.fmean(x for x, _ in points), mean, low, high, len(points)))
    return sorted(out)


def mean_curve(series: list[list[tuple[float, float]]], interpolate: bool = False) -> list[tuple[float, float]]:
    """Mean over seeds. Without ``interpolate``: at the x values every seed evaluated at. With it:
    each seed linearly interpolated onto the union of their x values inside the range all seeds
    cover (equal to the first form when the seeds share x values)."""
    series = [s for s in series if s]
    if len(series) <= 1:
        return list(series[0]) if series else []
    if not interpolate:
        return [(x, mean) for x, mean, *_ in curve_band(series)]
    lo, hi = max(s[0][0] for s in series), min(s[-1][0] for s in series)
    grid = sorted({x for s in series for x, _ in s if lo <= x <= hi})
    return [(x, statistics.fmean(interp(s, x) for s in series)) for x in grid]


def paired_gap_band(arm: dict[int, list[tuple[float, float]]], base: dict[int, list[tuple[float, float]]]
                    ) -> list[tuple[float, float, float, float, int]]:
    """(x, mean gap, ci low, ci high, seeds) along the baseline's x values: per seed, the arm's
    curve minus the baseline's (the arm linearly interpolated onto the baseline's evaluations, within
    its own range), then a 95% t-interval over the paired seeds at each x (unbounded with one seed)."""
    seeds = sorted(s for s in arm if s in base and arm[s] and base[s])
    if not seeds:
        return []
    xs = sorted({x for s in seeds for x, _ in base[s]})
    out = []
    for x in xs:
        gaps = []
        for s in seeds:
            own, theirs = arm[s], dict(base[s])
            if x in theirs and own[0][0] <= x <= own[-1][0]:
                gaps.append(interp(own, x) - theirs[x])
        if gaps:
            mean, low, high, _ = mean_interval(gaps)
            out.append((x, mean, low, high, len(gaps)))
    return out


__all__ = ["Effect", "VERDICTS", "REPRODUCED", "REFUTED", "NO_EFFECT", "INCONCLUSIVE", "NO_DATA", "mean_interval",
           "detectable_effect", "paired_difference", "paired_slope", "slope", "verdict", "effect_from",
           "t_quantile", "finite", "curve_xy", "interp", "speedup_to_target", "paired_gap_band", "curve_band",
           "mean_curve"]
