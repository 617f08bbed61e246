"""One report section per plan tier and budget: setup, per-arm table, claims with intervals, plots."""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from bench.plans import PLANS_DIR, Claim, Plan
from bench.report.claims import (ArmStats, ClaimResult, add_paired_metrics, arm_stats, evaluate_claim, fmt,
                                 throughput_arms, undecided)
from bench.report.stats import interp
from bench.tracking.records import RunRecord, throughput_by_arm


@dataclass
class Section:
    plan: Plan
    tier: str
    arms: dict[str, ArmStats]
    budget: float | None = None  # training FLOPs per run; None = the tier's budget
    claims: list[ClaimResult] = field(default_factory=list)
    plots: list[tuple[str, list[Path]]] = field(default_factory=list)  # (caption, files)
    notes: list[str] = field(default_factory=list)

    @property
    def translation(self) -> bool:
        return "bleu" in " ".join(c.metric for c in self.plan.claims) or self.plan.task.startswith(("multi30k", "wmt"))


def build_section(plan: Plan, tier: str, records: list[RunRecord], plot_dir: Path | None,
                  budget: float | None = None, throughput: list[RunRecord] | None = None) -> Section:
    """``records`` must share one budget (``budget``, default the tier's): arms are compared as matched.
    ``throughput``: the tier's quiet throughput measurements (``bench.throughput``)."""
    arms = arm_stats(records, [a.label for a in plan.arms])
    by_arm = throughput_by_arm(throughput or [])
    speed = {arm: statistics.median(v) for arm, v in by_arm.items() if v}
    add_paired_metrics(arms, plan.baseline, speed or None)
    section = Section(plan, tier, arms, budget)
    if any(c.metric == "loss_at_equal_time" for c in plan.claims):
        section.notes.append(_equal_time_note(plan, speed, by_arm))
    speed_arms = throughput_arms(throughput or [])
    # A claim belongs to the tier when the tier trains all its arms (or they were run anyway): a claim
    # on an arm the tier leaves out is listed as untested, not judged "no data".
    in_tier = {a.label for a in plan.tier_arms(tier)} | set(arms)
    tested = [c for c in plan.claims if _testable(c, in_tier)]
    section.claims = [evaluate_claim(c, arms, speed_arms) for c in tested]
    if tier in plan.tiers:
        looks = plan.tiers[tier].looks
        seeds = max((c.effect.n_seeds for c in section.claims), default=0)
        stopped = seeds if seeds in looks[:-1] and not undecided(section.claims) else None
        for result in section.claims:
            result.add_looks(looks, stopped)
    untested = [c for c in plan.claims if c not in tested]
    section.notes.append(_budget_note(section))
    if untested:
        section.notes.append(_untested_note(tier, untested, in_tier))
    for note in (mixed_design_note(records), _gap_trend_note(section), _speed_note(section),
                 _busy_machine_note(plan, records, throughput or []),
                 _machines_note(plan, records), _denormals_note(records), _bleu_settled_note(section)):
        if note:
            section.notes.append(note)
    if plot_dir is not None:
        _plots(section, records, plot_dir)
    return section


def _testable(claim: Claim, arms: set[str]) -> bool:
    """A trend is a slope over whichever of its arms were trained (three at least); a comparison
    needs both of its arms."""
    if claim.kind == "trend":
        return sum(label in arms for label in claim.x) >= 3
    return all(label in arms for label in claim.arms() if label)


def _untested_note(tier: str, claims: list[Claim], in_tier: set[str]) -> str:
    parts = []
    for c in claims:
        missing = ", ".join(sorted({a for a in c.arms() if a and a not in in_tier}))
        parts.append(f"{c.text} (needs {missing})")
    return f"Not tested at tier `{tier}` (the tier does not train an arm they need): " + "; ".join(parts) + "."


