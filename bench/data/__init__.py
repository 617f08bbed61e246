"""Data layer: task files, corpus sources, tokenizers and Lightning data modules.

``load_task(name)`` -> ``TaskConfig``; ``build_datamodule(task, ...)`` -> an LM or translation
LightningDataModule. Sub-modules are imported lazily by their users (lightning is heavy).
"""
from bench.data.sources import ChecksumError, DataError, resolve_corpus
from bench.data.tasks import TaskConfig, available_tasks, load_task

__all__ = ["ChecksumError", "DataError", "TaskConfig", "available_tasks", "load_task", "resolve_corpus"]
