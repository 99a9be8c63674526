#!/usr/bin/env bash
# Run tools/sanitize.py under compute-sanitizer: memcheck and synccheck on the full grid,
# racecheck on the reduced grid (--small; racecheck is slow). Exits non-zero if any tool
# reports an error or the script fails. Logs: LOGDIR/{memcheck,racecheck,synccheck}.log.
#
#   tools/sanitize.sh LOGDIR            # on a GPU machine, from the repository root
#   SANITIZER=/path/compute-sanitizer tools/sanitize.sh LOGDIR
#   SANITIZE_ALL_KERNELS=1 ...          # also instrument torch's own kernels (slower)
set -u -o pipefail
logdir=${1:?usage: tools/sanitize.sh LOGDIR}
mkdir -p "$logdir"
here=$(cd "$(dirname "$0")" && pwd)
script="$here/sanitize.py"
san=${SANITIZER:-$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")}
[ -x "$san" ] || { echo "compute-sanitizer not found (set SANITIZER)" >&2; exit 2; }
py=${PYTHON:-python3}

# Only our kernels (all live in namespace proxyattn, so the mangled names contain it).
filter=()
if [ -z "${SANITIZE_ALL_KERNELS:-}" ]; then
  if "$san" --help 2>&1 | grep -q -- "--kernel-name"; then
    filter=(--kernel-name kns=proxyattn)
  elif "$san" --help 2>&1 | grep -q -- "--filter"; then
    filter=(--filter kns=proxyattn)
  fi
fi

status=0
run_tool() {  # tool, extra args for sanitize.py
  local tool=$1; shift
  local log="$logdir/$tool.log"
  local t0=$(date +%s)
  "$san" --tool "$tool" --error-exitcode 17 "${filter[@]}" "${@:2}" "$py" "$script" $1 >"$log" 2>&1
  local rc=$?
  # compute-sanitizer prints "ERROR SUMMARY: N errors" (racecheck: also "RACECHECK SUMMARY: N hazards").
  local summary
  summary=$(grep -E "(ERROR|RACECHECK) SUMMARY" "$log" | tr '\n' ' ')
  if [ $rc -ne 0 ] || grep -qE "ERROR SUMMARY: [1-9]|\([1-9][0-9]* errors" "$log" || ! grep -q "sanitize grid ran" "$log"; then
    echo "FAIL $tool (rc $rc, $(( $(date +%s) - t0 )) s): ${summary:-no summary}; see $log"
    tail -30 "$log"
    status=1
  else
    echo "ok   $tool ($(( $(date +%s) - t0 )) s): ${summary:-clean}"
  fi
}

run_tool memcheck ""
run_tool racecheck "--small"
run_tool synccheck ""
exit $status
