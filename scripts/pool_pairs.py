"""One comparison (arm A vs arm B) replicated in several plan tiers, pooled over every paired seed.

A plan that re-runs another's pair with fresh seeds (e.g. `switch-lr`'s lr 2e-3 arms re-run
`switch-vs-dense`'s dense vs Switch cf 1.25 at seeds 1000-1002) is a replication: each group's
effect is printed alone, then the pooled effect over all their seeds (bench.report.stats, as the
report). Pooling is refused when a seed appears in two groups (plans that share runs, such as
`switch-vs-dense` and `switch-experts`, are not independent evidence) and the settings in which
the groups' arms differ are listed, so you can judge whether they are the same experiment.

    .venv/bin/python scripts/pool_pairs.py --metric val_loss --lower-better \\
        --pair repro-switch-vs-dense-ref "switch cf=1.25" dense \\
        --pair repro-switch-lr-ref "switch lr 2e-3" "dense lr 2e-3"

Effects are A's gain over B: B - A for a metric where lower is better, A - B otherwise.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from bench.report.claims import arm_stats
from bench.report.sections import flat_config
from bench.report.stats import Effect, effect_from
from bench.tracking.records import RunRecord, reading_store

DEFAULT_STORE = "sqlite:///results/reference/moe-bench.db"
# Settings that name a run or depend on where and when it ran, not what it trained.
IGNORED = ("seed", "name", "group", "tags", "run_id", "save_dir", "wandb", "storage")


@dataclass
class Pair:
    group: str
    a: str
    b: str


def _fmt(effect: Effect) -> str:
    if effect.n_seeds == 0:
        return "no paired seeds"
    if effect.n_seeds < 2:
        return f"{effect.estimate:+.4g} (1 seed, no interval)"
    return f"{effect.estimate:+.4g} [{effect.ci_low:+.4g}, {effect.ci_high:+.4g}] over {effect.n_seeds} seeds (p {effect.p_value:.2g})"


def _settings(records: list[RunRecord]) -> dict[str, str]:
    """The flattened settings every record agrees on (those that vary by seed are left out)."""
    flats = [{k: repr(v) for k, v in flat_config(r.config).items() if not any(part in IGNORED for part in k.split("."))}
             for r in records]
    keys = set.intersection(*(set(f) for f in flats)) if flats else set()
    return {k: flats[0][k] for k in keys if len({f[k] for f in flats}) == 1}


def setting_differences(sides: list[tuple[str, list[RunRecord]]]) -> list[str]:
    """'key: label1=v1, label2=v2' for settings the sides both record and disagree on."""
    agreed = [(label, _settings(records)) for label, records in sides]
    keys = set.intersection(*(set(s) for _, s in agreed)) if agreed else set()
    return [f"{k}: " + "; ".join(f"{label}: {s[k]}" for label, s in agreed)
            for k in sorted(keys) if len({s[k] for _, s in agreed}) > 1]


def pool(pairs: list[Pair], store_url: str, metric: str, lower_better: bool) -> list[str]:
    store = reading_store(store_url)
    sign = -1.0 if lower_better else 1.0
    lines = [f"{metric}: A's gain over B ({'B - A' if lower_better else 'A - B'}), paired by seed, 95% CI"]
    pooled: dict[tuple[str, int], float] = {}
    seen: dict[int, str] = {}
    sides: list[tuple[str, list[RunRecord]]] = []
    for pair in pairs:
        arms = arm_stats(store.list(group=pair.group))
        missing = [arm for arm in (pair.a, pair.b) if arm not in arms]
        if missing:
            known = ", ".join(sorted(arms)) or "none"
            raise SystemExit(f"{pair.group} has no finished runs of arm(s) {', '.join(missing)} in {store_url} "
                             f"(its arms: {known})")
        a, b = arms[pair.a].by_seed(metric), arms[pair.b].by_seed(metric)
        per_seed = {s: sign * (a[s] - b[s]) for s in a if s in b}
        for s in per_seed:
            if s in seen:
                raise SystemExit(f"seed {s} is in both {seen[s]} and {pair.group}: runs that share a seed (or are "
                                 f"shared between plans) are not independent replications; pool disjoint seeds only")
            seen[s] = pair.group
            pooled[(pair.group, s)] = per_seed[s]
        lines.append(f"{pair.group}: {pair.a} vs {pair.b}: {_fmt(effect_from(per_seed))}")
        lines.append("  per seed: " + ", ".join(f"{s}: {v:+.4g}" for s, v in sorted(per_seed.items())))
        sides += [(f"{pair.group}/{pair.a}", arms[pair.a].records), (f"{pair.group}/{pair.b}", arms[pair.b].records)]
    if len(pairs) > 1:
        by_index = {i: v for i, v in enumerate(pooled.values())}
        lines.append(f"pooled: {_fmt(effect_from(by_index))}")
        same_role = [[sides[i] for i in range(role, len(sides), 2)] for role in (0, 1)]
        diffs = [d for side in same_role for d in setting_differences(side)]
        lines.append("settings that differ between the groups' A (or B) arms: " + ("none" if not diffs else ""))
        lines += [f"  {d}" for d in diffs]
        lines += [f"  trained by {label}: {_how_trained(records)}" for label, records in sides[::2]]
    return lines


def _how_trained(records: list[RunRecord]) -> str:
    """Thread counts and code commits: float rounding differs between thread counts, and code
    changes that keep the settings may still change the numbers."""
    threads = sorted({str(r.timings.get("threads", "?")) for r in records})
    commits = sorted({(r.git_commit or "?")[:7] for r in records})
    return f"threads {'/'.join(threads)} (? = not recorded), code {', '.join(commits)}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", nargs=3, action="append", required=True, metavar=("GROUP", "A", "B"),
                   help="a group (repro-PLAN-TIER) and its two arm labels; repeat for each replication")
    p.add_argument("--metric", default="val_loss", help="a record metric (default val_loss)")
    p.add_argument("--lower-better", action="store_true", help="the metric is a loss (the gain is B - A)")
    p.add_argument("--storage", default=DEFAULT_STORE, help=f"store URL (default {DEFAULT_STORE})")
    args = p.parse_args(argv)
    print("\n".join(pool([Pair(*p) for p in args.pair], args.storage, args.metric, args.lower_better)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
