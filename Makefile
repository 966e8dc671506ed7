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

.PHONY: install serve test lint protos lock mutation
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

# Mutation testing of the sampler with mutmut 3 (scripts/mutation.sh says why it runs in a staging
# copy), bounded by MUTATION_LIMIT seconds; not part of CI's default run. Scores: docs/testing.md.
# MUTANTS='glob ...' narrows it to some functions, e.g. MUTANTS='*x_apply_min_p__mutmut_*'.
MUTATION_LIMIT ?= 300
mutation: $(STAMP)
	$(BIN)/python -c "import mutmut" 2>/dev/null || $(PIP) --no-build-isolation -e '.[dev,mutation]'
	bash scripts/mutation.sh executor/sampler.py $(MUTATION_LIMIT) \
		tests/executor/test_sampler.py tests/executor/test_sampling_rules.py
