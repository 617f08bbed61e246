"""The one failure policy of every runner (a plan's arms, a search space's trials).

- **Fatal**: a problem the user must fix that would fail every run the same way (bad config,
  missing or corrupt data, unreachable storage): stop at once with its message. The run it hit
  is recorded and is continued or re-run by the same command once fixed.
- **Interrupted** (Ctrl-C, SIGTERM, a killed worker): stop; the same command continues the run
  from its last checkpoint (a search re-queues the trial with the same parameters).
- **Failed** (anything else: NaN loss, out of memory, a bug hit by one configuration): the run
  is recorded as failed with its reason and the others go on.
"""
from __future__ import annotations

from bench.config import ConfigError
from bench.data.sources import DataError
from bench.tracking.records import StorageError

FATAL_ERRORS = (ConfigError, DataError, StorageError)


def is_fatal(error: BaseException) -> bool:
    return isinstance(error, FATAL_ERRORS)


def one_line(error: BaseException) -> str:
    """``Type: first line of the message``, for a progress log."""
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


CONTINUE_HINT = "run the same command again to continue (finished runs are kept)"

__all__ = ["CONTINUE_HINT", "FATAL_ERRORS", "is_fatal", "one_line"]
