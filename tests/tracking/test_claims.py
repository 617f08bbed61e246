"""Claims: one process per piece of work, across processes and machines sharing a results store."""
from __future__ import annotations

import datetime as dt
import os
import threading
import time

import pytest
import sqlalchemy as sa

from bench.tracking import ResultsStore
from bench.tracking.claims import HOST, STALE_AFTER_S, Claims, Heartbeat, holder_alive

DEAD_PID = 999_999_999  # no such process


@pytest.fixture
def url(tmp_path):
    return f"sqlite:///{tmp_path / 'store.db'}"


def test_first_claim_wins_and_the_holder_is_named(url):
    mine, theirs = Claims(ResultsStore(url)), Claims(ResultsStore(url), host="node-b", pid=42)
    assert mine.acquire("plan|dense|0|abc", "run-1") is None
    held = theirs.acquire("plan|dense|0|abc", "run-2")
    assert (held.run_id, held.host, held.pid) == ("run-1", HOST, os.getpid())
    assert held.describe() == f"process {os.getpid()} on {HOST} (run run-1)"
    assert theirs.acquire("plan|dense|1|abc", "run-3") is None  # another pair is free
    assert mine.acquire("plan|dense|0|abc", "run-4") is None  # ours already: now names run-4
    assert mine.holder("plan|dense|0|abc").run_id == "run-4"
    theirs.release("plan|dense|0|abc")  # not theirs: nothing happens
    assert mine.holder("plan|dense|0|abc") is not None
    mine.release("plan|dense|0|abc")
    assert mine.holder("plan|dense|0|abc") is None and theirs.acquire("plan|dense|0|abc", "run-5") is None


def test_a_dead_holder_is_taken_over(url):
    store = ResultsStore(url)
    # On this machine: its pid is gone.
    Claims(store, pid=DEAD_PID).acquire("k1", "killed")
    assert Claims(store).acquire("k1", "mine") is None
    # On another machine: alive while its heartbeat is fresh, dead once it is older than STALE_AFTER_S.
    remote = Claims(store, host="node-b", pid=7)
    remote.acquire("k2", "remote")
    assert Claims(store).acquire("k2", "mine").run_id == "remote"
    claims = Claims(store)
    old = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) - dt.timedelta(seconds=STALE_AFTER_S + 5)
    with store.engine.begin() as conn:
        conn.execute(sa.update(claims.table).where(claims.table.c.key == "k2").values(heartbeat_at=old))
    assert not holder_alive(claims.holder("k2"))
    assert claims.acquire("k2", "mine") is None and claims.holder("k2").host == HOST
    assert remote.beat("k2") is False  # the old holder learns it lost the claim


def test_heartbeat_renews_and_releases(url):
    claims = Claims(ResultsStore(url))
    claims.acquire("k", "run")
    first = claims.holder("k").heartbeat_at
    with Heartbeat(claims, "k", every_s=0.05):
        time.sleep(0.3)
        assert claims.holder("k").heartbeat_at > first
    assert claims.holder("k") is None


@pytest.fixture(params=["sqlite", "postgresql"])
def any_url(request, url):
    return url if request.param == "sqlite" else request.getfixturevalue("fresh_postgres_url")


def test_racing_processes_get_exactly_one_claim(any_url):
    """Eight claimants (separate connections, as separate processes have) race for one key."""
    url = any_url
    ResultsStore(url)
    claimants = [Claims(ResultsStore(url), host=f"node-{i}", pid=i + 1) for i in range(8)]
    won, start = [], threading.Barrier(len(claimants))

    def race(c: Claims) -> None:
        start.wait()
        if c.acquire("contested", f"run-{c.pid}") is None:
            won.append(c.pid)

    threads = [threading.Thread(target=race, args=(c,)) for c in claimants]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(won) == 1 and claimants[0].holder("contested").pid == won[0]
