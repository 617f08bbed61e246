"""Move a plan tier's run records out of a results store into an archive store (same format), e.g.
when a plan's settings change and its earlier runs no longer match it. The report reads every
record of a plan's tier, so runs of an old design left in the store would be pooled with the new
ones; moved to an archive they stay readable (`moe-bench report --storage ARCHIVE`, `moe-bench runs
--storage ARCHIVE`) and comparable seed by seed with the re-run.

    .venv/bin/python scripts/archive_runs.py repro-translation-ref \\
        --into sqlite:///results/reference/archive/translation-ref-warmup40.db [--arm dense ...] [--dry-run]

GROUP is the records' group: repro-PLAN-TIER. Every record of the group moves (finished ones and
the interrupted segments of resumed runs), or only those of the given --arm labels. A record still
marked running is refused: a run may be writing to it (stop the queue first). Each record is written
to the archive and read back before it is deleted from the store, so an interrupted move loses
nothing (running it again finishes it).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.tracking.records import ResultsStore, sqlite_file

DEFAULT_STORE = "sqlite:///results/reference/moe-bench.db"


def move_group(store: ResultsStore, archive: ResultsStore, group: str, arms: list[str] | None = None,
               dry_run: bool = False) -> list[str]:
    """Move ``group``'s records (of ``arms`` only, if given) from ``store`` to ``archive``; returns their run ids."""
    records = [r for r in store.list(group=group) if arms is None or r.extra.get("arm") in arms]
    running = [r.run_id for r in records if r.status == "running"]
    if running:
        raise SystemExit(f"{len(running)} record(s) of {group} are still marked running ({', '.join(running)}): "
                         "stop the runs first (scripts/stop_reference_queue.sh), or mark a lost one "
                         "(moe-bench reproduce ... --status shows it)")
    if dry_run:
        return [r.run_id for r in records]
    for r in records:
        archive.save(r)
        if archive.get(r.run_id) is None or archive.get(r.run_id).to_dict() != r.to_dict():
            raise SystemExit(f"run {r.run_id} did not read back from {archive.url} as written; nothing deleted")
        store.delete(r.run_id)
    return [r.run_id for r in records]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("group", help="the records' group, repro-PLAN-TIER (e.g. repro-translation-ref)")
    p.add_argument("--into", required=True, help="archive store URL (sqlite:///path.db is created if missing)")
    p.add_argument("--storage", default=DEFAULT_STORE, help=f"the store to move them out of (default {DEFAULT_STORE})")
    p.add_argument("--arm", action="append", help="only this arm's records (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="list what would move, change nothing")
    args = p.parse_args(argv)
    path = sqlite_file(args.into)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    with ResultsStore(args.storage) as store, ResultsStore(args.into) as archive:
        moved = move_group(store, archive, args.group, args.arm, args.dry_run)
    if not moved:
        print(f"no records of group {args.group}{' for arms ' + ', '.join(args.arm) if args.arm else ''} "
              f"in {args.storage}", file=sys.stderr)
        return 1
    print(f"{'would move' if args.dry_run else 'moved'} {len(moved)} records of {args.group} "
          f"from {args.storage} to {args.into}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
