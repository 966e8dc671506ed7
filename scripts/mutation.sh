#!/usr/bin/env bash
# Mutation testing with mutmut 3 (`make mutation`; not part of CI's default run).
#
#   [MUTANTS='glob ...'] bash scripts/mutation.sh MODULE_FILE TIME_LIMIT_S TEST_FILE...
#   e.g. MUTANTS='*x_apply_min_p__mutmut_*' bash scripts/mutation.sh executor/sampler.py 600 \
#            tests/executor/test_sampler.py
# MUTANTS (fnmatch globs over names like pagedserve.executor.sampler.x_apply_min_p__mutmut_3)
# picks the functions to mutate; without it every function of the module is mutated.
#
# mutmut 3 names a mutant after its file's path (executor/sampler.py -> executor.sampler) and
# activates it only when the running function's __module__ has that name; here the parts sit at
# the repository root but import as pagedserve.<part>, so run in place it would never switch a
# mutant on. This script therefore runs it in a staging copy laid out as the installed package
# (src/pagedserve/<part>/...), where the path gives the import name; mutmut puts mutants/src first
# on sys.path, so the tests import the mutated copy, and the repository's files are never touched
# (other processes may be running tests from the same tree).
#
# Prints mutmut's per-mutant results and a summary line: killed / total (score).
set -euo pipefail

module=${1:?module file, e.g. executor/sampler.py}
limit=${2:-600}
shift 2 || true
tests=("$@")
[ ${#tests[@]} -gt 0 ] || { echo "name the test files to run" >&2; exit 2; }

root=$(cd "$(dirname "$0")/.." && pwd)
py="$root/.venv/bin/python"
"$py" -c "import mutmut" 2>/dev/null || { echo "mutmut is not installed: pip install -e '.[mutation]'" >&2; exit 2; }
stage=${MUTATION_STAGE:-$root/build/mutation}

rm -rf "$stage"
mkdir -p "$stage/src/pagedserve"
cp -r "$root/pagedserve/." "$stage/src/pagedserve/"
for part in executor scheduler router kernels protos bench; do
  cp -r "$root/$part" "$stage/src/pagedserve/$part"
done
cp -r "$root/tests" "$stage/tests"
find "$stage" -name __pycache__ -prune -exec rm -rf {} +

tests_cfg=$(printf '    %s\n' "${tests[@]}")
cat > "$stage/setup.cfg" <<EOF
[mutmut]
source_paths = src
only_mutate = src/pagedserve/$module
pytest_add_cli_args = -p no:cacheprovider -q -x
pytest_add_cli_args_test_selection =
$tests_cfg
EOF

cd "$stage"
# One thread: fewer cores to fight over, and forking a process that has run a parallel region of
# OpenMP is not safe.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
set +e
# shellcheck disable=SC2086  # MUTANTS is a list of globs, split on purpose (and not expanded here)
set -f
timeout --signal=INT "$limit" "$root/.venv/bin/mutmut" run --max-children 1 ${MUTANTS:-} \
  > mutmut-run.log 2>&1
set +f
rc=$?
set -e
[ $rc -eq 124 ] && echo "mutmut stopped at the ${limit} s limit; results so far:"
"$root/.venv/bin/mutmut" results --all true > results.txt 2>&1 || true
grep -v ": not checked$" results.txt || true
"$py" - "$stage/results.txt" <<'EOF'
import collections, sys
counts = collections.Counter(line.rsplit(":", 1)[1].strip() for line in open(sys.argv[1])
                             if "__mutmut_" in line and ":" in line)
unchecked = counts.pop("not checked", 0)
checked, killed = sum(counts.values()), counts.get("killed", 0)
score = f" ({100 * killed / checked:.1f}%)" if checked else ""
print(f"{dict(counts)}; not checked in the time limit: {unchecked}")
print(f"killed {killed} of {checked} mutants checked{score}")
EOF
