"""The reference queue's loop (started by scripts/reference_queue.sh from its worktree): every plan's
`ref` tier in order, by `workers` loops at once, each a `moe-bench reproduce` process per plan. With
several workers each process gets cores/workers torch threads, and the workers split each plan's
pairs through the store's claims. A plan that fails (e.g. a missing dataset) does not stop the rest;
one that exits interrupted (130: Ctrl-C, SIGTERM, or SIGUSR1's stop after its run) ends its worker.

    python scripts/queue_loop.py STORE.db WORKERS PLAN [PLAN ...]
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from typing import Callable

INTERRUPTED = 130


def worker_env(workers: int, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    if workers > 1:  # the cores split between the runs
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        env["OMP_NUM_THREADS"] = str(max(1, cores // workers))
    return env


def run_queue(store: str, workers: int, plans: list[str],
              call: Callable[..., int] = subprocess.call, log: Callable[[str], None] = print) -> None:
    env = worker_env(workers)

    def queue(name: str) -> None:
        for plan in plans:
            rc = call([sys.executable, "-m", "bench.cli", "reproduce", plan, "--tier", "ref",
                       "--storage", f"sqlite:///{store}"], env=env)
            log(f"reference queue{name}: {plan} exited {rc}")
            if rc == INTERRUPTED:
                log(f"reference queue{name}: stopped; scripts/reference_queue.sh continues it")
                break

    threads = [threading.Thread(target=queue, args=(f" worker {w}" if workers > 1 else "",)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


if __name__ == "__main__":
    run_queue(sys.argv[1], int(sys.argv[2]), sys.argv[3:], log=lambda msg: print(msg, flush=True))
