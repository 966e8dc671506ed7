#!/usr/bin/env bash
# Mutation testing with mutmut 3 (`make mutation`; not part of CI's default run).
#
#   [MUTANTS='glob ...'] bash scripts/mutation.sh MODULE_FILE[,MODULE_FILE...] TIME_LIMIT_S TEST_FILE...
#   e.g. MUTANTS='*x_apply_min_p__mutmut_*' bash scripts/mutation.sh executor/sampler.py 600 \
#            tests/executor/test_sampler.py
#        bash scripts/mutation.sh scheduler/block_pool.py,scheduler/prefix_cache.py 600 tests/scheduler
# Several files (comma-separated, or a glob such as 'scheduler/*.py') are mutated in one run;
# the summary counts each file apart.
# MUTATION_ISOLATION=forkserver forks each mutant's run from a process that has not run the tests
# (mutmut's process_isolation): for tests that start gRPC servers, which do not survive a fork.
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
# Prints mutmut's per-mutant results and, per file and in all, killed / checked (score).
set -euo pipefail

modules=${1:?module file, e.g. executor/sampler.py}
limit=${2:-600}
shift 2 || true
tests=("$@")
[ ${#tests[@]} -gt 0 ] || { echo "name the test files to run" >&2; exit 2; }

root=$(cd "$(dirname "$0")/.." && pwd)
py="$root/.venv/bin/python"
"$py" -c "import mutmut" 2>/dev/null || { echo "mutmut is not installed: pip install -e '.[mutation]'" >&2; exit 2; }
# One staging folder per module list, so runs of different modules can go side by side.
stage=${MUTATION_STAGE:-$root/build/mutation/$(printf '%s' "$modules" | tr -c 'A-Za-z0-9_.-' '_' | cut -c1-80)}

rm -rf "$stage"
mkdir -p "$stage/src/pagedserve"
cp -r "$root/pagedserve/." "$stage/src/pagedserve/"
for part in executor scheduler router kernels protos bench; do
  cp -r "$root/$part" "$stage/src/pagedserve/$part"
done
cp -r "$root/tests" "$stage/tests"
# tests/conftest.py keys its cache of tiny test models by pagedserve/make_model.py under the tests'
# parent: copy it there (a folder without __init__.py, so imports still find src/pagedserve), and
# share the repository's cache instead of building the models again.
mkdir -p "$stage/pagedserve"
cp "$root/pagedserve/make_model.py" "$stage/pagedserve/"
export PAGEDSERVE_TEST_MODELS=${PAGEDSERVE_TEST_MODELS:-$root/.models/test}
find "$stage" -name __pycache__ -prune -exec rm -rf {} +

tests_cfg=$(printf '    %s\n' "${tests[@]}")
IFS=, read -r -a module_list <<< "$modules"
only_cfg=$(printf '    src/pagedserve/%s\n' "${module_list[@]}")
cat > "$stage/setup.cfg" <<EOF
[mutmut]
source_paths = src
also_copy = pagedserve
only_mutate =
$only_cfg
process_isolation = ${MUTATION_ISOLATION:-fork}
pytest_add_cli_args = -p no:cacheprovider -q -x
pytest_add_cli_args_test_selection =
$tests_cfg
EOF

cd "$stage"
# One thread: fewer cores to fight over, and forking a process that has run a parallel region of
# OpenMP is not safe.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
# Processes the tests start (the forkserver that renders chat templates, say) import the mutated
# copy too: through a link made now, since a folder on PYTHONPATH that is missing at start-up is
# cached as empty (mutmut makes mutants/ later), and before the cwd, where mutants/pagedserve holds
# only make_model.py and would import as an empty namespace package.
mkdir -p "$stage/path"
ln -sfn "$stage/mutants/src/pagedserve" "$stage/path/pagedserve"
export PYTHONPATH="$stage/path${PYTHONPATH:+:$PYTHONPATH}"
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
# Lines look like "    pagedserve.scheduler.block_pool.x_f__mutmut_3: killed"; the module is
# the dotted name before the function (a method's mangled name carries no dots). A mutant that
# makes the tests run past mutmut's time limit (an endless loop) counts as killed, as is usual.
per_module = collections.defaultdict(collections.Counter)
for line in open(sys.argv[1]):
    if "__mutmut_" not in line or ":" not in line:
        continue
    name, status = (part.strip() for part in line.rsplit(":", 1))
    per_module[name.rsplit(".", 1)[0]][status] += 1


def line(label, counts):
    checked = sum(n for s, n in counts.items() if s != "not checked")
    killed = counts.get("killed", 0) + counts.get("timeout", 0)
    score = f" ({100 * killed / checked:.1f}%)" if checked else ""
    rest = {s: n for s, n in counts.items() if s not in ("killed", "not checked")}
    return (f"{label}: killed {killed} of {checked} checked{score}; {rest}; "
            f"not checked in the time limit: {counts.get('not checked', 0)}")


total = collections.Counter()
for module, counts in sorted(per_module.items()):
    total.update(counts)
    print(line(module, counts))
print(line("all", total))
EOF
