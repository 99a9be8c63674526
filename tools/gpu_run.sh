#!/usr/bin/env bash
# On a GPU machine without network: install the carried CUTLASS wheel, build the extension
# (incremental across calls on the same machine), then run what is asked:
#   tools/gpu_run.sh build            build only
#   tools/gpu_run.sh test [pytest args]   GPU tests (default: -m gpu tests)
#   tools/gpu_run.sh bench SCRIPT [args]  a benchmark script under bench/
# Logs go to $OUT (or ./out) so they come back from the device machine. PROXYATTN_BUILD_TEMP: the
# object folder (default /tmp/proxyattn_build_temp; tools/gpu_ab.sh builds every variant in place over it,
# so a patched variant recompiles only what its patch touches).
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
SITE=/tmp/proxyattn_site
if [ ! -d "$SITE/cutlass_library" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl || exit 1
fi
export PYTHONPATH=$PWD:$SITE CUTLASS_PATH=$SITE/cutlass_library/source/include
# The device image's default compiler (/opt/gcc) links libstdc++ statically into the extension;
# that private copy crashes on the first TORCH_CHECK message (ostream in an uninitialised
# locale). Build with the system compiler, which links the shared libstdc++ torch uses.
export CC=/usr/bin/gcc CXX=/usr/bin/g++
export MAX_JOBS=${MAX_JOBS:-16} NVCC_THREADS=${NVCC_THREADS:-2} PROXYATTN_ARCHS=${PROXYATTN_ARCHS:-90a}
what=${1:-test}; shift || true
t0=$(date +%s)
python3 setup.py build_ext --inplace --build-temp "${PROXYATTN_BUILD_TEMP:-/tmp/proxyattn_build_temp}" > "$OUT/build.log" 2>&1 ||
  { tail -60 "$OUT/build.log"; exit 1; }
echo "build ok in $(( $(date +%s) - t0 )) s"; grep -E "[1-9][0-9]* bytes spill" "$OUT/build.log" | sort | uniq -c | head -20
case "$what" in
  build) ;;
  test) python3 -m pytest -q -rs ${@:--m gpu tests} 2>&1 | tee "$OUT/tests.log" | tail -40 ;;
  bench) script=$1; shift; python3 "bench/$script" "$@" 2>&1 | tee "$OUT/$(basename "$script" .py).log" | tail -40 ;;
esac
