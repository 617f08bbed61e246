#!/usr/bin/env bash
# Start the reference queue in the background: every plan's `ref` tier, one run at a time, from a
# separate worktree of the current commit (editing this checkout never changes the code under the
# runs), into this checkout's results/reference/moe-bench.db. Resumable: finished pairs are
# skipped, so the same command continues a queue a lost machine stopped.
#   bash scripts/reference_queue.sh [--workers N] [PLAN ...]      (default: 1 worker, the order below)
# --workers N: N runs at once, each with cores/N torch threads (scripts/queue_loop.py). On 2 cores,
# two 1-thread runs trained 1.09-1.18x the tokens per second of one 2-thread run (docs/performance.md);
# each run takes ~1.7x longer. Wall-clock claims use --throughput, not these runs; keep one plan's
# runs at one thread count, as float rounding differs between them.
#   tail -f ../refrun.log;  moe-bench reproduce PLAN --tier ref --status --storage sqlite:///results/reference/moe-bench.db
# Commit what finished with scripts/commit_reference.sh "message"; stop with scripts/stop_reference_queue.sh
# (--after-run: once the current run is recorded).
set -euo pipefail
cd "$(dirname "$0")/.."
MAIN=$PWD
WORKERS=1
if [ "${1:-}" = "--workers" ]; then
    WORKERS=${2:?--workers needs a number}
    shift 2
fi
[[ "$WORKERS" =~ ^[1-9][0-9]*$ ]] || { echo "--workers must be a positive integer, got '$WORKERS'" >&2; exit 2; }
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
PYTHONPATH=$WT MOE_BENCH_DATA=$DATA nohup "$PY" scripts/queue_loop.py "$MAIN/results/reference/moe-bench.db" "$WORKERS" \
    "${PLANS[@]}" > "$LOG" 2>&1 &
echo $! > "$PIDFILE"
echo "reference queue started (pid $!, $WORKERS worker(s)) at $(git rev-parse --short HEAD) in $WT; log $LOG; plans: ${PLANS[*]}"
