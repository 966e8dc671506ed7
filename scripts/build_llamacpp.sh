#!/usr/bin/env bash
# Build llama.cpp's llama-server and llama-quantize from the llama.cpp tree vendored in
# llama-cpp-python's source distribution (the only place it is fetched from: the package index).
# Idempotent: does nothing when the binaries already exist.
#
#   scripts/build_llamacpp.sh            # builds into ~/.cache/pagedserve/llama.cpp
#   LLAMACPP_DIR=/some/dir JOBS=4 scripts/build_llamacpp.sh
#
# Needs cmake and a C++ compiler (apt-get update && apt-get install -y cmake g++).
# About 15+ minutes on 2 cores.
set -euo pipefail

ROOT="${LLAMACPP_DIR:-$HOME/.cache/pagedserve/llama.cpp}"
JOBS="${JOBS:-2}"
PIP="${PIP:-pip}"
if [ -x "$(dirname "$0")/../.venv/bin/pip" ] && [ "$PIP" = pip ]; then
    PIP="$(dirname "$0")/../.venv/bin/pip"
fi

find_src() {
    find "$ROOT/src" -maxdepth 4 -type d -path '*/vendor/llama.cpp' 2>/dev/null | head -n 1
}

SRC="$(find_src || true)"
if [ -n "$SRC" ] && [ -x "$SRC/build/bin/llama-server" ] && [ -x "$SRC/build/bin/llama-quantize" ]; then
    echo "llama.cpp already built: $SRC/build/bin"
    exit 0
fi

for tool in cmake c++; do
    command -v "$tool" >/dev/null || {
        echo "missing $tool: apt-get update && apt-get install -y cmake g++" >&2
        exit 1
    }
done

mkdir -p "$ROOT/sdist" "$ROOT/src"
if [ -z "$SRC" ]; then
    if ! ls "$ROOT"/sdist/llama_cpp_python-*.tar.gz >/dev/null 2>&1; then
        "$PIP" download --no-binary :all: --no-deps llama-cpp-python -d "$ROOT/sdist"
    fi
    TARBALL="$(ls "$ROOT"/sdist/llama_cpp_python-*.tar.gz | sort | tail -n 1)"
    tar -xzf "$TARBALL" -C "$ROOT/src"
    SRC="$(find_src)"
fi
[ -n "$SRC" ] || { echo "no vendor/llama.cpp in the sdist under $ROOT/src" >&2; exit 1; }

cd "$SRC"
cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release
cmake --build build -j"$JOBS" --target llama-server llama-quantize
ln -sfn "$SRC/build/bin" "$ROOT/bin"
echo "built: $ROOT/bin/llama-server $ROOT/bin/llama-quantize"
