# medembed — `make help` lists the targets.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU wheel here; on a GPU box set TORCH_SPEC to the CUDA build you want (e.g. torch==2.13.0 from the CUDA index).
TORCH_SPEC ?= torch==2.13.0
# The tested versions of every other dependency (torch and medembed excluded); `make update-constraints` refreshes it.
CONSTRAINTS := constraints.txt
FRESH_VENV := $(or $(TMPDIR),/tmp)/medembed-constraints-venv
STAMP := $(VENV)/.installed
FRACATLAS ?= ../shared/data/fracatlas
WORK ?= work
export PYTHONUNBUFFERED := 1

.DEFAULT_GOAL := help
.PHONY: help install update-constraints test demo sweep bench-cli bench-store bench-extract bench-fit bench-transfer bench-ensemble bench-levels clean

help: ## List the targets with one-line descriptions
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-19s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install medembed with everything it needs (torch first, the rest at the tested versions of constraints.txt)

update-constraints: ## Resolve the newest dependencies pyproject.toml allows in a fresh venv and pin them in constraints.txt (then: make test)
	rm -rf $(FRESH_VENV)
	$(PYTHON) -m venv $(FRESH_VENV)
	$(FRESH_VENV)/bin/pip install -q $(TORCH_SPEC)
	$(FRESH_VENV)/bin/pip install -q -e ".[dev]"
	{ echo "# The tested dependency set: pip install -c constraints.txt -e \".[dev]\" (make install does)."; \
	  echo "# Regenerate with make update-constraints; torch (TORCH_SPEC) and medembed itself are not pinned here."; \
	  $(FRESH_VENV)/bin/pip freeze --exclude-editable --exclude torch --exclude medembed; } > $(CONSTRAINTS).tmp
	mv $(CONSTRAINTS).tmp $(CONSTRAINTS)
	rm -rf $(FRESH_VENV)

test: install ## Run the test suite (one worker per core; each test file stays on one worker, so its fixtures are built once)
	$(BIN)/python -m pytest -q -n auto --dist loadfile

STORE := $(WORK)/fracatlas-effl0.h5
HEADS := logreg mlp xgboost

demo: install ## The main job on FracAtlas: manifest -> extract (offline EfficientNet-Lite0) -> fit 3 heads -> results table
	$(BIN)/medembed manifest check data_manifests/fracatlas.csv --root $(FRACATLAS)
	$(BIN)/medembed extract data_manifests/fracatlas.csv --root $(FRACATLAS) --encoder efficientnet-lite0 --out $(STORE)
	$(BIN)/medembed info $(STORE)
	for head in $(HEADS); do $(BIN)/medembed fit $(STORE) --head $$head --threshold f1 --out $(WORK)/runs/frac-$$head || exit 1; done
	$(BIN)/medembed compare $(foreach head,$(HEADS),$(WORK)/runs/frac-$(head)) --out $(WORK)/runs/results.md

sweep: demo ## Benchmark sweep on FracAtlas: encoders x heads x label budgets x seeds, plus CNN/autoencoder baselines
	$(BIN)/medembed sweep data_manifests/fracatlas_sweep.toml

bench-cli: install ## Start-up: median seconds of medembed --help, fit --help, info STORE and encoders list against their targets
	$(BIN)/python tests/benchmarks/bench_cli.py

bench-store: install ## Store: seconds per 50,000 rows over 40 segments (2M x 1152 float16), write/read MB/s, consolidation
	$(BIN)/python tests/benchmarks/bench_store.py --rows 2000000 --dim 1152 --batch 500

bench-extract: install ## Extraction: data-path feed rate per core (old vs new), EfficientNet-Lite0 end to end on CPU; the GPU table on CUDA
	$(BIN)/python tests/benchmarks/bench_extract.py --fracatlas $(FRACATLAS) --limit 1000 --skip-naive

bench-fit: install ## Head fitting (with val search) and bootstrap evaluation on a MURA-sized synthetic store
	$(BIN)/python tests/benchmarks/bench_fit_heads.py --n-jobs 1
	$(BIN)/python tests/benchmarks/bench_evaluate.py

bench-transfer: install ## Site transfer on FracAtlas: corrupted test split as the target (recalibration, conformal coverage, OOD AUROC, drift p); needs work/fracatlas-effl0.h5
	@test -f $(WORK)/fracatlas-effl0.h5 || { echo "$(WORK)/fracatlas-effl0.h5 missing: run make demo first"; exit 1; }
	$(BIN)/python tests/benchmarks/bench_transfer.py extract --fracatlas $(FRACATLAS)
	$(BIN)/python tests/benchmarks/bench_transfer.py measure --fracatlas $(FRACATLAS)

bench-ensemble: install ## Single heads vs ensembles on FracAtlas (3 seeds; EfficientNet-Lite0/1/2 stores; extracts Lite1/2 when missing)
	test -f $(WORK)/ensemble/fracatlas-effl1.h5 || $(BIN)/medembed extract data_manifests/fracatlas.csv --root $(FRACATLAS) --encoder efficientnet-lite1 --out $(WORK)/ensemble/fracatlas-effl1.h5
	test -f $(WORK)/ensemble/fracatlas-effl2.h5 || $(BIN)/medembed extract data_manifests/fracatlas.csv --root $(FRACATLAS) --encoder efficientnet-lite2 --out $(WORK)/ensemble/fracatlas-effl2.h5
	$(BIN)/python tests/benchmarks/bench_ensemble.py --l0 $(STORE) --l1 $(WORK)/ensemble/fracatlas-effl1.h5 --l2 $(WORK)/ensemble/fracatlas-effl2.h5 --out $(WORK)/ensemble/bench

bench-levels: install ## Pooled heads vs token heads on intermediate levels and the adapter, FracAtlas, 3 seeds (extracts the level store when missing)
	test -f $(WORK)/tokens/fracatlas-effl0-levels.h5 || $(BIN)/medembed extract data_manifests/fracatlas.csv --root $(FRACATLAS) --encoder efficientnet-lite0 --levels block15,block14,block10@7x7,final@4x4 --tokens 2x2 --out $(WORK)/tokens/fracatlas-effl0-levels.h5
	$(BIN)/python tests/benchmarks/bench_levels.py --store $(WORK)/tokens/fracatlas-effl0-levels.h5 --out $(WORK)/tokens/bench

clean: ## Remove the virtual environment and generated work files
	rm -rf $(VENV) $(WORK) .pytest_cache
