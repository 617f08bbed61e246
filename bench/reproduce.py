"""Paper reproductions: fixed sets of training runs ("arms") at one matched budget.

    moe-bench reproduce NAME [--preset tiny|small|base] [--seeds N] [--storage URL]

Each reproduction trains its arms x seeds with ``bench.train.train`` into one group
(``repro-NAME-PRESET``), tagging every record with ``reproduction``, ``arm`` and ``preset``, so
``moe-bench report`` can put them beside the papers' numbers. Re-running the same command skips
arm/seed pairs that already finished in the store, so a killed reproduction continues where it
stopped. The ``tiny`` budgets are sized so each reproduction takes at most ~30 minutes on a
2-core CPU; ``small``/``base`` are for GPUs (see README).
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from bench.config import ConfigError
from bench.tracking.records import ResultsStore, RunRecord, new_run_id

PRESETS = ("tiny", "small", "base")
# Tier -> model preset: "ref" trains the tiny preset's shape for long enough to leave the plateau.
TIER_PRESET = {"tiny": "tiny", "ref": "tiny", "small": "small", "base": "base"}


@dataclass(frozen=True)
class Arm:
    """One model configuration of a reproduction."""

    label: str  # unique in the reproduction, e.g. "switch cf=1.25"
    family: str
    overrides: dict[str, Any] = field(default_factory=dict)
    # "flops": the reproduction's training-FLOPs budget (compute-matched arms).
    # "baseline_tokens": as many tokens as the FLOP budget buys the dense/lstm baseline, i.e.
    # the same number of steps — for the bigger dense model that plays T5-Large.
    budget: str = "flops"
    # Settings that depend on the preset (a shape relative to the preset's model), applied
    # after ``overrides``.
    preset_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Reproduction:
    name: str
    title: str
    paper: str
    task: str
    baseline: str  # label of the arm others are compared with
    arms: tuple[Arm, ...]
    budgets: dict[str, float]  # preset -> training FLOPs per run
    seeds: int = 2
    fixed: dict[str, Any] = field(default_factory=dict)  # --set style, every arm
    preset_fixed: dict[str, dict[str, Any]] = field(default_factory=dict)  # extra per preset

    def arm(self, label: str) -> Arm:
        return next(a for a in self.arms if a.label == label)

    def group(self, preset: str) -> str:
        return f"repro-{self.name}-{preset}"


# Evaluations every 50 steps give the "steps to reach the baseline's quality" curves their
# resolution; 4 batches of 64 x 256 tokens per intermediate evaluation keep them cheap (~10% of
# training time); the final evaluation always covers the whole validation split. The tiny
# budgets are a few hundred steps: the default 100-step warmup would take most of the run, so
# warm up over 20 steps.
_LM_FIXED = {"eval_every": 50, "eval_batches": 4, "warmup_steps": 20}

# The transformer reproductions' tiny shape: half the width of the tiny model preset
# (d_model 128, 4 layers, 4 heads, d_ff 512; 0.8M non-embedding params, 6.3 MFLOP per
# training token). A ~30-minute reproduction gives each run about a minute of a 2-core CPU, and
# pilots there showed that width buys more learning than it costs: in 60 s the d=256 preset
# model took 275 steps to a validation loss of 2.36, this one 449 steps to 2.22 (lr 2e-3; 2.20
# at 3-4e-3, 2.43 at 8e-3). At the preset's width every arm ended on the ~2.47 bigram
# plateau and no claim could be told apart from seed noise.
_LM_TINY = {"d_model": 128, "n_heads": 4, "d_ff": 512, "lr": 3e-3}
# Reference tier: the tiny preset's shape (d_model 256) for ~6.8M tokens; every evaluation covers
# the whole validation split (7 batches of 64 x 256), so curves and final losses are on one set.
_LM_REF = {"eval_every": 100, "eval_batches": 100, "warmup_steps": 100, "lr": 2e-3}

# T5-Large's role in Table 1: a dense model with ~3.5x the FLOPs per token of the preset's
# dense model (bench.flops, at seq 256, vocab 65): tiny 3.49x, small 3.39x, base 3.51x (the
# real T5-Large shape against T5-Base).
_WIDE = {
    "tiny": {"d_model": 256, "n_heads": 4, "d_ff": 1024},
    "small": {"d_model": 960, "n_heads": 8, "d_ff": 3840},
    "base": {"d_model": 1024, "n_heads": 16, "d_ff": 4096, "n_layers": 24},
}

# Translation batches of 16 sentences (~250 target tokens) left a 2-core CPU mostly waiting on
# per-step overhead: at 2.5e13 FLOPs the dense run took 6 min, the switch run 18 min (0.52x the
# dense tokens/s; MoE routing costs the same per call however few tokens it routes) and the
# moe-rnn ~14 min, ~80 min for two seeds (val BLEU 6.9 / 6.9 / 5.9, seed 0). 64 sentences per
# step (lr scaled by sqrt(4)) spends the same FLOPs in a quarter of the steps.
_TRANSLATION_FIXED = {"batch_size": 64, "lr": 2e-3, "warmup_steps": 40, "eval_every": 50, "eval_batches": 4}

REPRODUCTIONS: dict[str, Reproduction] = {r.name: r for r in [
    Reproduction(
        name="switch-vs-dense",
        title="Switch Transformer vs dense at equal FLOPs (Fedus et al. 2021, Table 1)",
        paper="fedus2021",
        task="tinyshakespeare-char",
        baseline="dense",
        arms=(
            Arm("dense", "dense"),
            # ~3.5x the FLOPs per token of the dense model, trained for the same steps (T5-Large's role).
            Arm("dense-wide", "dense", budget="baseline_tokens", preset_overrides=_WIDE),
            Arm("switch cf=1.0", "switch", {"capacity_factor": 1.0}),
            Arm("switch cf=1.25", "switch", {"capacity_factor": 1.25}),
            Arm("switch cf=2.0", "switch", {"capacity_factor": 2.0}),
            Arm("moe cf=1.0", "moe", {"capacity_factor": 1.0}),
            Arm("moe cf=1.25", "moe", {"capacity_factor": 1.25}),
            Arm("moe cf=2.0", "moe", {"capacity_factor": 2.0}),
        ),
        budgets={"tiny": 8e12, "ref": 1.5e14, "small": 2e15, "base": 2e17},
        seeds=3,
        fixed=_LM_FIXED,
        preset_fixed={"tiny": _LM_TINY, "ref": _LM_REF},
    ),
    Reproduction(
        name="switch-experts",
        title="More experts at equal FLOPs per token (Fedus et al. 2021, Figure 4)",
        paper="fedus2021",
        task="tinyshakespeare-char",
        baseline="dense",
        arms=(Arm("dense", "dense"),
              *(Arm(f"switch E={e}", "switch", {"num_experts": e}) for e in (1, 2, 4, 8, 16, 32, 64))),
        budgets={"tiny": 8e12, "small": 2e15, "base": 2e17},
        seeds=3,
        fixed=_LM_FIXED,
        preset_fixed={"tiny": _LM_TINY},
    ),
    Reproduction(
        name="capacity",
        title="Capacity factor vs quality, dropped tokens and speed (Fedus et al. 2021, Table 1 / Sec. 2.2)",
        paper="fedus2021",
        task="tinyshakespeare-char",
        baseline="switch cf=1.25",
        arms=tuple(Arm(f"switch cf={cf}", "switch", {"capacity_factor": cf, "num_experts": 8})
                   for cf in (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)),
        budgets={"tiny": 1.2e13, "small": 2e15, "base": 2e17},
        seeds=2,
        fixed=_LM_FIXED,
        preset_fixed={"tiny": _LM_TINY},
    ),
    Reproduction(
        name="moe-rnn",
        title="Sparsely-gated MoE between LSTM layers vs a FLOP-matched LSTM (Shazeer et al. 2017, Tables 6-7)",
        paper="shazeer2017",
        task="tinyshakespeare-char",
        baseline="lstm",
        arms=(
            Arm("lstm", "lstm"),
            *(Arm(f"moe-rnn E={e}", "moe-rnn", {"num_experts": e}) for e in (4, 16, 64)),
            # Table 6 ablation: no importance / load losses.
            Arm("moe-rnn E=16 no-aux", "moe-rnn", {"num_experts": 16, "importance_weight": 0.0, "load_weight": 0.0}),
        ),
        # The RNNs' FLOPs per token (9.6M) are 1.5x the tiny transformer arms'; 2.5e13 is ~2.6M
        # tokens, ~640 steps per run (a 1e13 pilot reached 2.54 / 2.48 for lstm / moe-rnn).
        budgets={"tiny": 2.5e13, "small": 1e15, "base": 1e17},
        seeds=2,
        fixed=_LM_FIXED,
    ),
    Reproduction(
        name="translation",
        title="Dense vs Switch vs MoE-RNN translation at a matched budget (Multi30k de-en)",
        paper="shazeer2017",
        task="multi30k-de-en",
        baseline="dense",
        arms=(Arm("dense", "dense"), Arm("switch", "switch"), Arm("moe-rnn", "moe-rnn")),
        # At 64 sentences per step, 2.5e13 took 6.5 min per seed (dense 98 s, switch 160 s,
        # moe-rnn 132 s) and reached 3.4 / 4.0 / 5.3 val BLEU: twice that still fits ~30 minutes.
        budgets={"tiny": 5e13, "small": 2e15, "base": 2e17},
        seeds=2,
        fixed=_TRANSLATION_FIXED,
    ),
]}


def reproduction(name: str) -> Reproduction:
    if name not in REPRODUCTIONS:
        raise ConfigError([f"reproduction {name!r} is not known; expected one of {', '.join(REPRODUCTIONS)}"],
                          "reproduce")
    return REPRODUCTIONS[name]


def arm_settings(repro: Reproduction, arm: Arm, preset: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The --set style settings one arm trains with: reproduction, preset, arm, then the user's."""
    return {**repro.fixed, **repro.preset_fixed.get(preset, {}), **arm.overrides,
            **arm.preset_overrides.get(preset, {}), **(extra or {})}


