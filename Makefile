# crosskv — one-command setup, assets, tests and figures. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROFILE ?= cpu
# notebooks executed at once by `make figures` (each its own process, cores/JOBS threads); one at a time on a GPU
JOBS ?= $(if $(filter gpu,$(PROFILE)),1,$(shell nproc))

.PHONY: help setup assets test test-fast test-smoke figures smoke lab bench gpu clean
.DEFAULT_GOAL := help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[lmeval]'
	$(PY) -m ipykernel install --sys-prefix --name crosskv --display-name "crosskv (.venv)" >/dev/null
	@touch $(STAMP)

setup: $(STAMP)  ## create .venv and install crosskv (editable); idempotent

assets: setup  ## fetch, verify and convert the embedded model and essay corpus into data/assets
	$(PY) -m crosskv assets

# pytest-xdist: one worker per core, each with one torch thread; the cases of each notebook run (one module
# fixture) go to one worker (tests/conftest.py)
TEST_WORKERS := -n auto

test: setup assets  ## run the test suite (the CI command): all but the smoke-profile notebook run (make test-smoke)
	$(PY) -m pytest -q $(TEST_WORKERS) -m "not smoke_profile" --durations=10

test-smoke: setup assets  ## every notebook executed with the smoke profile on the embedded model, and checked (~4 min)
	$(PY) -m pytest -q $(TEST_WORKERS) -m smoke_profile tests/test_notebooks.py

test-fast: setup  ## unit tests only: no model loaded (tiny random ones at most; enforced in tests/conftest.py), no notebooks
	$(PY) -m pytest -q $(TEST_WORKERS) -m "not slow"

figures: setup assets  ## execute every notebook on the embedded model (PROFILE=cpu) and regenerate figures/
	$(PY) -m crosskv figures --profile $(PROFILE) --jobs $(JOBS)

smoke: setup assets  ## execute every notebook with the smoke profile into build/ (never touches figures/)
	$(PY) -m crosskv figures --profile smoke

bench: setup assets  ## prefill/compress/decode speed, held bytes and peak memory of the methods vs full
	$(PY) -m crosskv bench

gpu: setup assets  ## on a CUDA machine: kernel and -m gpu tests, the 8B-shape bench (eager/static 32K, 40 GB throughput, 112K) into build/gpu
	PYTHON=$(abspath $(PY)) .ci/gpu

lab: setup assets  ## start JupyterLab with the project kernel
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks

clean:  ## remove build products (never results, assets or figures)
	rm -rf build .pytest_cache lib/*.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
