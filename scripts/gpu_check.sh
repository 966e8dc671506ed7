#!/usr/bin/env bash
# One command for a GPU machine, fetching nothing: (a) the kernel tests on CUDA, (b) the kernel
# microbenchmarks (pagedserve.bench.kernels), (c) the offline throughput benchmark on a llama-1b model in
# bf16 when bench/throughput.py exists. Results go to $OUT when set, else results/.
# Budget: under 5 minutes on one H100/H200. Exit status is non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=${OUT:-results}
mkdir -p "$RESULTS"
status=0
unset TRITON_INTERPRET

echo "== (a) kernel tests on CUDA"
if ! $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "no CUDA device visible to $PY: this script is for a GPU machine" >&2
  exit 2
fi
if $PY -c 'import pytest' 2>/dev/null; then
  $PY -m pytest tests/kernels -q -p no:cacheprovider --junitxml="$RESULTS/kernel_tests.xml" \
    || status=1
else
  echo "pytest is not installed for $PY: carry its wheel (pip install --no-index .whl/pytest-*.whl)" >&2
  status=1
fi

echo "== (b) kernel microbenchmarks"
$PY -m pagedserve.bench.kernels --out "$RESULTS/bench_kernels.json" || status=1

echo "== (c) offline throughput"
if [ -f bench/throughput.py ]; then
  MODEL_DIR=${MODEL_DIR:-/tmp/pagedserve-llama-1b}
  if [ ! -f "$MODEL_DIR/config.json" ]; then
    $PY -m pagedserve.cli make-model "$MODEL_DIR" --preset llama-1b || status=1
  fi
  # The stubs in protos/ need a protobuf runtime at least as new as their gencode (see
  # pyproject.toml); carry its wheel in .whl when the machine's is older.
  if ! $PY -c 'import pagedserve.protos.executor_pb2' 2>"$RESULTS/protobuf_check.txt"; then
    echo "protos/ do not import here (protobuf too old?): carry protobuf>=7.35 as a wheel" >&2
    status=1
  else
    $PY -m pagedserve.bench.throughput --model "$MODEL_DIR" --dtype bfloat16 --device cuda \
      --num-requests 200 --hf-dtypes bfloat16 --hf-batch-sizes 32,64 --tune-requests 128 \
      --out "$RESULTS/throughput.json" || status=1
  fi
else
  echo "throughput benchmark not present"
fi
exit $status
