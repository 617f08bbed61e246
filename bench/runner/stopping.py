"""Stop a long runner between runs, on request: ``kill -USR1 PID`` asks ``moe-bench reproduce`` to
finish (and record) the run it is training, then stop before the next pair instead of cutting a run
short; the same command continues later. For queues of hour-long runs (scripts/stop_reference_queue.sh
--after-run) and for code changes that should reach the next run without losing any training.
"""
from __future__ import annotations

import signal
import threading


class StopAfterRun:
    """Within ``with StopAfterRun() as stop:``, SIGUSR1 sets ``stop.asked``; the previous handler
    comes back on exit. Where signals cannot be handled (not the main thread, no SIGUSR1 on the OS)
    it never asks. (Lightning sets a SIGUSR1 handler only for SLURM auto-requeue, and not over one.)"""

    def __init__(self):
        self.asked = False
        self._previous = None
        self._installed = False

    def _ask(self, signum, frame) -> None:
        self.asked = True

    def __enter__(self) -> "StopAfterRun":
        if hasattr(signal, "SIGUSR1") and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGUSR1, self._ask)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGUSR1, self._previous)
            self._installed = False
