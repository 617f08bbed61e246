"""The short table printed after `moe-bench reproduce`: arms (mean ± sd over seeds) and claims (95% CI)."""
from __future__ import annotations

from bench.plans import Plan
from bench.report.claims import add_paired_metrics, arm_stats, evaluate_claim
from bench.tracking.records import RunRecord


def format_plan_results(plan: Plan, tier: str, records: list[RunRecord]) -> str:
    arms = arm_stats(records, [a.label for a in plan.arms])
    add_paired_metrics(arms, plan.baseline)
    bleu = any(a.mean("val_bleu") is not None for a in arms.values())
    key, name = ("val_bleu", "val BLEU") if bleu else ("val_loss", "val loss")
    width = max([len(label) for label in arms] + [3])
    lines = [f"{plan.title} (tier {tier})",
             f"{'arm':<{width}} {'seeds':>5} {name + ' (mean ± sd)':>22} {'active params':>14} {'total params':>13} "
             f"{'train MFLOP/token':>17} {'tokens':>7} {'tokens/s':>9}"]
    for label, a in arms.items():
        mean, sd = a.mean(key), a.sd(key)
        value = "-" if mean is None else f"{mean:.4f}" + (f" ± {sd:.4f}" if sd is not None else "")
        tps, r = a.mean("tokens_per_second"), a.first
        lines.append(f"{label:<{width}} {a.n:>5} {value:>22} {r.params.get('active', 0):>14,} "
                     f"{r.params.get('total', 0):>13,} {(r.flops.get('train_per_token') or 0) / 1e6:>17.2f} "
                     f"{(a.mean('tokens') or 0) / 1e6:>6.2f}M {'-' if tps is None else format(tps, ',.0f'):>9}")
    for r in records:
        if r.status == "failed":
            lines.append(f"{r.extra.get('arm', r.family)} (seed {r.seed}) failed: {r.error}")
    results = [evaluate_claim(c, arms) for c in plan.claims if all(x in arms for x in c.arms() if x)]
    if results:
        lines += ["", "Claims (effect in the paper's direction, mean over paired seeds, 95% CI):"]
        for r in results:
            e = r.effect
            if e.estimate is None:
                effect = "no paired seeds"
            elif e.n_seeds < 2:
                effect = f"{e.estimate:+.4g} (1 seed: no interval; run more seeds)"
            else:
                effect = f"{e.estimate:+.4g} [{e.ci_low:+.4g}, {e.ci_high:+.4g}], {e.n_seeds} seeds"
            lines.append(f"  {r.verdict:<12} {r.claim.text}: {effect}")
        if any(r.verdict == "inconclusive" for r in results):
            lines.append("  inconclusive = not resolved at this budget and number of seeds: the interval holds both 0 "
                         "and effects larger than the claim's delta. More seeds (--seeds) or a longer tier "
                         "(--tier ref) decide it; results/REPORT.md has the reference tier's answers.")
    return "\n".join(lines)


__all__ = ["format_plan_results"]
