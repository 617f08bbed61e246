#!/usr/bin/env bash
# Run HERE (a machine with package registries), before a GPU session: puts into the checkout,
# git-ignored, what scripts/gpu_tier.sh needs on the GPU machine, which reaches no network and
# has PyTorch, Lightning, tokenizers and sacrebleu but not SQLAlchemy:
#   .whl/       SQLAlchemy's wheel for the GPU machine's Python (3.12, x86-64)
#   .gpu-data/  the Tiny Shakespeare corpus from $MOE_BENCH_DATA (default ../shared/data), and COMMIT:
#               the commit the copied tree is (records name it; the copy there has no .git)
# Then, with the device tool: run `bash scripts/gpu_tier.sh` with carry [".whl", ".gpu-data"].
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${MOE_BENCH_DATA:-../shared/data}
PY=${PYTHON:-.venv/bin/python}
for d in /.whl/ /.gpu-data/; do
    grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude
done
SQLA=$("$PY" -c "import sqlalchemy; print(sqlalchemy.__version__)")
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "sqlalchemy==$SQLA"
rm -rf .gpu-data && mkdir -p .gpu-data
cp -r "$DATA/tinyshakespeare" .gpu-data/
"$PY" -c "from bench.tracking.records import git_commit; print(git_commit() or '')" > .gpu-data/COMMIT
echo "commit: $(cat .gpu-data/COMMIT) (run this again after committing, so the records name a commit)"
du -sh .whl .gpu-data
echo "gpu_tier_prepare: ready; carry .whl and .gpu-data"
