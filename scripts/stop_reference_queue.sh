#!/usr/bin/env bash
# Stop the reference queue that scripts/reference_queue.sh started.
#   bash scripts/stop_reference_queue.sh              now: the queue process first (so it cannot start
#       the next plan), then the run it is training, which records itself as interrupted and resumes
#       from its last checkpoint (written after every evaluation) when the queue is started again.
#   bash scripts/stop_reference_queue.sh --after-run  when the current run has finished and been
#       recorded (SIGUSR1 to `moe-bench reproduce`, bench/runner/stopping.py): nothing is redone, and
#       a restart picks up the code committed meanwhile. Waits for it (up to a run's length).
set -euo pipefail
cd "$(dirname "$0")/.."
AFTER_RUN=0
case "${1:-}" in
    --after-run) AFTER_RUN=1 ;;
    "") ;;
    *) echo "usage: $0 [--after-run]" >&2; exit 2 ;;
esac
PIDFILE=${REFRUN_PIDFILE:-$PWD/../refrun.pid}
if [ ! -f "$PIDFILE" ] || ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    echo "no reference queue is running (no live pid in $PIDFILE)"
    exit 0
fi
QUEUE=$(cat "$PIDFILE")
RUNS=$(pgrep -P "$QUEUE" || true)

gone() {  # every pid given has exited (a zombie its parent has not reaped yet counts as gone)
    local pid state
    for pid in "$@"; do
        state=$(ps -o stat= -p "$pid" 2>/dev/null || true)
        [ -n "$state" ] && [ "${state#Z}" = "$state" ] && return 1
    done
    return 0
}

if [ $AFTER_RUN = 1 ]; then
    if [ -z "$RUNS" ]; then
        echo "the queue (pid $QUEUE) is between plans: run the script without --after-run to stop it now" >&2
        exit 1
    fi
    for pid in $RUNS; do  # a process without a SIGUSR1 handler would be killed by it, not asked
        caught=$(awk '/^SigCgt:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
        if (( (16#${caught:-0} & (1 << 9)) == 0 )); then
            echo "run process $pid does not handle SIGUSR1 (started from older code, or between runs): try again" \
                 "in a minute, or stop it now with $0" >&2
            exit 1
        fi
    done
    kill -USR1 $RUNS
    echo "asked run process(es) $RUNS to stop after the current run; waiting for it (queue pid $QUEUE)"
    until gone $QUEUE $RUNS; do sleep 5; done  # the queue ends when its plan exits interrupted (130)
else
    kill -TERM "$QUEUE"
    [ -z "$RUNS" ] || kill -TERM $RUNS
    for _ in $(seq 1 60); do  # the run saves its record before it exits
        gone $QUEUE $RUNS && break
        sleep 1
    done
fi
rm -f "$PIDFILE"
echo "reference queue stopped (queue pid $QUEUE, run pid(s) ${RUNS:-none}); restart with scripts/reference_queue.sh"
