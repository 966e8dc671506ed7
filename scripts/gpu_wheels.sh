#!/usr/bin/env bash
# Run here, before a GPU window: puts in .whl/ the wheels the GPU machine lacks (it has torch,
# triton, transformers, grpcio and an older protobuf; not structlog, nor a protobuf new enough for
# our stubs), at the versions of requirements.lock. Carry .whl to the machine (the device tool's
# `carry`); scripts/gpu_env.sh installs them from disk if an import fails there.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
pins=$(grep -iE '^(protobuf|structlog|pytest|pytest-timeout|pluggy|iniconfig|grpcio-health-checking)==' requirements.lock)
rm -rf .whl && mkdir -p .whl
# shellcheck disable=SC2086
"$py" -m pip download -q --no-deps --only-binary=:all: -d .whl $pins
ls -l .whl
