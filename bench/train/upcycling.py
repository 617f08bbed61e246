"""`moe-bench train --init-from RUN_ID`: sparse upcycling (Komatsuzaki et al. 2022) from a finished dense run.

    train(task, "switch", ..., init_from=from_dense_run(RUN_ID, storage))

The dense run's model is rebuilt as `moe-bench evaluate` rebuilds it (``evaluate.load_run``: its
record, task and ``model.pt``); the weights go into the new model by ``bench.models.upcycle``. This
module imports evaluate, which imports the trainer: so ``train`` takes the prepared source, not a run id.
"""
from __future__ import annotations

from typing import Any, Callable

from bench.config import ConfigError
from bench.data.tasks import TaskConfig
from bench.models.config import ModelConfig
from bench.models.upcycle import upcycle, upcycle_problems
from bench.train.config import RunConfig
from bench.train.evaluate import load_run

CONTEXT = "--init-from"


def from_dense_run(run_id: str, storage: str | None = None):
    """The ``init_from`` of ``train``: (cfg, rc, task) -> (record entry, init function), or one
    ConfigError listing every reason the run cannot start from ``run_id``."""

    def prepare(cfg: ModelConfig, rc: RunConfig, task: TaskConfig) -> tuple[dict[str, Any], Callable]:
        source = load_run(run_id, storage, CONTEXT)
        record, dense = source.record, source.module.model
        problems = []
        if record.status != "finished":
            problems.append(f"run {run_id} is {record.status}: upcycling starts from a finished dense run")
        if source.task.type != task.type:
            problems.append(f"run {run_id} trained a {source.task.type} model (task {record.task}), this run a "
                            f"{task.type} model (task {task.name})")
        problems += upcycle_problems(dense.cfg, cfg)
        spent = float(record.train_flops)
        if rc.budget.kind == "flops" and rc.budget.value <= spent:
            problems.append(f"budget_flops={rc.budget.value:.4g} is already spent by run {run_id}'s {spent:.4g} "
                            f"training FLOPs: an upcycled run's FLOPs budget counts its dense run's too; give more "
                            f"than {spent:.4g}")
        if problems:
            raise ConfigError(problems, f"{CONTEXT} {run_id}")
        state, dense_cfg = dense.state_dict(), dense.cfg
        entry = {"run_id": record.run_id, "family": record.family, "task": record.task, "train_flops": spent}
        return entry, lambda model: upcycle(model, state, dense_cfg)

    return prepare
