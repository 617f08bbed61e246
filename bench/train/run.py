"""Build and run one training run from a task, a model family and a budget; write its record.

    train(task, family, preset, overrides, budget, seed, storage) -> RunRecord

The record is written to the results store when the run starts (status "running") and again
when it ends: "finished", "failed" (with the error) or "interrupted" (Ctrl-C / SIGTERM; the
last checkpoint stays, and ``resume_run`` continues it to the same final metrics).
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from bench.config import ConfigError, from_dict, to_dict
from bench.data.datamodules import build_datamodule
from bench.data.tokenizers import check_resumed_vocab_size, data_fingerprint, derive_vocab_size
from bench.data.tasks import TaskConfig, load_task
from bench.flops import model_cost
from bench.models import build_model, model_config
from bench.models.config import ModelConfig, task_problems
from bench.models.moe import use_frequency_hash
from bench.runtime import apply_cpu_settings, denormals_flushed, device_name, skip_uninitialized_fill
from bench.tracking.liveness import LOCK_NAME, live_owner
from bench.tracking.records import ResultsStore, RunRecord, git_commit, new_run_id, runs_dir, sqlite_file
from bench.train.callbacks import (BudgetBar, BudgetStop, ComputeTracker, CurveBLEU, EvalCurve, ExpertStats,
                                   ProgressLine, RNGState, summarize_moe_stats)
from bench.train.callbacks import BalanceBias, MachineLoad, RoutingHealth, SaveProgress
from bench.train.config import RunConfig, run_config, split_overrides
from bench.train.module import LMModule, TranslationModule, eval_batch_size
from bench.train.task_metrics import add_bits_per_char, lm_split_size


# Lightning 2.6 calls a torch 2.13-deprecated pytree API once per fit: noise for every user.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def _precision(requested: str) -> str:
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32"
    # CPU: bf16 autocast trains ~1.5x faster on CPUs with AVX512-BF16/AMX; fp16 is never used.
    return "bf16-mixed" if _cpu_has_bf16() else "32"


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_configs(task: TaskConfig, family: str, preset: str, overrides: list[str] | dict,
                    budget: dict[str, Any] | None, data_dir: str | None = None) -> tuple[ModelConfig, RunConfig]:
    """The model and run configs of one run. A task without vocab_size takes its data's (the
    tokenizer built on its training split), so plans, sweeps and `flops` size the model as `train` does."""
    if task.vocab_size is None:
        task = derive_vocab_size(task, data_dir)
    model_over, run_over = split_overrides(overrides or [])
    if budget:
        run_over.update({f"budget.{k}": v for k, v in budget.items()})
    problems = []
    cfg = rc = None
    try:
        cfg = model_config(family, preset, model_over, vocab_size=task.vocab_size, max_seq_len=task.max_seq_len)
        if cfg.vocab_size < task.vocab_size:  # larger only pads the embedding; smaller cannot embed every id
            problems.append(f"vocab_size={cfg.vocab_size} is not allowed: the model must cover the task's "
                            f"{task.vocab_size} tokens (drop `--set vocab_size`, or set it >= {task.vocab_size})")
        problems += task_problems(cfg, task.type)  # e.g. expert choice in a causal LM
    except ConfigError as e:
        problems += e.problems
    try:
        rc = run_config(run_over)
    except ConfigError as e:
        problems += e.problems
    if cfg is not None and rc is not None:
        problems += expert_parallel_problems(cfg, rc.train.expert_parallel)
    if problems:
        raise ConfigError(problems, f"{family} run config")
    return cfg, rc


def expert_parallel_problems(cfg: ModelConfig, expert_parallel: int) -> list[str]:
    """Expert parallelism needs experts to shard: a sparse model whose expert count it divides."""
    if expert_parallel <= 1:
        return []
    if not cfg.is_sparse:
        return [f"expert_parallel={expert_parallel} is not allowed: a {cfg.family} model has no experts to shard"]
    if cfg.moe.num_experts % expert_parallel:
        return [f"expert_parallel={expert_parallel} is not allowed: it must divide the {cfg.moe.num_experts} "
                "experts of every MoE layer"]
    return []


def _strategy(tr):
    """Lightning's strategy for ``train.strategy``; expert parallelism is DDP with sharded experts."""
    if tr.expert_parallel <= 1:
        return tr.strategy
    from bench.train.expert_parallel import ExpertParallelStrategy

    return ExpertParallelStrategy(tr.expert_parallel, start_method="spawn" if tr.strategy == "ddp_spawn" else "popen")


