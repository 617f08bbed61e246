"""What `moe-bench clean` may remove from the run folders, and how much space it frees.

Finished (and pruned) runs need nothing from ``runs/<id>/checkpoints``: their record holds the
metrics, curve and config, and they cannot be resumed. Interrupted, running and failed runs keep
their checkpoint (to resume or inspect). A run folder with no record in the store is an orphan:
listed, and removed only when asked, since it may belong to another store. A finished run's final
model (``runs/<id>/model.pt``, weights only, for `moe-bench evaluate` / `translate`) is listed and
removed only with ``models``.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from bench.tracking.records import SUMMARIES_DIR, ResultsStore

DONE = ("finished", "pruned")
MODEL_FILE = "model.pt"  # bench.train.run.MODEL_FILE (not imported: cleaning must not load torch)


@dataclass
class Item:
    path: Path
    bytes: int
    why: str
    removable: bool


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def plan_cleanup(runs_dir: Path, store: ResultsStore, orphans: bool = False, models: bool = False) -> list[Item]:
    items = []
    status = {r.run_id: r.status for r in store.list()}
    folders = sorted(p for p in runs_dir.iterdir() if p.is_dir()) if runs_dir.is_dir() else []
    for run in (p for p in folders if p.name != SUMMARIES_DIR):
        ckpt = run / "checkpoints"
        if run.name not in status:
            items.append(Item(run, folder_bytes(run), f"no record in {store.url}", removable=orphans))
        elif ckpt.exists():
            done = status[run.name] in DONE
            items.append(Item(ckpt, folder_bytes(ckpt), f"checkpoint of a {status[run.name]} run"
                              + ("" if done else " (kept: it can be resumed or inspected)"), removable=done))
        model = run / MODEL_FILE
        if run.name in status and model.is_file():
            items.append(Item(model, model.stat().st_size, f"final model of a {status[run.name]} run"
                              + ("" if models else " (kept: evaluate and translate use it; --models removes it)"),
                              removable=models))
    return items


def remove(items: list[Item]) -> int:
    freed = 0
    for item in items:
        if item.removable:
            if item.path.is_dir():
                shutil.rmtree(item.path, ignore_errors=True)
            else:
                item.path.unlink(missing_ok=True)
            freed += item.bytes
    return freed


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


__all__ = ["Item", "plan_cleanup", "remove", "human", "folder_bytes"]
