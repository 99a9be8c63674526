#!/usr/bin/env bash
# A same-run comparison of this tree (A) and this tree with a patch applied (B), on a GPU machine
# without git: builds A in place (tools/gpu_run.sh build) and B in a copy, then runs one benchmark
# script under each, A and B alternating for ROUNDS rounds (default 2), so that clock drift hits
# both. The patch is what a branch changes, made on the development machine and carried as an
# untracked file of the working tree:
#
#   git diff main..est16 > ab.patch          # here, untracked (not committed)
#   tools/gpu_ab.sh ab.patch bench_estimate.py --seq-len 131072 --groups 16 1     # there
#
# Records: $OUT/{a,b}<round>-<script>.json (the script's --out), logs beside them; the build logs
# in $OUT/{a,b}-build.log. Extra tests for B: GPU_AB_TESTS="tests/test_estimate_gpu.py ..." runs
# them under B before the benchmark (log $OUT/b-tests.log).
set -o pipefail
patch_file=${1:?usage: tools/gpu_ab.sh PATCH SCRIPT [args]}
script=${2:?usage: tools/gpu_ab.sh PATCH SCRIPT [args]}
shift 2
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
here=$(cd "$(dirname "$0")/.." && pwd)
patch_file=$(cd "$(dirname "$patch_file")" && pwd)/$(basename "$patch_file")
b_tree=/tmp/proxyattn_b

OUT=$OUT/a-build bash "$here/tools/gpu_run.sh" build || exit 1
mv "$OUT/a-build/build.log" "$OUT/a-build.log" && rmdir "$OUT/a-build"
rm -rf "$b_tree" && mkdir -p "$b_tree"
(cd "$here" && tar --exclude=./build --exclude='./proxyattn/_C*.so' -cf - .) | (cd "$b_tree" && tar -xf -)
(cd "$b_tree" && patch -p1 --forward --quiet < "$patch_file") || { echo "the patch does not apply"; exit 1; }
(cd "$b_tree" && OUT=$OUT/b-build PROXYATTN_BUILD_TEMP=/tmp/proxyattn_build_temp_b bash tools/gpu_run.sh build) || exit 1
mv "$OUT/b-build/build.log" "$OUT/b-build.log" && rmdir "$OUT/b-build"

SITE=/tmp/proxyattn_site
export CUTLASS_PATH=$SITE/cutlass_library/source/include PYTHONUNBUFFERED=1
if [ -n "${GPU_AB_TESTS:-}" ]; then
  # shellcheck disable=SC2086
  (cd "$b_tree" && PYTHONPATH=$b_tree:$SITE python3 -m pytest -q -rs $GPU_AB_TESTS 2>&1 | tee "$OUT/b-tests.log" | tail -15)
fi
name=$(basename "$script" .py)
for round in $(seq 1 "${ROUNDS:-2}"); do
  for side in a b; do
    tree=$here; [ "$side" = b ] && tree=$b_tree
    echo "== $side, round $round"
    (cd "$tree" && PYTHONPATH=$tree:$SITE python3 "bench/$script" "$@" --out "$OUT/$side$round-$name.json" 2>&1 |
       tee "$OUT/$side$round-$name.log" | tail -25)
  done
done
