"""`moe-bench report`: the reproductions in the results store, beside the papers, as Markdown + plots.

    write_report(storage=None, out_dir="results") -> Path of REPORT.md (claims.json beside it)

Plots go to ``<out_dir>/plots/`` as PNG and interactive HTML (one shared local plotly.min.js).
Everything comes from the store, so the committed store regenerates the committed report.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
from collections import Counter
from pathlib import Path

from bench.plans import Plan, all_plans
from bench.report import stats
from bench.tracking.records import ResultsStore, RunRecord, is_throughput, reading_store

VERDICT_MARK = {"reproduced": "**reproduced**", "refuted": "**refuted**", "no-effect": "**no effect beyond delta**",
                "inconclusive": "inconclusive", "no-data": "no data"}
TIER_ORDER = ("tiny", "ref", "small", "base")


def add_q_values(claims_json: list[dict]) -> None:
    """Each claim's Benjamini-Hochberg q (``q_value``) over the tested claims of its tier."""
    for tier in dict.fromkeys(c["tier"] for c in claims_json):
        members = [c for c in claims_json if c["tier"] == tier]
        for c, q in zip(members, stats.bh_q_values([c.get("p_value") for c in members])):
            c["q_value"] = q


def fdr_notes(claims_json: list[dict]) -> list[str]:
    """Per tier, whether its reproduced / refuted verdicts survive a 5% false-discovery rate."""
    notes = []
    for tier in dict.fromkeys(c["tier"] for c in claims_json):
        members = [c for c in claims_json if c["tier"] == tier]
        tested = sum(c.get("p_value") is not None for c in members)
        decided = [c for c in members if c["verdict"] in (stats.REPRODUCED, stats.REFUTED)]
        if not decided:
            continue
        weak = [c for c in decided if c.get("q_value") is None or c["q_value"] >= 0.05]
        text = (f"Many claims, one tier: at tier `{tier}`, {len(decided) - len(weak)} of {len(decided)} reproduced / "
                f"refuted verdicts keep a Benjamini-Hochberg q below 0.05 over the tier's {tested} tested claims "
                "(`q_value` in claims.json), i.e. survive a 5% false-discovery rate")
        if weak:
            text += "; these do not, so read them as weaker evidence: " + "; ".join(
                f"{c['reproduction']}: {c['claim']} (q {c['q_value']:.2g})" if c.get("q_value") is not None
                else f"{c['reproduction']}: {c['claim']} (no test)" for c in weak)
        notes.append(text + ".")
    return notes


def verdict_cell(verdict: str, seeds_to_decide: int | None = None, metric: str = "",
                 looks: list[int] | None = None, n_seeds: int = 0, spread_known: bool = False) -> str:
    """A verdict for a table; an inconclusive one says how many paired seeds (speed claims: repeats
    of the throughput measurement) would decide it at the observed mean and spread (a projection,
    see bench.report.stats.seeds_to_decide), or, when the claim has a spread (``spread_known``) but
    no count up to stats.MAX_SEEDS_TO_DECIDE would do, that more would be needed. A tier with
    sequential ``looks`` that has not reached its last one marks the verdict interim: the claim is
    judged at the last look."""
    mark = VERDICT_MARK[verdict]
    if looks and 0 < n_seeds < looks[-1]:
        return f"{mark} (interim: {n_seeds} of {looks[-1]} seeds)"
    if verdict != "inconclusive":
        return mark
    unit = "repeats" if metric == "tokens_per_second" else "seeds"
    if seeds_to_decide:
        return f"{mark} (~{seeds_to_decide} {unit} to decide)"
    if spread_known and n_seeds >= 2:
        return f"{mark} (over {stats.MAX_SEEDS_TO_DECIDE} {unit} to decide)"
    return mark


def _tagged_budget(r: RunRecord) -> float | None:
    """The plan's FLOP budget a run belongs to: its tag (runs since the tag exists), else its
    own budget when that is in FLOPs; None for an untagged tokens-budget arm (dense-wide)."""
    tagged = r.extra.get("budget_flops")
    if tagged is not None:
        return float(tagged)
    if r.budget.get("kind") == "flops" and r.budget.get("value") is not None:
        return float(r.budget["value"])
    return None


def run_tier(r: RunRecord) -> str:
    """The plan tier a run belongs to: its tag, else its model preset (tiers named after one)."""
    return r.extra.get("tier") or r.preset


