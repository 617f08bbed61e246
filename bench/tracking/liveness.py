"""Whether a recorded run is being trained right now, and whether it can be continued.

A training process writes its pid to ``runs/<id>/RUNNING.pid`` and removes it when it stops
(finished, failed or interrupted). A run killed with -9, or by the machine going down, leaves
its record "running" and the pid file behind; the pid then names no live process.
"""
from __future__ import annotations

import os
from pathlib import Path

from bench.tracking.records import RunRecord

LOCK_NAME = "RUNNING.pid"
UNFINISHED = ("running", "interrupted")


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (owned by anyone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def live_owner(run_dir: Path) -> int | None:
    """The pid training this run right now, or None (no lock, or its process is gone)."""
    try:
        pid = int((Path(run_dir) / LOCK_NAME).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def resumable_checkpoint(record: RunRecord) -> Path | None:
    """The last checkpoint of an unfinished run nobody is training, or None.

    Failed runs are not offered: their error would most likely come back.
    """
    if record.status not in UNFINISHED or live_owner(Path(record.paths.get("run_dir") or "")) is not None:
        return None
    ckpt = Path(record.paths.get("checkpoint_dir") or "") / "last.ckpt"
    return ckpt if record.paths.get("checkpoint_dir") and ckpt.is_file() else None
