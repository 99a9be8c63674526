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
#   e2e         bench/suite.py at 128k and 256k, D = 128, no varlen rows: proxy_attention and its
#               stages beside cuDNN and the other anchors, the random-density sweep at 128k (#22's
#               ratios between suites; the suite part records them for the docs)
#   suite       bench/suite.py (on an H100 with the FA4 anchors 4k-128k took 2 minutes and 256k-512k
#               7, so split it over two calls: SUITE_ARGS "--seq-lens 4096 ... 131072" with SUITE_TAG
#               suite, then "--seq-lens 262144 524288 --density-at --varlen-totals" with suite-long;
#               tools/results_table.py joins the files of one date and commit)
#   attention   bench_bsa.py --interleave at 128k, D = 64 and 128, densities 1.0 / 0.3 / 0.1, beside
#               every anchor that imports (flash-attn-4 ones only where it is installed); the
#               variables ATT_HEAD_DIMS and ATT_SEQLENS (space-separated) change the first two
#
# Run `bash ../shared/tools/gpu-prep.sh` here first and carry [".whl"]. Summaries go to stdout; the
# logs and records are packed into $OUT/session.tgz after every part (a call brings back at most 8
# files, and a call cut short by its time limit still brings back what was packed).
#
# FlashAttention-4's anchors need its wheels, which take two calls to carry (../shared/GPU.md;
# `bash ../shared/tools/fa4-prep.sh` here fills .fa4a/ and .fa4b/):
#   tools/gpu_session.sh fa4split            # here, once: moves bytes of the split wheel from .fa4a/
#                                            # to .fa4b/ so that .fa4a/ and .whl fit one call
#   tools/gpu_session.sh fa4parts            # call 1, carry [".fa4a", ".whl"]: parks them in /tmp and
#                                            # builds (carry [".fa4a"] alone: no build)
#   tools/gpu_session.sh attention           # call 2 on the still-warm machine, carry [".fa4b", ".whl"]
# Any call that finds the parked parts and .fa4b/ (or an earlier call's unpacked wheels) puts
# flash-attn-4 on the attention part's path; without them the FA4 anchors are skipped.
set -u -o pipefail
[ $# -ge 1 ] || { echo "usage: tools/gpu_session.sh PART... (tests sanitize estimate paged e2e suite attention; fa4split or fa4parts alone)"; exit 2; }
FA4_PARTS=/tmp/fa4parts FA4_SITE=/tmp/fa4site
here=$(cd "$(dirname "$0")/.." && pwd)
if [ "$1" = fa4split ]; then  # a call carries at most 64 MiB: .fa4a/ with .whl and the tree must fit
  cd "$here" && [ -f .fa4a/libs13.part.aa ] && [ -f .fa4b/libs13.part.ab ] ||
    { echo "fa4split: no .fa4a/ and .fa4b/ here (bash ../shared/tools/fa4-prep.sh first)"; exit 1; }
  whole=$(mktemp) && cat .fa4a/libs13.part.aa .fa4b/libs13.part.ab > "$whole" || exit 1
  sum=$(md5sum < "$whole")
  head -c 40000000 "$whole" > .fa4a/libs13.part.aa && tail -c +40000001 "$whole" > .fa4b/libs13.part.ab &&
    [ "$(cat .fa4a/libs13.part.aa .fa4b/libs13.part.ab | md5sum)" = "$sum" ] ||
    { echo "fa4split: the new parts do not make the wheel; it is kept whole in $whole"; exit 1; }
  rm -f "$whole"
  echo "call 1 carries $(( $(du -cb .fa4a .whl | tail -1 | cut -f1) >> 20 )) MiB plus the tree," \
    "call 2 $(( $(du -cb .fa4b .whl | tail -1 | cut -f1) >> 20 )) MiB"
  exit 0
fi
if [ "$1" = fa4parts ]; then
  mkdir -p "$FA4_PARTS" && cp "$here"/.fa4a/* "$FA4_PARTS"/ ||
    { echo "fa4parts: no .fa4a/ here (bash ../shared/tools/fa4-prep.sh, then carry [\".fa4a\"])"; exit 1; }
  ls "$FA4_PARTS"
  if ls "$here"/.whl/*.whl > /dev/null 2>&1; then  # .whl came along: build now, so call 2 only runs
    cd "$here" && OUT=${OUT:-$PWD/out}/session bash tools/gpu_run.sh build; exit
  fi
  exit 0
fi
fa4_path() {  # prints the PYTHONPATH entries of flash-attn-4, unpacking the wheels first if needed
  if [ ! -d "$FA4_SITE/flash_attn" ]; then
    [ -f "$FA4_PARTS/libs13.part.aa" ] && ls .fa4b/libs13.part.ab > /dev/null 2>&1 || return 1
    cat "$FA4_PARTS/libs13.part.aa" .fa4b/libs13.part.ab \
      > "$FA4_PARTS/nvidia_cutlass_dsl_libs_cu13-4.7.0-cp312-cp312-manylinux_2_28_x86_64.whl" || return 1
    rm -f "$FA4_PARTS/libs13.part.aa"
    for w in "$FA4_PARTS"/*.whl .fa4b/*.whl; do
      python3 -c "import zipfile, sys; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$w" "$FA4_SITE" || return 1
    done
  fi
  # The CuTe DSL's own `cutlass` package must come before the nvidia-cutlass wheel's.
  echo "$FA4_SITE/nvidia_cutlass_dsl/dsl_packages:$FA4_SITE"
}
OUT=${OUT:-$PWD/out}
work=$OUT/session
mkdir -p "$work"
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
bench_path=$PYTHONPATH  # the benchmarks' path: flash-attn-4 first where it is here (not for the tests)
if fa4=$(fa4_path); then
  bench_path=$fa4:$PYTHONPATH
  PYTHONPATH=$bench_path python3 -c "import flash_attn.cute" 2>&1 | tail -2 && echo "== flash-attn-4 found ($FA4_SITE)"
else
  echo "== flash-attn-4 not here: its anchors are skipped (tools/gpu_session.sh fa4parts first)"
fi

for part in "$@"; do
  case "$part" in
    tests) step 200 tests python3 -m pytest -q -rs -m gpu tests ;;
    sanitize) TAIL=6 step 300 sanitize bash tools/sanitize.sh "$work/sanitize" ;;
    estimate)
      TAIL=25 step 180 estimate python3 bench/bench_estimate.py --seq-len 131072 --groups 16 1 \
        --scores-backends auto portable --kernels --out "$work/estimate.json" ;;
    paged) TAIL=25 step 150 paged python3 bench/bench_paged.py --out "$work/paged.json" ;;
    e2e)
      TAIL=40 step 400 e2e env PYTHONPATH="$bench_path" python3 bench/suite.py --seq-lens 131072 262144 --head-dims 128 \
        --no-varlen --tag e2e --out "$work/e2e.json" --no-plots ;;
    suite)
      TAIL=40 step 570 suite env PYTHONPATH="$bench_path" python3 bench/suite.py ${SUITE_ARGS:-} --tag "${SUITE_TAG:-suite}" \
        --out "$work/${SUITE_TAG:-suite}.json" ;;
    attention)
      for d in ${ATT_HEAD_DIMS:-64 128}; do
        TAIL=30 step 240 "bsa-d$d" env PYTHONPATH="$bench_path" python3 bench/bench_bsa.py --interleave --seqlens ${ATT_SEQLENS:-131072} \
          --densities 1.0 0.3 0.1 --head-dim "$d" --out "$work/bsa-d$d.json"
      done ;;
    *) echo "unknown part '$part' (tests sanitize estimate paged e2e suite attention)"; status=2 ;;
  esac
done
pack
echo "logs and records: $OUT/session.tgz"
exit $status
