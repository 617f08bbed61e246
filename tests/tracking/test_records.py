"""RunRecord JSON, ResultsStore (SQLite upsert/filters/concurrency/errors), runs table."""
from __future__ import annotations

import json
import multiprocessing
import sqlite3

import pytest

from bench.tracking import (
    RecordError,
    ResultsStore,
    RunRecord,
    StorageError,
    format_runs_table,
    git_commit,
    new_run_id,
)


def make_record(run_id="20261128-201500-dense-3f9a", **kw) -> RunRecord:
    base = dict(
        run_id=run_id, name="dense-tiny", group="cmp-1", task="tinyshakespeare-char", family="dense",
        preset="tiny", config={"model": {"d_model": 32}, "train": {"lr": 3e-4}}, seed=7,
        git_commit="abc123+dirty", budget={"kind": "flops", "value": 1e15},
        params={"total": 1_234_567, "active": 1_234_567, "total_no_embed": 1_000_000, "active_no_embed": 1_000_000},
        flops={"forward_per_token": 2.5e6, "train_per_token": 7.5e6, "executed_train_per_token": 7.6e6},
        train_flops=1.234e15, tokens_seen=131072, steps=512,
        metrics={"val_loss": 1.4321, "quality": 0.61, "bits_per_char": 2.066, "test_val_loss": 1.45},
        timings={"wall_seconds": 125.0, "train_seconds": 120.0, "tokens_per_second": 1092.3},
        expert_stats=[{"tokens_per_expert": [10, 12, 9, 1], "fraction_dropped": 0.01, "router_entropy": 1.2,
                       "load_balancing_loss": 0.02}],
        status="finished", finished_at="2026-11-28T20:17:05+00:00",
        paths={"checkpoint_dir": "runs/x/ckpt", "csv_file": "runs/x/metrics.csv", "wandb_dir": "runs/x/wandb"},
        wandb={"mode": "offline", "run_id": "abcd1234"},
    )
    base.update(kw)
    return RunRecord(**base)


def test_json_round_trip():
    rec = make_record()
    back = RunRecord.from_json(rec.to_json())
    assert back == rec
    assert json.loads(rec.to_json())["metrics"]["val_loss"] == 1.4321


def test_json_converts_tensors_and_rejects_bad_records():
    torch = pytest.importorskip("torch")
    rec = make_record(metrics={"val_loss": torch.tensor(1.5), "hist": torch.tensor([1, 2])})
    assert json.loads(rec.to_json())["metrics"] == {"val_loss": 1.5, "hist": [1, 2]}
    data = json.loads(make_record().to_json())
    data.update(status="done", steps="many", colour="red")
    with pytest.raises(RecordError) as e:
        RunRecord.from_dict(data)
    msg = str(e.value)  # every problem reported at once
    assert "steps='many' is not allowed: expected an integer" in msg and "unknown key 'colour'" in msg
    assert "status='done' is not allowed: expected one of 'running'" in msg
    assert len(e.value.problems) == 3
    with pytest.raises(RecordError, match="budget.kind='joules'"):
        RunRecord.from_dict({"run_id": "x", "budget": {"kind": "joules", "value": 1}})
    lenient = RunRecord.from_dict({**json.loads(make_record().to_json()), "future_field": 1}, strict=False)
    assert lenient.extra == {"future_field": 1}
    assert json.loads(lenient.to_json())["future_field"] == 1


def test_summary_and_helpers():
    s = make_record().summary()
    for key in ("val_loss", "quality", "quality_per_active_param", "active_params", "total_params",
                "train_flops", "status"):
        assert key in s
    assert s["quality_per_active_param"] == pytest.approx(0.61 / 1.234567)  # per million active params
    assert s["active_params"] == 1_234_567 and s["status"] == "finished" and s["bits_per_char"] == 2.066
    empty = RunRecord(run_id="x").summary()
    assert empty["val_loss"] is None and empty["quality_per_active_param"] is None
    rid = new_run_id("moe-rnn")
    assert rid.split("-")[2:4] == ["moe", "rnn"] and len(rid.split("-")[-1]) == 4 and rid != new_run_id("moe-rnn")
    rec = RunRecord(run_id="y").finish("failed", error="boom")
    assert rec.status == "failed" and rec.error == "boom" and rec.finished_at


def test_git_commit(tmp_path, monkeypatch):
    monkeypatch.delenv("MOE_BENCH_GIT_COMMIT", raising=False)
    commit = git_commit()
    assert commit is None or len(commit.split("+")[0]) == 40
    assert git_commit(tmp_path) is None  # not a checkout
    # a copy of the tree without .git (as sent to a GPU machine) names the commit it was copied from
    monkeypatch.setenv("MOE_BENCH_GIT_COMMIT", "d671388" + "0" * 33)
    assert git_commit(tmp_path) == "d671388" + "0" * 33
    if commit:  # inside a checkout git's own answer wins
        assert git_commit() == commit


