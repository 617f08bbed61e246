"""Tracking: run records, the results database, and Weights & Biases setup.

``RunRecord`` describes one training run; ``ResultsStore`` keeps records in an SQL table
(SQLite by default, shared with Optuna's tables); ``make_wandb_logger`` returns an offline-first
Lightning ``WandbLogger`` or None, never breaking training.
"""
from bench.tracking.records import (
    BUDGET_KINDS,
    DEFAULT_STORAGE_URL,
    STATUSES,
    STORAGE_ENV,
    RecordError,
    ResultsStore,
    RunRecord,
    StorageError,
    default_storage_url,
    format_runs_table,
    git_commit,
    new_run_id,
    normalize_storage_url,
    utc_now_iso,
)
from bench.tracking.wandb_setup import (
    finish_wandb_logger,
    make_wandb_logger,
    read_offline_history,
    read_offline_run_keys,
    wandb_mode,
    wandb_run_info,
)

__all__ = [
    "BUDGET_KINDS", "DEFAULT_STORAGE_URL", "STATUSES", "STORAGE_ENV", "RecordError", "ResultsStore",
    "RunRecord", "StorageError", "default_storage_url", "format_runs_table", "git_commit", "new_run_id",
    "normalize_storage_url", "utc_now_iso", "finish_wandb_logger", "make_wandb_logger",
    "read_offline_history", "read_offline_run_keys", "wandb_mode", "wandb_run_info",
]
