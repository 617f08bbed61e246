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


def _kill(*pids: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


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
        _kill(queue.pid, run_pid)


def _caught_usr1(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        mask = next(line.split()[1] for line in f if line.startswith("SigCgt:"))
    return bool(int(mask, 16) & (1 << 9))


def _queue_with_run(run_cmd: str) -> tuple[subprocess.Popen, int]:
    """A stand-in queue (a shell that stops when its run exits with 130, as the real queue's loop
    does) and the pid of its run."""
    queue = subprocess.Popen(["bash", "-c", f"{run_cmd}; [ $? = 130 ] || sleep 300"], start_new_session=True)
    for _ in range(200):
        run = subprocess.run(["pgrep", "-P", str(queue.pid)], capture_output=True, text=True).stdout.split()
        if run:
            return queue, int(run[0])
        time.sleep(0.05)
    raise AssertionError("the stand-in run did not start")


def test_stop_after_run_asks_the_run_to_finish_and_waits_for_the_queue(tmp_path):
    # the run's stand-in handles SIGUSR1 as `moe-bench reproduce` does: it ends once its run is recorded (130)
    queue, run_pid = _queue_with_run(
        "python3 -c 'import signal, sys, time; signal.signal(signal.SIGUSR1, lambda *a: sys.exit(130)); time.sleep(300)'")
    pidfile = tmp_path / "refrun.pid"
    pidfile.write_text(f"{queue.pid}\n")
    env = {**os.environ, "REFRUN_PIDFILE": str(pidfile)}
    try:
        for _ in range(200):  # the handler is installed once the interpreter has started
            if _caught_usr1(run_pid):
                break
            time.sleep(0.05)
        out = subprocess.run(["bash", str(ROOT / "scripts/stop_reference_queue.sh"), "--after-run"], env=env,
                             capture_output=True, text=True, check=True, timeout=60).stdout
        assert f"asked run process(es) {run_pid} to stop after the current run" in out
        assert f"reference queue stopped (queue pid {queue.pid}, run pid(s) {run_pid})" in out
        assert queue.wait(timeout=10) == 0 and not _alive(run_pid) and not pidfile.exists()
    finally:
        _kill(queue.pid, run_pid)


def test_stop_after_run_refuses_a_run_that_would_be_killed_by_sigusr1(tmp_path):
    queue, run_pid = _queue_with_run("sleep 300")  # no handler: SIGUSR1 would kill it mid-run
    pidfile = tmp_path / "refrun.pid"
    pidfile.write_text(f"{queue.pid}\n")
    env = {**os.environ, "REFRUN_PIDFILE": str(pidfile)}
    try:
        res = subprocess.run(["bash", str(ROOT / "scripts/stop_reference_queue.sh"), "--after-run"], env=env,
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 1 and f"run process {run_pid} does not handle SIGUSR1" in res.stderr
        assert _alive(run_pid) and _alive(queue.pid) and pidfile.exists()  # untouched
        bad = subprocess.run(["bash", str(ROOT / "scripts/stop_reference_queue.sh"), "--now"], env=env,
                             capture_output=True, text=True)
        assert bad.returncode == 2 and "usage:" in bad.stderr
    finally:
        _kill(queue.pid, run_pid)


def _queue_loop():
    import importlib.util

    spec = importlib.util.spec_from_file_location("queue_loop", ROOT / "scripts/queue_loop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_queue_loop_workers_split_the_cores_and_an_interrupted_plan_ends_its_worker(monkeypatch):
    loop = _queue_loop()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    calls, said = [], []
    interrupted = {"done": False}

    def fake_call(cmd, env):
        plan = cmd[cmd.index("reproduce") + 1]
        assert cmd[-2:] == ["--storage", "sqlite:///store.db"] and cmd[cmd.index("--tier") + 1] == "ref"
        calls.append((plan, env.get("OMP_NUM_THREADS")))
        if plan == "b" and not interrupted["done"]:  # the first worker to reach plan b is asked to stop
            interrupted["done"] = True
            return 130
        return 0

    loop.run_queue("store.db", 2, ["a", "b", "c"], call=fake_call, log=said.append)
    assert sorted(calls) == [("a", "2"), ("a", "2"), ("b", "2"), ("b", "2"), ("c", "2")]  # 4 cores / 2 workers
    assert sum("stopped; scripts/reference_queue.sh continues it" in m for m in said) == 1
    assert {m.split(":")[0] for m in said} == {"reference queue worker 0", "reference queue worker 1"}

    calls.clear()
    loop.run_queue("store.db", 1, ["a"], call=fake_call, log=said.append)
    assert calls == [("a", None)]  # one worker: torch's own thread count


@pytest.mark.parametrize("workers", ["0", "two"])
def test_reference_queue_refuses_a_bad_worker_count(tmp_path, workers):
    env = {**os.environ, "REFRUN_PIDFILE": str(tmp_path / "refrun.pid"), "REFRUN_WORKTREE": str(tmp_path / "wt")}
    res = subprocess.run(["bash", str(ROOT / "scripts/reference_queue.sh"), "--workers", workers, "capacity"], env=env,
                         capture_output=True, text=True)
    assert res.returncode == 2 and f"--workers must be a positive integer, got '{workers}'" in res.stderr
    assert not (tmp_path / "wt").exists() and not (tmp_path / "refrun.pid").exists()
