"""Two designs of one plan tier, seed by seed: the runs in a BEFORE store (e.g. an archive of the
tier's earlier design, scripts/archive_runs.py) against the same group's runs in an AFTER store.
Per arm: the settings that differ, each metric's mean +- sd in both, and the paired effect
after - before with its 95% interval over the seeds both have (bench.report.stats, as the report).

    .venv/bin/python scripts/compare_designs.py repro-translation-ref \\
        --before sqlite:///results/reference/archive/translation-ref-warmup40.db \\
        --after sqlite:///results/reference/moe-bench.db --metric val_bleu --metric val_loss --at-step 1000

--at-step S adds each run's evaluation-curve loss at step S (interpolated), e.g. to compare early
learning when the final numbers are still to come.
"""
from __future__ import annotations

import argparse
import statistics
import sys

from bench.report.claims import arm_stats, curve_points
from bench.report.sections import flat_config
from bench.report.stats import effect_from, interp
from bench.tracking.records import RunRecord, reading_store

DEFAULT_AFTER = "sqlite:///results/reference/moe-bench.db"


def setting_changes(before: list[RunRecord], after: list[RunRecord]) -> list[str]:
    """'key old -> new' for settings every run of a side agrees on and the two sides differ in."""
    def agreed(records: list[RunRecord]) -> dict[str, str]:
        flats = [flat_config(r.config) for r in records]
        keys = set.intersection(*(set(f) for f in flats)) if flats else set()
        return {k: repr(flats[0][k]) for k in keys if len({repr(f[k]) for f in flats}) == 1}

    old, new = agreed(before), agreed(after)
    return [f"{k} {old[k]} -> {new[k]}" for k in sorted(old.keys() & new.keys()) if old[k] != new[k]]


def _fmt_mean(values: list[float]) -> str:
    if not values:
        return "-"
    sd = f" +- {statistics.stdev(values):.3g}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.4g}{sd}"


def compare(group: str, before_url: str, after_url: str, metrics: list[str], at_step: int | None) -> list[str]:
    before = reading_store(before_url).list(group=group)
    after = reading_store(after_url).list(group=group)
    old, new = arm_stats(before), arm_stats(after)
    if not old or not new:
        side = before_url if not old else after_url
        raise SystemExit(f"no finished runs of group {group} in {side}")
    arms = [a for a in old if a in new]
    changes = {arm: "; ".join(setting_changes(old[arm].records, new[arm].records)) or "same settings" for arm in arms}
    lines = [f"{group}: after ({after_url}) - before ({before_url}), paired by seed, 95% CI"]
    if len(set(changes.values())) == 1:
        lines.append(f"settings, every arm: {changes[arms[0]]}")
    else:
        lines += [f"settings, {arm}: {changes[arm]}" for arm in arms]
    lines.append(f"{'arm':<18} {'metric':<22} {'seeds':>5}  {'before':<17} {'after':<17} after - before")
    for arm in arms:
        for metric in metrics + ([f"val loss at step {at_step}"] if at_step is not None else []):
            if at_step is not None and metric == f"val loss at step {at_step}":
                a = {r.seed: interp(curve_points(r), at_step) for r in old[arm].records if curve_points(r)}
                b = {r.seed: interp(curve_points(r), at_step) for r in new[arm].records if curve_points(r)}
            else:
                a, b = old[arm].by_seed(metric), new[arm].by_seed(metric)
            effect = effect_from({s: b[s] - a[s] for s in b if s in a})
            if effect.n_seeds == 0:
                cell = "no paired seeds yet"
            elif effect.n_seeds < 2:  # no interval from one seed
                cell = f"{effect.estimate:+.4g} (1 seed)"
            else:
                cell = f"{effect.estimate:+.4g} [{effect.ci_low:+.4g}, {effect.ci_high:+.4g}]"
            lines.append(f"{arm:<18} {metric:<22} {effect.n_seeds:>5}  {_fmt_mean(list(a.values())):<17} "
                         f"{_fmt_mean(list(b.values())):<17} {cell}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("group", help="the records' group, repro-PLAN-TIER")
    p.add_argument("--before", required=True, help="store URL of the earlier design's runs")
    p.add_argument("--after", default=DEFAULT_AFTER, help=f"store URL of the new design's runs (default {DEFAULT_AFTER})")
    p.add_argument("--metric", action="append", help="a record metric (val_loss, val_bleu, ...; repeatable; default val_loss)")
    p.add_argument("--at-step", type=int, help="also the evaluation-curve loss at this step")
    args = p.parse_args(argv)
    print("\n".join(compare(args.group, args.before, args.after, args.metric or ["val_loss"], args.at_step)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
