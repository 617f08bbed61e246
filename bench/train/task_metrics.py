"""The metrics a task lists (``metrics:`` in its YAML) in a run's final evaluation and `evaluate` output.

Every evaluation computes loss, perplexity and bits per token (LM) or loss, perplexity, BLEU and
chrF (translation), so each of those a task lists is always there. ``bits_per_char`` needs the
character count of the evaluated text: it is computed for LM tasks that list it, and for every
char-level task (where it is bits_per_token, as it always was). `moe-bench evaluate` puts the
listed metrics first; ``tests/train/test_evaluate.py`` checks that every metric a task may list
(``bench.data.tasks.METRICS``) comes out of a final evaluation.
"""
from __future__ import annotations

from typing import Any

from bench.data.tasks import TaskConfig
from bench.data.text import lm_text
from bench.metrics import bits_per_char


def reports_bits_per_char(task: TaskConfig) -> bool:
    return task.type == "lm" and (task.tokenizer.kind == "char" or "bits_per_char" in task.metrics)


def lm_split_size(dm, split: str) -> tuple[int, int]:
    """(tokens, characters) of an LM data module's split: the ids it encoded, the text it read."""
    return len(dm.ids[split]), len(lm_text(dm.task, dm.corpus, split))


def add_bits_per_char(metrics: dict[str, Any], task: TaskConfig, prefix: str, tokens: int, chars: int) -> None:
    """``{prefix}bits_per_char`` from ``{prefix}bits_per_token`` when the task reports it (from the
    reported value, so a char task's two are equal to the last digit)."""
    if reports_bits_per_char(task):
        metrics[f"{prefix}bits_per_char"] = bits_per_char(metrics[f"{prefix}bits_per_token"], tokens, chars)


def listed_first(task: TaskConfig, metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` with the task's listed ones (bare or split-prefixed: ``loss``, ``val_loss``) first,
    in the task's order; the rest after them, as they were."""
    def rank(key: str) -> int:
        for i, name in enumerate(task.metrics):
            if key == name or key.endswith(f"_{name}") and key.split("_", 1)[0] in ("val", "test"):
                return i
        return len(task.metrics)

    return dict(sorted(metrics.items(), key=lambda kv: rank(kv[0])))


__all__ = ["add_bits_per_char", "listed_first", "lm_split_size", "reports_bits_per_char"]
