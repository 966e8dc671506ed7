#!/usr/bin/env bash
# `make lock`: refresh requirements.lock to the newest releases pyproject.toml allows, then run the
# suite on exactly that set. Rebuilds .venv from nothing, so what passes is what the lock says.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PY:-python3}"
rm -rf .venv
"$py" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip setuptools
# torch is pinned in the Makefile, not in the lock: its CPU build (2.13.0+cpu) lies on local disk,
# and a machine without it takes the registry's 2.13.0.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q --no-build-isolation -e '.[dev,mutation]'
{
  echo "# The tested set of every dependency: \`make\` installs with \`pip install -c requirements.lock\`."
  echo "# Refreshed by \`make lock\` (scripts/lock.sh), which runs the suite on it. torch is pinned in the Makefile."
  .venv/bin/python -m pip freeze --all --exclude-editable | grep -viE '^(torch|nvidia-[a-z0-9-]+)=='
} > requirements.lock
touch .venv/.installed
make test
