"""Sequential looks: a tier with ``looks`` (e.g. [5, 10]) trains its seeds look by look, and stops at
the first look whose pairs have all finished and whose headline claims are all decided (reproduced,
refuted or within delta: ``bench.report.claims.undecided``), so seeds that cannot change a verdict
are not trained. The report states the rule's false-verdict rate under no effect."""
from __future__ import annotations

from typing import Callable

from bench.plans import Plan
from bench.report import throughput_records
from bench.report.claims import undecided
from bench.report.sections import build_section
from bench.tracking.records import ResultsStore


def _seeds(plan: Plan, tier: str, n: int) -> str:
    seeds = plan.tier(tier).seed_list(n)
    return f"seeds {seeds[0]}-{seeds[-1]}" if len(seeds) > 1 else f"seed {seeds[0]}"


def look_seeds(plan: Plan, tier: str, store: ResultsStore, runs_at: Callable[[int], list]) -> tuple[int, str]:
    """How many seeds the tier trains now, and why. ``runs_at(n)``: the tier's planned runs
    (``bench.runner.arms.plan_runs``) for its first n seeds."""
    looks = plan.tier(tier).looks
    throughput = throughput_records(store).get((plan.name, tier), [])
    still_open: list[str] = []
    for i, n in enumerate(looks[:-1]):
        runs = runs_at(n)
        busy = sum(r.done is None and r.busy is not None for r in runs)
        if busy and not any(r.done is None and r.busy is None for r in runs):
            return n, (f"look {i + 1} ({_seeds(plan, tier, n)}) waits for {busy} run(s) other processes are training; "
                       "the one that completes the look decides whether the tier goes on")
        if getattr(runs, "waiting", None) or any(r.done is None for r in runs):
            return n, (f"looks at {', '.join(map(str, looks))} seeds: look {i + 1} ({_seeds(plan, tier, n)}) first; "
                       "more seeds only if a headline claim is undecided there")
        section = build_section(plan, tier, [r.done for r in runs], plot_dir=None, throughput=throughput)
        still_open = [f"{c.claim.text} ({c.verdict})" for c in undecided(section.claims)]
        if not still_open:
            return n, (f"look {i + 1} of {len(looks)}: every headline claim is decided at {n} paired seeds, so the "
                       f"tier stops there ({looks[-1] - n} of its {looks[-1]} seeds not trained)")
    last = looks[-1]
    if len(looks) < 2:
        return last, ""
    return last, (f"look {len(looks) - 1} of {len(looks)} ({looks[-2]} seeds) left {len(still_open)} headline "
                  f"claim(s) undecided ({'; '.join(still_open)}): training up to {last} seeds "
                  f"({_seeds(plan, tier, last)})")
