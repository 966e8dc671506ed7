# Sourced by scripts/gpu_check.sh (and by tests/test_gpu_check.py, which runs it on the CPU).
# `step NAME LIMIT CMD...` runs CMD under `timeout`, its output teed to $OUT/NAME.log as it goes,
# and appends "NAME rc=N seconds=S" to $OUT/summary.txt, so a run cut short keeps what it had.
# A step gets at most what is left of $BUDGET seconds (counted from $START); with DRY=1 it is only
# printed. A step that fails or times out (rc 124) sets STATUS=1; the script goes on.

: "${OUT:?OUT must be set}" "${BUDGET:=540}" "${START:=$SECONDS}" "${DRY:=0}" "${STATUS:=0}"

step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - (SECONDS - START)))
  ((limit > left)) && limit=$left
  echo "== $name (timeout ${limit}s) -> $OUT/$name.log"
  echo "   $*"
  ((DRY)) && return 0
  if ((left < 5)); then
    echo "$name skipped: the budget of ${BUDGET}s is spent" | tee -a "$OUT/summary.txt"
    STATUS=1
    return 0
  fi
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1
  rc=$?
  echo "$name rc=$rc seconds=$((SECONDS - t0))" | tee -a "$OUT/summary.txt"
  ((rc == 0)) || STATUS=1
  return 0
}