def arm_budget(repro: Reproduction, arm: Arm, preset: str, flops: float | None = None,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The training budget of one arm (see Arm.budget); ``flops`` replaces the preset's budget."""
    flops = flops or repro.budgets[preset]
    if arm.budget == "flops":
        return {"kind": "flops", "value": flops}
    from bench.data.tasks import load_task
    from bench.flops import model_cost
    from bench.train.run import resolve_configs

    task = load_task(repro.task)
    base = repro.arm(repro.baseline)
    cfg, _ = resolve_configs(task, base.family, TIER_PRESET[preset], arm_settings(repro, base, preset, extra), None)
    seq_len = task.seq_len if task.type == "lm" else task.tgt_len
    per_token = model_cost(cfg, seq_len, task.type, src_len=task.src_len).train_flops_per_token
    return {"kind": "tokens", "value": float(int(flops / per_token))}


@dataclass
class PlannedRun:
    arm: Arm
    seed: int
    budget: dict[str, Any]
    done: RunRecord | None = None  # a finished record from an earlier invocation


def plan(repro: Reproduction, preset: str, seeds: int, store: ResultsStore, arms: list[str] | None = None,
         flops: float | None = None, extra: dict[str, Any] | None = None) -> list[PlannedRun]:
    """Every (arm, seed) pair, seed-major so partial results cover all arms early."""
    if preset not in TIER_PRESET:
        raise ConfigError([f"preset={preset!r} is not allowed; expected one of {', '.join(PRESETS)}"], "reproduce")
    if seeds < 1:
        raise ConfigError([f"seeds={seeds} is not allowed; expected >= 1"], "reproduce")
    chosen = list(repro.arms)
    if arms:
        unknown = [a for a in arms if a not in {x.label for x in repro.arms}]
        if unknown:
            raise ConfigError([f"arm {a!r} is not in {repro.name}; arms: {', '.join(x.label for x in repro.arms)}"
                               for a in unknown], "reproduce")
        chosen = [a for a in repro.arms if a.label in arms]
    budgets = {a.label: arm_budget(repro, a, preset, flops, extra) for a in chosen}
    wanted = {a.label: planned_config(repro, a, preset, budgets[a.label], extra) for a in chosen}
    finished = {}
    for r in store.list(group=repro.group(preset)):
        arm = r.extra.get("arm")
        # Only a run of the *current* definition counts (an older budget or setting does not).
        if r.status == "finished" and arm in wanted and _same_config(r.config, wanted[arm]):
            finished.setdefault((arm, r.seed), r)
    return [PlannedRun(a, seed, budgets[a.label], finished.get((a.label, seed)))
            for seed in range(seeds) for a in chosen]


def planned_config(repro: Reproduction, arm: Arm, preset: str, budget: dict[str, Any],
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The resolved model and run configs this arm trains with (as stored in its record)."""
    from bench.config import to_dict
    from bench.data.tasks import load_task
    from bench.train.run import resolve_configs

    cfg, rc = resolve_configs(load_task(repro.task), arm.family, TIER_PRESET[preset], arm_settings(repro, arm, preset, extra),
                              budget)
    return {"model": to_dict(cfg), "run": to_dict(rc)}


def _same_config(stored: dict[str, Any], wanted: dict[str, Any]) -> bool:
    import json

    def norm(d):
        return json.loads(json.dumps(d, sort_keys=True, default=str))

    return norm(stored.get("model")) == norm(wanted["model"]) and norm(stored.get("run")) == norm(wanted["run"])


def run_reproduction(name: str, preset: str = "tiny", seeds: int | None = None, storage: str | None = None,
                     data_dir: str | None = None, overrides: list[str] | None = None,
                     arms: list[str] | None = None, budget_flops: float | None = None, progress: bool = True,
                     announce: Callable[[str], None] | None = None) -> list[RunRecord]:
    """Train every missing arm x seed of a reproduction; return all its finished records."""
    from bench.config import override_pairs
    from bench.train.run import train

    announce = announce or (lambda msg: print(msg, file=sys.stderr, flush=True))
    # Dozens of runs: Lightning's per-run "GPU available ..." banner drowns the progress lines.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    repro = reproduction(name)
    store = ResultsStore(storage)
    problems: list[str] = []
    extra = dict(override_pairs(overrides or [], problems))
    if problems:
        raise ConfigError(problems, "reproduce --set")
    runs = plan(repro, preset, seeds or repro.seeds, store, arms, budget_flops, extra)
    todo = [r for r in runs if r.done is None]
    flops = float(budget_flops or repro.budgets[preset])
    announce(f"{repro.title}: {len(runs)} runs ({len(runs) - len(todo)} already finished), preset {preset}, "
             f"budget {flops:.3g} training FLOPs per run, group {repro.group(preset)}")
    records = [r.done for r in runs if r.done is not None]
    for i, run in enumerate(todo, 1):
        b = run.budget
        announce(f"[{i}/{len(todo)}] {run.arm.label} (seed {run.seed}): {b['kind']} budget {b['value']:.4g}")
        settings = arm_settings(repro, run.arm, preset, extra)
        run_id = new_run_id(f"{repro.name}-{run.arm.family}")
        try:
            record = train(repro.task, run.arm.family, TIER_PRESET[preset], settings, budget=b, seed=run.seed, storage=storage,
                           data_dir=data_dir, group=repro.group(preset), name=f"{repro.name}: {run.arm.label}",
                           progress=progress, run_id=run_id,
                           # budget_flops: the report keeps each budget of a reproduction apart.
                           tags={"reproduction": repro.name, "arm": run.arm.label, "budget_flops": flops,
                                 **({"tier": preset} if preset != TIER_PRESET[preset] else {})})
        except Exception as e:  # recorded as failed by train(); the other arms still run
            if store.get(run_id) is None:
                raise
            announce(f"  {run.arm.label} (seed {run.seed}) failed: {type(e).__name__}: {e}")
            continue
        if record.status == "interrupted":
            announce("interrupted: run the same command again to continue (finished runs are kept)")
            raise KeyboardInterrupt
        records.append(record)
    return records


def format_reproduction(name: str, records: list[RunRecord]) -> str:
    """A short per-arm table (mean ± half-range over seeds) printed after a reproduction."""
    import statistics

    repro = reproduction(name)
    lines = [repro.title, f"{'arm':<22} {'seeds':>5} {'val loss':>16} {'quality':>8} {'active':>10} {'tok/s':>8}"]
    for arm in repro.arms:
        rs = [r for r in records if r.extra.get("arm") == arm.label and r.status == "finished"]
        if not rs:
            continue
        key = "val_bleu" if repro.task.startswith("multi30k") else "val_loss"
        vals = [r.metrics.get(key) for r in rs if r.metrics.get(key) is not None]
        spread = f" ±{(max(vals) - min(vals)) / 2:.4f}" if len(vals) > 1 else ""
        mean = statistics.mean(vals) if vals else float("nan")
        lines.append(f"{arm.label:<22} {len(rs):>5} {mean:>9.4f}{spread:<7} "
                     f"{statistics.mean(r.metrics.get('quality') or 0 for r in rs):>8.4f} "
                     f"{rs[0].params.get('active', 0):>10,} "
                     f"{statistics.mean(r.timings.get('tokens_per_second', 0) for r in rs):>8.0f}")
    return "\n".join(lines)


__all__ = ["Arm", "Reproduction", "REPRODUCTIONS", "reproduction", "run_reproduction", "plan", "arm_budget",
           "format_reproduction"]
