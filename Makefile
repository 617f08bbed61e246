# moe-bench: `make install` once, then `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Real datasets: point MOE_BENCH_DATA at a copy (../shared/data in this repository's workspace).
export MOE_BENCH_DATA ?= $(abspath ../shared/data)

.PHONY: install demo test perf clean

$(PY):
	$(PYTHON) -m venv $(VENV)

install: $(PY)
	$(PY) -m pip install --upgrade pip
	# CPU build of torch first: a plain `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[test,peer]'

# Dense vs Switch on Tiny Shakespeare at one matched training-FLOPs budget (~2M tokens each,
# about 5 minutes on a 2-core CPU), then a comparison table.
DEMO_BUDGET ?= 4e13
demo: $(PY)
	$(VENV)/bin/moe-bench flops --task tinyshakespeare-char --model dense
	$(VENV)/bin/moe-bench flops --task tinyshakespeare-char --model switch
	$(VENV)/bin/moe-bench compare --task tinyshakespeare-char --models dense switch --preset tiny \
		--budget-flops $(DEMO_BUDGET) --storage sqlite:///results/demo.db

test: $(PY)
	$(PY) -m pytest -q

perf: $(PY)
	$(VENV)/bin/moe-bench perf

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