def _bleu_settled_note(s: Section) -> str | None:
    """Translation: each arm's BLEU at the last two evaluations (curve_bleu_batches), mean over
    seeds: has BLEU settled by the end of the budget?"""
    parts = []
    for label, arm in s.arms.items():
        pairs = [[p["bleu"] for p in r.curve if p.get("bleu") is not None][-2:] for r in arm.records]
        pairs = [p for p in pairs if len(p) == 2]
        if pairs:
            before, last = (statistics.fmean(p[i] for p in pairs) for i in (0, 1))
            parts.append(f"{label} {before:.2f} → {last:.2f} ({last - before:+.2f})")
    if not parts:
        return None
    return ("BLEU at the last two evaluations (greedy, a fixed subset of the validation split, mean over seeds): "
            + "; ".join(parts) + ". A change of more than about 0.5 BLEU means the models were still improving.")


def _equal_time_note(plan: Plan, speed: dict[str, float], throughput: dict[str, list[float]]) -> str:
    base = plan.baseline
    if base in speed and len(speed) > 1:
        parts = [f"{arm} {tps:,.0f} tokens/s ({tps / speed[base]:.2f}x, {len(throughput[arm])} measurements)"
                 for arm, tps in speed.items()]
        return ("Equal-time losses: each arm's loss after the tokens it trains in the baseline's time, from training "
                "throughput measured together in one quiet process (medians; sparse arms dropless): "
                + "; ".join(parts) + ".")
    return (f"Equal-time losses use each run's own training seconds: no quiet throughput measurement is in the store "
            f"for this tier (run `moe-bench reproduce {plan.name} --tier TIER --throughput`); on a shared machine "
            "those timings drift, so treat the equal-time claim with care.")


def section_budget(s: Section) -> float:
    return s.budget if s.budget is not None else s.plan.tier(s.tier).budget_flops


def is_default_budget(s: Section) -> bool:
    return abs(section_budget(s) / s.plan.tier(s.tier).budget_flops - 1) < 1e-6


def plan_argument(plan: Plan) -> str:
    """How `moe-bench reproduce` names this plan: a shipped plan's name, or a user's plan file."""
    return plan.name if plan.source.startswith(str(PLANS_DIR)) or not plan.source else plan.source


def reproduce_command(s: Section) -> str:
    """The command that (re)makes this section's runs: non-default budgets and arm subsets included."""
    seeds = max((a.n for a in s.arms.values()), default=0)
    cmd = f"moe-bench reproduce {plan_argument(s.plan)} --tier {s.tier}"
    if seeds != s.plan.tier(s.tier).seeds:
        cmd += f" --seeds {seeds}"
    if not is_default_budget(s):
        cmd += f" --budget-flops {section_budget(s):g}"
    if set(s.arms) != {a.label for a in s.plan.tier_arms(s.tier)}:
        cmd += "".join(f' --arm "{label}"' for label in s.arms)
    return cmd


def plot_stem(s: Section) -> str:
    """File-name stem of the section's plots, unique per tier and budget (tiny at its default budget: the name)."""
    stem = s.plan.name if s.tier == "tiny" else f"{s.plan.name}-{s.tier}"
    return stem if is_default_budget(s) else f"{stem}-{section_budget(s):.2g}flops".replace("+", "")


def _budget_note(s: Section) -> str:
    base = s.arms.get(s.plan.baseline)
    budget = section_budget(s)
    text = f"Budget: {budget:.3g} training FLOPs per run"
    if not is_default_budget(s):
        text += f" ({budget / s.plan.tier(s.tier).budget_flops:.3g}x the tier's default {s.plan.tier(s.tier).budget_flops:.3g})"
    if base is None:
        return text + "."
    tokens = base.mean("tokens")
    text += f" ({tokens / 1e6:.2f}M tokens for the baseline, {base.mean('steps'):.0f} steps)."
    drop = final_loss_slope(base.first.curve)
    if drop is not None:
        if drop > 0.005:
            text += (f" The baseline's validation loss was still falling at the end ({100 * drop:.1f}% per 100 steps "
                     "over the last 10% of the run): models are under-trained, and gaps that depend on learning many "
                     "experts (large E, low capacity) would likely change with a larger budget; the papers train "
                     "100k+ steps.")
        else:
            text += " The baseline's loss had flattened by the end of the budget."
    return text


