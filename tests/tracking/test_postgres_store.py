"""ResultsStore and Optuna on a real PostgreSQL server (one fresh database per test).

Needs $MOE_BENCH_TEST_POSTGRES_URL (see tests/postgres.py): skipped without it, failed under CI.
"""
from __future__ import annotations

import dataclasses
import math
import multiprocessing

import optuna
import pytest
import sqlalchemy as sa

from bench.tracking import RecordError, ResultsStore, RunRecord, StorageError


def make_record(run_id: str, **kw) -> RunRecord:
    base = dict(
        run_id=run_id, name="dense-tiny · ünïcode", group="cmp-1", task="tinyshakespeare-char", family="dense",
        preset="tiny", config={"model": {"d_model": 32, "layers": [1, 2]}, "train": {"lr": 3e-4}}, seed=7,
        git_commit="abc123+dirty", budget={"kind": "flops", "value": 1e15},
        params={"total": 12_345_678_901, "active": 1_234_567},
        flops={"forward_per_token": 2.5e6, "train_per_token": 7.5e6},
        train_flops=1.2345678901234567e15, tokens_seen=131072, steps=512,
        metrics={"val_loss": 0.1 + 0.2, "quality": 0.61, "bleu": 12.5},
        timings={"wall_seconds": 125.0, "tokens_per_second": 1092.3},
        expert_stats=[{"tokens_per_expert": [10, 12, 9, 1], "fraction_dropped": 0.01}],
        status="finished", finished_at="2026-11-28T20:17:05+00:00",
        paths={"checkpoint_dir": "runs/x/ckpt"}, wandb={"mode": "offline", "run_id": "abcd1234"},
    )
    base.update(kw)
    return RunRecord(**base)


def test_store_save_get_list_update(fresh_postgres_url):
    store = ResultsStore(fresh_postgres_url)
    assert store.engine.dialect.name == "postgresql" and not store.is_sqlite
    assert "moebench:***@" in repr(store)  # password hidden

    a = make_record("a", status="running", metrics={}, finished_at=None)
    store.save(a)
    got = store.get("a")
    for f in dataclasses.fields(RunRecord):  # field by field, exact (floats, big ints, unicode)
        assert getattr(got, f.name) == getattr(a, f.name), f.name
    assert got == a and got.status == "running"

    a.finish("failed", error="CUDA out of memory: ' \" ; -- quotes survive")
    a.metrics = {"val_loss": 1.0}
    store.save(a)  # upsert on run_id: same row updated
    store.save(make_record("b", family="moe", group="cmp-2"))
    store.save(make_record("c", family="moe", task="wmt", status="pruned"))
    assert store.get("a") == a and store.get("a").status == "failed"
    assert store.get("missing") is None
    assert [r.run_id for r in store.list()] == ["a", "b", "c"]  # creation order, a kept its slot
    assert [r.run_id for r in store.list(family="moe")] == ["b", "c"]
    assert [r.run_id for r in store.list(family="moe", status="finished")] == ["b"]
    assert [r.run_id for r in store.list(status="failed")] == ["a"]
    assert [r.run_id for r in store.list(task="wmt")] == ["c"]
    assert [r.run_id for r in store.list(group="cmp-1")] == ["a", "c"]
    with pytest.raises(RecordError, match="status='done'"):
        store.save(make_record("bad", status="done"))
    assert store.delete("b") and not store.delete("b")
    store.close()

    with ResultsStore(fresh_postgres_url) as again:  # reopening: table kept, data kept
        assert [r.run_id for r in again.list()] == ["a", "c"]
        with again.engine.connect() as conn:
            created, updated = conn.execute(sa.text(
                "SELECT created_at, updated_at FROM moe_bench_runs WHERE run_id = 'a'")).one()
        assert created <= updated


def test_non_finite_metrics_round_trip(fresh_postgres_url):
    with ResultsStore(fresh_postgres_url) as store:
        store.save(make_record("nan", metrics={"val_loss": float("nan"), "ppl": float("inf")}))
        got = store.get("nan")
    assert math.isnan(got.metrics["val_loss"]) and got.metrics["ppl"] == math.inf


def test_optuna_study_shares_the_database(fresh_postgres_url):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    store = ResultsStore(fresh_postgres_url)
    study = optuna.create_study(storage=fresh_postgres_url, study_name="x", direction="minimize")
    study.optimize(lambda t: (t.suggest_float("lr", 1e-4, 1e-2, log=True) - 1e-3) ** 2, n_trials=3)
    store.save(make_record("after-optuna"))

    loaded = optuna.load_study(storage=fresh_postgres_url, study_name="x")
    assert len(loaded.trials) == 3 and loaded.best_value == study.best_value
    assert [r.run_id for r in ResultsStore(fresh_postgres_url).list()] == ["after-optuna"]
    tables = set(sa.inspect(store.engine).get_table_names())
    assert {"moe_bench_runs", "studies", "trials"} <= tables
    store.close()


def _store_worker(url: str, prefix: str, start) -> None:
    start.wait(timeout=60)
    store = ResultsStore(url)  # both processes create the table at once on a fresh database
    for i in range(10):
        rec = make_record(f"{prefix}-{i:02d}", status="running")
        store.save(rec)
        store.save(rec.finish())
    store.close()


def _optuna_worker(url: str) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(storage=url, study_name="shared")
    study.optimize(lambda t: t.suggest_float("x", -1, 1) ** 2, n_trials=4)


CTX = multiprocessing.get_context("spawn")


def _run_two(target, args_list) -> None:
    procs = [CTX.Process(target=target, args=args) for args in args_list]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():  # hung: do not leave it behind
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]


def test_two_processes_share_one_database(fresh_postgres_url):
    start = CTX.Barrier(2)
    _run_two(_store_worker, [(fresh_postgres_url, "p0", start), (fresh_postgres_url, "p1", start)])
    records = ResultsStore(fresh_postgres_url).list()
    assert len(records) == 20 and {r.status for r in records} == {"finished"}

    # Optuna: create the study once in the parent, then workers load it (the pattern for sweeps).
    optuna.create_study(storage=fresh_postgres_url, study_name="shared")
    _run_two(_optuna_worker, [(fresh_postgres_url,), (fresh_postgres_url,)])
    trials = optuna.load_study(storage=fresh_postgres_url, study_name="shared").trials
    assert len(trials) == 8 and len({t.number for t in trials}) == 8


def test_missing_database_is_one_clear_error(postgres_url):
    url = sa.make_url(postgres_url)
    bad = url.set(database="moebench_no_such_db").render_as_string(hide_password=False)
    with pytest.raises(StorageError) as e:
        ResultsStore(bad)
    msg = str(e.value)
    assert "moebench_no_such_db" in msg and "server is running" in msg
    assert f":{url.password}@" not in msg  # password hidden (shown as ***)
