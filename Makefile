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

# Mutation testing with mutmut 3 (scripts/mutation.sh says why it runs in a staging copy): each
# module in turn, with its own fast test selection (unit tests, no servers: mutmut runs them for
# every mutant), each bounded by MUTATION_LIMIT seconds; not part of CI's default run. Scores and
# the equivalent mutants: docs/testing.md. `make mutation-scheduler` runs one module;
# MUTANTS='glob ...' narrows a run to some functions, e.g. MUTANTS='*x_apply_min_p__mutmut_*'.
MUTATION_LIMIT ?= 300
MUTMUT := $(BIN)/python -c "import mutmut" 2>/dev/null || $(PIP) --no-build-isolation -e '.[dev,mutation]'
# The scheduler's core: planning a step, the block pool and the KV cache's pages, prefix caching,
# requests, admission checks and stop conditions.
MUTATION_SCHEDULER := scheduler/scheduler.py,scheduler/block_pool.py,scheduler/kv_cache_manager.py,$\
	scheduler/prefix_cache.py,scheduler/block_hash.py,scheduler/request.py,scheduler/validation.py,$\
	scheduler/stop.py,scheduler/admission.py
.PHONY: mutation-sampler mutation-scheduler mutation-router mutation-detokenizer
mutation: mutation-sampler mutation-scheduler mutation-router mutation-detokenizer

# The sampler and the sampling-parameter checks the scheduler and the executor share.
mutation-sampler: $(STAMP)
	$(MUTMUT)
	bash scripts/mutation.sh executor/sampler.py,protos/request_checks.py $(MUTATION_LIMIT) \
		tests/executor/test_sampler.py tests/executor/test_sampling_rules.py

mutation-scheduler: $(STAMP)
	$(MUTMUT)
	bash scripts/mutation.sh $(MUTATION_SCHEDULER) $(MUTATION_LIMIT) tests/scheduler

# The router's request validation: the OpenAI bodies' checks and their mapping to parameters.
# These tests talk to a router in a thread over HTTP and to a fake scheduler over gRPC, which does
# not survive a fork: forkserver isolation. A chat template that the test renders in a process of
# its own is left out (its 1 s deadline is too short for an import of the mutated package).
mutation-router: $(STAMP)
	$(MUTMUT)
	MUTATION_ISOLATION=forkserver bash scripts/mutation.sh router/openai_protocol.py \
		$(MUTATION_LIMIT) tests/router/test_request_checks_unit.py tests/router/test_bad_inputs.py \
		tests/router/test_api_params.py \
		--deselect=tests/router/test_api_params.py::test_trusted_chat_template

mutation-detokenizer: $(STAMP)
	$(MUTMUT)
	bash scripts/mutation.sh router/detokenizer.py $(MUTATION_LIMIT) tests/router/test_detokenizer.py
