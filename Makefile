# The two commands a newcomer runs: `make serve` and `make test`. Each installs into .venv first,
# the exact set in requirements.lock (`make lock` refreshes it and runs the suite).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip install -q -c requirements.lock

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) --upgrade pip setuptools
	# The CPU build of torch lies on local disk; pinning it keeps pip from pulling a CUDA build.
	$(PIP) torch==2.13.0 || $(PIP) torch
	$(PIP) --no-build-isolation -e '.[dev]'
	touch $(STAMP)

.PHONY: install serve test lint protos lock
install: $(STAMP)

serve: $(STAMP)
	$(BIN)/pagedserve serve $(MODEL)

test: $(STAMP)
	$(BIN)/ruff check .
	bash scripts/run_tests.sh

lint: $(STAMP)
	$(BIN)/ruff check .

protos: $(STAMP)
	bash scripts/gen_protos.sh

lock:
	PY=$(PY) bash scripts/lock.sh
