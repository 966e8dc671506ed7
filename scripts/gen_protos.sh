#!/usr/bin/env bash
# Regenerates the checked-in stubs from protos/*.proto (run from the repository root).
# OUT_DIR lets a test generate into a scratch folder and compare with what is checked in.
set -euo pipefail
out="${OUT_DIR:-.}"
py="${PYTHON:-.venv/bin/python}"
mkdir -p "$out/protos"
"$py" -m grpc_tools.protoc -I. --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" protos/*.proto
# protoc names the stubs' modules after the folder (`protos`); Python imports them as
# pagedserve.protos (the one namespace), so their imports of each other say so. The .proto files,
# their import paths and the wire package pagedserve.v1 stay as they are.
sed -i -e 's/^from protos import /from pagedserve.protos import /' \
  -e "s/(DESCRIPTOR, 'protos\./(DESCRIPTOR, 'pagedserve.protos./" \
  "$out"/protos/*_pb2.py "$out"/protos/*_pb2_grpc.py "$out"/protos/*_pb2.pyi
