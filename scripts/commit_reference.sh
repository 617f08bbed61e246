#!/usr/bin/env bash
# Commit the reference store as it stands (runs may still be writing to it): fold SQLite's
# write-ahead log into the file (the -wal file is not committed), list the runs and the ref tier's
# progress (STATUS.txt), regenerate the report (and the README's table of ref claims) from the
# store, commit results/ and README.md.
#   bash scripts/commit_reference.sh "Reference store: switch-experts ref E=64 seed 101"
set -euo pipefail
cd "$(dirname "$0")/.."
MB=${MOE_BENCH:-.venv/bin/moe-bench}
S=sqlite:///results/reference/moe-bench.db
sqlite3 results/reference/moe-bench.db "PRAGMA wal_checkpoint(TRUNCATE);" > /dev/null
"$MB" runs --storage "$S" > results/reference/RUNS.txt
"$MB" reproduce --status --tier ref --storage "$S" > results/reference/STATUS.txt   # every plan's progress, hours left
rm -f results/plots/*.png results/plots/*.html
"$MB" report --storage "$S" --out results --readme README.md > /dev/null   # and README's ref table
git add results README.md
git commit -qm "${1:-Reference store: finished runs; report regenerated}"
git log --oneline -1
