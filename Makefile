# Local set-up and checks. On a cluster the recipe runs inside an NGC PyTorch/NeMo container
# and is installed with `pip install -e .` there (which keeps the container's torch and TE).

PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch for local work and CI; override for a CUDA machine outside a container.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.nemo-infifpo-installed

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test test-fast demo demo-seeds demo-sweep clean

setup: $(STAMP)

# Re-runs only when pyproject.toml changes; pip itself is idempotent.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test,eval]"
	touch $@

# The full suite, slow end-to-end and multi-process tests included (what CI runs).
test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Everything but the slow end-to-end / multi-process tests.
test-fast: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

DEMO_ARGS ?=
# The paper's recipe on tiny CPU models (about 5 min on 2 cores) -> demo-output/report.md
demo: setup
	$(BIN)/python recipes/demo.py $(DEMO_ARGS)

# The demo over seeds 0, 1, 2 (about 3 x 5 min) -> demo-output-seeds/seeds.md (quoted in the README)
demo-seeds: setup
	$(BIN)/python recipes/demo_seeds.py --seeds 0 1 2 -- $(DEMO_ARGS)

# How the demo's settings were chosen, on validation prompts -> demo-output-sweep/sweep.md (docs/DEMO_SWEEP.md)
demo-sweep: setup
	$(BIN)/python recipes/demo_sweep.py -- $(DEMO_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis demo-output demo-output-ci demo-output-seeds demo-output-sweep