def train(task: str | TaskConfig, family: str, preset: str = "tiny", overrides: list[str] | dict | None = None,
          budget: dict[str, Any] | None = None, seed: int = 0, storage: str | None = None,
          data_dir: str | None = None, group: str | None = None, name: str | None = None,
          progress: bool = True, extra_callbacks: list[pl.Callback] | None = None,
          run_id: str | None = None, tags: dict[str, Any] | None = None,
          keep_checkpoints: bool = False, init_from=None) -> RunRecord:
    """Train one model under a compute budget and return its (stored) run record.

    A run that finishes (or is pruned) deletes its checkpoint unless ``keep_checkpoints``: the
    record holds everything reports need, and checkpoints of sparse models are large (a tiny
    Switch model's is 123 MB). Interrupted and failed runs keep theirs, to resume or inspect.

    ``init_from``: weights from another run, prepared by ``bench.train.upcycling.from_dense_run(RUN_ID)``
    (sparse upcycling: a finished dense run initialises this switch/moe model); called with the
    resolved (cfg, rc, task), it checks them and returns the record's ``init_from`` entry (which
    holds that run's training FLOPs: a FLOPs budget counts them too) and the function that loads the
    weights into the built model."""
    task_file = _task_file(task)
    task = task if isinstance(task, TaskConfig) else load_task(task)
    if task.vocab_size is not None:  # bad settings are reported before any work on the data
        resolve_configs(task, family, preset, overrides or [], budget)
    _check_before_work(seed)
    # Missing or corrupt data, or a vocab_size the data does not have: one clear error before a
    # record, run folder or W&B run exists. A task without vocab_size gets its data's.
    task = derive_vocab_size(task, data_dir)
    cfg, rc = resolve_configs(task, family, preset, overrides or [], budget)
    init, source = None, {}
    if init_from is not None:  # the source is checked before any record or run folder exists
        source, init = init_from(cfg, rc, task)
    for warning in schedule_warnings(task, cfg, rc, inherited_flops=float(source.get("train_flops") or 0.0)):
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    # A launcher's worker joins rank 0's run (the id comes in the environment); across nodes the
    # user sets MOE_BENCH_RUN_ID on every node, so all of them share one run folder.
    shared = launched_worker() or rc.train.num_nodes > 1
    run_id = run_id or (os.environ.get(RUN_ID_ENV) if shared else None) or new_run_id(f"{task.name}-{family}")
    # The data's vocabulary size (the model's may be larger): --resume checks the data still gives it.
    config = {"model": to_dict(cfg), "run": to_dict(rc), "data_dir": data_dir, "data_vocab_size": task.vocab_size,
              "data_sha256": data_fingerprint(task, data_dir)}  # --resume checks the files are unchanged
    if task_file:
        config["task_file"] = task_file  # a task given by path: --resume finds it again (and checks it)
    if init is not None:
        config["init_from"] = source  # the dense run and its training FLOPs (the budget counts them)
    record = RunRecord(run_id=run_id, name=name or run_id, group=group, task=task.name, family=family,
                       preset=preset, seed=seed, git_commit=git_commit(), config=config, extra=dict(tags or {}))
    return _execute(record, task, cfg, rc, storage, data_dir, progress, extra_callbacks, ckpt_path=None,
                    keep_checkpoints=keep_checkpoints, init=init)


RUN_ID_ENV = "MOE_BENCH_RUN_ID"  # the run a DDP launcher's worker processes belong to


def launched_worker() -> bool:
    """True in a process a DDP launcher started for a rank other than global rank 0: Lightning's
    ``strategy=ddp`` re-runs the command with LOCAL_RANK=1.., torchrun and SLURM set RANK or
    SLURM_PROCID, other nodes have NODE_RANK > 0. Such a process trains its part of the run; the
    record, run folder, W&B run and printed summary are rank 0's."""
    if any(os.environ.get(var, "0") not in ("", "0") for var in ("RANK", "SLURM_PROCID")):
        return True
    return os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0"


