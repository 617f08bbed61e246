"""One report section per reproduction: setup, per-arm table beside the paper, claims, plots."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bench.report import papers
from bench.report.plots import interp
from bench.report.claims import (ArmStats, Claim, add_step_speedups, all_seeds, arm_stats, claim, compare, fmt,
                                 trend)
from bench.reproduce import Reproduction
from bench.tracking.records import RunRecord


@dataclass
class Section:
    repro: Reproduction
    preset: str
    arms: dict[str, ArmStats]
    budget: float | None = None  # training FLOPs per run; None = the reproduction's default for the preset
    claims: list[Claim] = field(default_factory=list)
    plots: list[tuple[str, list[Path]]] = field(default_factory=list)  # (caption, files)
    paper_column: dict[str, str] = field(default_factory=dict)  # arm -> what the paper reports
    notes: list[str] = field(default_factory=list)


def build_section(repro: Reproduction, preset: str, records: list[RunRecord], plot_dir: Path | None,
                  budget: float | None = None) -> Section:
    """``records`` must share one budget (``budget``, default the preset's): arms are compared as matched."""
    arms = arm_stats(records, [a.label for a in repro.arms])
    if not repro.task.startswith("multi30k"):  # translation: BLEU only at the end, no loss target
        add_step_speedups(arms, repro.baseline)
    section = Section(repro, preset, arms, budget)
    builder = {"switch-vs-dense": _switch_vs_dense, "switch-experts": _switch_experts, "capacity": _capacity,
               "moe-rnn": _moe_rnn, "translation": _translation}[repro.name]
    builder(section)
    section.notes.append(_budget_note(section))
    trend_note = _gap_trend_note(section)
    if trend_note:
        section.notes.append(trend_note)
    speed = _speed_note(section)
    if speed:
        section.notes.append(speed)
    if plot_dir is not None:
        _plots(section, records, plot_dir)
    return section


# -- claims per reproduction --------------------------------------------------------------------
def _switch_vs_dense(s: Section) -> None:
    t1 = papers.SWITCH_TABLE1
    s.paper_column = {k: f"{v['model']}: {v['neg_log_perp']:+.3f}, {v['examples_per_s']} ex/s" for k, v in t1.items()}
    a = s.arms
    s.claims += [
        claim("Switch (cf 1.25) reaches a lower validation loss than the FLOP-matched dense model at the same "
              "training FLOPs", f"Switch-Base {t1['switch cf=1.25']['neg_log_perp']} vs T5-Base "
              f"{t1['dense']['neg_log_perp']} neg. log perplexity after 100k steps (Table 1)",
              compare(a, "switch cf=1.25", "dense", "val_loss", higher_better=False)),
        claim("Switch matches the ~3.5x-FLOPs dense model (T5-Large's role) trained for the same steps",
              f"Switch-Base cf 1.25 {t1['switch cf=1.25']['neg_log_perp']} vs T5-Large "
              f"{t1['dense-wide']['neg_log_perp']} (Table 1)",
              _not_worse(a, "switch cf=1.25", "dense-wide", "val_loss")),
        claim("Top-1 Switch beats top-2 MoE at capacity factor 1.0 (quality at equal FLOPs)",
              f"{t1['switch cf=1.0']['neg_log_perp']} vs {t1['moe cf=1.0']['neg_log_perp']} (Table 1)",
              compare(a, "switch cf=1.0", "moe cf=1.0", "val_loss", higher_better=False)),
        claim("Top-1 Switch trains faster (tokens/s) than top-2 MoE at the same capacity factor",
              f"{t1['switch cf=1.0']['examples_per_s']} vs {t1['moe cf=1.0']['examples_per_s']} examples/s at cf 1.0 "
              "(Table 1)", compare(a, "switch cf=1.0", "moe cf=1.0", "tokens_per_second", higher_better=True)),
        claim("Switch reaches the dense model's final quality in fewer steps (step speed-up > 1)",
              "Switch-Base reaches T5-Base quality several times faster (7x pre-training speed-up, abstract)",
              all_seeds(a, "switch cf=1.25", "step_speedup", lambda v: v > 1, "step speed-up (0 = never reached)")),
    ]


def _switch_experts(s: Section) -> None:
    a = s.arms
    xs = {label: float(label.split("E=")[1]) for label in a if label.startswith("switch E=")}
    biggest = max(xs, key=xs.get) if xs else "switch E=64"
    s.paper_column = {"dense": "T5-Base", **{k: "loss falls with E (Fig. 4)" for k in xs}}
    s.paper_column["switch E=64"] = f"{papers.SWITCH_STEP_SPEEDUP_64_EXPERTS}x step speed-up (Fig. 5)"
    s.claims += [
        claim("Validation loss falls as experts are added at equal FLOPs per token",
              "loss improves monotonically with the number of experts (Fig. 4)",
              trend(a, xs, "val_loss", decreasing=True)),
        claim(f"The largest Switch ({biggest}) beats the FLOP-matched dense model",
              "every Switch-Base variant beats T5-Base (Fig. 4)", compare(a, biggest, "dense", "val_loss", False)),
        claim("The step speed-up over dense grows with the number of experts",
              f"{papers.SWITCH_STEP_SPEEDUP_64_EXPERTS}x fewer steps to T5-Base quality with 64 experts (Fig. 5)",
              trend(a, xs, "step_speedup", decreasing=False)),
    ]


def _capacity(s: Section) -> None:
    a = s.arms
    xs = {label: float(label.split("cf=")[1]) for label in a}
    t1 = papers.SWITCH_TABLE1
    s.paper_column = {k: f"{t1[k]['neg_log_perp']:+.3f}, {t1[k]['examples_per_s']} ex/s" for k in t1 if k in xs}
    s.claims += [
        claim("A lower capacity factor drops more tokens", "tokens over capacity are dropped (Sec. 2.2)",
              trend(a, xs, "fraction_dropped", decreasing=True)),
        claim("Quality improves with capacity factor (fewer dropped tokens)",
              "Switch-Base -1.561 / -1.553 / -1.554 at cf 1.0 / 1.25 / 2.0 (Table 1): small, saturating gains",
              trend(a, xs, "val_loss", decreasing=True)),
        claim("A higher capacity factor trains slower", "1000 / 910 / 860 examples/s at cf 1.0 / 1.25 / 2.0 (Table 1)",
              trend(a, xs, "tokens_per_second", decreasing=True)),
    ]


def _moe_rnn(s: Section) -> None:
    a = s.arms
    xs = {label: float(label.split("E=")[1]) for label in a if label.startswith("moe-rnn E=") and "no-aux" not in label}
    t6 = {(r["w_importance"], r["w_load"]): r for r in papers.SHAZEER_TABLE6}
    with_aux, without = t6[(0.1, 0.1)], t6[(0.0, 0.0)]
    s.paper_column = {"lstm": "4xLSTM-512 baseline",
                      "moe-rnn E=16 no-aux": f"ppl {without['test_perplexity']}, max/mean load "
                                              f"{without['max_over_mean_load']} (Table 6)",
                      "moe-rnn E=16": f"ppl {with_aux['test_perplexity']}, max/mean load "
                                      f"{with_aux['max_over_mean_load']} (Table 6, weights 0.1)"}
    s.claims += [
        claim("The MoE between LSTM layers beats the FLOP-matched LSTM", "every MoE model beats the "
              "compute-matched LSTM baselines on 1B-Word (Table 7, Fig. 2)",
              compare(a, "moe-rnn E=16", "lstm", "val_loss", higher_better=False)),
        claim("More experts at matched ops per timestep lower the loss",
              "perplexity falls as experts grow from 4 to 4096 at ~8M ops/timestep (Fig. 2 left, Table 7)",
              trend(a, xs, "val_loss", decreasing=True)),
        claim("Without the importance/load losses, expert load is far more unbalanced",
              f"max/mean load {without['max_over_mean_load']} vs {with_aux['max_over_mean_load']} (Table 6)",
              compare(a, "moe-rnn E=16", "moe-rnn E=16 no-aux", "max_over_mean_load", higher_better=False)),
        claim("Without the importance/load losses, the loss is worse",
              f"perplexity {without['test_perplexity']} vs {with_aux['test_perplexity']} (Table 6)",
              compare(a, "moe-rnn E=16", "moe-rnn E=16 no-aux", "val_loss", higher_better=False)),
    ]


def _translation(s: Section) -> None:
    a = s.arms
    wmt = papers.SHAZEER_WMT14_EN_DE
    s.paper_column = {"dense": f"GNMT {wmt['dense']} BLEU (WMT'14 en-de)",
                      "moe-rnn": f"MoE 2048 experts {wmt['moe']} BLEU"}
    s.claims += [
        claim("A sparse Transformer (Switch) translates better than the dense one at the same training FLOPs",
              "Switch gains carry to downstream tasks (Sec. 4); not measured on translation in the paper",
              compare(a, "switch", "dense", "val_bleu", higher_better=True)),
        claim("The MoE-RNN translates better than the dense model at matched compute",
              f"MoE {wmt['moe']} vs GNMT {wmt['dense']} BLEU on WMT'14 en-de (Table 2)",
              compare(a, "moe-rnn", "dense", "val_bleu", higher_better=True)),
    ]


def _not_worse(arms: dict[str, ArmStats], a: str, b: str, key: str) -> tuple[str, str]:
    """"a matches b": reproduced unless b is better than a beyond the seed spread."""
    verdict, evidence = compare(arms, a, b, key, higher_better=False)
    if verdict == "mixed":
        return "reproduced", evidence.replace(" — within seed noise", " — equal within seed noise")
    return verdict, evidence


def section_budget(s: Section) -> float:
    return s.budget if s.budget is not None else s.repro.budgets[s.preset]


def is_default_budget(s: Section) -> bool:
    return abs(section_budget(s) / s.repro.budgets[s.preset] - 1) < 1e-6


def reproduce_command(s: Section) -> str:
    """The command that (re)makes this section's runs: non-default budgets and arm subsets included."""
    seeds = max((a.n for a in s.arms.values()), default=0)
    cmd = f"moe-bench reproduce {s.repro.name} --preset {s.preset} --seeds {seeds}"
    if not is_default_budget(s):
        cmd += f" --budget-flops {section_budget(s):g}"
    if set(s.arms) != {a.label for a in s.repro.arms}:
        cmd += "".join(f' --arm "{label}"' for label in s.arms)
    return cmd


def plot_stem(s: Section) -> str:
    """File-name stem of the section's plots, unique per preset and budget (tiny at its default budget: the name)."""
    stem = s.repro.name if s.preset == "tiny" else f"{s.repro.name}-{s.preset}"
    return stem if is_default_budget(s) else f"{stem}-{section_budget(s):.2g}flops".replace("+", "")


def _budget_note(s: Section) -> str:
    base = s.arms.get(s.repro.baseline)
    budget = section_budget(s)
    text = f"Budget: {budget:.3g} training FLOPs per run"
    if not is_default_budget(s):
        text += f" ({budget / s.repro.budgets[s.preset]:.3g}x the preset's default {s.repro.budgets[s.preset]:.3g})"
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
    base = s.arms.get(s.repro.baseline)
    if base is None:
        return None
    parts = []
    for label, arm in s.arms.items():
        if label == s.repro.baseline:
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
    return (f"Loss gap to {s.repro.baseline} (arm − baseline, mean over seeds, on the intermediate evaluations' "
            "validation batches) at half the budget → at the end: "
            + "; ".join(parts) + ". Gaps still widening at the end would likely grow with a larger budget; "
            "narrowing ones may close or change sign.")


def add_cross_budget_notes(sections: list[Section]) -> None:
    """Where one reproduction ran at several budgets, say in each of its sections how every arm's loss
    gap to the baseline moved with the budget: the measured answer to "would a larger budget change
    the picture?"."""
    by_repro: dict[tuple[str, str], list[Section]] = {}
    for s in sections:
        by_repro.setdefault((s.repro.name, s.preset), []).append(s)
    for group in by_repro.values():
        if len(group) < 2:
            continue
        group = sorted(group, key=section_budget)
        baseline = group[0].repro.baseline

        def loss(s: Section, label: str) -> float | None:
            return s.arms[label].mean("val_loss") if label in s.arms else None

        parts = []
        base_losses = [(section_budget(s), loss(s, baseline)) for s in group if loss(s, baseline) is not None]
        if len(base_losses) >= 2:
            parts.append(f"{baseline} loss " + " → ".join(f"{v:.3f} at {b:.3g}" for b, v in base_losses))
        for label in [a.label for a in group[0].repro.arms if a.label != baseline]:
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


# -- table and plots ----------------------------------------------------------------------------
def arms_table(s: Section) -> list[str]:
    translation = s.repro.task.startswith("multi30k")
    head = ["arm", "seeds", "active params", "total params", "train MFLOP/token", "tokens", "val loss",
            "val BLEU" if translation else "quality", "tokens/s", "dropped", "max/mean load",
            "step speed-up", "paper"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, a in s.arms.items():
        r = a.first
        loss = fmt(a.mean("val_loss")) + (f" ± {a.half_range('val_loss'):.4f}" if a.half_range("val_loss") else "")
        score = a.mean("val_bleu") if translation else a.mean("quality")
        speed = [v for v in a.values.get("step_speedup", []) if v > 0]
        missed = len(a.values.get("step_speedup", [])) - len(speed)
        speed_txt = "-" if "step_speedup" not in a.values else (
            (f"{sum(speed) / len(speed):.2f}x" + (f" ({missed} seed(s) never reached)" if missed else ""))
            if speed else "never reached")
        rows.append("| " + " | ".join([
            label, str(a.n), f"{r.params.get('active', 0):,}", f"{r.params.get('total', 0):,}",
            fmt((r.flops.get("train_per_token") or 0) / 1e6, ".2f"), f"{a.mean('tokens') / 1e6:.2f}M",
            loss, fmt(score, ".2f" if translation else ".4f"), fmt(a.mean("tokens_per_second"), ".0f"),
            fmt(a.mean("fraction_dropped"), ".3f"), fmt(a.mean("max_over_mean_load"), ".2f"), speed_txt,
            s.paper_column.get(label, "")]) + " |")
    return rows


def _plots(s: Section, records: list[RunRecord], plot_dir: Path) -> None:
    from bench.report import plots

    finished = [r for r in records if r.status == "finished"]
    stem, title = plot_stem(s), s.repro.title
    if not is_default_budget(s):
        title += f" ({section_budget(s):.3g} training FLOPs per run)"
    add = s.plots.append
    add(("Validation loss vs training FLOPs", plots.learning_curves(finished, plot_dir, f"{stem}-curves", title)))
    add(("Quality vs active parameters (Pareto front)",
         plots.quality_vs_active_params(finished, plot_dir, f"{stem}-pareto", title)))
    if s.repro.name == "switch-experts":
        add(("Validation loss vs number of experts", plots.loss_vs_experts(finished, plot_dir, f"{stem}-experts", title,
                                                                          baseline_label=s.repro.baseline)))
    if s.repro.name == "capacity":
        add(("Capacity factor vs dropped tokens, loss and speed",
             plots.capacity_tradeoffs(finished, plot_dir, f"{stem}-tradeoffs", title)))
    if not s.repro.task.startswith("multi30k"):
        add(("Step speed-up to the baseline's final loss",
             plots.steps_to_quality(finished, plot_dir, f"{stem}-speedup", title, baseline_label=s.repro.baseline)))
    sparse = [a for a in s.arms.values() if a.first.expert_stats]
    for a in sparse[:3] if s.repro.name != "moe-rnn" else sparse:
        slug = a.label.replace(" ", "_").replace("=", "").replace(".", "p")
        add((f"Expert load, {a.label} (seed {a.first.seed}, last training batch)",
             plots.expert_load_heatmap(a.first, plot_dir, f"{stem}-load-{slug}", f"{s.repro.name}: {a.label}")))
    s.plots[:] = [(caption, files) for caption, files in s.plots if files]
