#!/usr/bin/env bash
# One GPU session's verification and measurement: build once (tools/gpu_run.sh; cold about 2-4
# minutes with 16 cores, seconds on a machine still warm from the last call), then the parts asked
# for, in order, each bounded by its own timeout and all by one deadline, BUDGET seconds (default
# 560) after the start, under a device call's 600 s: a step gets what is left of it, and a step
# with under 20 s left is skipped, saying so. Three device calls cover all:
#
#   tools/gpu_session.sh tests sanitize      # call 1
#   tools/gpu_session.sh estimate paged      # call 2
#   tools/gpu_session.sh attention           # call 3
#
#   tests       the whole GPU suite (pytest -m gpu tests)
#   sanitize    tools/sanitize.sh (memcheck, synccheck, racecheck on the small grid)
#   estimate    stages 1-3 at 128k beside cuDNN, G = 16 and 1, stage 1 on both kernels (Hopper wgmma,
#               portable mma.sync) in one run, and the kernels of one estimate with their times
#   paged       bench_paged.py: paged K/V against contiguous, pages of 16 and 128
#   attention   bench_bsa.py --interleave at 128k, D = 128 and 64, densities 1.0 / 0.3 / 0.1, beside
#               every anchor that imports (flash-attn-4 ones only where it is installed)
#
# Run `bash ../shared/tools/gpu-prep.sh` here first and carry [".whl"]. Summaries go to stdout; the
# logs and records are packed into $OUT/session.tgz after every part (a call brings back at most 8
# files, and a call cut short by its time limit still brings back what was packed).
set -u -o pipefail
[ $# -ge 1 ] || { echo "usage: tools/gpu_session.sh PART... (tests sanitize estimate paged attention)"; exit 2; }
OUT=${OUT:-$PWD/out}
work=$OUT/session
mkdir -p "$work"
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here" || exit 1
export PYTHONUNBUFFERED=1
status=0
pack() { tar czf "$OUT/session.tgz.part" -C "$OUT" session && mv "$OUT/session.tgz.part" "$OUT/session.tgz"; }
deadline=$(( $(date +%s) + ${BUDGET:-560} ))
step() {  # seconds, name, command...
  local limit=$1 name=$2; shift 2
  local t0; t0=$(date +%s)
  local left=$(( deadline - t0 ))
  if [ "$left" -lt 20 ]; then
    echo "== $name: skipped, $left s left of the call's budget"; status=1; return
  fi
  [ "$limit" -le "$left" ] || limit=$left
  timeout "$limit" "$@" > "$work/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc $rc in $(( $(date +%s) - t0 )) s (limit $limit s)"
  tail -n "${TAIL:-15}" "$work/$name.log"
  [ "$rc" -eq 0 ] || status=1
  pack
}

nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv > "$work/gpu.csv" 2>&1
t0=$(date +%s)
OUT=$work timeout $(( deadline - t0 )) bash tools/gpu_run.sh build || { echo "== build failed or ran out of time"; pack; exit 1; }
echo "== build: $(( $(date +%s) - t0 )) s"
SITE=/tmp/proxyattn_site
export PYTHONPATH=$here:$SITE CUTLASS_PATH=$SITE/cutlass_library/source/include

for part in "$@"; do
  case "$part" in
    tests) step 200 tests python3 -m pytest -q -rs -m gpu tests ;;
    sanitize) TAIL=6 step 300 sanitize bash tools/sanitize.sh "$work/sanitize" ;;
    estimate)
      TAIL=25 step 180 estimate python3 bench/bench_estimate.py --seq-len 131072 --groups 16 1 \
        --scores-backends auto portable --kernels --out "$work/estimate.json" ;;
    paged) TAIL=25 step 150 paged python3 bench/bench_paged.py --out "$work/paged.json" ;;
    attention)
      for d in 128 64; do
        TAIL=30 step 240 "bsa-d$d" python3 bench/bench_bsa.py --interleave --seqlens 131072 --densities 1.0 0.3 0.1 \
          --head-dim "$d" --out "$work/bsa-d$d.json"
      done ;;
    *) echo "unknown part '$part' (tests sanitize estimate paged attention)"; status=2 ;;
  esac
done
pack
echo "logs and records: $OUT/session.tgz"
exit $status
