"""Runs a search space: an Optuna study where every trial is a real `moe-bench train` run.

    moe-bench sweep NAME|STUDY.yaml [--n-trials N] [--study NAME] [--storage URL]

The study lives in the same database as the run records (``bench.sweep.study``). Failures follow
the runners' one policy (``bench.runner.failures``); what it means for trials:

- **Exactly n_trials.** Before training, a trial counts the trials numbered before it that
  finished, failed, or are running or queued; if n_trials are already accounted for, it is
  marked ``surplus`` (never trained) instead. Trial numbers are allocated atomically by the
  database, so parallel workers agree on the order.
- **Killed workers.** A trial left "running" by a dead worker on this host (its pid is gone)
  is marked failed/interrupted at the next start and re-queued with the same parameters;
  workers on other hosts are found by Optuna's heartbeat (stale after ``GRACE_PERIOD_S``).
  Its run record becomes "interrupted". A Ctrl-C'd trial is re-queued the same way. The
  re-queued trial continues the interrupted run from its last checkpoint (same run id), as a
  plan's arms do; a run that stopped before its first checkpoint starts again.
- **No duplicate grid points.** Grid trials that race onto a point an earlier trial holds are
  marked ``duplicate`` (never trained).
- **Failures.** A fatal error (bad config, missing data, unreachable storage) stops the sweep and
  re-queues its trial; any other exception in training (NaN loss, out of memory) marks the trial
  failed with the reason and the sweep goes on.
"""
from __future__ import annotations

import logging
import math
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import optuna
from optuna.trial import TrialState

from bench.runner.failures import CONTINUE_HINT, is_fatal, one_line
from bench.sweep.spec import OBJECTIVES, SweepSpec
from bench.sweep.study import (counts_toward_budget, make_sampler, open_study, retried_numbers, retry_callback,
                              trial_counts)
from bench.tracking.liveness import pid_alive, resumable_checkpoint
from bench.tracking.records import ResultsStore, RunRecord, new_run_id


