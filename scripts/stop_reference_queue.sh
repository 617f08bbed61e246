#!/usr/bin/env bash
# Stop the reference queue that scripts/reference_queue.sh started: the queue process first (so it
# cannot start the next plan), then the run it is training, which records itself as interrupted and
# resumes from its last checkpoint (written after every evaluation) when the queue is started again.
#   bash scripts/stop_reference_queue.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PIDFILE=${REFRUN_PIDFILE:-$PWD/../refrun.pid}
if [ ! -f "$PIDFILE" ] || ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    echo "no reference queue is running (no live pid in $PIDFILE)"
    exit 0
fi
QUEUE=$(cat "$PIDFILE")
RUNS=$(pgrep -P "$QUEUE" || true)
kill -TERM "$QUEUE"
[ -z "$RUNS" ] || kill -TERM $RUNS
for _ in $(seq 1 60); do  # the run saves its record before it exits
    alive=0
    for pid in $QUEUE $RUNS; do  # an exited process its parent has not reaped yet (state Z) is gone
        state=$(ps -o stat= -p "$pid" 2>/dev/null || true)
        [ -n "$state" ] && [ "${state#Z}" = "$state" ] && alive=1
    done
    [ $alive = 0 ] && break
    sleep 1
done
rm -f "$PIDFILE"
echo "reference queue stopped (queue pid $QUEUE, run pid(s) ${RUNS:-none}); restart with scripts/reference_queue.sh"
