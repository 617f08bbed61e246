"""The short table printed after `moe-bench reproduce`/`compare`: arms (mean ± sd over seeds) and
claims (95% CI); ``plan_tables`` gives the same numbers as columns and rows (for W&B tables)."""
from __future__ import annotations

from bench.plans import Plan
from bench.report.claims import add_paired_metrics, arm_stats, evaluate_claim, throughput_arms
from bench.tracking.records import RunRecord, is_throughput


ARM_COLUMNS = ["arm", "seeds", "metric", "mean", "sd", "active_params", "total_params", "train_flops_per_token",
               "tokens", "tokens_per_second"]
CLAIM_COLUMNS = ["claim", "verdict", "effect", "ci_low", "ci_high", "seeds", "evidence"]
RUN_COLUMNS = ["arm", "seed", "run_id", "status", "val_loss", "quality", "train_flops", "tokens_seen", "wall_seconds",
               "error"]


def plan_tables(plan: Plan, records: list[RunRecord]) -> dict[str, tuple[list[str], list[list]]]:
    """The arms (mean and sd over seeds), the claims (paired effect, 95% CI, verdict) and the runs.
    Quiet throughput measurements among ``records`` judge the tokens/s claims (``throughput_arms``)."""
    speed_arms = throughput_arms(records)
    records = [r for r in records if not is_throughput(r)]
    arms = arm_stats(records, [a.label for a in plan.arms])
    add_paired_metrics(arms, plan.baseline)
    bleu = any(a.mean("val_bleu") is not None for a in arms.values())
    key = "val_bleu" if bleu else "val_loss"
    arm_rows = []
    for label, a in arms.items():
        r = a.first
        arm_rows.append([label, a.n, key, a.mean(key), a.sd(key), r.params.get("active", 0), r.params.get("total", 0),
                         r.flops.get("train_per_token") or 0, a.mean("tokens") or 0, a.mean("tokens_per_second")])
    claim_rows = []
    for result in (evaluate_claim(c, arms, speed_arms) for c in plan.claims
                   if all(x in arms for x in c.arms() if x)):
        e = result.effect
        claim_rows.append([result.claim.text, result.verdict, e.estimate, e.ci_low, e.ci_high, e.n_seeds,
                           result.evidence])
    run_rows = []
    for r in records:
        s = r.summary()
        run_rows.append([r.extra.get("arm", r.family), r.seed, r.run_id, r.status, s.get("val_loss"), s.get("quality"),
                         r.train_flops, r.tokens_seen, s.get("wall_seconds"), r.error])
    return {"arms": (ARM_COLUMNS, arm_rows), "claims": (CLAIM_COLUMNS, claim_rows), "runs": (RUN_COLUMNS, run_rows)}


def format_plan_results(plan: Plan, tier: str, records: list[RunRecord]) -> str:
    tables = plan_tables(plan, records)
    arm_rows, claim_rows = tables["arms"][1], tables["claims"][1]
    name = "val BLEU" if arm_rows and arm_rows[0][2] == "val_bleu" else "val loss"
    width = max([len(row[0]) for row in arm_rows] + [3])
    lines = [f"{plan.title} (tier {tier})",
             f"{'arm':<{width}} {'seeds':>5} {name + ' (mean ± sd)':>22} {'active params':>14} {'total params':>13} "
             f"{'train MFLOP/token':>17} {'tokens':>7} {'tokens/s':>9}"]
    for label, n, _, mean, sd, active, total, flops, tokens, tps in arm_rows:
        value = "-" if mean is None else f"{mean:.4f}" + (f" ± {sd:.4f}" if sd is not None else "")
        lines.append(f"{label:<{width}} {n:>5} {value:>22} {active:>14,} {total:>13,} {flops / 1e6:>17.2f} "
                     f"{tokens / 1e6:>6.2f}M {'-' if tps is None else format(tps, ',.0f'):>9}")
    for r in records:
        if r.status == "failed" and not is_throughput(r):
            lines.append(f"{r.extra.get('arm', r.family)} (seed {r.seed}) failed: {r.error}")
    if claim_rows:
        lines += ["", "Claims (effect in the paper's direction, mean over paired seeds, 95% CI):"]
        for text, verdict, estimate, low, high, n_seeds, evidence in claim_rows:
            if estimate is None:
                effect = evidence if n_seeds == 0 else "no paired seeds"
            elif n_seeds < 2:
                effect = f"{estimate:+.4g} (1 seed: no interval; run more seeds)"
            else:
                effect = f"{estimate:+.4g} [{low:+.4g}, {high:+.4g}], {n_seeds} seeds"
            lines.append(f"  {verdict:<12} {text}: {effect}")
        if any(row[1] == "inconclusive" for row in claim_rows):
            lines.append("  inconclusive = not resolved at this budget and number of seeds: the interval holds both 0 "
                         "and effects larger than the claim's delta. More seeds (--seeds) or a longer tier "
                         "(--tier ref) decide it; results/REPORT.md has the reference tier's answers.")
    return "\n".join(lines)


__all__ = ["format_plan_results", "plan_tables"]
