# Everything runs through the project's venv; `make test` is what CI (.ci/run) runs.
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
# Subprocesses (dvc running `polyinr`, tests starting servers) find the venv's commands.
export PATH := $(BIN):$(PATH)
# No internet for Prefect's analytics; a cold CI machine starts servers slowly.
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120

.PHONY: setup demo test test-fast lint format clean stack-up stack-down stack-status docs-images \
	ui-check

setup:
	VENV=$(VENV) bash scripts/install.sh

# Writes this machine's results into dvc.lock and metrics/ (expected: docs/orchestration.md).
demo: setup
	$(BIN)/dvc repro
	@git status --short -- dvc.lock metrics 2>/dev/null | sed 's/^/make demo: results in /' || true

test: setup lint
	$(BIN)/pytest -q

test-fast: setup
	$(BIN)/pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The MLflow and Prefect UIs as users see them: two tiny runs on an MLflow server and a deployment
# run on a Prefect server with a worker, all on 127.0.0.1, pages rendered by headless Chromium
# and checked (scripts/ui_check.py, docs/evaluation.md, docs/prefect.md); screenshots to docs/.
ui-check: setup
	$(BIN)/python scripts/ui_check.py --shots docs

# The local stack (S3, MLflow, Prefect server + a worker for the `local` pool): scripts/stack.sh.
stack-up: setup
	VENV=$(VENV) bash scripts/stack.sh up

stack-down:
	VENV=$(VENV) bash scripts/stack.sh down

stack-status:
	VENV=$(VENV) bash scripts/stack.sh status

# The README's pictures (docs/*.png) from a trained generator: `make docs-images` after
# `make demo`, or DOCS_GENERATOR=path/to/generator.pt. Seeds are picked for the demo model.
DOCS_GENERATOR ?= run/generator.pt
docs-images: setup
	$(BIN)/polyinr mix --generator $(DOCS_GENERATOR) --levels shape --device cpu --quiet \
	  --source-classes 0 0 1 2 --source-seeds 9,12,15,6 \
	  --target-classes 0 1 0 1 --target-seeds 15,5,2,9 --out docs/mix.png
	$(BIN)/polyinr interpolate --generator $(DOCS_GENERATOR) --device cpu --quiet \
	  --classes 0 1 2 0 --seeds 9,15,6,12 --steps 6 --strip-frames 10 --out docs/interpolate.png
	$(BIN)/polyinr generate --generator $(DOCS_GENERATOR) --device cpu --quiet \
	  --classes 0 1 --seeds 15 --resolution 32 256 --view 0.25 0.25 0.75 0.75 \
	  --out docs/superres.png
	$(BIN)/polyinr generate --generator $(DOCS_GENERATOR) --device cpu --quiet \
	  --classes 0 1 --seeds 15 --resolution 128 --view -0.5 -0.5 1.5 1.5 \
	  --out docs/extrapolate.png

# Caches and pipeline outputs (DVC restores or rebuilds them); keeps .venv and MLflow runs.
clean:
	rm -rf .pytest_cache .ruff_cache *.egg-info data/demo data/ffcv models samples checkpoints
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
