#!/usr/bin/env bash
# The GPU tier of the reference results (issue "Reference results", item 7), in one call of at
# most ~9 minutes on the GPU machine, prepared by scripts/gpu_tier_prepare.sh:
#   bash scripts/gpu_tier.sh            (device tool: carry [".whl", ".gpu-data"], timeout_s 600)
# Trains the `small` tier of switch-vs-dense (dense and Switch cf 1.25, seeds interleaved so a cut
# leaves paired seeds) into $OUT/gpu-small.db, whose records name the device (timings.device), and
# writes the report of that store to $OUT/report/. A store carried back in (GPU_TIER_STORE) is
# continued: finished pairs are skipped. Stops cleanly (SIGINT: the run in flight is recorded as
# interrupted) GPU_TIER_SECONDS after it starts, so the call ends inside its limit.
# Env: PYTHON (default python3), GPU_TIER_SECONDS (480), GPU_TIER_ARGS (default the small tier:
# "--tier small --seeds 3"; on a CPU, e.g. "--tier tiny --seeds 1 --budget-flops 2e10" to test it).
set -uo pipefail
cd "$(dirname "$0")/.."
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
STORE="$OUT/gpu-small.db"
[ -n "${GPU_TIER_STORE:-}" ] && cp "$GPU_TIER_STORE" "$STORE"
"$PY" - <<'PY' || exit 1
import torch, lightning, sqlalchemy, tokenizers, sacrebleu  # what a run needs; fails here, not mid-run
print("torch", torch.__version__, "| device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU")
PY
read -r -a ARGS <<< "${GPU_TIER_ARGS:---tier small --seeds 3}"
timeout -s INT "${GPU_TIER_SECONDS:-480}" "$PY" -m bench.cli reproduce switch-vs-dense "${ARGS[@]}" \
    --arm dense --arm "switch cf=1.25" --storage "sqlite:///$STORE" 2>&1 | tee "$OUT/reproduce.log"
echo "reproduce exit: ${PIPESTATUS[0]} (124/130: stopped at the time limit; the finished runs are in the store)"
"$PY" -m bench.cli runs --storage "sqlite:///$STORE" | tee "$OUT/runs.txt"
"$PY" -m bench.cli report --storage "sqlite:///$STORE" --out "$OUT/report" --no-plots > /dev/null
ls -la "$OUT" "$OUT/report"
