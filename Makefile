# tilepipe: `make run` builds .venv and runs the whole pipeline; `make test` runs the tests.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED := false
# no usage reports, no ids written under ~ (tilepipe sets these itself; dvc and mlflow run alone here too)
export DVC_NO_ANALYTICS := 1
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export ORT_DISABLE_TELEMETRY := 1
export MPLCONFIGDIR := $(CURDIR)/.cache/matplotlib
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PYTHONHASHSEED := 0
# dvc.yaml calls `tilepipe`, so the venv's bin must be on PATH for `dvc repro`.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: run test lint bench ui serve services clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/dvc repro
	$(BIN)/tilepipe report

test: lint
	$(BIN)/pytest -n 2 --dist loadgroup

# ruff; the layering contracts of pyproject.toml (import-linter); every import a declared dependency
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/deptry .

bench: $(STAMP)
	$(BIN)/python -m benchmarks

ui: $(STAMP)
	$(BIN)/mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}

serve: $(STAMP)  # needs a Prefect server: see docs/orchestration.md
	PREFECT_API_URL=$${PREFECT_API_URL:-http://127.0.0.1:4200/api} $(BIN)/tilepipe serve

# PostgreSQL, S3 (moto), MLflow and Prefect servers on 127.0.0.1 under .services/ (docs/team-setup.md);
# prints the export lines to use them. `tilepipe services down` stops them, `... status` shows them.
services: $(STAMP)
	$(BIN)/tilepipe services up

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .import_linter_cache
