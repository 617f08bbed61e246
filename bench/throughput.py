"""Training throughput of a plan's arms, measured together in one quiet process.

    moe-bench reproduce NAME --tier T --throughput [--repeats 3] [--storage URL]

The equal-wall-clock claims (Fedus et al. Table 1's time to a quality) need tokens/s that are
comparable across arms. A training run's own timing is not: on a shared machine another job can
slow one run and not the next. Here every arm of the tier trains the same real-text batches with
its planned config, arms interleaved (A B A B ...) so drift hits all alike, after warm-up steps
(oneDNN builds a bf16 kernel per new matmul shape). Sparse arms run dropless, i.e. at the full
FLOP-matched cost of a balanced router: at initialisation a router sends most tokens to one or two
experts, and with a capacity limit a timed step would drop most of them and look cheap.

Each measurement is stored as a record tagged ``kind: throughput`` in the plan's group; the report
takes the median per arm. Arms that differ only in their capacity factor therefore time the same
computation: a speed claim between them is not measured (the report says so) and would need a
trained router's balance.
"""
from __future__ import annotations

import logging
import warnings
from typing import Callable

import torch

from bench.plans import Plan
from bench.tracking.records import THROUGHPUT_KIND, ResultsStore, RunRecord, git_commit, new_run_id


def measure_throughput(plan: Plan, tier: str, storage: str | None = None, arms: list[str] | None = None,
                       repeats: int = 3, steps: int = 30, warmup: int = 20, data_dir: str | None = None,
                       announce: Callable[[str], None] | None = None) -> list[RunRecord]:
    from bench.config import ConfigError, to_dict
    from bench.data.datamodules import LMDataModule
    from bench.data.tasks import load_task
    from bench.models import build_model
    from bench.perf import lightning_tokens_per_sec
    from bench.runtime import CpuClock, apply_cpu_settings, device_name, load_average, machine_id, usable_cpus
    from bench.train.run import _precision, resolve_configs

    announce = announce or (lambda msg: None)
    task = load_task(plan.task)
    if task.type != "lm":
        raise ConfigError([f"--throughput measures language-model plans; {plan.name!r} is a {task.type} task"],
                          "reproduce")
    chosen = [a for a in plan.tier_arms(tier) if not arms or a.label in arms]
    apply_cpu_settings()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where training runs (accelerator="auto")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    store = ResultsStore(storage)
    preset = plan.tier(tier).preset
    setups = {}
    for arm in chosen:
        settings = plan.arm_settings(arm, tier)
        cfg, rc = resolve_configs(task, arm.model, preset, settings, None)  # the budget does not change speed
        if cfg.is_sparse:  # dropless: the full cost of a balanced router (see the module docstring)
            cfg, _ = resolve_configs(task, arm.model, preset, {**settings, "capacity_factor": None}, None)
        setups[arm.label] = (arm, cfg, rc, {"model": to_dict(cfg), "run": to_dict(rc)})  # as timed (dropless)
    timed: dict[str, list[str]] = {}
    for label, (_, cfg, _, _) in setups.items():
        timed.setdefault(repr(to_dict(cfg)), []).append(label)
    for same in (labels for labels in timed.values() if len(labels) > 1):
        announce(f"  note: {', '.join(same)} time the same model (dropless, their capacity does not count; "
                 "a training setting such as the learning rate never does): their tokens/s differ by noise "
                 "alone, and the report does not judge a speed claim between them")
    batch_size = next(iter(setups.values()))[2].train.batch_size
    dm = LMDataModule(task, data_dir=data_dir, batch_size=batch_size, seed=0, allow_download=False)
    dm.prepare_data()
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    batches = [next(it) for _ in range(steps + warmup)]
    records = []
    for repeat in range(repeats):
        for label, (arm, cfg, rc, timed_config) in setups.items():
            torch.manual_seed(repeat)
            bf16 = _precision(rc.train.precision) == "bf16-mixed"
            clock = CpuClock()
            tps, _ = lightning_tokens_per_sec(build_model(cfg, "lm"), batches, bf16, warmup, device)
            announce(f"  {label} (repeat {repeat}): {tps:,.0f} tokens/s")
            record = RunRecord(
                run_id=new_run_id(f"{plan.name}-throughput-{arm.model}"), name=f"{plan.name}: {label} throughput",
                group=plan.group(tier), task=task.name, family=arm.model, preset=preset, seed=repeat,
                git_commit=git_commit(), config=timed_config, steps=steps, tokens_seen=steps * batches[0][0].numel(),
                metrics={"tokens_per_second": tps},
                # the load right after the timed steps (near the thread count when the machine was quiet)
                # and the process's CPU share over them (near 1 when nothing took part of its cores)
                timings={"tokens_per_second": tps, "device": device_name(device), "load_avg": load_average(),
                         "cpus": usable_cpus(), "cpu_share": clock.share(), "machines": [m for m in [machine_id()] if m]},
                extra={"reproduction": plan.name, "arm": label, "tier": tier, "kind": THROUGHPUT_KIND, "dropless": cfg.is_sparse,
                       "warmup_steps": warmup, "precision": "bf16-mixed" if bf16 else "32"})
            store.save(record.finish("finished"))
            records.append(record)
    return records


__all__ = ["measure_throughput"]
