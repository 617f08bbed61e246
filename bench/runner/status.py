"""Where a plan's tier stands, without training anything: ``moe-bench reproduce NAME --status``.

Every (arm, seed) pair as ``reproduce`` would see it now (finished, being trained by a live
process, resumable from a checkpoint, or still to do), the machine time its finished runs took
(``_hours``) and an estimate of what the rest will take (each arm's mean so far, or the mean over all arms
for an arm with no finished run yet), for long reference queues that span several sessions. The
tier overview estimates a plan with no finished run from the tier's pace in hours per training FLOP,
so a plan with a smaller budget (the RNN plans) is not charged a Transformer plan's hours per run.
"""
from __future__ import annotations

from typing import Any

from bench.plans import Plan, all_plans
from bench.runner.arms import plan_runs
from bench.runner.looks import look_seeds
from bench.tracking.records import ResultsStore


def _hours(record) -> float | None:
    """Machine hours: wall time x the share of the machine's cores the run's torch threads used, so
    two 1-thread runs side by side on 2 cores (scripts/reference_queue.sh --workers 2) count as the
    machine time they took together, not twice it. Records without threads/cpus count whole."""
    timings = record.timings or {}
    wall = timings.get("wall_seconds")
    if not isinstance(wall, (int, float)):
        return None
    threads, cpus = timings.get("threads"), timings.get("cpus")
    share = min(1.0, threads / cpus) if isinstance(threads, int) and isinstance(cpus, int) and cpus > 0 else 1.0
    return wall * share / 3600


