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

# Until training lands (issue 3), the demo compares the families' cost and the MoE layer speed.
demo: $(PY)
	for f in dense switch moe lstm moe-rnn; do $(VENV)/bin/moe-bench flops --task tinyshakespeare-char --model $$f; echo; done
	$(VENV)/bin/moe-bench perf --tokens 2048 --experts 8 32

test: $(PY)
	$(PY) -m pytest -q

perf: $(PY)
	$(VENV)/bin/moe-bench perf

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
