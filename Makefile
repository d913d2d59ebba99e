# Grantwire — every command installs what it needs (pinned) before it runs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
UV_VERSION := 0.13.9

.PHONY: install lock infra-up infra-down demo up down docs docs-check test bench validate-deploy test-unit lint fmt clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q uv==$(UV_VERSION)
	$(BIN)/uv pip install -q --python $(BIN)/python --require-hashes -r requirements.lock
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps -e .
	touch $@

# Regenerate the lock after changing pyproject.toml dependencies.
lock:
	$(BIN)/uv pip compile pyproject.toml --extra dev --generate-hashes --python-version 3.11 \
		--python-platform x86_64-unknown-linux-gnu -o requirements.lock

infra-up: install
	$(BIN)/python deploy/local/infra.py up

infra-down:
	$(BIN)/python deploy/local/infra.py down

# Validate what cannot run here (no Docker engine): manifests, Dockerfile, compose, broker permissions.
validate-deploy:
	bash deploy/validate.sh
	bash deploy/observability/validate.sh

# The main job: the whole referral story on three real service processes.
demo: install infra-up
	$(BIN)/grantwire demo

# Keep the system running for exploration (URLs printed); `make down` stops it.
up: install infra-up
	$(BIN)/grantwire up

down:
	$(BIN)/grantwire down

# AsyncAPI document and event examples, generated from the code.
docs: install
	$(BIN)/grantwire docs

docs-check: install
	$(BIN)/grantwire docs --check

test: install infra-up
	$(BIN)/pytest -q

# Throughput and latency on the local infrastructure, against a raw-broker baseline
# measured in the same run; writes bench/results/.
bench: install infra-up
	$(BIN)/python -m bench

test-unit: install
	$(BIN)/pytest -q tests/unit

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy shared $(wildcard services/*/domain.py)
	$(BIN)/lint-imports

fmt: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# Reliability scenarios (tests/reliability, README "Reliability"): crashes, broker and
# database outages, duplicate and out-of-order storms, hostile input, on real processes;
# each prints one summary line (repeated at the end). CI runs it; under 15 minutes.
.PHONY: chaos
chaos: install infra-up
	GRANTWIRE_CHAOS=1 $(BIN)/pytest -q tests/reliability
