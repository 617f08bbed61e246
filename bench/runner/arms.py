"""Runs a plan's arms: every (arm, seed) pair of one tier, resumable, with the runners' one
failure policy (``bench.runner.failures``).

    moe-bench reproduce NAME|PLAN.yaml [--tier T] [--seeds N] [--arm LABEL ...] [--storage URL]

``moe-bench compare`` is a plan built from its arguments (``compare``), run the same way.

Each run trains with ``bench.train.train`` into the plan's group (``repro-NAME-TIER``), tagged
with ``reproduction``, ``arm``, ``tier`` and ``budget_flops``. Re-running skips pairs that already
finished with exactly the planned config and continues a killed or interrupted run from its last
checkpoint, so a killed plan goes on where it stopped; a changed definition is re-run, never mixed
in. Processes on one or several machines can share a plan: each claims a pair before training it
(``bench.tracking.claims``), so a pair another process holds or has finished is left to it. A
failed run is recorded and the others go on; a fatal error (bad config, missing data, unreachable
storage) stops the plan.
"""
from __future__ import annotations

import hashlib
import json
import logging
import sys
from dataclasses import dataclass
from typing import Any, Callable

from bench.config import ConfigError, override_pairs
from bench.plans import Arm, Plan, is_shipped, load_plan, parse_plan
from bench.runner.failures import CONTINUE_HINT, is_fatal, one_line
from bench.runner.looks import look_seeds
from bench.runner.stopping import StopAfterRun
from bench.tracking.claims import HOST, Claims, Heartbeat, holder_alive
from bench.tracking.liveness import UNFINISHED, live_owner, resumable_checkpoint
from bench.tracking.records import ResultsStore, RunRecord, is_throughput, new_run_id, throughput_by_arm


class NeedsThroughput(ConfigError):
    """An equal-time arm's budget needs throughput measured with ``--throughput`` first."""


def arm_budget(plan: Plan, arm: Arm, tier: str, flops: float | None = None,
               extra: dict[str, Any] | None = None, store: ResultsStore | None = None) -> dict[str, Any]:
    """The training budget of one arm (see ``Arm.budget``); ``flops`` replaces the tier's budget."""
    spec = plan.tier(tier).budget_spec()
    if arm.budget == "flops":  # the tier's budget (FLOPs for every shipped plan), or a share of it
        budget = {"kind": "flops", "value": float(flops)} if flops else dict(spec)
        if arm.budget_fraction != 1:
            if budget["kind"] != "flops":
                raise ConfigError([f"arm {arm.label!r} has budget_fraction, which takes a share of a FLOP budget; "
                                   f"tier {tier!r} has a {budget['kind']} budget"], "plan")
            budget["value"] = float(budget["value"] * arm.budget_fraction)
        return budget
    if spec["kind"] != "flops" and not flops:
        raise ConfigError([f"arm {arm.label!r} has budget {arm.budget!r}, which derives from a FLOP budget; tier "
                           f"{tier!r} has a {spec['kind']} budget"], "plan")
    flops = flops or spec["value"]
    if arm.budget == "equal_time":
        base = plan.arm(plan.baseline)
        as_tokens = Arm(base.label, base.model, base.settings, "baseline_tokens", base.tier_settings)
        base_tokens = arm_budget(plan, as_tokens, tier, flops, extra)  # what the FLOP budget buys the baseline
        speed = throughput_medians(store, plan, tier) if store is not None else {}
        if arm.label not in speed or plan.baseline not in speed:
            raise NeedsThroughput([f"arm {arm.label!r} trains for the baseline's time: measure both arms' tokens/s "
                                   f"first with `moe-bench reproduce {plan.name} --tier {tier} --throughput` "
                                   "(on a quiet machine)"], "reproduce")
        return {"kind": "tokens", "value": float(int(base_tokens["value"] * speed[arm.label] / speed[plan.baseline]))}
    from bench.data.tasks import load_task
    from bench.flops import model_cost
    from bench.train.run import resolve_configs

    task = load_task(plan.task)
    base = plan.arm(plan.baseline)
    cfg, _ = resolve_configs(task, base.model, plan.tier(tier).preset, plan.arm_settings(base, tier, extra), None)
    per_token = model_cost(cfg, task.target_len, task.type, src_len=task.src_len).train_flops_per_token
    return {"kind": "tokens", "value": float(int(flops / per_token))}


