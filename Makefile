# The two commands a newcomer runs: `make serve` and `make test`. Each installs into .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch lies on local disk; pinning it keeps pip from pulling a CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0 || $(BIN)/python -m pip install -q torch
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

.PHONY: install serve test lint protos
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
