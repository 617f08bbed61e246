"""`moe-bench clean`: a dry run lists checkpoints of finished runs with sizes; --yes removes them."""
from __future__ import annotations

from bench.cli import main
from bench.tracking.records import ResultsStore, RunRecord


def _run(runs, run_id, nbytes):
    ckpt = runs / run_id / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "last.ckpt").write_bytes(b"x" * nbytes)
    (runs / run_id / "metrics.csv").write_text("step,loss\n")


def test_clean_dry_run_then_yes(tmp_path, capsys):
    runs, url = tmp_path / "runs", f"sqlite:///{tmp_path / 's.db'}"
    store = ResultsStore(url)
    for run_id, status, size in (("a", "finished", 3000), ("b", "interrupted", 5000), ("c", "pruned", 1000)):
        _run(runs, run_id, size)
        store.save(RunRecord(run_id=run_id, status=status))
    _run(runs, "orphan", 700)
    (runs / "_summaries" / "wandb").mkdir(parents=True)  # comparisons' W&B tables: not a run folder
    assert main(["clean", "--storage", url, "--runs-dir", str(runs)]) == 0
    out = capsys.readouterr().out
    assert "remove     2.9 KB" in out and "checkpoint of a finished run" in out
    assert "keep       4.9 KB" in out and "interrupted run (kept: it can be resumed" in out
    assert "3.9 KB can be freed; nothing removed yet" in out and (runs / "a" / "checkpoints").exists()
    assert main(["clean", "--storage", url, "--runs-dir", str(runs), "--yes"]) == 0
    assert "removed 3.9 KB" in capsys.readouterr().out
    assert not (runs / "a" / "checkpoints").exists() and not (runs / "c" / "checkpoints").exists()
    assert (runs / "a" / "metrics.csv").exists() and (runs / "b" / "checkpoints" / "last.ckpt").exists()
    assert (runs / "orphan").exists()
    assert main(["clean", "--storage", url, "--runs-dir", str(runs), "--orphans", "--yes"]) == 0
    assert not (runs / "orphan").exists() and (runs / "b").exists() and (runs / "_summaries" / "wandb").exists()


def test_final_models_go_only_with_models(tmp_path, capsys):
    runs, url = tmp_path / "runs", f"sqlite:///{tmp_path / 's.db'}"
    (runs / "a").mkdir(parents=True)
    (runs / "a" / "model.pt").write_bytes(b"x" * 2048)
    ResultsStore(url).save(RunRecord(run_id="a", status="finished"))
    args = ["clean", "--storage", url, "--runs-dir", str(runs)]
    assert main(args + ["--yes"]) == 0
    out = capsys.readouterr().out
    assert "keep       2.0 KB" in out and "final model of a finished run (kept: evaluate and translate" in out
    assert (runs / "a" / "model.pt").exists()
    assert main(args) == 0 and "--models also removes model.pt files" in capsys.readouterr().out
    assert main(args + ["--models"]) == 0
    assert "remove     2.0 KB" in capsys.readouterr().out and (runs / "a" / "model.pt").exists()
    assert main(args + ["--models", "--yes"]) == 0
    assert "removed 2.0 KB" in capsys.readouterr().out and not (runs / "a" / "model.pt").exists()


def test_runs_and_report_read_a_store_without_writing_beside_it(tmp_path, capsys):
    import shutil
    import sqlite3

    src = tmp_path / "src.db"
    store = ResultsStore(f"sqlite:///{src}")
    store.save(RunRecord(run_id="r1", status="finished", task="tinyshakespeare-char", family="dense"))
    store.close()
    shared = tmp_path / "shared"
    shared.mkdir()
    shutil.copy(src, shared / "ref.db")  # a WAL-mode file, as shipped, with no writer
    assert sqlite3.connect(src).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    before = sorted(p.name for p in shared.iterdir())
    url = f"sqlite:///{shared / 'ref.db'}"
    assert main(["runs", "--storage", url]) == 0
    assert "r1" in capsys.readouterr().out
    assert main(["report", "--storage", url, "--out", str(tmp_path / "out"), "--no-plots"]) == 0
    assert sorted(p.name for p in shared.iterdir()) == before  # no -wal/-shm left beside it
    missing = tmp_path / "nowhere" / "none.db"
    assert main(["runs", "--storage", f"sqlite:///{missing}"]) == 0
    assert "no runs recorded yet" in capsys.readouterr().out and not missing.parent.exists()
