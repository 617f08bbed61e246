"""Matched-budget comparisons: several families trained on one task with the same budget.

``moe-bench compare --task T --models dense switch --budget-flops 4e13`` trains each model (and
seed) with the same training-FLOPs budget, groups the runs, and prints one table.
"""
from __future__ import annotations

import statistics
from typing import Any

from bench.tracking.records import ResultsStore, RunRecord, new_run_id
from bench.train.run import train


def compare(task: str, families: list[str], preset: str = "tiny", budget: dict[str, Any] | None = None,
            seeds: int = 1, overrides: list[str] | None = None, storage: str | None = None,
            data_dir: str | None = None, group: str | None = None, progress: bool = True,
            announce=print) -> list[RunRecord]:
    group = group or new_run_id(f"compare-{task}")
    records = []
    for seed in range(seeds):
        for family in families:
            announce(f"[{len(records) + 1}/{len(families) * seeds}] training {family} (seed {seed}) on {task} ...")
            run_id = new_run_id(f"{task}-{family}")
            try:
                records.append(train(task, family, preset, overrides, budget=budget, seed=seed, storage=storage,
                                     data_dir=data_dir, group=group, progress=progress, run_id=run_id,
                                     name=f"{group}: {family}", tags={"comparison": group}))
            except Exception as e:  # one failed model must not lose the others: it is recorded as failed
                record = ResultsStore(storage).get(run_id)
                if record is None:  # failed before it started (bad config): nothing to compare
                    raise
                announce(f"  {family} failed: {type(e).__name__}: {e}")
                records.append(record)
    return records


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_comparison(records: list[RunRecord]) -> str:
    """One row per family (mean over seeds, ± spread when several), best quality marked."""
    if not records:
        return "no runs"
    by_family: dict[str, list[RunRecord]] = {}
    for r in records:
        by_family.setdefault(r.family, []).append(r)
    first = records[0]
    budget = first.budget
    lines = [f"task {first.task}, preset {first.preset}, budget {budget.get('kind')} = {budget.get('value'):.4g}, "
             f"group {first.group}", ""]
    header = (f"{'model':<8} {'seeds':>5} {'active':>9} {'total':>10} {'train FLOP/tok':>14} {'steps':>6} "
              f"{'tokens':>9} {'FLOPs used':>10} {'wall s':>7} {'tok/s':>7} {'val loss':>15} {'quality':>8} "
              f"{'q/active-M':>10}")
    lines.append(header)
    rows = []
    for family, rs in by_family.items():
        failed = [r for r in rs if r.status != "finished"]
        if failed:
            lines.append(f"{family:<8} {len(failed)} run(s) {failed[0].status}: {failed[0].error}")
            rs = [r for r in rs if r.status == "finished"]
            if not rs:
                continue
        losses = [r.metrics.get("val_loss") for r in rs if r.metrics.get("val_loss") is not None]
        mean_loss = statistics.mean(losses) if losses else None
        spread = (max(losses) - min(losses)) / 2 if len(losses) > 1 else None
        loss_txt = _fmt(mean_loss, ".4f") + (f" ±{spread:.4f}" if spread is not None else "")
        quality = statistics.mean(r.metrics.get("quality") or 0 for r in rs)
        qpap = statistics.mean(r.metrics.get("quality_per_active_param") or 0 for r in rs)
        r0 = rs[0]
        rows.append((family, mean_loss))
        lines.append(
            f"{family:<8} {len(rs):>5} {r0.params.get('active', 0):>9,} {r0.params.get('total', 0):>10,} "
            f"{r0.flops.get('train_per_token', 0):>14.4g} {statistics.mean(r.steps for r in rs):>6.0f} "
            f"{statistics.mean(r.tokens_seen for r in rs):>9.3g} {statistics.mean(r.train_flops for r in rs):>10.3g} "
            f"{statistics.mean(r.timings.get('wall_seconds', 0) for r in rs):>7.0f} "
            f"{statistics.mean(r.timings.get('tokens_per_second', 0) for r in rs):>7.0f} {loss_txt:>15} "
            f"{quality:>8.4f} {qpap:>10.4f}")
    baseline = first.metrics.get("unigram_baseline_val_loss")
    if baseline is not None:
        lines.append(f"\n(unigram baseline val loss: {baseline:.4f}; quality = exp(-val loss) = 1/perplexity)")
    scored = [(loss, fam) for fam, loss in rows if loss is not None]
    if len(scored) > 1:
        scored.sort()
        (best, fam), (second, fam2) = scored[0], scored[1]
        lines.append(f"lowest val loss: {fam} ({best:.4f}), {second - best:.4f} nats below {fam2} at the same budget")
    return "\n".join(lines)
