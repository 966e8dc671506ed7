#!/usr/bin/env bash
# One command for a lent GPU machine, fetching nothing from the network:
#   scripts/gpu_check.sh [--dry-run] [--budget SECONDS]
# Steps, cheapest and most telling first, each under `timeout`, output teed to $OUT as it goes:
#   env        versions and imports (torch, CUDA, triton, transformers, protobuf, the stubs); wheels
#              carried in .whl/ (scripts/gpu_wheels.sh) are installed from disk if an import fails
#   model      the llama-1b bench model, built in the background while the kernel steps run
#   kernels    the Triton kernel tests and the CUDA-only tests (pytest -m "triton or cuda")
#   kbench     kernel microbenchmarks (pagedserve.bench.kernels, after its compile warm-up)
#   throughput offline throughput vs transformers (one dtype, one batch size; no CPU roofline)
#   tp2, tp2bench  with 2+ GPUs (nvidia-smi -L): the two-GPU tensor/pipeline-parallel test and
#              `bench tensor-parallel --device cuda`; with one GPU only a line saying so
#   sweep      decode and prefill tile settings per head size, in what is left of the budget
# Results: $OUT (default results/gpu): NAME.log per step, summary.txt, *.json, kernel_tests.xml.
# The budget (default 540 s) caps the whole run; partial results stay. Exit 1 if any step failed,
# 2 when there is no CUDA device or an argument is wrong.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-results/gpu}
BUDGET=540
DRY=0
while (($#)); do
  case $1 in
    --dry-run) DRY=1 ;;
    --budget) BUDGET=${2:?--budget needs seconds}; shift ;;
    -h | --help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[[ $BUDGET =~ ^[0-9]+$ ]] || { echo "gpu_check.sh: --budget must be whole seconds" >&2; exit 2; }
START=$SECONDS
STATUS=0
mkdir -p "$OUT"
: > "$OUT/summary.txt"
# shellcheck source=scripts/gpu_steps.sh
source scripts/gpu_steps.sh
unset TRITON_INTERPRET
MODEL_DIR=${MODEL_DIR:-/tmp/pagedserve-llama-1b}

if ((!DRY)) && ! $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "no CUDA device visible to $PY: this script is for a GPU machine (--dry-run shows the plan)" >&2
  exit 2
fi
step env 90 bash scripts/gpu_env.sh "$PY"

echo "== model (background, timeout 300s) -> $OUT/model.log"
echo "   $PY -m pagedserve.cli make-model $MODEL_DIR --preset llama-1b"
if ((!DRY)) && [ ! -f "$MODEL_DIR/config.json" ]; then
  timeout 300 "$PY" -m pagedserve.cli make-model "$MODEL_DIR" --preset llama-1b > "$OUT/model.log" 2>&1 &
  model_pid=$!
fi

# The two-GPU tests have a step of their own (tp2, below).
step kernels 150 "$PY" -m pytest tests/kernels tests/executor -m "triton or cuda" -k "not two_gpus" -q \
  -p no:cacheprovider --junitxml="$OUT/kernel_tests.xml"
# Its warm-up compiles every attention variant (about 14) before anything is timed.
step kbench 150 "$PY" -m pagedserve.bench.kernels --out "$OUT/bench_kernels.json"

if [ -n "${model_pid:-}" ]; then
  wait "$model_pid" || { echo "model build failed: see $OUT/model.log"; STATUS=1; }
fi
# The engine as a GPU runs it: 4096-token steps, an explicit 16 GiB KV budget (the executor empties
# torch's cache before measuring free memory), transformers at its usual best batch size only.
step throughput 180 "$PY" -m pagedserve.bench.throughput --model "$MODEL_DIR" --dtype bfloat16 \
  --device cuda --num-requests 200 --max-num-batched-tokens 4096 --max-num-seqs 256 \
  --kv-cache-memory-bytes $((16 << 30)) --hf-dtypes bfloat16 --hf-batch-sizes 64 \
  --skip-roofline --out "$OUT/throughput.json"

# Several ranks on CUDA (executor/rank_devices.py) need a second GPU; the lent machines mostly have one.
GPUS=$(nvidia-smi -L 2>/dev/null | wc -l)
if ((DRY || GPUS >= 2)); then
  ((GPUS >= 2)) || echo "   (the next two steps run only when nvidia-smi -L lists 2+ GPUs)"
  step tp2 120 "$PY" -m pytest tests/executor/test_rank_devices.py -k two_gpus -q \
    -p no:cacheprovider -rs
  step tp2bench 150 "$PY" -m pagedserve.bench.tensor_parallel --device cuda --dtype bfloat16 \
    --sizes 1,2,1x2 --num-requests 16 --out "$OUT/tensor_parallel.json"
else
  echo "== tp2, tp2bench skipped: $GPUS GPU(s) here, tensor parallelism on CUDA needs a second GPU" |
    tee -a "$OUT/summary.txt"
fi

# The tile sweep takes whatever budget is left: it writes its JSON after each head size.
step sweep 240 "$PY" -m pagedserve.bench.kernels --sweep --sweep-budget-s 180 \
  --out "$OUT/bench_sweep.json"

echo "== done in $((SECONDS - START))s (budget ${BUDGET}s); summary: $OUT/summary.txt"
exit $STATUS
