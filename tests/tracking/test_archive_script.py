"""scripts/archive_runs.py: a plan tier's records move to an archive store intact, others stay."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.tracking import ResultsStore
from tests.tracking.test_records import make_record

ROOT = Path(__file__).resolve().parents[2]


def archive(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts/archive_runs.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": ""}, timeout=120)


def fill(url: str) -> dict[str, object]:
    records = {
        "old-dense-1": make_record("old-dense-1", group="repro-translation-ref", extra={"arm": "dense"}),
        "old-dense-1-seg": make_record("old-dense-1-seg", group="repro-translation-ref", status="interrupted",
                                       extra={"arm": "dense"}),
        "old-lstm-1": make_record("old-lstm-1", group="repro-translation-ref", extra={"arm": "lstm"}),
        "tiny-dense-1": make_record("tiny-dense-1", group="repro-translation-tiny", extra={"arm": "dense"}),
    }
    with ResultsStore(url) as s:
        for r in records.values():
            s.save(r)
    return records


def test_moves_one_arms_records_of_a_group_and_keeps_them_readable(tmp_path):
    store, into = f"sqlite:///{tmp_path}/store.db", f"sqlite:///{tmp_path}/archive/old.db"
    records = fill(store)
    out = archive("repro-translation-ref", "--arm", "dense", "--storage", store, "--into", into)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("moved 2 records of repro-translation-ref")
    with ResultsStore(store) as s, ResultsStore(into) as a:
        assert sorted(r.run_id for r in s.list()) == ["old-lstm-1", "tiny-dense-1"]
        moved = {r.run_id: r for r in a.list()}
    assert sorted(moved) == ["old-dense-1", "old-dense-1-seg"]
    assert all(moved[k].to_dict() == records[k].to_dict() for k in moved)  # every field intact


def test_dry_run_changes_nothing_and_a_running_record_is_refused(tmp_path):
    store, into = f"sqlite:///{tmp_path}/store.db", f"sqlite:///{tmp_path}/old.db"
    fill(store)
    out = archive("repro-translation-ref", "--storage", store, "--into", into, "--dry-run")
    assert out.returncode == 0 and out.stdout.startswith("would move 3 records")
    with ResultsStore(store) as s:
        assert len(s.list()) == 4
        s.save(make_record("live-switch-2", group="repro-translation-ref", status="running", extra={"arm": "switch"}))
    out = archive("repro-translation-ref", "--storage", store, "--into", into)
    assert out.returncode == 1
    assert "still marked running (live-switch-2)" in out.stderr and "stop the runs first" in out.stderr
    with ResultsStore(store) as s:
        assert len(s.list()) == 5  # nothing moved
    out = archive("repro-nothing-ref", "--storage", store, "--into", into)
    assert out.returncode == 1 and "no records of group repro-nothing-ref" in out.stderr