def final_loss_slope(curve: list[dict]) -> float | None:
    """Relative fall of the validation loss per 100 steps (a fraction) over the end of a run: from the last
    evaluation at least max(50 steps, 10% of the run) before the end to the end. The last
    interval alone can be a few steps at the floor of the lr schedule, which reads as flat."""
    points = [p for p in curve if p.get("loss") is not None]
    if len(points) < 2:
        return None
    end = points[-1]
    window = max(50, 0.1 * end["step"])
    earlier = [p for p in points[:-1] if end["step"] - p["step"] >= window] or points[:1]
    ref = earlier[-1]
    steps = max(end["step"] - ref["step"], 1)
    return (ref["loss"] - end["loss"]) / max(ref["loss"], 1e-9) * 100 / steps


def gap_at_half_and_end(arm: ArmStats, base: ArmStats) -> tuple[float, float] | None:
    """Mean over shared seeds of (arm - baseline) validation loss at half of each run and at its end.

    "Half" is half of each run's own steps: the same training FLOPs for FLOP-matched arms (the
    same number of steps), and the same fraction of the budget for arms that take more steps for
    it (an LSTM's cheaper tokens) or fewer (dense-wide runs the baseline's steps at 3.5x FLOPs)."""
    base_by_seed = {r.seed: r for r in base.records}
    half, end = [], []
    for r in arm.records:
        b = base_by_seed.get(r.seed)
        if b is None:
            continue
        mine = sorted((p["step"], p["loss"]) for p in r.curve if p.get("loss") is not None)
        theirs = sorted((p["step"], p["loss"]) for p in b.curve if p.get("loss") is not None)
        if len(mine) < 2 or len(theirs) < 2:
            continue
        half.append(interp(mine, mine[-1][0] / 2) - interp(theirs, theirs[-1][0] / 2))
        end.append(mine[-1][1] - theirs[-1][1])
    if not half:
        return None
    return sum(half) / len(half), sum(end) / len(end)


def _gap_trend_note(s: Section) -> str | None:
    """How the gaps moved over the second half of the budget: the data behind "would a larger
    budget change the picture?" (a widening gap is likely to grow further, a shrinking one may
    close or flip)."""
    base = s.arms.get(s.plan.baseline)
    if base is None:
        return None
    parts = []
    for label, arm in s.arms.items():
        if label == s.plan.baseline:
            continue
        gaps = gap_at_half_and_end(arm, base)
        if gaps is None:
            continue
        h, e = gaps
        if abs(e - h) <= 0.002:
            direction = "steady"
        elif h * e < 0 and min(abs(h), abs(e)) > 0.002:
            direction = "changed sign"
        else:
            direction = "widening" if abs(e) > abs(h) else "narrowing"
        parts.append(f"{label} {h:+.3f} → {e:+.3f} ({direction})")
    if not parts:
        return None
    return (f"Loss gap to {s.plan.baseline} (arm − baseline, mean over seeds, on the intermediate evaluations' "
            "validation batches) at half the budget → at the end: "
            + "; ".join(parts) + ". Gaps still widening at the end would likely grow with a larger budget; "
            "narrowing ones may close or change sign.")