def reproduction_records(store: ResultsStore, plans: dict[str, Plan]) -> dict[tuple[str, str, float], list[RunRecord]]:
    """(plan, tier, training-FLOPs budget) -> its records, from the run tags written by the runner.
    Runs at another budget (``--budget-flops``) are another comparison: mixing them would compare
    arms at unequal compute and let one budget's seed replace the other's."""
    by_tier: dict[tuple[str, str], list[RunRecord]] = {}
    for r in store.list():
        name = r.extra.get("reproduction")
        if name in plans and run_tier(r) in plans[name].tiers and not is_throughput(r):
            by_tier.setdefault((name, run_tier(r)), []).append(r)
    out: dict[tuple[str, str, float], list[RunRecord]] = {}
    for (name, tier), records in by_tier.items():
        default = float(plans[name].tiers[tier].budget_flops)
        known = {b for b in map(_tagged_budget, records) if b is not None}
        # Untagged tokens-budget runs predate the tag; they belong with the default budget if any run has it.
        fallback = default if default in known or not known else min(known)
        for r in records:
            budget = _tagged_budget(r)
            out.setdefault((name, tier, fallback if budget is None else budget), []).append(r)
    return out


def throughput_records(store: ResultsStore) -> dict[tuple[str, str], list[RunRecord]]:
    """(plan, tier) -> its quiet throughput measurements (``bench.throughput``)."""
    by_tier: dict[tuple[str, str], list[RunRecord]] = {}
    for r in store.list():
        if is_throughput(r):
            by_tier.setdefault((r.extra.get("reproduction"), run_tier(r)), []).append(r)
    return by_tier


def _users_plans(store: ResultsStore, known: dict[str, Plan]) -> dict[str, Plan]:
    """Plans of a user's own that runs in the store were made with (their ``plan_file`` tag), where
    the file is still there; a missing file is skipped (pass it with ``--plan``)."""
    from bench.config import ConfigError
    from bench.plans import load_plan

    found = {}
    for path in {r.extra.get("plan_file") for r in store.list() if r.extra.get("plan_file")}:
        try:
            plan = load_plan(path)
        except ConfigError:
            continue
        if plan.name not in known:
            found[plan.name] = plan
    return found


def _progress_note(s) -> str:
    """For a tier at its planned budget with fewer runs than planned (a queue still going, or a
    deliberate --seeds N): how far it is, and the command that trains the rest."""
    from bench.report.sections import is_default_budget, plan_argument

    tier = s.plan.tier(s.tier)
    planned = len(s.plan.tier_arms(s.tier)) * tier.seeds
    done = sum(a.n for a in s.arms.values())
    if not is_default_budget(s) or done >= planned:
        return ""
    return (f" **Incomplete:** {done} of the tier's {planned} runs ({tier.seeds} seeds per arm); "
            f"`moe-bench reproduce {plan_argument(s.plan)} --tier {s.tier}` trains the rest (finished runs are skipped).")


def format_effect(estimate: float | None, ci_low: float | None, ci_high: float | None, digits: int = 4) -> str:
    """``+est [low, high]``; ``+est (1 seed)`` without an interval; ``-`` without an estimate."""
    if estimate is None:
        return "-"
    if ci_low is None or ci_high is None or not (math.isfinite(ci_low) and math.isfinite(ci_high)):
        return f"{estimate:+.{digits}g} (1 seed)"
    return f"{estimate:+.{digits}g} [{ci_low:+.{digits}g}, {ci_high:+.{digits}g}]"


def _interval(c) -> str:
    return format_effect(c.effect.estimate, c.effect.ci_low, c.effect.ci_high)


