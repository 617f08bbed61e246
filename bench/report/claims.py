"""Per-arm numbers over seeds, and each plan claim judged on paired seeds (``bench.report.stats``).

Metrics that compare a run with the baseline run of the *same seed* (step speed-up, loss at the
baseline's training time) are computed on the evaluation curves only, so both sides of every
comparison are measured on the same evaluation data.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable

from bench.metrics import last_eval_max_violation, perplexity
from bench.plans import Claim, Plan
from bench.report import stats
from bench.report.stats import curve_xy, interp, speedup_to_target
from bench.tracking.records import RunRecord, is_throughput

# Throughputs differ by model size: their claims compare relative differences (a / b - 1).
RELATIVE_METRICS = ("tokens_per_second",)


@dataclass
class ArmStats:
    label: str
    records: list[RunRecord]
    values: dict[str, list[float]] = field(default_factory=dict)  # metric -> one value per seed

    def present(self, key: str) -> list[float]:
        return [v for v in self.values.get(key) or [] if v is not None]

    def mean(self, key: str) -> float | None:
        vals = self.present(key)
        return statistics.mean(vals) if vals else None

    def by_seed(self, key: str) -> dict[int, float]:
        """seed -> value (``values[key]`` holds one entry per record, None where it is missing)."""
        return {r.seed: v for r, v in zip(self.records, self.values.get(key) or []) if v is not None}

    def sd(self, key: str) -> float | None:
        vals = self.present(key)
        return statistics.stdev(vals) if len(vals) > 1 else None

    def half_range(self, key: str) -> float | None:
        vals = self.present(key)
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
        "max_violation": last_eval_max_violation(r.expert_stats),
    }
    if m.get("val_loss") is not None:
        out["val_perplexity"] = perplexity(min(m["val_loss"], 50.0))
    return {k: float(v) for k, v in out.items() if v is not None}


def arm_stats(records: list[RunRecord], order: list[str] | None = None) -> dict[str, ArmStats]:
    """Finished records grouped by their ``arm`` tag, in ``order`` (the reproduction's arm order)."""
    newest: dict[tuple[str, int], RunRecord] = {}  # a re-run of an arm/seed replaces the older run
    for r in sorted(records, key=lambda r: r.started_at):
        if r.status == "finished" and r.extra.get("arm") and not is_throughput(r):
            newest[(r.extra["arm"], r.seed)] = r
    groups: dict[str, list[RunRecord]] = {}
    for (arm, _), r in newest.items():
        groups.setdefault(arm, []).append(r)
    labels = [a for a in (order or sorted(groups)) if a in groups]
    out = {}
    for label in labels:
        rs = sorted(groups[label], key=lambda r: r.seed)
        arm = ArmStats(label, rs)
        per_run = [record_values(r) for r in rs]
        for key in {k for values in per_run for k in values}:
            arm.values[key] = [values.get(key) for values in per_run]
        out[label] = arm
    return out


def throughput_arms(records: list[RunRecord]) -> dict[str, ArmStats]:
    """Quiet throughput measurements (``bench.throughput``) as arms whose seeds are the repeats:
    one process times every arm in turn, repeat by repeat, so repeat i of two arms is a pair
    measured under the same machine load. A later measurement of an (arm, repeat) replaces it."""
    newest: dict[tuple[str, int], RunRecord] = {}
    for r in sorted(records, key=lambda r: r.started_at):
        if is_throughput(r) and r.status == "finished" and r.metrics.get("tokens_per_second"):
            newest[(r.extra.get("arm"), r.seed)] = r
    out: dict[str, ArmStats] = {}
    for (arm, _), r in sorted(newest.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        a = out.setdefault(arm, ArmStats(arm, []))
        a.records.append(r)
        a.values.setdefault("tokens_per_second", []).append(float(r.metrics["tokens_per_second"]))
    return out


def timed_model(record: RunRecord) -> str:
    """The model a quiet throughput record timed, as canonical JSON: its planned model config, less
    the capacity where it was timed dropless (``bench.throughput``: all of a balanced router's
    tokens, since an untrained router would drop most of them under a capacity)."""
    model = json.loads(json.dumps((record.config or {}).get("model") or {}))
    if record.extra.get("dropless") and isinstance(model.get("moe"), dict):
        for key in ("capacity_factor", "eval_capacity_factor"):
            model["moe"].pop(key, None)
    return json.dumps(model, sort_keys=True)


def curve_points(record: RunRecord, x: str = "step") -> list[tuple[float, float]]:
    """(x, val loss) of a run's evaluation curve, sorted by x (all on the same evaluation data)."""
    return curve_xy(record.curve, x)


def add_paired_metrics(arms: dict[str, ArmStats], baseline: str, speed: dict[str, float] | None = None) -> None:
    """Per seed, against the baseline run of the same seed, on evaluation curves only:

    - ``step_speedup``: the step at which the baseline's curve first reaches its own last evaluated
      loss / the step at which this run's curve first reaches it (a run compared with itself gives
      exactly 1.0, even when its curve is not monotone).
      A run that never gets there counts as its own last step (an upper bound on its speed-up).
    - ``loss_at_equal_time``: this run's loss after the baseline's training time. With ``speed``
      (arm -> tokens/s measured together in one quiet process, see ``bench.throughput``): its
      loss at baseline tokens x (its tokens/s / the baseline's), on its curve; else at the
      baseline's training seconds as both runs measured them. Linear between evaluations; its
      last point when it ran out sooner (conservative for the faster arm).
    """
    base = arms.get(baseline)
    if base is None:
        return
    base_by_seed = {r.seed: r for r in base.records}
    for arm in arms.values():
        speedups, at_time = [], []
        ratio = speed[arm.label] / speed[baseline] if speed and arm.label in speed and baseline in speed else None
        for r in arm.records:
            b = base_by_seed.get(r.seed)
            mine, theirs = curve_points(r), curve_points(b) if b is not None else []
            if not mine or not theirs:
                speedups.append(None)
                at_time.append(None)
                continue
            target = theirs[-1][1]
            # Both steps are first crossings of the same target: a noisy baseline curve that dipped
            # to its final loss before the end is not credited with its later steps, and a run
            # compared with itself gives exactly 1.0.
            base_step = speedup_to_target(theirs, target) or theirs[-1][0]
            step = speedup_to_target(mine, target)
            speedups.append(base_step / (step if step else mine[-1][0]))
            axis = "tokens" if ratio is not None else "seconds"
            mine_x, theirs_x = curve_points(r, axis), curve_points(b, axis)
            budget = theirs_x[-1][0] * (ratio if ratio is not None else 1.0) if theirs_x else None
            at_time.append(interp(mine_x, budget) if mine_x and budget is not None else None)
        arm.values["step_speedup"] = speedups
        arm.values["loss_at_equal_time"] = at_time


@dataclass
class ClaimResult:
    claim: Claim
    effect: stats.Effect
    verdict: str
    evidence: str
    seeds_to_decide: int | None = None  # inconclusive claims: paired seeds that would decide it (stats.seeds_to_decide)
    looks: list[int] = field(default_factory=list)  # the tier's sequential looks (Tier.looks), if any
    stopped_at: int | None = None  # the look before the last at which the tier stopped (every deciding claim decided)

    @property
    def false_verdict_rate(self) -> float | None:
        """Under no effect, the chance of a verdict from the tier's looks (None: one planned look)."""
        return stats.sequential_false_verdict_rate(tuple(self.looks)) if len(self.looks) > 1 else None

    @property
    def looks_run(self) -> list[int]:
        """The looks the tier takes: all of them, or those up to the one it stopped at."""
        return self.looks[:self.looks.index(self.stopped_at) + 1] if self.stopped_at in self.looks else self.looks

    def add_looks(self, looks: list[int], stopped_at: int | None = None) -> None:
        """Say that the tier's seeds come in sequential looks, what that costs, and where it stands."""
        self.looks, self.stopped_at = list(looks), stopped_at
        if len(looks) < 2 or not self.effect.n_seeds:
            return
        n, last = self.effect.n_seeds, self.looks_run[-1]
        self.evidence += (f"; the tier's seeds come in looks (at {', '.join(map(str, looks))} seeds: more only while "
                          f"a headline claim is undecided), so under no effect a verdict comes out "
                          f"~{self.false_verdict_rate:.1%} of the time, not 5%")
        if stopped_at is not None:
            self.evidence += f"; every headline claim was decided at {stopped_at} seeds, so the tier stopped there"
        elif n < last:
            self.evidence += f"; interim: {n} of the {last} seeds"

    def as_json(self, reproduction: str, tier: str, budget: float) -> dict[str, Any]:
        """One object of claims.json. Strict JSON: a bound that does not exist (one seed gives no
        interval, internally +-inf) is null, so every JSON parser reads the file."""
        c, e = self.claim, self.effect

        def finite(x: float | None) -> float | None:
            return x if x is None or math.isfinite(x) else None

        return {"reproduction": reproduction, "tier": tier, "budget_flops": budget, "claim": c.text,
                "paper": c.paper, "kind": c.kind, "metric": c.metric, "direction": c.direction,
                "arms": c.arms(), "headline": c.headline, "estimate": finite(e.estimate), "ci_low": finite(e.ci_low),
                "ci_high": finite(e.ci_high), "n_seeds": e.n_seeds, "delta": c.effect_delta,
                "detectable_effect": finite(e.detectable), "seeds_to_decide": self.seeds_to_decide,
                "p_value": e.p_value, "per_seed": {str(k): finite(v) for k, v in e.per_seed.items()},
                # claims.json keeps the four verdicts of its contract: a claim with no paired data is
                # undecided (inconclusive, n_seeds 0); "has_data" and "evidence" say why.
                "verdict": stats.INCONCLUSIVE if self.verdict == stats.NO_DATA else self.verdict,
                "has_data": self.verdict != stats.NO_DATA, "evidence": self.evidence,
                "looks": self.looks or None, "stopped_at_look": self.stopped_at,
                "false_verdict_rate": self.false_verdict_rate}


def deciding_claims(results: list[ClaimResult]) -> list[ClaimResult]:
    """The claims whose verdicts decide whether a tier with sequential looks goes on: its headline
    claims, or every claim where none is marked headline."""
    headline = [r for r in results if r.claim.headline]
    return headline or list(results)


def undecided(results: list[ClaimResult]) -> list[ClaimResult]:
    """The deciding claims not yet reproduced, refuted or bounded within delta (no data counts as undecided)."""
    return [r for r in deciding_claims(results) if r.verdict not in (stats.REPRODUCED, stats.REFUTED, stats.NO_EFFECT)]


def _relative(per_seed: dict[int, float], reference: dict[int, float]) -> dict[int, float]:
    return {s: v / reference[s] for s, v in per_seed.items() if reference.get(s)}


def evaluate_claim(claim: Claim, arms: dict[str, ArmStats], speed_arms: dict[str, ArmStats] | None = None
                   ) -> ClaimResult:
    """The claim's effect in the paper's direction over paired seeds, its interval and verdict.

    Speed claims (``tokens_per_second``) are judged on ``speed_arms`` (``throughput_arms``: quiet
    measurements paired by repeat), never on the training runs' own timings, which were taken at
    different times under different machine loads; without a measurement the verdict is no-data.
    """
    key = claim.metric
    pairs = "paired seed(s)"
    if key == "tokens_per_second":
        measured = speed_arms or {}
        # a trend needs the arms that were trained (a tier may train a subset of its x), a comparison both
        needed = [label for label in claim.arms() if label and (claim.kind != "trend" or label in arms)]
        if not needed or not all(label in measured for label in needed):
            return ClaimResult(claim, stats.Effect(None, None, None, 0), "no-data",
                               "tokens/s of training runs are timed under whatever else the machine was doing; "
                               "measure the arms together on a quiet machine with `moe-bench reproduce PLAN --tier "
                               "TIER --throughput`")
        timed = {timed_model(r) for label in needed for r in measured[label].records}
        if len(needed) > 1 and len(timed) == 1:
            return ClaimResult(claim, stats.Effect(None, None, None, 0), "no-data",
                               "not measured: the quiet throughput measurement timed the same model for each arm "
                               "(it times sparse arms dropless, so arms that differ only in their capacity run the "
                               "same computation; any gap is noise). With the `sorted` kernel a capacity changes "
                               "only how many tokens are computed, which depends on a trained router's balance, and "
                               "the measurement starts from an untrained one")
        arms, pairs = measured, "interleaved repeat(s) of a quiet throughput measurement"
    if claim.kind == "trend":
        values = {}
        for label, x in claim.x.items():
            if label in arms and arms[label].by_seed(key):
                xx = math.log2(x) if claim.log_x else x
                values.setdefault(xx, {}).update(arms[label].by_seed(key))
        if key in RELATIVE_METRICS:  # slope of the value relative to the seed's mean over arms
            seeds = {s for per in values.values() for s in per}
            means = {s: statistics.fmean([per[s] for per in values.values() if s in per]) for s in seeds}
            values = {x: _relative(per, means) for x, per in values.items()}
        effect = stats.paired_slope(values, decreasing=claim.direction == "lower")
        unit = "per doubling of x" if claim.log_x else "per unit of x"
        shown = ", ".join(f"{label}: {_num(arms[label].mean(key))}" for label in claim.x
                          if label in arms and arms[label].mean(key) is not None)
        evidence = f"{shown} ({key}); slope {unit}"
    else:
        a = arms[claim.a].by_seed(key) if claim.a in arms else {}
        b = arms[claim.b].by_seed(key) if claim.b in arms else {}
        if key in RELATIVE_METRICS:
            a, b = _relative(a, b), {s: 1.0 for s in b}
        effect = stats.paired_difference(a, b, higher_better=claim.direction == "higher")
        evidence = (f"{claim.a} {_num(arms[claim.a].mean(key)) if a else '-'} vs {claim.b} "
                    f"{_num(arms[claim.b].mean(key)) if b else '-'} ({key}, means)")
    delta = claim.effect_delta
    kind = "not-worse" if claim.kind == "not-worse" else "better"
    verdict = stats.verdict(effect, delta, kind)
    to_decide = stats.seeds_to_decide(effect, delta, kind) if verdict == stats.INCONCLUSIVE else None
    if effect.n_seeds:
        interval = (f"95% CI [{_num(effect.ci_low, '+')}, {_num(effect.ci_high, '+')}]"
                    if effect.ci_low is not None and math.isfinite(effect.ci_low) else "no interval from one seed")
        evidence += (f"; effect in the paper's direction {_num(effect.estimate, '+')}, {interval} over "
                     f"{effect.n_seeds} {pairs}")
        if effect.p_value is not None:
            evidence += f" (two-sided p {effect.p_value:.2g})"
        evidence += f"; delta {delta:g}"
        if effect.detectable is not None:
            evidence += f"; smallest effect detectable at this n {_num(effect.detectable)}"
        if verdict == stats.INCONCLUSIVE and effect.sd is not None:
            evidence += (f"; if this mean and spread held, ~{to_decide} {pairs} would decide it" if to_decide
                         else f"; more than {stats.MAX_SEEDS_TO_DECIDE} pairs would be needed at this mean and spread")
    else:
        evidence += "; no seed has runs of every arm the claim needs"
    return ClaimResult(claim, effect, verdict, evidence, to_decide)


def _num(x: float | None, sign: str = "") -> str:
    """4 significant decimals for losses and ratios, whole numbers for throughputs."""
    if x is None:
        return "-"
    if not math.isfinite(x):
        return "inf" if x > 0 else "-inf"
    return format(x, f"{sign},.0f") if abs(x) >= 100 else format(x, f"{sign}.4f")


def fmt(value: Any, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def plan_arm_order(plan: Plan) -> list[str]:
    return [a.label for a in plan.arms]


__all__ = ["ArmStats", "ClaimResult", "arm_stats", "add_paired_metrics", "evaluate_claim", "record_values", "fmt",
           "curve_points", "throughput_arms", "timed_model", "RELATIVE_METRICS"]