def throughput_medians(store: ResultsStore, plan: Plan, tier: str) -> dict[str, float]:
    """arm -> median tokens/s of the tier's quiet throughput measurements (``bench.throughput``)."""
    import statistics

    return {arm: statistics.median(v) for arm, v in throughput_by_arm(store.list(group=plan.group(tier))).items()}


def planned_config(plan: Plan, arm: Arm, tier: str, budget: dict[str, Any],
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The resolved model and run configs this arm trains with (as stored in its record)."""
    from bench.config import to_dict
    from bench.data.tasks import load_task
    from bench.train.run import resolve_configs

    cfg, rc = resolve_configs(load_task(plan.task), arm.model, plan.tier(tier).preset,
                              plan.arm_settings(arm, tier, extra), budget)
    return {"model": to_dict(cfg), "run": to_dict(rc)}


def same_config(stored: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """A stored run's config equals the planned one. A field added to the configs after the run
    (missing from its record) counts as equal when the plan leaves it at its default, so adding
    an option does not re-run every finished reference run."""
    from bench.config import to_dict
    from bench.models.config import ModelConfig
    from bench.train.config import RunConfig

    def norm(d):
        return json.loads(json.dumps(d, sort_keys=True, default=str))

    def equal(old: Any, new: Any, default: Any) -> bool:
        if isinstance(old, dict) and isinstance(new, dict):
            default = default if isinstance(default, dict) else {}
            return all(equal(old[k], new[k], default.get(k)) if k in old else new[k] == default.get(k, object())
                       for k in new) and set(old) <= set(new)
        return old == new

    defaults = norm({"model": to_dict(ModelConfig()), "run": to_dict(RunConfig())})
    stored, wanted = norm(stored), norm(wanted)
    return all(equal(stored.get(part), wanted[part], defaults[part]) for part in ("model", "run"))


@dataclass
class PlannedRun:
    arm: Arm
    seed: int
    budget: dict[str, Any]
    done: RunRecord | None = None  # a finished record from an earlier invocation
    resume: RunRecord | None = None  # an unfinished one with a checkpoint, nobody training it
    busy: str | None = None  # another process training this pair now ("process N on HOST (run ID)")
    key: str = ""  # its claim (bench.tracking.claims): the group, arm, seed and planned config


class PlannedRuns(list):
    """The planned (arm, seed) runs, plus the arms that wait for something (``waiting``: label, why)."""

    def __init__(self, runs: list[PlannedRun], waiting: list[tuple[str, str]],
                 wanted: dict[str, dict[str, Any]] | None = None):
        super().__init__(runs)
        self.waiting = waiting
        self.wanted = wanted or {}  # arm label -> its planned config


def plan_runs(plan: Plan, tier: str, store: ResultsStore, seeds: int | None = None, arms: list[str] | None = None,
              flops: float | None = None, extra: dict[str, Any] | None = None, group: str | None = None) -> PlannedRuns:
    """Every (arm, seed) pair of a tier, seed-major so partial results cover all arms early."""
    spec = plan.tier(tier)
    if seeds is not None and seeds < 1:
        raise ConfigError([f"seeds={seeds} is not allowed; expected >= 1"], "reproduce")
    chosen = plan.tier_arms(tier)
    if arms:
        labels = {a.label for a in plan.arms}
        unknown = [a for a in arms if a not in labels]
        if unknown:
            raise ConfigError([f"arm {a!r} is not in {plan.name}; arms: {', '.join(x.label for x in plan.arms)}"
                               for a in unknown], "reproduce")
        chosen = [a for a in plan.arms if a.label in arms]
    budgets, waiting = {}, []
    for a in chosen:
        try:
            budgets[a.label] = arm_budget(plan, a, tier, flops, extra, store)
        except NeedsThroughput as e:
            if arms and a.label in arms:  # asked for by name: say why it cannot run
                raise
            waiting.append((a, e))
    chosen = [a for a in chosen if a.label in budgets]
    group = group or plan.group(tier)
    wanted = {a.label: planned_config(plan, a, tier, budgets[a.label], extra) for a in chosen}
    found = scan_pairs(store, group, wanted)
    claims = Claims(store) if not store.read_only else None
    runs = []
    for seed in spec.seed_list(seeds):
        for a in chosen:
            pair = (a.label, seed)
            key = claim_key(group, a.label, seed, wanted[a.label])
            done = found.finished.get(pair)
            busy = None if done else found.busy.get(pair) or (claims and live_holder(claims, key))
            runs.append(PlannedRun(a, seed, budgets[a.label], done, resume=None if done else found.unfinished.get(pair),
                                   busy=busy, key=key))
    return PlannedRuns(runs, [(a.label, e.problems[0]) for a, e in waiting], wanted)


@dataclass
class PairRecords:
    finished: dict[tuple[str, int], RunRecord]
    unfinished: dict[tuple[str, int], RunRecord]  # the latest resumable one, nobody training it
    busy: dict[tuple[str, int], str]  # run by a live process on this machine that holds no claim


def scan_pairs(store: ResultsStore, group: str, wanted: dict[str, dict[str, Any]]) -> PairRecords:
    """The group's records of each (arm, seed) pair trained with exactly the planned config."""
    found = PairRecords({}, {}, {})
    for r in store.list(group=group):
        arm = r.extra.get("arm")
        if arm not in wanted or is_throughput(r) or not same_config(r.config, wanted[arm]):
            continue
        if r.status == "finished":
            found.finished.setdefault((arm, r.seed), r)
        elif r.status in UNFINISHED:
            owner = live_owner(r.paths.get("run_dir") or "")
            if owner is not None:
                found.busy[(arm, r.seed)] = f"process {owner} on {HOST} (run {r.run_id})"
            elif resumable_checkpoint(r) is not None:
                found.unfinished[(arm, r.seed)] = r
    return found


def mark_lost(store: ResultsStore, holder, announce: Callable[[str], None]) -> None:
    """The run of a claim whose process died (no heartbeat, or its pid gone): a record still
    "running" becomes "interrupted", saying so, instead of running forever. On its own machine it
    continues from its checkpoint; elsewhere the pair starts again."""
    record = store.get(holder.run_id)
    if record is None or record.status != "running":
        return
    if holder.host == HOST and live_owner(record.paths.get("run_dir") or "") is not None:
        return  # the pid in the claim died, but another process here trains the run (a resume)
    last = holder.heartbeat_at.strftime("%Y-%m-%d %H:%M:%S")
    record.finish("interrupted", f"lost: {holder.describe()} stopped (last heartbeat {last} UTC)")
    store.save(record)
    announce(f"  run {record.run_id} was lost with {holder.describe()}: recorded as interrupted")


def claim_key(group: str, arm: str, seed: int, config: dict[str, Any]) -> str:
    """The same for every process that plans this pair with this config (any machine)."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{group}|{arm}|{seed}|{digest}"


def live_holder(claims: Claims, key: str) -> str | None:
    held = claims.holder(key)
    return held.describe() if held is not None and holder_alive(held, stale_after_s=claims.stale_after_s) else None


def run_plan(name_or_path: str | Plan, tier: str = "tiny", seeds: int | None = None, storage: str | None = None,
             data_dir: str | None = None, overrides: list[str] | None = None, arms: list[str] | None = None,
             budget_flops: float | None = None, progress: bool = True,
             announce: Callable[[str], None] | None = None, keep_checkpoints: bool = False,
             group: str | None = None, tags: dict[str, Any] | None = None,
             include_failed: bool = False) -> list[RunRecord]:
    """Train every missing (arm, seed) pair of a plan's tier; return all its finished records
    (and the failed ones with ``include_failed``). ``group``/``tags`` replace the plan's group and
    its reproduction tags (``moe-bench compare`` runs a plan of its own under its own group)."""
    from bench.train.run import resume_run, train

    announce = announce or (lambda msg: print(msg, file=sys.stderr, flush=True))
    # Dozens of runs: Lightning's per-run "GPU available ..." banner drowns the progress lines.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    plan = name_or_path if isinstance(name_or_path, Plan) else load_plan(name_or_path)
    store = ResultsStore(storage)
    problems: list[str] = []
    extra = dict(override_pairs(overrides or [], problems))
    if problems:
        raise ConfigError(problems, "reproduce --set")
    group = group or plan.group(tier)
    # A tier with sequential looks, run as planned, trains look by look (bench.runner.looks).
    by_looks = (seeds is None and not (arms or budget_flops or extra) and group == plan.group(tier)
                and len(plan.tier(tier).looks) > 1)
    trained_up_to, said = None, None
    while True:
        if by_looks:
            seeds, why = look_seeds(plan, tier, store, lambda n: plan_runs(plan, tier, store, n, group=group))
            if why != said:
                announce(why)
                said = why
            if seeds == trained_up_to:  # nothing new: the tier stopped, or waits on runs others train
                break
        runs = plan_runs(plan, tier, store, seeds, arms, budget_flops, extra, group)
        todo = [r for r in runs if r.done is None and r.busy is None]
        for label, why in runs.waiting:
            announce(f"skipping {label}: {why}")
        for r in runs:
            if r.busy is not None:
                announce(f"skipping {r.arm.label} (seed {r.seed}): {r.busy} is training it now")
        spec = {"kind": "flops", "value": float(budget_flops)} if budget_flops else plan.tier(tier).budget_spec()
        preset = plan.tier(tier).preset
        what = "training FLOPs" if spec["kind"] == "flops" else spec["kind"]
        resumed = sum(r.resume is not None for r in todo)
        announce(f"{plan.title}: {len(runs)} runs ({sum(r.done is not None for r in runs)} already finished"
                 + (f", {resumed} to resume" if resumed else "") + f"), tier {tier} "
                 f"(preset {preset}), budget {spec['value']:.3g} {what} per run, group {group}")
        records = [r.done for r in runs if r.done is not None]
        claims = Claims(store)
        with StopAfterRun() as stop:  # SIGUSR1: finish the current run, then start no other
            for i, run in enumerate(todo, 1):
                if stop.asked:
                    announce(f"stopped before [{i}/{len(todo)}] {run.arm.label} (seed {run.seed}), as asked (SIGUSR1): "
                             f"{len(todo) - i + 1} of {len(todo)} runs left; {CONTINUE_HINT}")
                    raise KeyboardInterrupt
                b = run.budget
                # Another process may have taken or finished this pair since the plan was made (two
                # commands sharing a plan): claim it, then look again at its records while holding it.
                run_id = new_run_id(f"{plan.name}-{run.arm.model}")
                holder = claims.acquire(run.key, run_id)
                if holder is not None:
                    announce(f"[{i}/{len(todo)}] {run.arm.label} (seed {run.seed}): skipped, "
                             f"{holder.describe()} is training it now")
                    continue
                if claims.taken_over is not None:
                    mark_lost(store, claims.taken_over, announce)
                now = scan_pairs(store, group, {run.arm.label: runs.wanted[run.arm.label]})
                pair = (run.arm.label, run.seed)
                if pair in now.finished or pair in now.busy:
                    claims.release(run.key)
                    if pair in now.finished:
                        announce(f"[{i}/{len(todo)}] {run.arm.label} (seed {run.seed}): finished meanwhile by another "
                                 f"process (run {now.finished[pair].run_id})")
                        records.append(now.finished[pair])
                    else:
                        announce(f"[{i}/{len(todo)}] {run.arm.label} (seed {run.seed}): skipped, "
                                 f"{now.busy[pair]} is training it now")
                    continue
                run.resume = now.unfinished.get(pair)
                if run.resume is not None:
                    run_id = run.resume.run_id
                    claims.acquire(run.key, run_id)  # ours: now names the run it continues
                with Heartbeat(claims, run.key):  # held while it trains; released however it ends
                    if run.resume is not None:
                        announce(f"[{i}/{len(todo)}] {run.arm.label} (seed {run.seed}): resuming {run.resume.run_id} "
                                 f"from its last checkpoint")
                    else:
                        announce(f"[{i}/{len(todo)}] {run.arm.label} (seed {run.seed}): "
                                 f"{b['kind']} budget {b['value']:.4g}")
                    if tags is not None:
                        run_tags = {**tags, "arm": run.arm.label}
                    else:
                        run_tags = {"reproduction": plan.name, "arm": run.arm.label}
                        if spec["kind"] == "flops":
                            run_tags["budget_flops"] = spec["value"]  # the report keeps each budget of a plan apart
                        if tier != preset:  # tiers named after their preset keep the records of earlier versions
                            run_tags["tier"] = tier
                        if not is_shipped(plan):  # lets `moe-bench report` find a user's own plan again
                            run_tags["plan_file"] = plan.source
                    init_from = None
                    if run.resume is None and run.arm.init_from is not None:
                        source = source_run(plan, tier, run.arm, run.seed, store, group, budget_flops, extra)
                        if source is None:
                            announce(f"  skipping {run.arm.label} (seed {run.seed}): it starts from {run.arm.init_from!r} "
                                     f"(seed {run.seed}), which has no finished run; run that arm first")
                            continue
                        from bench.train.upcycling import from_dense_run

                        init_from = from_dense_run(source.run_id, storage)
                    try:
                        if run.resume is not None:
                            record = resume_run(run_id, storage=storage, data_dir=data_dir, progress=progress,
                                                keep_checkpoints=keep_checkpoints)
                        else:
                            record = train(plan.task, run.arm.model, preset, plan.arm_settings(run.arm, tier, extra),
                                           budget=b, seed=run.seed, storage=storage, data_dir=data_dir, group=group,
                                           name=f"{plan.name}: {run.arm.label}", progress=progress, run_id=run_id,
                                           tags=run_tags, keep_checkpoints=keep_checkpoints, init_from=init_from)
                    except Exception as e:  # train() recorded it as failed (bench.runner.failures: the policy)
                        failed = store.get(run_id)
                        if failed is None or is_fatal(e):
                            raise
                        announce(f"  {run.arm.label} (seed {run.seed}) failed: {one_line(e)}; the other runs go on")
                        if include_failed:
                            records.append(failed)
                        continue
                    if record.status == "interrupted":
                        announce(f"interrupted: {CONTINUE_HINT}")
                        raise KeyboardInterrupt
                    records.append(record)
        if not by_looks:
            break
        trained_up_to = seeds
    return records


def source_run(plan: Plan, tier: str, arm: Arm, seed: int, store: ResultsStore, group: str,
               flops: float | None = None, extra: dict[str, Any] | None = None) -> RunRecord | None:
    """The finished run of ``arm.init_from`` with this seed and its planned config (newest first)."""
    src = plan.arm(arm.init_from)
    wanted = planned_config(plan, src, tier, arm_budget(plan, src, tier, flops, extra, store), extra)
    found = [r for r in store.list(group=group) if r.extra.get("arm") == src.label and r.seed == seed
             and r.status == "finished" and not is_throughput(r) and same_config(r.config, wanted)]
    return max(found, key=lambda r: r.started_at) if found else None


# -- `moe-bench compare`: a plan built from its arguments -----------------------------------------
def comparison_plan(task: str, families: list[str], preset: str, budget: dict[str, Any], seeds: int) -> Plan:
    kind, value = budget["kind"], budget["value"]
    tier = {"preset": preset, "seeds": seeds,
            **({"budget_flops": value} if kind == "flops" else {"budget": {kind: value}})}
    claims = [{"text": f"{f} reaches a lower validation loss than {families[0]} at the same budget", "kind": "better",
               "a": f, "b": families[0], "metric": "val_loss", "direction": "lower"} for f in families[1:]]
    return parse_plan({"name": "compare", "title": f"{' vs '.join(families)} on {task}", "task": task,
                       "baseline": families[0], "tiers": {"cli": tier},
                       "arms": [{"label": f, "model": f} for f in families], "claims": claims}, "compare")


def compare(task: str, families: list[str], preset: str = "tiny", budget: dict[str, Any] | None = None,
            seeds: int = 1, overrides: list[str] | None = None, storage: str | None = None,
            data_dir: str | None = None, group: str | None = None, progress: bool = True,
            announce=print) -> tuple[Plan, list[RunRecord]]:
    """Train every family x seed at the same budget into one group; (the plan, its records)."""
    group = group or new_run_id(f"compare-{task}")
    plan = comparison_plan(task, families, preset, budget or {"kind": "steps", "value": 500}, seeds)
    records = run_plan(plan, "cli", storage=storage, data_dir=data_dir, overrides=overrides, progress=progress,
                       announce=announce, group=group, tags={"comparison": group}, include_failed=True)
    return plan, records


__all__ = ["compare", "comparison_plan", "PlannedRun", "PlannedRuns", "NeedsThroughput", "plan_runs", "run_plan", "arm_budget", "planned_config",
           "same_config", "source_run", "throughput_medians"]