def write_report(storage: str | None = None, out_dir: str | Path = "results", plots: bool = True,
                 plans: dict[str, Plan] | None = None) -> Path:
    """REPORT.md, claims.json and plots/ from the store; ``plans`` defaults to the shipped ones."""
    from bench.report.sections import (add_cross_budget_notes, arms_table, build_section, is_default_budget,
                                       reproduce_command, section_budget)

    plans = plans if plans is not None else all_plans()
    store = reading_store(storage)  # read-only: a shipped or shared store on read-only media works
    plans = {**plans, **_users_plans(store, plans)}
    out_dir = Path(out_dir)
    plot_dir = out_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    if plots:
        plot_dir.mkdir(parents=True, exist_ok=True)
    found = reproduction_records(store, plans)
    speeds = throughput_records(store)
    sections = []
    for name, plan in plans.items():
        tiers = sorted(plan.tiers, key=lambda t: (TIER_ORDER.index(t) if t in TIER_ORDER else len(TIER_ORDER), t))
        for tier in tiers:
            for budget in sorted(b for n, t, b in found if (n, t) == (name, tier)):
                sections.append(build_section(plan, tier, found[(name, tier, budget)],
                                              plot_dir if plots else None, budget=budget,
                                              throughput=speeds.get((name, tier))))
    add_cross_budget_notes(sections)

    claims_json = [c.as_json(s.plan.name, s.tier, section_budget(s)) for s in sections for c in s.claims]
    add_q_values(claims_json)
    (out_dir / "claims.json").write_text(json.dumps(claims_json, indent=1, allow_nan=False) + "\n", encoding="utf-8")

    commits = Counter((r.git_commit or "unknown")[:12] for recs in found.values() for r in recs)
    n_runs = sum(len(v) for v in found.values())
    lines = ["# moe-bench: paper reproductions", "",
             f"Generated by `moe-bench report --storage {store.url}` from {n_runs} recorded runs "
             f"(code commit(s): {', '.join(f'{c} ({n})' for c, n in commits.most_common())}) on "
             f"{_dt.date.today().isoformat()}. Every number below comes from the results store; re-running the "
             "command regenerates this file, `claims.json` and `plots/`.", "",
             "How to read it: each plan trains its arms with the same training-FLOPs budget (unless noted) over "
             "several seeds; a seed fixes the initialisation and the data order of every arm, so runs with the same "
             "seed are pairs. Each claim is an **effect in the paper's direction** (positive = as the paper says; "
             "e.g. the dense loss minus the Switch loss, in nats), the mean over paired seeds with a 95% Student-t "
             "interval; trends are least-squares slopes per seed (per doubling of the expert count), averaged the "
             "same way. Verdicts: **reproduced** (interval above 0), **refuted** (below 0), **no effect beyond "
             "delta** (inside +-delta, the smallest effect that matters, stated per claim), **inconclusive** "
             "otherwise. Step speed-ups and equal-time losses compare evaluation curves with evaluation curves (one "
             "evaluation set). Absolute numbers are not comparable with the papers' (character-level Tiny "
             "Shakespeare / Multi30k on a 2-core CPU vs C4 and 1B-Word on TPU clusters).", ""]
    if not sections:
        lines += ["No reproduction runs in this store yet: run `moe-bench reproduce NAME` "
                  f"(one of {', '.join(plans)})."]
    else:
        lines += ["## Summary", "", "| plan | tier | training FLOPs/run | runs | claim | effect [95% CI] | seeds | "
                  "verdict |", "|---|---|---|---|---|---|---|---|"]
        for s in sections:
            for c in s.claims:
                lines.append(f"| {s.plan.name} | {s.tier} | {section_budget(s):.3g} | "
                             f"{sum(a.n for a in s.arms.values())} | {c.claim.text} | {_interval(c)} | "
                             f"{c.effect.n_seeds} | {verdict_cell(c.verdict, c.seeds_to_decide, c.claim.metric, c.looks_run, c.effect.n_seeds, c.effect.sd is not None)} |")
        lines += ["", *fdr_notes(claims_json), ""]
        present = {name for name, _, _ in found}
        missing = [n for n in plans if n not in present]
        if missing:
            lines += [f"Not in this store yet: {', '.join(f'`{n}`' for n in missing)} (run "
                      "`moe-bench reproduce NAME --tier tiny`, then this command again).", ""]
    for s in sections:
        p = s.plan
        seeds = max((a.n for a in s.arms.values()), default=0)
        budget = "" if is_default_budget(s) else f", budget {section_budget(s):.3g} training FLOPs"
        tier = p.tier(s.tier)
        lines += [f"## {p.title} — `{p.name}`, tier `{s.tier}`{budget}", "",
                  f"Task `{p.task}`; model preset `{tier.preset}`; baseline `{p.baseline}`; {seeds} seed(s)"
                  + (f" ({tier.note})" if tier.note else "") + f". Reproduce with `{reproduce_command(s)}`, then "
                  f"`moe-bench report`.{_progress_note(s)}", "", *arms_table(s), "",
                  "Claims (effect in the paper's direction, 95% CI over paired seeds):", ""]
        for c in s.claims:
            lines.append(f"- {VERDICT_MARK[c.verdict]}: {c.claim.text}. *Paper:* {c.claim.paper}. "
                         f"*Ours:* {c.evidence}.")
        lines += ["", *s.notes, ""]
        for caption, files in s.plots:
            png = next((f for f in files if f.suffix == ".png"), None)
            html = next((f for f in files if f.suffix == ".html"), None)
            if png is not None:
                lines.append(f"![{caption}]({png.relative_to(out_dir).as_posix()})")
            if html is not None:
                lines.append(f"[{caption} — interactive]({html.relative_to(out_dir).as_posix()})")
            lines.append("")
    path = out_dir / "REPORT.md"
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return path


__all__ = ["write_report", "reproduction_records", "run_tier"]