def test_store_upsert_get_list_delete(tmp_path):
    store = ResultsStore(f"sqlite:///{tmp_path / 'sub' / 'runs.db'}")
    assert (tmp_path / "sub" / "runs.db").is_file()
    a = make_record("a", status="running", metrics={}, finished_at=None)
    store.save(a)
    assert store.get("a").status == "running"
    a.finish("finished")
    a.metrics = {"val_loss": 1.0}
    store.save(a)  # upsert: same row updated
    store.save(make_record("b", family="moe", group="cmp-2"))
    store.save(make_record("c", family="moe", task="wmt", status="failed"))
    assert store.get("a") == a
    assert store.get("missing") is None
    assert [r.run_id for r in store.list()] == ["a", "b", "c"]  # creation order, a kept its slot
    assert [r.run_id for r in store.list(family="moe")] == ["b", "c"]
    assert [r.run_id for r in store.list(family="moe", status="finished")] == ["b"]
    assert [r.run_id for r in store.list(task="wmt")] == ["c"]
    assert [r.run_id for r in store.list(group="cmp-1")] == ["a", "c"]
    with pytest.raises(RecordError, match="status='done'"):
        store.save(make_record("bad", status="done"))
    assert store.delete("b") and not store.delete("b")
    assert [r.run_id for r in store.list()] == ["a", "c"]
    store.close()
    # other tables in the same file (Optuna's) are untouched, and reopening keeps the data
    con = sqlite3.connect(tmp_path / "sub" / "runs.db")
    con.execute("CREATE TABLE studies (study_id INTEGER PRIMARY KEY)")
    con.commit()
    con.close()
    assert len(ResultsStore(str(tmp_path / "sub" / "runs.db")).list()) == 2


def test_default_url_and_env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = ResultsStore()
    assert store.url == "sqlite:///results/moe-bench.db"
    store.save(make_record("d"))
    assert (tmp_path / "results" / "moe-bench.db").is_file()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # an open store keeps using the file it opened
    store.save(make_record("e"))
    assert [r.run_id for r in store.list()] == ["d", "e"]
    assert not (tmp_path / "elsewhere" / "results").exists()
    monkeypatch.setenv("MOE_BENCH_STORAGE", f"sqlite:///{tmp_path / 'other.db'}")
    assert ResultsStore().list() == []


def _worker(url: str, prefix: str) -> None:
    store = ResultsStore(url)
    for i in range(20):
        rec = make_record(f"{prefix}-{i:02d}", status="running")
        store.save(rec)
        store.save(rec.finish())


def test_two_processes_share_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(url, p)) for p in ("p0", "p1")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    records = ResultsStore(url).list()
    assert len(records) == 40 and {r.status for r in records} == {"finished"}


def test_bad_url_and_unreachable_database(tmp_path):
    with pytest.raises(StorageError, match="nosuchdialect://x") as e:
        ResultsStore("nosuchdialect://x")
    assert isinstance(e.value, RuntimeError) and "dialect" in str(e.value)
    with pytest.raises(StorageError, match="invalid results database URL"):
        ResultsStore("sqlite://:::bad")
    with pytest.raises(StorageError) as e:  # driver missing or server unreachable: either way one clear error
        ResultsStore("postgresql://bench:secret@127.0.0.1:1/bench")
    assert "127.0.0.1:1/bench" in str(e.value) and "secret" not in str(e.value)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(StorageError, match="afile"):
        ResultsStore(f"sqlite:///{tmp_path / 'afile' / 'runs.db'}")


def test_corrupt_sqlite_file(tmp_path):
    path = tmp_path / "broken.db"
    path.write_bytes(b"this is definitely not an sqlite database" * 100)
    with pytest.raises(StorageError) as e:
        ResultsStore(f"sqlite:///{path}")
    msg = str(e.value)
    assert str(path) in msg and "not a valid SQLite database" in msg


def test_format_runs_table():
    recs = [make_record(), make_record("20261128-201501-moe-0001", family="moe", status="running",
                                       steps=0, train_flops=0.0, metrics={}, timings={}, params={})]
    table = format_runs_table(recs)
    lines = table.splitlines()
    assert lines[0].split()[:5] == ["run_id", "task", "family", "preset", "status"]
    first = lines[2]
    for text in ("20261128-201500-dense-3f9a", "tinyshakespeare-char", "dense", "finished", "512", "1.23e15",
                 "1.4321", "0.6100", "0.4941", "1.23M", "2m05s"):
        assert text in first, text
    assert lines[3].split()[5:] == ["-"] * 7
    assert len({len(line) for line in lines[:3]}) == 1  # aligned columns
    assert "(no runs)" in format_runs_table([])


def test_one_damaged_record_row_is_skipped_with_a_warning(tmp_path):
    import sqlalchemy as sa

    store = ResultsStore(f"sqlite:///{tmp_path / 'd.db'}")
    store.save(RunRecord(run_id="good", status="finished"))
    store.save(RunRecord(run_id="bad", status="finished"))
    with store.engine.begin() as conn:
        conn.execute(sa.update(store.table).where(store.table.c.run_id == "bad").values(record="{not json"))
    with pytest.warns(UserWarning, match="skipping run bad .* its record cannot be read"):
        assert [r.run_id for r in store.list()] == ["good"]
