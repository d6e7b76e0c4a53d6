# Sourced by the session scripts here (bench/README.md, "Session scripts"): the deadline, the work folder $W and
# `step NAME LIMIT CMD...`, which runs CMD under min(LIMIT, the seconds left before the deadline), logs it to
# $W/NAME.log and prints its exit code, duration and the log's last ${TAIL:-25} lines. Set BUDGET_S before sourcing.
set -u
DEADLINE=$((SECONDS + BUDGET_S))
W="$OUT/s"
step() { local name=$1 limit=$2; shift 2; local t0=$SECONDS left=$((DEADLINE - SECONDS))
  ((left < 30)) && { echo "=== $name skipped: ${left}s left"; return; }
  ((left < limit)) && limit=$left
  echo "=== $name (limit ${limit}s)"; timeout "$limit" "$@" >"$W/$name.log" 2>&1; local rc=$?
  echo "=== $name rc=$rc in $((SECONDS - t0))s"; tail -n "${TAIL:-25}" "$W/$name.log"; }
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader
pip install -e . --no-deps --no-build-isolation -q >/dev/null 2>&1 || echo "pip install failed"
