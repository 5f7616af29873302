# alignpipe: `make run` sets up .venv and runs the default pipeline end to end; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PARAMS ?= params.yaml

export PATH := $(abspath $(BIN)):$(PATH)
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup data run quality test test-fast test-images status images clean

# torch first: the CPU wheel (a plain `torch` requirement would pull a CUDA build of several GB).
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[cpu,dev]"
	touch $@

setup: $(BIN)/.installed

# Build data/ when it is missing, and track it with DVC (data.dvc holds its md5: the data version).
data: setup
	@if [ ! -d data ]; then alignpipe data build --params $(PARAMS) --out data; fi
	dvc add -q data

run: data
	@start=$$(date +%s); dvc repro; status=$$?; \
	  echo; echo "== dvc repro finished in $$(( $$(date +%s) - start )) s (exit $$status)"; exit $$status
	@$(BIN)/python -m alignpipe.cli.report
	@echo; echo "Results: artifacts/<stage>/ (metrics.json in each); 'dvc metrics show' prints them all."
	@echo "MLflow:  $(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db  (then open http://127.0.0.1:5000)"

# The quality budget: the whole PEP8 pipeline at configs/quality.yaml's budget plus an MLE baseline;
# outputs in artifacts-quality/, the table in benchmarks/results/quality.md.
quality: setup
	$(BIN)/python benchmarks/quality.py --params configs/quality.yaml --work artifacts-quality

status: setup
	dvc status

# Two pytest-xdist workers (this machine's 2 cores); tests/conftest.py says how the tests are split between them.
PYTEST_WORKERS ?= 2
PYTEST_XDIST = -n $(PYTEST_WORKERS) --dist loadgroup --no-loadscope-reorder

test: setup
	mkdir -p .tmp
	$(BIN)/python -m pytest -q $(PYTEST_XDIST) --durations=15 --basetemp=.tmp/pytest

# The edit-test loop: every test not marked `slow` (end-to-end runs, subprocess launches); `make test` runs all.
test-fast: setup
	mkdir -p .tmp
	$(BIN)/python -m pytest -q $(PYTEST_XDIST) -m "not slow" --basetemp=.tmp/pytest-fast

# The CPU image built with podman and the components run in it (needs root; installs podman when missing).
test-images: setup
	bash docker/test-images.sh

clean:
	rm -rf artifacts checkpoints .tmp

# `make images` / `make push-images`: the KFP images (tags pinned once, in components/image.py).
include docker/images.mk