def add_cross_budget_notes(sections: list[Section]) -> None:
    """Where one reproduction ran at several budgets, say in each of its sections how every arm's loss
    gap to the baseline moved with the budget: the measured answer to "would a larger budget change
    the picture?"."""
    by_repro: dict[tuple[str, str], list[Section]] = {}
    for s in sections:
        by_repro.setdefault((s.plan.name, s.tier), []).append(s)
    for group in by_repro.values():
        if len(group) < 2:
            continue
        group = sorted(group, key=section_budget)
        baseline = group[0].plan.baseline

        def loss(s: Section, label: str) -> float | None:
            return s.arms[label].mean("val_loss") if label in s.arms else None

        parts = []
        base_losses = [(section_budget(s), loss(s, baseline)) for s in group if loss(s, baseline) is not None]
        if len(base_losses) >= 2:
            parts.append(f"{baseline} loss " + " → ".join(f"{v:.3f} at {b:.3g}" for b, v in base_losses))
        for label in [a.label for a in group[0].plan.arms if a.label != baseline]:
            gaps = [(section_budget(s), loss(s, label) - loss(s, baseline)) for s in group
                    if loss(s, label) is not None and loss(s, baseline) is not None]
            if len(gaps) >= 2:
                parts.append(f"{label} gap " + " → ".join(f"{g:+.3f} at {b:.3g}" for b, g in gaps))
        if not parts:
            continue
        note = ("Across budgets (validation loss, mean over seeds, training FLOPs per run; arm − baseline): "
                + "; ".join(parts) + ".")
        for s in group:
            s.notes.append(note)


def _speed_note(s: Section) -> str | None:
    """Throughput is only comparable when the machine was quiet: flag arms whose seeds disagree."""
    worst = []
    for a in s.arms.values():
        tps = a.values.get("tokens_per_second") or []
        if len(tps) > 1 and min(tps) > 0:
            worst.append((max(tps) / min(tps) - 1, a.label))
    if not worst:
        return None
    spread, label = max(worst)
    if spread <= 0.10:
        return f"Throughput was consistent across seeds (within {100 * spread:.0f}% for every arm)."
    return (f"Caution: tokens/s of one arm differed by up to {100 * spread:.0f}% between its seeds ({label}); "
            "timings drift on a shared CPU (and with how a run's routing balances), so speed claims (tokens/s) "
            "are less reliable than the loss and step-count claims, which do not depend on timing.")


BUSY_SHARE = 0.85  # CPU share of its threads below this: other work took >~10% of a run's time (alone: 0.95-0.97)
BUSY_LOAD = 1.25  # records without a CPU share: mean 1-minute load above this many times the cores


def _machine_check(timings: dict, load_key: str) -> tuple[str, bool, str] | None:
    """(measure, busy?, the figure) from what a record measured: its CPU share where it has one (alone
    on 2 cores ~0.97, beside an equal-priority busy process ~0.5; niced background work barely lowers
    it), else the load average (which also counts niced work); None where it recorded neither."""
    share = timings.get("cpu_share")
    if share is not None:
        return "share", share < BUSY_SHARE, f"CPU share {share:.2f}"
    load, cpus = timings.get(load_key), timings.get("cpus")
    if load is not None and cpus:
        return "load", load > BUSY_LOAD * cpus, f"load {load:.1f} on {cpus} cores"
    return None


def _bound(measures: set[str], busy: bool) -> str:
    share = f"CPU share of their threads {'below' if busy else 'at least'} {BUSY_SHARE}"
    load = f"mean 1-minute load {'above' if busy else 'within'} {BUSY_LOAD}x the cores"
    if measures == {"share"}:
        return share
    if measures == {"load"}:
        return load
    return f"{share}; records made before the share was measured: {load}"


def _busy_machine_note(plan: Plan, records: list[RunRecord], throughput: list[RunRecord]) -> str | None:
    """Which runs (and quiet-throughput measurements) ran on a busy machine, from what they recorded
    (``MachineLoad``; records made before it have neither measure and are not judged)."""
    checked = [(r, c) for r in records if r.status == "finished"
               if (c := _machine_check(r.timings, "load_avg_mean")) is not None]
    speed = [(r, c) for r in throughput if (c := _machine_check(r.timings, "load_avg")) is not None]
    busy = [(r, c) for r, c in checked if c[1]]
    busy_speed = [(r, c) for r, c in speed if c[1]]
    if not busy and not busy_speed:
        return (f"Machine load: all {len(checked)} runs that recorded it ran alone "
                f"({_bound({c[0] for _, c in checked}, False)}), so their tokens/s are a quiet machine's."
                ) if checked else None
    parts = []
    if busy:
        named = ", ".join(f"{r.extra.get('arm', r.family)} seed {r.seed} ({c[2]})" for r, c in busy)
        clocks = (" and the curve-based equal-time estimate, which reads these runs' clocks,"
                  if any(c.metric == "loss_at_equal_time" for c in plan.claims) else "")
        parts.append(f"{len(busy)} of {len(checked)} runs shared the machine with other work "
                     f"({_bound({c[0] for _, c in busy}, True)}): {named}. Their tokens/s{clocks} are slower than "
                     "a quiet machine's; losses and step counts do not depend on it.")
    if busy_speed:
        parts.append(f"{len(busy_speed)} of {len(speed)} quiet-throughput measurements ran on a busy machine "
                     f"({_bound({c[0] for _, c in busy_speed}, True)}): re-measure with `--throughput` on a "
                     "quiet one.")
    return "Machine load: " + " ".join(parts)


