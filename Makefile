# Everything runs through the project's venv; `make test` is what CI (.ci/run) runs.
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
# Subprocesses (dvc running `polyinr`, tests starting servers) find the venv's commands.
export PATH := $(BIN):$(PATH)
# No internet for Prefect's analytics; a cold CI machine starts servers slowly.
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120

.PHONY: setup demo test test-fast lint format clean stack-up stack-down stack-status

setup:
	VENV=$(VENV) bash scripts/install.sh

demo: setup
	$(BIN)/dvc repro

test: setup lint
	$(BIN)/pytest -q

test-fast: setup
	$(BIN)/pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The local stack (S3, MLflow, Prefect server + a worker for the `local` pool): scripts/stack.sh.
stack-up: setup
	VENV=$(VENV) bash scripts/stack.sh up

stack-down:
	VENV=$(VENV) bash scripts/stack.sh down

stack-status:
	VENV=$(VENV) bash scripts/stack.sh status

# Caches and pipeline outputs (DVC restores or rebuilds them); keeps .venv and MLflow runs.
clean:
	rm -rf .pytest_cache .ruff_cache *.egg-info data/demo data/ffcv models samples checkpoints
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
