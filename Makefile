# medembed — `make help` lists the targets.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU wheel here; on a GPU box set TORCH_SPEC to the CUDA build you want (e.g. torch==2.13.0 from the CUDA index).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
FRACATLAS ?= ../shared/data/fracatlas
WORK ?= work
export PYTHONUNBUFFERED := 1

.DEFAULT_GOAL := help
.PHONY: help install test demo bench-store bench-extract bench-fit sweep clean

help: ## List the targets with one-line descriptions
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-15s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install medembed with everything it needs (torch first)

test: install ## Run the test suite
	$(BIN)/python -m pytest -q

demo: install ## The main job on FracAtlas: build + check the manifest (then extract -> fit -> evaluate)
	$(BIN)/medembed manifest check data_manifests/fracatlas.csv --root $(FRACATLAS)

bench-store: install ## Store write/read throughput on a MURA-sized store (40,561 x 1152 float16)
	$(BIN)/python benchmarks/bench_store.py

clean: ## Remove the virtual environment and generated work files
	rm -rf $(VENV) $(WORK) .pytest_cache