def inherited_train_flops(record: RunRecord) -> float:
    """Training FLOPs of the dense run an upcycled run started from (0 for any other run)."""
    return float((record.config.get("init_from") or {}).get("train_flops") or 0.0)


def _task_file(task: str | TaskConfig) -> dict[str, str] | None:
    """{path, sha256} of a task given as a YAML path (not a shipped task name), else None."""
    import hashlib

    from bench.data.tasks import default_tasks_dir, task_path

    if isinstance(task, TaskConfig):
        return None
    path = task_path(task).resolve()
    if path.parent == default_tasks_dir().resolve():
        return None
    return {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def _recorded_task(record: RunRecord, context: str = "resume") -> TaskConfig:
    """The task a run trained on: its shipped name, or the YAML file it was given (checked unchanged)."""
    import hashlib

    source = record.config.get("task_file")
    if not source:
        return load_task(record.task)
    path = Path(source["path"])
    if not path.is_file():
        raise ConfigError([f"run {record.run_id} trained on the task file {path}, which is no longer there: put it "
                           f"back (or restore it) to {context}"], context)
    if hashlib.sha256(path.read_bytes()).hexdigest() != source["sha256"]:
        raise ConfigError([f"the task file {path} changed since run {record.run_id} started: {context} would use "
                           "different data or settings; restore the file, or start a new run"], context)
    return load_task(path)


def expected_steps(task: TaskConfig, cfg: ModelConfig, rc: RunConfig, inherited_flops: float = 0.0) -> int | None:
    """Optimizer steps the budget buys (LM tasks; None for time budgets or translation, whose
    batches vary in length). ``inherited_flops``: an upcycled run's dense pre-training, which a
    FLOPs budget counts too (``inherited_train_flops``)."""
    kind, value = rc.budget.kind, rc.budget.value
    if kind == "flops":
        value -= inherited_flops
    if kind == "steps":
        return int(value)
    if kind == "seconds" or task.type != "lm":
        return None
    tokens_per_step = rc.train.batch_size * rc.train.devices * task.seq_len
    tokens = value if kind == "tokens" else value / model_cost(cfg, task.target_len).train_flops_per_token
    return max(1, math.ceil(tokens / tokens_per_step))


def schedule_warnings(task: TaskConfig, cfg: ModelConfig, rc: RunConfig, inherited_flops: float = 0.0) -> list[str]:
    """Settings that silently do nothing at this budget: warmup longer than the run, or no
    intermediate evaluation (no learning curve, no pruning). An upcycled run's steps are those of
    the budget left after its dense run's FLOPs."""
    steps = expected_steps(task, cfg, rc, inherited_flops)
    if steps is None:
        return []
    out = []
    if rc.optim.warmup_steps >= steps:
        out.append(f"warmup_steps={rc.optim.warmup_steps} is not shorter than the whole run (~{steps} steps at this "
                   f"budget): the learning rate never reaches optim.lr; lower warmup_steps")
    if rc.train.eval_every > steps:
        out.append(f"eval_every={rc.train.eval_every} is longer than the run (~{steps} steps): no intermediate "
                   "evaluation, so no learning curve (step speed-ups, gap plots) and no pruning; lower eval_every")
    return out


def _check_before_work(seed: int) -> None:
    """Problems that would otherwise surface as tracebacks after a record and run folder exist."""
    problems = []
    if not 0 <= seed < 2**32:  # numpy/Lightning seed range
        problems.append(f"seed={seed} is not allowed: expected an integer in [0, 2**32 - 1]")
    root = runs_dir()
    probe = root if root.exists() else next((p for p in root.parents if p.exists()), Path("."))
    if not os.access(probe, os.W_OK):
        problems.append(f"run folders go to {root.resolve()}, which is not writable: set MOE_BENCH_RUNS to a "
                        "writable directory")
    if problems:
        raise ConfigError(problems, "run")


def resume_run(run_id: str, storage: str | None = None, data_dir: str | None = None, progress: bool = True,
               keep_checkpoints: bool = False, extra_callbacks: list[pl.Callback] | None = None) -> RunRecord:
    """Continue a killed or interrupted run from its last checkpoint with its recorded config."""
    record = stored_record(run_id, storage, "resume")
    if record.status == "finished":
        raise ConfigError([f"run {run_id} already finished: nothing to resume (its results are in the store)"],
                          "resume")
    ckpt = Path(record.paths.get("checkpoint_dir") or "") / "last.ckpt"
    if not ckpt.exists():
        raise ConfigError([f"run {run_id} has no checkpoint at {ckpt}; it stopped before its first "
                           "evaluation, so start it again instead"], "resume")
    try:  # a damaged checkpoint must not turn the interrupted record into a failed, empty one
        torch.load(ckpt, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ConfigError([f"the checkpoint of run {run_id} cannot be read ({type(e).__name__}: {e}); its record is "
                           f"unchanged. Start the run again, or restore {ckpt} from a backup"], "resume") from None
    task = _recorded_task(record)
    cfg = from_dict(ModelConfig, record.config["model"])
    rc = from_dict(RunConfig, record.config["run"])
    owner = live_owner(Path(record.paths.get("run_dir") or ""))
    if record.status == "running" and owner is not None and not launched_worker():  # a worker joins rank 0's
        raise ConfigError([f"run {run_id} is still running (process {owner}): resuming it now would make two "
                           "processes write one run; wait for it, or stop it first"], "resume")
    data_dir = data_dir or record.config.get("data_dir")
    # An edited corpus would feed the checkpoint ids it was not built for: stop before the record changes.
    check_resumed_vocab_size(task, record.config.get("data_vocab_size", cfg.vocab_size), run_id, data_dir,
                             recorded_sha256=record.config.get("data_sha256"))
    record.status, record.error, record.finished_at = "running", None, None
    return _execute(record, task, cfg, rc, storage, data_dir, progress,
                    extra_callbacks, ckpt_path=str(ckpt), keep_checkpoints=keep_checkpoints)


def stored_record(run_id: str, storage: str | None, context: str) -> RunRecord:
    """The record of ``run_id``, or one clear error (a mistyped store path is never created)."""
    db_file = sqlite_file(storage)
    if db_file is not None and not db_file.exists():
        raise ConfigError([f"no results store at {db_file}: check --storage (runs list with `moe-bench runs "
                           "--storage URL`)"], context)
    store = ResultsStore(storage)
    record = store.get(run_id)
    if record is None:
        raise ConfigError([f"run_id={run_id!r} is not in the results store {store.url}; "
                           "list runs with `moe-bench runs`"], context)
    return record


def _execute(record: RunRecord, task: TaskConfig, cfg: ModelConfig, rc: RunConfig, storage: str | None,
             data_dir: str | None, progress: bool, extra_callbacks, ckpt_path: str | None,
             keep_checkpoints: bool = False, init=None) -> RunRecord:
    apply_cpu_settings()
    pl.seed_everything(record.seed, workers=True, verbose=False)
    worker = launched_worker()  # rank > 0 of a launched DDP job: no record, lock or W&B of its own
    store = _NoStore() if worker else ResultsStore(storage)
    run_dir = runs_dir() / record.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    launched_id = os.environ.get(RUN_ID_ENV)
    if not worker:
        (run_dir / LOCK_NAME).write_text(str(os.getpid()))
        os.environ[RUN_ID_ENV] = record.run_id  # inherited by the ranks strategy=ddp launches
    # A resumed run adds this segment to the wall time of the segments before it (as saved at its
    # last evaluation when it was killed outright).
    earlier_timings = dict(record.timings) if ckpt_path else {}  # also pools the load samples below
    earlier_wall = float(earlier_timings.get("wall_seconds") or 0.0)

    tr = rc.train
    dm_kwargs: dict[str, Any] = dict(data_dir=data_dir, batch_size=tr.batch_size, seed=record.seed,
                                     num_workers=tr.num_workers)
    if task.type == "lm":
        # One "epoch" = eval_every steps: evaluation and checkpoints fall on epoch boundaries,
        # where the seeded sampler makes a resumed run see exactly the same batches.
        dm_kwargs["samples_per_epoch"] = tr.eval_every * tr.batch_size
    dm = build_datamodule(task, **dm_kwargs)
    dm.eval_batch_size = eval_batch_size(tr.eval_batch_size, cfg, task)
    model = build_model(cfg, task.type)
    if init is not None:  # sparse upcycling: the dense run's weights (a resumed run loads its checkpoint)
        init(model)
    if cfg.moe is not None and cfg.moe.hash_assignment == "frequency":
        counts = dm.train_token_counts(cfg.vocab_size)  # balanced hash tables (Roller et al. 2021)
        use_frequency_hash(model, lambda name: counts.get("tokens", counts.get("src" if name.startswith("encoder.")
                                                                               else "tgt")))
    cost = model_cost(cfg, task.target_len, task.type, src_len=task.src_len)
    tracker = ComputeTracker(cfg, task.type)
    inherited = inherited_train_flops(record)  # an upcycled run's FLOPs budget counts its dense run's
    budget = BudgetStop(rc.budget.kind, rc.budget.value - (inherited if rc.budget.kind == "flops" else 0), tracker)
    module_cls = LMModule if task.type == "lm" else TranslationModule
    module = module_cls(model, rc.optim, cost.active_params)

    record.budget = {"kind": rc.budget.kind, "value": rc.budget.value}
    record.params = {"total": cost.total_params, "active": cost.active_params,
                     "total_no_embed": cost.total_params_no_embed, "active_no_embed": cost.active_params_no_embed}
    record.flops = {"forward_per_token": cost.forward_flops_per_token, "train_per_token": cost.train_flops_per_token,
                    "executed_train_per_token": 3 * cost.executed_forward_flops_per_token}
    if tr.expert_parallel > 1:  # what expert parallelism sends per step and rank (bench/flops.py)
        value_bytes = 2 if "bf16" in _precision(tr.precision) else 4
        sent = cost.all_to_all_bytes_per_step(tr.batch_size * task.target_len, value_bytes, tr.expert_parallel)
        record.flops["all_to_all_bytes_per_step_per_rank"] = sent["volume"]
        record.flops["all_to_all_bytes_off_rank_per_step_per_rank"] = sent["off_rank"]
    ckpt_dir = run_dir / "checkpoints"

    # A resumed run logs to a new CSV file: CSVLogger would overwrite the earlier one.
    csv_version = "csv" if ckpt_path is None else f"csv-resumed-{time.strftime('%Y%m%d-%H%M%S')}"
    loggers: list = [CSVLogger(save_dir=str(run_dir), name="", version=csv_version)]
    record.paths = {"run_dir": str(run_dir), "checkpoint_dir": str(ckpt_dir),
                    "csv_file": str(run_dir / csv_version / "metrics.csv")}
    wandb_logger = None if worker else _wandb_logger(record, run_dir)
    if wandb_logger is not None:
        loggers.append(wandb_logger)
        from bench.tracking.wandb_setup import wandb_run_info

        info = wandb_run_info(wandb_logger)
        record.wandb = info
        record.paths["wandb_dir"] = info.get("dir")
    store.save(record)

    curve = EvalCurve(budget)
    load = MachineLoad()  # was the machine shared? (the report flags runs whose timings it skewed)
    callbacks = [budget, curve, load, ExpertStats(every=max(1, tr.eval_every // 10)), RNGState(),
                 # One rolling checkpoint, written after every evaluation (an epoch boundary).
                 ModelCheckpoint(dirpath=str(ckpt_dir), filename="last", save_top_k=1, monitor=None,
                                 enable_version_counter=False, save_on_train_epoch_end=False)]
    health = RoutingHealth()  # routing health of every evaluation, into the record's expert_stats
    callbacks += [BalanceBias(), health]  # BalanceBias: the aux-loss-free bias step (balance=bias)
    if task.type == "translation" and tr.curve_bleu_batches:
        callbacks.insert(callbacks.index(curve) + 1,
                         CurveBLEU(curve, dm, tr.curve_bleu_batches, tr.max_decode_len or task.tgt_len))

    def timings() -> dict:
        """Wall time and the rest of ``record.timings`` so far, with a resumed run's earlier segments."""
        return {"wall_seconds": earlier_wall + time.perf_counter() - start, "train_seconds": budget.spent["seconds"],
                "tokens_per_second": budget.spent["tokens"] / max(budget.spent["seconds"], 1e-9),
                # what the speed was measured on (GPU tiers name their device)
                "device": device_name(trainer.strategy.root_device), "processes": trainer.world_size,
                "precision": str(trainer.precision), "denormals_flushed": denormals_flushed(),
                **load.timings(earlier_timings)}

    def save_progress() -> None:
        record.steps, record.tokens_seen = int(budget.spent["steps"]), int(budget.spent["tokens"])
        record.train_flops, record.curve = float(budget.spent["flops"]), list(curve.points)
        # Timings too: a run killed outright (-9, a lost machine) then keeps the time it spent up to
        # its last checkpoint, which its resumed segment adds to (it used to start again from 0).
        record.timings = timings()
        store.save(record)

    if not worker:
        callbacks.append(SaveProgress(save_progress))  # after the curve (and its BLEU) took the evaluation
    # A terminal gets a bar measured in the budget; anything else (log file, CI) a line each minute.
    bar = progress and sys.stderr.isatty()
    if bar:
        callbacks.append(BudgetBar(budget, record.name or record.run_id))
    elif progress:
        every = float(os.environ.get("MOE_BENCH_PROGRESS_EVERY", "60"))  # seconds between lines
        callbacks.append(ProgressLine(budget, record.name or record.run_id, every_s=every))
    # Lightning's per-run banners (GPU/TPU available, tips) say nothing a moe-bench user needs.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    callbacks += extra_callbacks or []
    trainer = pl.Trainer(
        accelerator="auto", devices=tr.devices, num_nodes=tr.num_nodes, strategy=_strategy(tr),
        precision=_precision(tr.precision),
        max_epochs=-1, max_steps=int(rc.budget.value) if rc.budget.kind == "steps" else -1,
        limit_train_batches=tr.eval_every if task.type == "translation" else None,
        limit_val_batches=tr.eval_batches, num_sanity_val_steps=0, check_val_every_n_epoch=1,
        gradient_clip_val=rc.optim.grad_clip or None, logger=loggers, callbacks=callbacks,
        enable_progress_bar=bar, enable_model_summary=False, default_root_dir=str(run_dir),
        log_every_n_steps=1, deterministic="warn", use_distributed_sampler=False,
    )
    skip_uninitialized_fill()  # after the Trainer turned deterministic algorithms on
    start = time.perf_counter()
    status, error = "finished", None
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        budget.sync_from_logged(trainer.callback_metrics)
        if trainer.interrupted:
            status = "interrupted"
        else:
            record.metrics = final_evaluation(trainer, module, dm, task, rc, cost.active_params)
            if "study" not in record.extra and trainer.is_global_zero:  # sweep trials: many, only numbers matter
                record.paths["model"] = str(save_model(model, cfg, task, run_dir))
    except (KeyboardInterrupt, SystemExit, SIGTERMException) as e:
        # Lightning turns Ctrl-C into a graceful shutdown followed by exit(1), and SIGTERM into
        # SIGTERMException: record the run as interrupted (its last checkpoint can be resumed).
        if isinstance(e, SystemExit) and not trainer.interrupted:
            raise
        status = "interrupted"
    except Exception as e:  # recorded, then re-raised for the caller (a sweep marks the trial)
        if _is_trial_pruned(e):  # an Optuna pruning callback stopped this sweep trial early
            status, error = "pruned", str(e)
            record.metrics = _last_evaluation(trainer)
        else:
            status, error = "failed", f"{type(e).__name__}: {e}"
            record.extra["traceback"] = traceback.format_exc(limit=20)
        raise
    finally:
        record.steps = int(budget.spent["steps"])
        record.tokens_seen = int(budget.spent["tokens"])
        record.train_flops = float(budget.spent["flops"])
        if inherited:  # this run's training FLOPs above; with its dense run's here
            record.extra["total_train_flops"] = inherited + record.train_flops
        if not worker:
            (run_dir / LOCK_NAME).unlink(missing_ok=True)
            _restore_env(RUN_ID_ENV, launched_id)  # the next run of this process gets its own id
        record.timings = timings()
        record.expert_stats = health.merge_into(summarize_moe_stats(module.last_moe_stats))
        record.curve = list(curve.points)
        record.finish(status, error)
        if status in ("finished", "pruned") and not keep_checkpoints and not worker:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
            record.paths["checkpoint_dir"] = None  # removed: the run cannot (and need not) be resumed
        store.save(record)
        if wandb_logger is not None:
            _finish_wandb(wandb_logger, record)
    return record


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


class _NoStore:
    """The results store of a launched worker rank: rank 0 writes the run's record."""

    def save(self, record: RunRecord) -> None:
        pass


def _is_trial_pruned(error: BaseException) -> bool:
    try:
        from optuna.exceptions import TrialPruned
    except ImportError:  # optuna is a dependency, but training must not need it
        return False
    return isinstance(error, TrialPruned)


def _last_evaluation(trainer: pl.Trainer) -> dict:
    """The metrics of the last (partial) evaluation: what a pruned run reached."""
    metrics = {k.replace("/", "_"): float(v) for k, v in trainer.callback_metrics.items()
               if k.startswith("val/") and getattr(v, "numel", lambda: 1)() == 1}
    return _headline(metrics)


def final_evaluation(trainer: pl.Trainer, module, dm, task: TaskConfig, rc: RunConfig, active_params: int,
                     splits: list[str] | None = None, hyp_prefix: str = "") -> dict:
    """Evaluate on the whole validation (and test) split; translation adds BLEU and chrF.

    `moe-bench evaluate` calls this very function on the rebuilt model (bench/train/evaluate.py),
    so it reproduces a run's final metrics exactly; ``hyp_prefix`` keeps its hypothesis files
    apart from the run's own."""
    trainer.limit_val_batches = 1.0
    trainer.limit_test_batches = 1.0
    splits = splits or ["val"] + (["test"] if task.has_split("test") else [])
    metrics: dict[str, Any] = {}
    for split in splits:
        loader = dm.val_dataloader() if split == "val" else dm.test_dataloader()
        refs = dm.references(split) if task.type == "translation" else None
        scores = evaluate_loader(trainer, module, loader, split, task, rc, active_params, dm.tokenizer, refs,
                                 Path(trainer.default_root_dir) / f"{hyp_prefix}{split}.hyp.txt",
                                 decode_batches=rc.train.decode_batches)
        metrics.update({f"{split}_{k}": v for k, v in scores.items()})
        if "bleu" in scores:
            for logger in trainer.loggers:
                logger.log_metrics({f"{split}/{k}": scores[k] for k in ("bleu", "chrf", "quality")},
                                   step=trainer.global_step)
    if task.type == "lm":
        if "val" in splits:
            metrics["unigram_baseline_val_loss"] = float(dm.unigram_baseline_loss("val"))
        for split in splits:
            add_bits_per_char(metrics, task, f"{split}_", *lm_split_size(dm, split))
    return _headline(metrics)


def evaluate_loader(trainer: pl.Trainer, module, loader, stage: str, task: TaskConfig, rc: RunConfig,
                    active_params: int, tokenizer=None, references: list[str] | None = None,
                    hyp_file: Path | None = None, decode_batches: int = 0) -> dict:
    """Metrics of one evaluation loader, unprefixed (loss, perplexity, bits_per_token, ...): the
    loss through Lightning's validate/test step, as during training; for translation also BLEU and
    chrF of ``decode(...)`` on its first ``decode_batches`` batches (0 = all) against ``references``,
    with the hypotheses written to ``hyp_file``."""
    from bench.metrics import corpus_bleu, corpus_chrf, quality_per_active_param, quality_translation

    results = (trainer.test if stage == "test" else trainer.validate)(module, dataloaders=loader, verbose=False)
    metrics: dict[str, Any] = {k.split("/", 1)[1]: float(v) for k, v in (results[0] if results else {}).items()}
    if references is None:
        return metrics
    hyps = decode(module.model, loader if not decode_batches else _take(loader, decode_batches), tokenizer, task, rc)
    refs = references[: len(hyps)]
    bleu, chrf = corpus_bleu(hyps, refs), corpus_chrf(hyps, refs)
    metrics["bleu"], metrics["chrf"] = bleu["score"], chrf["score"]
    metrics["bleu_signature"], metrics["chrf_signature"] = bleu["signature"], chrf["signature"]
    metrics["quality"] = quality_translation(bleu["score"])
    metrics["quality_per_active_param"] = quality_per_active_param(metrics["quality"], active_params)
    if hyp_file is not None:
        _write_lines(hyp_file, hyps)
    return metrics


def decode(model, batches, tokenizer, task: TaskConfig, rc: RunConfig) -> list[str]:
    """Hypotheses of a translation model with the run's decoding settings (beam size, length limit)."""
    from bench.decoding import translate

    max_len = rc.train.max_decode_len or task.tgt_len
    hyps = translate(model, batches, tokenizer, beam_size=rc.train.beam_size, max_len=max_len)
    return [h.strip() for h in hyps]  # a generated first token may carry BPE's word-initial space


MODEL_FILE = "model.pt"


def save_model(model: torch.nn.Module, cfg: ModelConfig, task: TaskConfig, run_dir: Path) -> Path:
    """Weights only (no optimizer state: about a third of a checkpoint) and the config to rebuild
    the model with ``build_model``: what `moe-bench evaluate` / `translate` need after the
    checkpoint is gone."""
    path = run_dir / MODEL_FILE
    torch.save({"model_config": to_dict(cfg), "task_type": task.type, "state_dict": model.state_dict()}, path)
    return path


def _headline(metrics: dict) -> dict:
    """The record's headline numbers are the validation ones (DESIGN.md: quality on val)."""
    metrics["quality"] = metrics.get("val_quality")
    metrics["quality_per_active_param"] = metrics.get("val_quality_per_active_param")
    return metrics


def _take(loader, n: int):
    for i, batch in enumerate(loader):
        if i >= n:
            return
        yield batch


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


# Record tags that say which command made a run (W&B job_type), and which of them become W&B tags.
_JOB_TYPES = (("study", "sweep-trial"), ("reproduction", "reproduce"), ("comparison", "compare"))
_TAGGED = ("arm", "reproduction", "tier", "study")


def _wandb_logger(record: RunRecord, run_dir: Path):
    """A W&B run organised as W&B users filter: named like the record, grouped by the comparison,
    typed by the command, tagged with family, task, preset and arm / plan / study, and with the
    parameter and FLOP counts in its config (where filters and parallel coordinates look)."""
    try:
        from bench.tracking.wandb_setup import make_wandb_logger
    except ImportError:
        return None
    extra = record.extra
    job_type = next((job for key, job in _JOB_TYPES if key in extra), "train")
    tags = [record.family, record.task, record.preset] + [f"{k}:{extra[k]}"[:64] for k in _TAGGED if k in extra]
    config = {"task": record.task, "family": record.family, "preset": record.preset, "seed": record.seed,
              "run_id": record.run_id, "params": record.params, "flops_per_token": record.flops,
              **{k: v for k, v in extra.items() if k in _TAGGED + ("trial", "budget_flops")}, **record.config}
    # A plain `train` has no group of its own: W&B groups it with the other runs of its task.
    group = record.group or f"train-{record.task}"
    return make_wandb_logger(project="moe-bench", name=record.name or record.run_id, group=group,
                             config=config, save_dir=str(run_dir), tags=tags, job_type=job_type)


def _finish_wandb(logger, record: RunRecord) -> None:
    from bench.tracking.wandb_setup import finish_wandb_logger

    try:
        # Counts and timings only: the validation metrics are already there under val/... (with
        # their best value, see SUMMARY_BEST), and val_loss beside val/loss would say it twice.
        keys = ("active_params", "total_params", "train_flops", "tokens_seen", "steps", "wall_seconds",
                "tokens_per_second", "quality_per_active_param")
        summary = {k: v for k, v in record.summary().items() if k in keys and isinstance(v, (int, float))}
        logger.experiment.summary.update(summary)
        finish_wandb_logger(logger, status=record.status)
    except Exception:  # logging never kills a run
        pass
