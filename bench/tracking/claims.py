"""Which process is training which piece of work, for processes on one or several machines that
share a results store: a plan's (arm, seed) pairs, so two ``moe-bench reproduce`` commands split a
plan between them instead of both training every pair.

A claim is a row of table ``moe_bench_claims`` keyed by the work's name. Taking it is an INSERT,
which the database lets exactly one process win; the holder renews ``heartbeat_at`` from a
background thread while it trains (``Heartbeat``) and deletes the row when done. A claim whose
holder is gone (its pid is dead on this machine, or no heartbeat for ``STALE_AFTER_S`` from another
machine) is taken over with a compare-and-swap UPDATE, so a killed process never blocks its work.
Heartbeats are stamped by each machine's own clock, so the machines' clocks must agree to well
within ``STALE_AFTER_S`` (as NTP keeps them).
"""
from __future__ import annotations

import datetime as _dt
import os
import socket
import threading

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from bench.tracking.liveness import pid_alive
from bench.tracking.records import ResultsStore, StorageError

TABLE_NAME = "moe_bench_claims"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 180.0  # a holder on another machine silent for this long is taken to be dead (Optuna's grace)
HOST = socket.gethostname()


@dataclass(frozen=True)
class Holder:
    run_id: str
    host: str
    pid: int
    heartbeat_at: _dt.datetime

    def describe(self) -> str:
        return f"process {self.pid} on {self.host} (run {self.run_id})"


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)


def holder_alive(holder: Holder, now: _dt.datetime | None = None, stale_after_s: float = STALE_AFTER_S) -> bool:
    """On this machine: its pid exists. Elsewhere: it renewed its heartbeat within ``stale_after_s``."""
    if holder.host == HOST:
        return pid_alive(holder.pid)
    return ((now or _now()) - holder.heartbeat_at).total_seconds() < stale_after_s


class Claims:
    """This process's claims in the database of ``store`` (the table is created on first use).
    ``host``/``pid`` name the claiming process (default: this one)."""

    def __init__(self, store: ResultsStore, stale_after_s: float = STALE_AFTER_S, host: str = HOST,
                 pid: int | None = None):
        self.store, self.stale_after_s = store, stale_after_s
        self.host, self.pid = host, os.getpid() if pid is None else pid
        self.taken_over: Holder | None = None  # the dead holder the last acquire took over from
        md = sa.MetaData()
        self.table = sa.Table(
            TABLE_NAME, md,
            sa.Column("key", sa.String(500), primary_key=True),
            sa.Column("run_id", sa.String(200), nullable=False),
            sa.Column("host", sa.String(255), nullable=False),
            sa.Column("pid", sa.Integer, nullable=False),
            sa.Column("heartbeat_at", sa.DateTime, nullable=False),
        )
        with store._guard("create the claims table in"):
            with store.engine.begin() as conn:
                if conn.dialect.name == "postgresql":  # concurrent CREATE TABLE: serialised, as for the runs table
                    conn.execute(sa.text(f"SELECT pg_advisory_xact_lock(hashtext('{TABLE_NAME}'))"))
                self.table.create(conn, checkfirst=True)

    def holder(self, key: str) -> Holder | None:
        with self.store._guard("read from"):
            with self.store.engine.connect() as conn:
                row = conn.execute(sa.select(self.table).where(self.table.c.key == key)).mappings().first()
        return None if row is None else Holder(row["run_id"], row["host"], row["pid"], row["heartbeat_at"])

    def acquire(self, key: str, run_id: str) -> Holder | None:
        """Take ``key`` for ``run_id`` in this process; None when taken, else the live holder.
        Taking over a dead holder's claim leaves that holder in ``self.taken_over``."""
        self.taken_over: Holder | None = None
        mine = {"run_id": run_id, "host": self.host, "pid": self.pid, "heartbeat_at": _now()}
        for _ in range(3):  # lost a race twice in a row: someone is actively claiming it
            with self.store._guard("write to"):
                try:
                    with self.store.engine.begin() as conn:
                        conn.execute(sa.insert(self.table).values(key=key, **mine))
                    return None
                except sa_exc.IntegrityError:  # the row exists: see who holds it
                    pass
            held = self.holder(key)
            if held is None:
                continue  # released in between: insert again
            if held.host == self.host and held.pid == self.pid:  # ours already: now for this run
                t = self.table
                with self.store._guard("write to"):
                    with self.store.engine.begin() as conn:
                        conn.execute(sa.update(t).where(t.c.key == key, t.c.host == self.host, t.c.pid == self.pid)
                                     .values(run_id=run_id, heartbeat_at=_now()))
                return None
            if holder_alive(held, stale_after_s=self.stale_after_s):
                return held
            t = self.table  # take over a dead holder's claim, unless someone else just did
            with self.store._guard("write to"):
                with self.store.engine.begin() as conn:
                    won = conn.execute(sa.update(t).where(t.c.key == key, t.c.run_id == held.run_id,
                                                          t.c.pid == held.pid, t.c.host == held.host,
                                                          t.c.heartbeat_at == held.heartbeat_at)
                                       .values(**mine)).rowcount
            if won == 1:
                self.taken_over = held
                return None
        held = self.holder(key)
        if held is None:
            raise StorageError(f"could not claim {key!r}: it kept changing hands between processes; run the command again")
        return held

    def beat(self, key: str) -> bool:
        """Renew this process's claim; False when it is no longer ours."""
        t = self.table
        with self.store._guard("write to"):
            with self.store.engine.begin() as conn:
                return conn.execute(sa.update(t).where(t.c.key == key, t.c.host == self.host, t.c.pid == self.pid)
                                    .values(heartbeat_at=_now())).rowcount == 1

    def release(self, key: str) -> None:
        """Give up this process's claim (if it still holds it)."""
        t = self.table
        with self.store._guard("write to"):
            with self.store.engine.begin() as conn:
                conn.execute(sa.delete(t).where(t.c.key == key, t.c.host == self.host, t.c.pid == self.pid))


class Heartbeat:
    """``with Heartbeat(claims, key):`` renews this process's claim every ``every_s`` seconds from
    a daemon thread while the block runs, and releases it at the end. A database hiccup skips one
    beat (the next one retries); it never stops the training."""

    def __init__(self, claims: Claims, key: str, every_s: float = HEARTBEAT_S):
        self.claims, self.key, self.every_s = claims, key, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"moe-bench heartbeat {key}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.claims.beat(self.key)
            except Exception:  # noqa: BLE001 - a missed beat is retried; STALE_AFTER_S spans several
                pass

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        try:
            self.claims.release(self.key)
        except Exception:  # noqa: BLE001 - an unreleased claim goes stale and is taken over
            pass
