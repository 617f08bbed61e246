#!/usr/bin/env bash
# The GPU tier of the reference results (issue "Reference results", item 7), in one call of at
# most ~9 minutes on the GPU machine, prepared by scripts/gpu_tier_prepare.sh:
#   bash scripts/gpu_tier.sh            (device tool: carry [".whl", ".gpu-data"], timeout_s 600)
# 1. Measures the arms' training tokens/s on the device (`reproduce --throughput`), which the
#    equal-time arm's budget needs (Table 1's time claim); if that fails, the arm is left out.
# 2. Trains the `small` tier of switch-vs-dense (dense, Switch cf 1.25 and Switch cf 1.25 for
#    dense's time; seeds interleaved so a cut leaves paired seeds) into $OUT/gpu-small.db, whose
#    records name the device (timings.device). A store carried back in (GPU_TIER_STORE) is
#    continued: finished pairs are skipped, and its throughput measurements are reused.
# 3. If time is left, `moe-bench perf --device cuda` (layer and training speed, MFU) to $OUT/perf.*.
# 4. The report of the store to $OUT/report/.
# Training stops cleanly (SIGINT: the run in flight is recorded as interrupted) GPU_TIER_SECONDS
# after the script starts, so the call ends inside its limit.
# Env: PYTHON (default python3), GPU_TIER_SECONDS (450), GPU_TIER_ARGS (default the small tier:
# "--tier small --seeds 5"; on a CPU, e.g. "--tier tiny --seeds 1 --budget-flops 2e10" to test it),
# GPU_TIER_THROUGHPUT_ARGS (default "--repeats 3"), GPU_TIER_THROUGHPUT_SECONDS (150), GPU_TIER_PERF_SECONDS
# (75; 0 skips step 3).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
if ! "$PY" -c "import sqlalchemy" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export MOE_BENCH_DATA=${MOE_BENCH_DATA:-$PWD/.gpu-data} MOE_BENCH_RUNS=${MOE_BENCH_RUNS:-/tmp/moe-bench-runs}
export MOE_BENCH_CACHE=${MOE_BENCH_CACHE:-/tmp/moe-bench-cache} WANDB_MODE=disabled PYTHONUNBUFFERED=1
# the copy on the GPU machine has no .git: records name the commit gpu_tier_prepare.sh wrote down
[ -s "$MOE_BENCH_DATA/COMMIT" ] && export MOE_BENCH_GIT_COMMIT=${MOE_BENCH_GIT_COMMIT:-$(cat "$MOE_BENCH_DATA/COMMIT")}
STORE="$OUT/gpu-small.db"
[ -n "${GPU_TIER_STORE:-}" ] && cp "$GPU_TIER_STORE" "$STORE"
"$PY" - <<'PY' || exit 1
import torch, lightning, sqlalchemy, tokenizers, sacrebleu  # what a run needs; fails here, not mid-run
print("torch", torch.__version__, "| lightning", lightning.__version__, "| device:",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU")
PY
read -r -a ARGS <<< "${GPU_TIER_ARGS:---tier small --seeds 5}"
read -r -a TP_ARGS <<< "${GPU_TIER_THROUGHPUT_ARGS:---repeats 3}"
TIER_ARGS=()  # the tier alone (throughput takes no --seeds / --budget-flops)
for ((i = 0; i < ${#ARGS[@]}; i++)); do
    [ "${ARGS[$i]}" = "--tier" ] && TIER_ARGS=(--tier "${ARGS[$((i + 1))]}")
done
ARMS=(--arm dense --arm "switch cf=1.25")
EQUAL_TIME="switch cf=1.25 equal-time"
elapsed() { echo $((SECONDS - START)); }

measured() {  # the store already holds device throughput for every arm (a carried store): reuse it
    "$PY" - "$STORE" "$EQUAL_TIME" <<'PY'
import sys
from pathlib import Path
from bench.tracking.records import ResultsStore, throughput_by_arm
store, equal_time = sys.argv[1], sys.argv[2]
have = throughput_by_arm(ResultsStore(f"sqlite:///{store}").list()) if Path(store).is_file() else {}
sys.exit(0 if {"dense", "switch cf=1.25", equal_time} <= set(have) else 1)
PY
}

echo "== throughput on the device ($(elapsed) s)"
if measured; then
    echo "the carried store holds every arm's throughput: reused"
    ARMS+=(--arm "$EQUAL_TIME")
elif timeout -s INT "${GPU_TIER_THROUGHPUT_SECONDS:-150}" "$PY" -m bench.cli reproduce switch-vs-dense \
        "${TIER_ARGS[@]}" --throughput "${TP_ARGS[@]}" "${ARMS[@]}" --arm "$EQUAL_TIME" --storage "sqlite:///$STORE" \
        2>&1 | tee "$OUT/reproduce.log"; then
    ARMS+=(--arm "$EQUAL_TIME")
else
    echo "throughput failed or timed out: the equal-time arm is left out"
fi

LEFT=$(( ${GPU_TIER_SECONDS:-450} - $(elapsed) ))
echo "== training for at most $LEFT s ($(elapsed) s)"
timeout -s INT "$LEFT" "$PY" -m bench.cli reproduce switch-vs-dense "${ARGS[@]}" \
    "${ARMS[@]}" --storage "sqlite:///$STORE" 2>&1 | tee -a "$OUT/reproduce.log"
echo "reproduce exit: ${PIPESTATUS[0]} (124/130: stopped at the time limit; the finished runs are in the store)"

PERF=${GPU_TIER_PERF_SECONDS:-75}
LEFT=$(( ${GPU_TIER_SECONDS:-450} + PERF - $(elapsed) ))
if [ "$PERF" -gt 0 ] && [ "$LEFT" -ge 30 ] && "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "== moe-bench perf --device cuda for at most $LEFT s ($(elapsed) s)"
    timeout "$LEFT" "$PY" -m bench.cli perf --device cuda --presets small --json > "$OUT/perf.json" 2> "$OUT/perf.log"
    echo "perf exit: $?"
fi

echo "== runs and report ($(elapsed) s)"
"$PY" -m bench.cli runs --storage "sqlite:///$STORE" | tee "$OUT/runs.txt"
"$PY" -m bench.cli report --storage "sqlite:///$STORE" --out "$OUT/report" --no-plots > /dev/null
ls -la "$OUT" "$OUT/report"
echo "gpu_tier done in $(elapsed) s"
