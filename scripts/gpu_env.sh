#!/usr/bin/env bash
# The GPU check's first step: what the machine has, and whether our modules import there.
# Wheels carried in .whl/ (scripts/gpu_wheels.sh) are installed from disk when an import fails;
# nothing is fetched from the network.
set -uo pipefail
PY=${1:-python3}
imports='import torch, triton, transformers, google.protobuf, grpc, structlog, pytest
import pagedserve.protos.executor_pb2, pagedserve.executor.executor, pagedserve.llm'
if ! $PY -c "$imports" && [ -d .whl ]; then
  echo "an import failed: installing the carried wheels from .whl/"
  $PY -m pip install -q --no-deps --no-index .whl/*.whl
fi
$PY - <<'PY'
import importlib
import platform

import torch

print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.0f} GiB", "sm", f"{p.major}{p.minor}")
for name in ("triton", "transformers", "google.protobuf", "grpc", "structlog", "pytest"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except ImportError as e:
        print(name, "MISSING:", e)
PY
$PY -c "$imports"
