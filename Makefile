# moe-bench: `make demo` (the main job) and `make test` each install what they need first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch: the CPU build from PyTorch's CPU wheel index when it is reachable and there is no NVIDIA
# GPU, else $(TORCH_SPEC) from the default index (which is where a CUDA build comes from).
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: install demo test perf clean clean-runs

# pip's own output goes to $(LOG) (shown when a step fails), so the demo's output stays readable.
LOG := $(VENV)/install.log
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV) (pip's log: $(LOG))"
	@$(PY) -m pip install --quiet --upgrade pip > $(LOG) 2>&1 || { tail -30 $(LOG); exit 1; }
	@if [ -n "$(TORCH_INDEX)" ] && ! command -v nvidia-smi >/dev/null 2>&1 && \
	    timeout 15 $(PY) -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=10)" \
	        "$(TORCH_INDEX)" >/dev/null 2>&1; then \
	    echo "installing $(TORCH_SPEC) (CPU build) from $(TORCH_INDEX)"; \
	    $(PY) -m pip install --quiet "$(TORCH_SPEC)" --index-url "$(TORCH_INDEX)" >> $(LOG) 2>&1 || { tail -30 $(LOG); exit 1; }; \
	else \
	    echo "installing $(TORCH_SPEC) from the default index ($(TORCH_INDEX) not used: GPU present or not reachable)"; \
	    $(PY) -m pip install --quiet "$(TORCH_SPEC)" >> $(LOG) 2>&1 || { tail -30 $(LOG); exit 1; }; \
	fi
	@echo "installing moe-bench and its dependencies"
	@$(PY) -m pip install --quiet -e '.[test,peer]' >> $(LOG) 2>&1 || { tail -30 $(LOG); exit 1; }
	@touch $(STAMP)

install: $(STAMP)

# Dense vs Switch on Tiny Shakespeare at one matched training-FLOPs budget, 3 paired seeds each
# (~10 minutes on a 2-core CPU): each arm's parameters and FLOPs per token, its loss over seeds,
# and the claim with its confidence interval. Records go to the default store, results/moe-bench.db.
DEMO_FLAGS ?=  # e.g. DEMO_FLAGS="--seeds 2 --budget-flops 2e11": CI's quick pass through the same path
demo: $(STAMP)
	$(VENV)/bin/moe-bench reproduce switch-vs-dense --tier demo $(DEMO_FLAGS)
	@echo "next: source $(VENV)/bin/activate, then e.g. moe-bench runs, moe-bench report, moe-bench dashboard"

test: $(STAMP)
	$(PY) -m pytest -q

perf: $(STAMP)
	$(VENV)/bin/moe-bench perf

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

clean-runs:  # run folders (checkpoints, CSV, offline W&B) of every run; the results store is kept
	rm -rf runs