def plan_status(plan: Plan, tier: str, store: ResultsStore, seeds: int | None = None, arms: list[str] | None = None,
                flops: float | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    look = ""
    if seeds is None and not (arms or flops or extra) and len(plan.tier(tier).looks) > 1:
        seeds, look = look_seeds(plan, tier, store, lambda n: plan_runs(plan, tier, store, n))
    runs = plan_runs(plan, tier, store, seeds, arms, flops, extra)
    training: dict[tuple[str, int], Any] = {}  # the newest running record of each pair: its saved progress
    for r in sorted(store.list(group=plan.group(tier)), key=lambda r: r.started_at):
        if r.status == "running":
            training[(r.extra.get("arm"), r.seed)] = r
    pairs = []
    for r in runs:
        row = {"arm": r.arm.label, "seed": r.seed, "state": "to do", "run_id": None, "val_loss": None, "hours": None}
        if r.done is not None:
            row.update(state="finished", run_id=r.done.run_id, val_loss=r.done.metrics.get("val_loss"),
                       hours=_hours(r.done))
        elif r.busy is not None:
            row.update(state="running", by=r.busy)
            now = training.get((r.arm.label, r.seed))
            if now is not None and now.curve:  # as of its last evaluation
                row.update(run_id=now.run_id, steps=now.steps, last_val_loss=now.curve[-1].get("loss"))
                if r.budget.get("kind") == "flops" and r.budget.get("value"):
                    row["done"] = now.train_flops / r.budget["value"]
        elif r.resume is not None:
            row.update(state="resumable", run_id=r.resume.run_id)
        pairs.append(row)
    spent: dict[str, list[float]] = {}
    for p in pairs:
        if p["hours"] is not None:
            spent.setdefault(p["arm"], []).append(p["hours"])
    every = [h for hs in spent.values() for h in hs]
    overall = sum(every) / len(every) if every else None
    left = [sum(spent[p["arm"]]) / len(spent[p["arm"]]) if p["arm"] in spent else overall
            for p in pairs if p["state"] != "finished"]
    return {"plan": plan.name, "tier": tier, "group": plan.group(tier), "pairs": pairs, "looks": look,
            "waiting": [{"arm": a, "why": why} for a, why in runs.waiting],
            "finished": sum(p["state"] == "finished" for p in pairs), "total": len(pairs),
            # with the pairs of arms waiting for an input (a throughput measurement): the tier's whole plan
            "planned": len(pairs) + len(runs.waiting) * len(plan.tier(tier).seed_list(seeds)),
            "budget_flops": flops or plan.tier(tier).budget_flops,
            "hours_spent": sum(every), "hours_left": None if any(h is None for h in left) else sum(left)}


def format_status(status: dict[str, Any]) -> str:
    lines = [f"{status['plan']} tier {status['tier']} (group {status['group']}): {status['finished']} of "
             f"{status['total']} runs finished, {status['hours_spent']:.1f} h of machine time"
             + ("" if status["finished"] == status["total"] else
                f"; ~{status['hours_left']:.1f} h left at the pace of the runs so far" if status["hours_left"] is not None
                else "; time left unknown (no run finished yet)")]
    width = max([len(p["arm"]) for p in status["pairs"]] + [3])
    lines.append(f"{'arm':<{width}}  seed  {'state':<10} {'val_loss':>8}  {'hours':>5}  run / by")
    for p in status["pairs"]:
        loss = f"{p['val_loss']:.4f}" if isinstance(p["val_loss"], (int, float)) else "-"
        hours = f"{p['hours']:.2f}" if p["hours"] is not None else "-"
        who = p.get("by") or p["run_id"] or ""
        if p["state"] == "running" and p.get("steps"):
            done = f"{100 * p['done']:.0f}% of its budget, " if p.get("done") is not None else ""
            who += f"; {done}step {p['steps']}, last val loss {p['last_val_loss']:.4f}"
        if p["state"] == "resumable":
            who += " (continues from its last checkpoint)"
        lines.append(f"{p['arm']:<{width}}  {p['seed']:>4}  {p['state']:<10} {loss:>8}  {hours:>5}  {who}")
    for w in status["waiting"]:
        lines.append(f"waiting: {w['arm']}: {w['why']}")
    if status.get("looks"):
        lines.append(status["looks"])
    return "\n".join(lines)


def tier_overview(tier: str, store: ResultsStore) -> dict[str, Any]:
    """Every shipped plan's state at ``tier`` (``moe-bench reproduce --status`` without a name): runs
    finished of planned, hours spent, hours left. A plan with no finished run yet is estimated from the
    tier's other plans (marked ``estimated_from_others``): at their hours per training FLOP times its
    budget when both have FLOP budgets, else at their mean hours per run."""
    plans = [plan_status(p, tier, store) for p in all_plans().values() if tier in p.tiers]
    hours = [p["hours"] for s in plans for p in s["pairs"] if p["hours"] is not None]
    per_run = sum(hours) / len(hours) if hours else None
    paced = [(p["hours"], s["budget_flops"]) for s in plans if s.get("budget_flops")
             for p in s["pairs"] if p["hours"] is not None]
    per_flop = sum(h for h, _ in paced) / sum(f for _, f in paced) if paced else None
    rows = []
    for s in plans:
        left, guessed = s["hours_left"], False
        if left is None and per_run is not None:
            each = per_flop * s["budget_flops"] if per_flop is not None and s.get("budget_flops") else per_run
            left, guessed = each * (s["planned"] - s["finished"]), True
        running = [f"{p['arm']} seed {p['seed']}" for p in s["pairs"] if p["state"] == "running"]
        running += [f"{w['arm']} waits: {w['why']}" for w in s.get("waiting") or []]
        rows.append({"plan": s["plan"], "finished": s["finished"], "total": s["planned"], "hours_spent": s["hours_spent"],
                     "hours_left": left, "estimated_from_others": guessed, "running": running})
    known = [r["hours_left"] for r in rows if r["hours_left"] is not None]
    return {"tier": tier, "plans": rows, "finished": sum(r["finished"] for r in rows),
            "total": sum(r["total"] for r in rows), "hours_spent": sum(r["hours_spent"] for r in rows),
            "hours_left": sum(known) if len(known) == len(rows) else None, "hours_per_run": per_run,
            "hours_per_flop": per_flop}


def format_overview(overview: dict[str, Any]) -> str:
    width = max([len(r["plan"]) for r in overview["plans"]] + [4])
    lines = [f"tier {overview['tier']}: {overview['finished']} of {overview['total']} runs finished, "
             f"{overview['hours_spent']:.1f} h of machine time"
             + (f"; ~{overview['hours_left']:.1f} h left at the pace of the runs so far" if overview["hours_left"] is not None
                else "; time left unknown (no run of this tier finished yet)"),
             f"{'plan':<{width}}  {'runs':>7}  {'hours':>5}  {'left':>6}  running / waiting"]
    for r in overview["plans"]:
        left = ("done" if r["finished"] == r["total"] else "-" if r["hours_left"] is None
                else f"~{r['hours_left']:.1f}" + ("*" if r["estimated_from_others"] else ""))
        lines.append(f"{r['plan']:<{width}}  {r['finished']:>3}/{r['total']:<3}  {r['hours_spent']:>5.1f}  {left:>6}  "
                     + ", ".join(r["running"]))
    if any(r["estimated_from_others"] for r in overview["plans"]):
        pace = (f"{overview['hours_per_flop'] * 1e14:.2f} h per 1e14 training FLOPs (times the plan's budget)"
                if overview.get("hours_per_flop") is not None else f"{overview['hours_per_run']:.2f} h per run")
        lines.append(f"* no run of the plan finished yet: estimated at the tier's pace so far, {pace}")
    lines.append("moe-bench reproduce NAME --tier TIER --status: one plan's runs, pair by pair")
    return "\n".join(lines)
