#!/usr/bin/env bash
# Runs the whole suite. pytest's exit code 5 (no tests collected) is a failure here, not a pass.
set -uo pipefail
cd "$(dirname "$0")/.."
extra=()
if [ -n "${CI:-}" ]; then
  bash scripts/install_chromium.sh  # the browser tests fail, not skip, in CI without it
  extra=(--durations=25)  # the slowest tests in CI's log: the run has a 20-minute budget
fi
.venv/bin/python -m pytest ${extra[@]+"${extra[@]}"} "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
