#!/usr/bin/env bash
# Start the reference queue in the background: every plan's `ref` tier, one run at a time, from a
# separate worktree of the current commit (editing this checkout never changes the code under the
# runs), into this checkout's results/reference/moe-bench.db. Resumable: finished pairs are
# skipped, so the same command continues a queue a lost machine stopped.
#   bash scripts/reference_queue.sh [PLAN ...]      (default: the order below)
#   tail -f ../refrun.log;  moe-bench reproduce PLAN --tier ref --status --storage sqlite:///results/reference/moe-bench.db
# Commit what finished with scripts/commit_reference.sh "message"; stop with scripts/stop_reference_queue.sh
# (--after-run: once the current run is recorded).
set -euo pipefail
cd "$(dirname "$0")/.."
MAIN=$PWD
PLANS=("$@")
[ ${#PLANS[@]} -gt 0 ] || PLANS=(switch-experts moe-rnn capacity translation switch-lr granularity balancing shared-experts
                                expert-choice upcycling)
PIDFILE=${REFRUN_PIDFILE:-$MAIN/../refrun.pid}
# Two queues would share the 2 cores, and the checkout below would change the code under a running one.
if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    echo "a reference queue is already running (pid $(cat "$PIDFILE")): stop it first with scripts/stop_reference_queue.sh" >&2
    exit 1
fi
WT=${REFRUN_WORKTREE:-$MAIN/../refrun}
if [ -d "$WT" ]; then
    git -C "$WT" checkout -q --detach "$(git rev-parse HEAD)"
else
    git worktree add -q --detach "$WT" HEAD
fi
PY=${PYTHON:-$MAIN/.venv/bin/python}
DATA=${MOE_BENCH_DATA:-$(cd "$MAIN/../shared/data" && pwd)}
LOG=${REFRUN_LOG:-$MAIN/../refrun.log}
cd "$WT"
PYTHONPATH=$WT MOE_BENCH_DATA=$DATA nohup "$PY" - "$MAIN/results/reference/moe-bench.db" "${PLANS[@]}" > "$LOG" 2>&1 <<'PY' &
import subprocess, sys
store, plans = sys.argv[1], sys.argv[2:]
for plan in plans:  # one after another; a plan that fails (e.g. a missing dataset) does not stop the rest
    rc = subprocess.call([sys.executable, "-m", "bench.cli", "reproduce", plan, "--tier", "ref",
                          "--storage", f"sqlite:///{store}"])
    print(f"reference queue: {plan} exited {rc}", flush=True)
    if rc == 130:  # interrupted, or asked to stop after its run (stop_reference_queue.sh --after-run)
        print("reference queue: stopped; scripts/reference_queue.sh continues it", flush=True)
        break
PY
echo $! > "$PIDFILE"
echo "reference queue started (pid $!) at $(git rev-parse --short HEAD) in $WT; log $LOG; plans: ${PLANS[*]}"