class SweepAborted(BaseException):
    """A user-fixable problem (missing data, bad config, unreachable storage) that would fail
    every trial: stop the sweep with its message instead of failing trials one by one.
    BaseException so Optuna does not record it as the trial's own failure; the trial is
    re-queued for the next run."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


class SkippedTrial(Exception):
    """A trial that must not train (surplus or duplicate grid point); recorded as failed."""


@dataclass
class SweepResult:
    study_name: str
    storage: str
    completed: int
    pruned: int
    failed: int
    trials_this_worker: list[int] = field(default_factory=list)


def recover_interrupted_trials(study: optuna.Study, storage_url: str, log: Callable[[str], None] = print) -> list[int]:
    """Mark trials of dead local workers (and Ctrl-C'd ones) interrupted; re-queue their params."""
    host = socket.gethostname()
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    retry = retry_callback()
    store = ResultsStore(storage_url)
    recovered = []
    for t in trials:
        dead_local = (t.state == TrialState.RUNNING and t.user_attrs.get("host") == host
                      and isinstance(t.user_attrs.get("pid"), int) and not pid_alive(t.user_attrs["pid"]))
        stopped = t.state == TrialState.FAIL and t.user_attrs.get("interrupted") and t.number not in retried
        if not (dead_local or stopped):
            continue
        if dead_local:
            reason = f"worker pid {t.user_attrs['pid']} on {host} died"
            try:  # attributes first: a finished trial can no longer be annotated
                study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
                study._storage.set_trial_user_attr(t._trial_id, "error", reason)
                if not study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                    continue
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another worker got there first
        retry(study, study._storage.get_trial(t._trial_id))
        run_id = t.user_attrs.get("run_id")
        record = store.get(run_id) if run_id else None
        if record is not None and record.status == "running":
            record.finish("interrupted", "the sweep worker running this trial died; the trial was re-queued")
            store.save(record)
        recovered.append(t.number)
        log(f"trial {t.number} was interrupted ({'worker died' if dead_local else 'stopped'}); re-queued with the "
            f"same parameters")
    return recovered


def interrupted_run(study: optuna.Study, trial: optuna.Trial, store: ResultsStore) -> RunRecord | None:
    """The run of the attempt this re-queued trial repeats, when it can continue from a checkpoint."""
    # Optuna's retry callback keeps the numbers of the earlier attempts here (retried_numbers reads it too).
    history = study._storage.get_trial_system_attrs(trial._trial_id).get("retry_history", [])
    if not history:
        return None
    attempts = {t.number: t for t in study.get_trials(deepcopy=False)}
    last = attempts.get(history[-1])
    run_id = last.user_attrs.get("run_id") if last is not None else None
    record = store.get(run_id) if run_id else None
    return record if record is not None and resumable_checkpoint(record) is not None else None


def _note_interrupted(trial: optuna.Trial, reason: str) -> None:
    """Annotate a running trial as interrupted (not its own failure), so it is re-queued."""
    trial.set_user_attr("interrupted", True)
    trial.set_user_attr("error", reason.splitlines()[0][:2000] if reason else "interrupted")


def _fail_if_running(study: optuna.Study, trial: optuna.Trial) -> None:
    """A SweepAborted escapes Optuna's own bookkeeping: finish the trial as failed here."""
    if study._storage.get_trial(trial._trial_id).state == TrialState.RUNNING:
        try:
            study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass


def _check_slot(study: optuna.Study, trial: optuna.Trial, n_trials: int, grid: bool) -> None:
    """Raise SkippedTrial if this trial would exceed n_trials or repeat a held grid point."""
    trials = study._storage.get_all_trials(study._study_id, deepcopy=False)
    retried = retried_numbers(trials)
    earlier = [t for t in trials if t.number < trial.number and counts_toward_budget(t, retried)]
    if len(earlier) >= n_trials:
        study._storage.set_trial_user_attr(trial._trial_id, "surplus", True)
        raise SkippedTrial(f"surplus: the study already has {n_trials} trials")
    if grid:
        mine = study._storage.get_trial_system_attrs(trial._trial_id).get("grid_id")
        if any(t.system_attrs.get("grid_id") == mine for t in earlier):
            study._storage.set_trial_user_attr(trial._trial_id, "duplicate", True)
            raise SkippedTrial(f"duplicate: grid point {mine} is held by an earlier trial")


def _grid_done(study: optuna.Study, spec: SweepSpec) -> bool:
    if spec.sampler["name"] != "grid":
        return False
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    held = {t.system_attrs.get("grid_id") for t in trials if counts_toward_budget(t, retried)
            and t.state != TrialState.WAITING}
    queued = any(t.state == TrialState.WAITING for t in trials)
    return not queued and len(held - {None}) >= spec.grid_size()


# -- the sweep ---------------------------------------------------------------------------------
def objective_values(spec: SweepSpec, record) -> list[float]:
    values = []
    for obj in spec.objectives:
        value = OBJECTIVES[obj.metric][1](record)
        if value is None or not math.isfinite(float(value)):
            raise ValueError(f"objective {obj.metric} is {value!r} in run {record.run_id}")
        values.append(float(value))
    return values


def run_sweep(spec: SweepSpec, storage: str | None = None, study_name: str | None = None,
              data_dir: str | None = None, progress: bool = True, log: Callable[[str], None] | None = None,
              trial_progress: bool = False) -> SweepResult:
    """Run trials until the study holds ``spec.target_trials()`` of them (this worker's share)."""
    from tqdm.auto import tqdm

    from optuna_integration import PyTorchLightningPruningCallback
    from bench.train.run import resume_run, train

    bar = None

    def default_log(msg: str) -> None:  # above the progress bar, not through it
        (bar.write if bar is not None else print)(msg, file=sys.stderr)

    log = log or default_log
    store = ResultsStore(storage)  # creates the database (and results/) before Optuna opens it
    url = store.url
    study_name = study_name or spec.name
    n_trials = spec.target_trials()
    if spec.sampler["name"] == "grid" and n_trials > spec.grid_size():
        log(f"n_trials={n_trials} is more than the grid's {spec.grid_size()} points: running the grid once")
        n_trials = spec.grid_size()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial is reported by log()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    study = open_study(spec, url, study_name)
    recover_interrupted_trials(study, url, log)
    grid = spec.sampler["name"] == "grid"
    host, pid = socket.gethostname(), os.getpid()
    mine: list[int] = []
    current: dict[str, Any] = {}

    def objective(trial: optuna.Trial) -> list[float] | float:
        current["trial"] = trial
        trial.set_user_attr("host", host)
        trial.set_user_attr("pid", pid)
        _check_slot(study, trial, n_trials, grid)
        params = {p.name: p.suggest(trial) for p in spec.all_params}
        family, preset, overrides = spec.trial_settings(params)
        earlier = interrupted_run(study, trial, store)
        run_id = earlier.run_id if earlier is not None else new_run_id(f"{study_name}-t{trial.number}")
        trial.set_user_attr("run_id", run_id)
        trial.set_user_attr("family", family)
        trial.set_user_attr("preset", preset)
        mine.append(trial.number)
        shown = ", ".join(f"{k}={v}" for k, v in params.items()) or "no searched params"
        log(f"trial {trial.number}: {family}/{preset} {shown}"
            + (f" (continuing run {run_id} from its last checkpoint)" if earlier is not None else ""))
        monitor = spec.pruning_monitor()
        callbacks = [PyTorchLightningPruningCallback(trial, monitor)] if monitor else []
        start = time.perf_counter()
        try:
            if earlier is not None:
                record = resume_run(run_id, storage=url, data_dir=data_dir, progress=trial_progress,
                                    extra_callbacks=callbacks)
            else:
                record = train(spec.task, family, preset, overrides, budget=spec.budget, seed=spec.seed, storage=url,
                               data_dir=data_dir, group=study_name, name=f"{study_name}#{trial.number}",
                               progress=trial_progress, extra_callbacks=callbacks, run_id=run_id,
                               tags={"study": study_name, "trial": trial.number})
        except optuna.TrialPruned:
            log(f"trial {trial.number}: pruned after {time.perf_counter() - start:.0f} s")
            raise
        except KeyboardInterrupt:
            _note_interrupted(trial, "stopped by Ctrl-C")
            raise
        except Exception as e:
            if is_fatal(e):
                _note_interrupted(trial, one_line(e))
                raise SweepAborted(e) from e
            trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:2000])
            log(f"trial {trial.number}: FAILED ({one_line(e)}); the sweep goes on")
            raise
        if record.status == "interrupted":  # Lightning caught Ctrl-C / SIGTERM and stopped cleanly
            _note_interrupted(trial, "stopped by Ctrl-C or SIGTERM")
            raise KeyboardInterrupt
        values = objective_values(spec, record)
        trial.set_user_attr("wall_seconds", record.timings.get("wall_seconds"))
        shown = ", ".join(f"{o.metric} {v:.5g}" for o, v in zip(spec.objectives, values))
        log(f"trial {trial.number}: {shown} ({record.timings.get('wall_seconds', 0):.0f} s)")
        return values if spec.multi_objective else values[0]

    counts = trial_counts(study)
    bar = tqdm(total=n_trials, initial=min(counts.finished, n_trials), desc=f"study {study_name}", unit="trial",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        while True:
            counts = trial_counts(study)
            bar.n = min(counts.finished, n_trials)
            bar.set_postfix_str(f"running {counts.running}, failed {counts.failed}, pruned {counts.pruned}")
            bar.refresh()
            if counts.finished >= n_trials or (counts.finished + counts.running >= n_trials and not counts.waiting):
                break
            if _grid_done(study, spec):
                break
            if not grid:
                # Reproducible from spec.seed for one worker (a restart does not replay the same
                # random points: the seed moves with the trial count).
                study.sampler = make_sampler(spec, spec.seed + 1000 * len(study.trials))
            if counts.running:  # other workers: keep our random choices apart from theirs
                study.sampler.reseed_rng()
            current.clear()
            study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=True)
    except (KeyboardInterrupt, SweepAborted) as e:
        trial = current.get("trial")
        if trial is not None:
            _fail_if_running(study, trial)
            recover_interrupted_trials(study, url, log)
        if isinstance(e, SweepAborted):
            raise e.error from None
        log(f"sweep interrupted: {CONTINUE_HINT} (study {study_name!r})")
        raise
    finally:
        bar.close()
    counts = trial_counts(study)
    return SweepResult(study_name, url, counts.complete, counts.pruned, counts.failed, mine)


__all__ = ["run_sweep", "open_study", "optuna_storage", "recover_interrupted_trials", "trial_counts",
           "counts_toward_budget", "SweepResult", "SkippedTrial"]
