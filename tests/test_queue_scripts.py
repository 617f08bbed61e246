"""scripts/reference_queue.sh refuses to start beside a live queue; scripts/stop_reference_queue.sh
stops the queue process before its run (so no next plan starts) and removes the pid file."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc (pgrep -P, kill -0)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not yet reaped) counts as gone
        return f.read().split()[2] != "Z"


def test_stop_ends_the_queue_and_its_run_then_a_new_queue_may_start(tmp_path):
    # a stand-in queue: a shell whose child "run" sleeps; the real queue waits on its run the same way
    queue = subprocess.Popen(["bash", "-c", "sleep 300 & wait"], start_new_session=True)
    pidfile = tmp_path / "refrun.pid"
    pidfile.write_text(f"{queue.pid}\n")
    env = {**os.environ, "REFRUN_PIDFILE": str(pidfile), "REFRUN_WORKTREE": str(tmp_path / "wt")}
    for _ in range(50):  # wait for the child to exist
        run = subprocess.run(["pgrep", "-P", str(queue.pid)], capture_output=True, text=True).stdout.split()
        if run:
            break
        time.sleep(0.05)
    (run_pid,) = map(int, run)
    try:
        busy = subprocess.run(["bash", str(ROOT / "scripts/reference_queue.sh"), "capacity"], env=env,
                              capture_output=True, text=True)
        assert busy.returncode == 1 and f"already running (pid {queue.pid})" in busy.stderr
        assert not (tmp_path / "wt").exists()  # refused before touching the worktree
        out = subprocess.run(["bash", str(ROOT / "scripts/stop_reference_queue.sh")], env=env,
                             capture_output=True, text=True, check=True).stdout
        queue.wait(timeout=10)
        assert f"reference queue stopped (queue pid {queue.pid}, run pid(s) {run_pid})" in out
        assert not _alive(run_pid) and not pidfile.exists()
        again = subprocess.run(["bash", str(ROOT / "scripts/stop_reference_queue.sh")], env=env,
                               capture_output=True, text=True, check=True).stdout
        assert again.startswith("no reference queue is running")
    finally:
        for pid in (queue.pid, run_pid):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
