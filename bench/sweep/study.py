"""An Optuna study in the results database: storage, samplers, pruners, and counting its trials.

Shared by the search runner (``bench.runner.search``), which adds trials, and ``moe-bench sweep
--show`` (``bench.sweep.show``), which reads them. The study lives in the same database as the run
records (SQLite by default; PostgreSQL lets workers on several machines share one study).
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import exc as sa_exc

from bench.config import ConfigError
from bench.sweep.spec import SweepSpec

HEARTBEAT_INTERVAL_S = 30
GRACE_PERIOD_S = 180  # a trial on another host with no heartbeat for this long is stale
MAX_RETRIES = 3  # re-queues of one interrupted trial
SQLITE_TIMEOUT_S = 120
SPEC_ATTR = "moe_bench_spec"


# -- storage and study -------------------------------------------------------------------------
def optuna_storage(url: str) -> RDBStorage:
    """Optuna's RDB storage on the results-store URL, with heartbeats and retry of stale trials."""
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # Several worker processes share one file: wait for locks instead of failing at once.
        engine_kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_S}
    else:
        engine_kwargs["pool_pre_ping"] = True
    for attempt in range(5):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna (since 2.x)
                warnings.simplefilter("ignore")
                return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_INTERVAL_S,
                                  grace_period=GRACE_PERIOD_S, heartbeat_stale_trial_callback=retry_callback())
        except (sa_exc.IntegrityError, sa_exc.OperationalError, sa_exc.ProgrammingError) as e:
            # Workers started together on a fresh database race to create Optuna's tables
            # (PostgreSQL: IntegrityError; SQLite: "table ... already exists"); the loser finds them
            # on a retry. Other errors (a wrong URL, no server) are not races: re-raise at once.
            if attempt == 4 or not _is_schema_race(e):
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def _is_schema_race(error: Exception) -> bool:
    text = str(error).lower()
    return isinstance(error, sa_exc.IntegrityError) or "already exists" in text or "database is locked" in text


def retry_callback() -> RetryHeartbeatStaleTrialCallback:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return RetryHeartbeatStaleTrialCallback(MAX_RETRIES)


def make_sampler(spec: SweepSpec, seed: int) -> optuna.samplers.BaseSampler:
    opts = {k: v for k, v in spec.sampler.items() if k != "name"}
    name = spec.sampler["name"]
    if name == "grid":
        # The seed also shuffles the grid's point numbering: every worker must use spec.seed.
        return optuna.samplers.GridSampler(spec.grid(), seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, **opts)
    # constant_liar: parallel workers see each other's running trials and spread out.
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True, **{"n_startup_trials": 5, **opts})


def make_pruner(spec: SweepSpec) -> optuna.pruners.BasePruner:
    opts = {k: v for k, v in spec.pruner.items() if k != "name"}
    name = spec.pruner["name"]
    if name == "median":
        return optuna.pruners.MedianPruner(**{"n_startup_trials": 2, "n_warmup_steps": 1, **opts})
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(**{"min_resource": 1, "reduction_factor": 3, **opts})
    return optuna.pruners.NopPruner()


def open_study(spec: SweepSpec, storage_url: str, study_name: str, seed: int | None = None) -> optuna.Study:
    """Create the study, or load it after checking it was made with the same settings."""
    storage = optuna_storage(storage_url)
    existing = {s.study_name: s for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    sampler_seed = spec.seed if seed is None else seed
    study = optuna.create_study(storage=storage, study_name=study_name, sampler=make_sampler(spec, sampler_seed),
                                pruner=make_pruner(spec), directions=spec.directions, load_if_exists=True)
    fingerprint = json.loads(json.dumps(spec.fingerprint()))
    if study_name not in existing:
        study.set_user_attr(SPEC_ATTR, fingerprint)
        study.set_user_attr("objectives", [o.metric for o in spec.objectives])
        # optuna-dashboard and Optuna's plots label the objectives with these ("Objective 0" without)
        study.set_metric_names([o.metric for o in spec.objectives])
        return study
    stored = study.user_attrs.get(SPEC_ATTR)
    if stored is None:
        raise ConfigError([f"study {study_name!r} already exists in {storage_url} but was not made by "
                           "moe-bench sweep; pass --study NEW_NAME"], "sweep")
    if stored != fingerprint:
        diff = [f"{k}: study has {stored.get(k)!r}, now {fingerprint.get(k)!r}"
                for k in sorted(set(stored) | set(fingerprint)) if stored.get(k) != fingerprint.get(k)]
        raise ConfigError([f"study {study_name!r} in {storage_url} was created with other settings; continuing it "
                           "would mix incomparable trials. Differences:", *diff,
                           "pass --study NEW_NAME for a new study, or restore the original settings"], "sweep")
    if study.metric_names is None:  # a study made before the names were set
        study.set_metric_names([o.metric for o in spec.objectives])
    return study


# -- bookkeeping over the study's trials -------------------------------------------------------
def retried_numbers(trials: list[FrozenTrial]) -> set[int]:
    done = set()
    for t in trials:
        done.update(t.system_attrs.get("retry_history", []))
    return done


def _skipped(t: FrozenTrial) -> bool:
    return bool(t.user_attrs.get("surplus") or t.user_attrs.get("duplicate"))


def counts_toward_budget(t: FrozenTrial, retried: set[int]) -> bool:
    """Trials that use up one of n_trials: finished, genuinely failed, running or queued."""
    if t.state == TrialState.FAIL:
        return not _skipped(t) and t.number not in retried
    return t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


@dataclass
class TrialCounts:
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    running: int = 0
    waiting: int = 0

    @property
    def finished(self) -> int:
        return self.complete + self.pruned + self.failed


def trial_counts(study: optuna.Study) -> TrialCounts:
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    c = TrialCounts()
    for t in trials:
        if not counts_toward_budget(t, retried):
            continue
        name = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
                TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}[t.state]
        setattr(c, name, getattr(c, name) + 1)
    return c


__all__ = ["GRACE_PERIOD_S", "SPEC_ATTR", "TrialCounts", "counts_toward_budget", "make_pruner", "make_sampler",
           "open_study", "optuna_storage", "retried_numbers", "retry_callback", "trial_counts"]
