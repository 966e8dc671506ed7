#!/usr/bin/env bash
# Regenerates the checked-in stubs from protos/*.proto (run from the repository root).
# OUT_DIR lets a test generate into a scratch folder and compare with what is checked in.
set -euo pipefail
out="${OUT_DIR:-.}"
py="${PYTHON:-.venv/bin/python}"
mkdir -p "$out/protos"
"$py" -m grpc_tools.protoc -I. --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" protos/*.proto