def flat_config(config: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def mixed_design_note(records: list[RunRecord]) -> str | None:
    """Arms whose finished runs trained with different settings, e.g. runs of a plan's earlier
    design left in the store after an edit: the statistics would pool them. A setting only some
    records have (added to the configs after the older runs) is not a difference."""
    by_arm: dict[str, list[dict[str, object]]] = {}
    for r in records:
        if r.status == "finished":
            by_arm.setdefault(r.extra.get("arm") or r.family, []).append(flat_config(r.config))
    parts = []
    for arm, configs in by_arm.items():
        keys = sorted({k for c in configs for k in c})
        diffs = []
        for key in keys:
            values = [repr(c[key]) for c in configs if key in c]
            counts = {v: values.count(v) for v in dict.fromkeys(values)}
            if len(counts) > 1:
                diffs.append(f"{key} " + ", ".join(f"{v} in {n} run{'s' if n > 1 else ''}" for v, n in counts.items()))
        if diffs:
            parts.append(f"`{arm}` ({'; '.join(diffs)})")
    if not parts:
        return None
    group = next((r.group for r in records if r.group), "repro-PLAN-TIER")
    return ("**Mixed designs**: runs of one arm trained with different settings, and the figures above pool them: "
            + "; ".join(parts) + ". A plan edit leaves its earlier runs in the store: move the ones that no longer "
            f"match out with `scripts/archive_runs.py {group} --arm ARM --into sqlite:///archive.db` (the runner "
            "re-trains the pairs whose finished run does not match the plan).")


def _denormals_note(records: list[RunRecord]) -> str | None:
    """CPU runs that computed on float32 denormals (before bench.runtime.flush_denormals; their
    records lack ``timings.denormals_flushed``) slowed as Adam's state decayed into them."""
    cpu = [r for r in records if r.status == "finished" and str(r.timings.get("device", "cpu")).startswith("cpu")]
    kept = [r for r in cpu if not r.timings.get("denormals_flushed")]
    if not kept:
        return None
    share = "All" if len(kept) == len(cpu) else f"{len(kept)} of {len(cpu)}"
    return (f"Denormals: {share} runs trained with float32 denormals kept (before they were flushed, "
            "docs/performance.md): late in training sparse models' steps were slower (a Switch translation "
            "step up to ~1.65x; whole dense runs took about as long), so the table's tokens/s understates "
            "sparse arms there; losses are unaffected beyond float rounding.")


def _machines_note(plan: Plan, records: list[RunRecord]) -> str | None:
    """The machines (boots) the runs trained on, from ``timings.machines``, where more than one:
    wall-clock figures then compare only within a machine."""
    done = [r for r in records if r.status == "finished"]
    known = [r for r in done if r.timings.get("machines")]
    machines = {m for r in known for m in r.timings["machines"]}
    if len(machines) < 2:
        return None
    text = f"Machines: {len(known)} runs trained on {len(machines)} machines (boots)"
    if len(known) < len(done):
        text += f", {len(done) - len(known)} older runs did not record theirs"
    text += ("; look-alike machines have differed 1.6x in speed here, so the table's tokens/s mixes machines "
             "(speed claims use the quiet `--throughput` measurement, one process with the arms interleaved)")
    if any(c.metric == "loss_at_equal_time" for c in plan.claims):
        by_seed: dict[int, set[str]] = {}
        for r in known:
            by_seed.setdefault(r.seed, set()).update(r.timings["machines"])
        split = sorted(seed for seed, ms in by_seed.items() if len(ms) > 1)
        if split:
            text += (f"; the curve-based equal-time estimate reads each run's clock, and the arms of seed(s) "
                     f"{', '.join(map(str, split))} trained on different machines")
    return text + "."


# -- table and plots ----------------------------------------------------------------------------
def arms_table(s: Section) -> list[str]:
    translation = s.translation
    paper = {a.label: a.paper for a in s.plan.arms}
    head = ["arm", "seeds", "active params", "total params", "train MFLOP/token", "tokens", "val loss (mean ± sd)",
            "val BLEU" if translation else "quality", "tokens/s", "dropped", "max/mean load",
            "step speed-up", "paper"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, a in s.arms.items():
        r = a.first
        loss = fmt(a.mean("val_loss")) + (f" ± {a.sd('val_loss'):.4f}" if a.sd("val_loss") else "")
        score = a.mean("val_bleu") if translation else a.mean("quality")
        speed = a.mean("step_speedup")
        speed_txt = "-" if speed is None else f"{speed:.2f}x"
        rows.append("| " + " | ".join([
            label, str(a.n), f"{r.params.get('active', 0):,}", f"{r.params.get('total', 0):,}",
            fmt((r.flops.get("train_per_token") or 0) / 1e6, ".2f"), f"{a.mean('tokens') / 1e6:.2f}M",
            loss, fmt(score, ".2f" if translation else ".4f"), fmt(a.mean("tokens_per_second"), ".0f"),
            fmt(a.mean("fraction_dropped"), ".3f"), fmt(a.mean("max_over_mean_load"), ".2f"), speed_txt,
            paper.get(label, "")]) + " |")
    return rows


def _plots(s: Section, records: list[RunRecord], plot_dir: Path) -> None:
    from bench.report import plots

    finished = [r for r in records if r.status == "finished"]
    stem, title = plot_stem(s), s.plan.title
    if not is_default_budget(s):
        title += f" ({section_budget(s):.3g} training FLOPs per run)"
    add = s.plots.append
    add(("Loss gap to the baseline (mean over paired seeds, 95% band): below zero is better than the baseline",
         plots.gap_to_baseline(finished, plot_dir, f"{stem}-gap", title, baseline_label=s.plan.baseline)))
    add(("Validation loss vs training FLOPs", plots.learning_curves(finished, plot_dir, f"{stem}-curves", title)))
    add(("Quality vs active parameters (Pareto front)",
         plots.quality_vs_active_params(finished, plot_dir, f"{stem}-pareto", title)))
    if "experts" in s.plan.plots:
        add(("Validation loss vs number of experts", plots.loss_vs_experts(finished, plot_dir, f"{stem}-experts", title,
                                                                          baseline_label=s.plan.baseline)))
    if "capacity" in s.plan.plots:
        add(("Capacity factor vs dropped tokens, loss and speed",
             plots.capacity_tradeoffs(finished, plot_dir, f"{stem}-tradeoffs", title)))
    if not s.translation:
        add(("Step speed-up to the baseline's last evaluated loss",
             plots.steps_to_quality(finished, plot_dir, f"{stem}-speedup", title, baseline_label=s.plan.baseline)))
    sparse = [a for a in s.arms.values() if a.first.expert_stats]
    for a in sparse[:4]:
        slug = a.label.replace(" ", "_").replace("=", "").replace(".", "p")
        add((f"Expert load, {a.label} (seed {a.first.seed}, last training batch)",
             plots.expert_load_heatmap(a.first, plot_dir, f"{stem}-load-{slug}", f"{s.plan.name}: {a.label}")))
    s.plots[:] = [(caption, files) for caption, files in s.plots if files]
