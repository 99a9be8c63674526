#!/usr/bin/env bash
# A same-run comparison of this tree (a) and this tree with each of one or more patches applied
# (b1, b2, ...), on a GPU machine without git. Builds a in place (tools/gpu_run.sh build), keeps a
# copy of the built tree, then for each patch applies it in place, rebuilds (incrementally: only the
# files the patch touches recompile), keeps a copy of that tree and takes the patch back out. Then
# it runs one or more benchmark scripts under every variant, alternating for ROUNDS rounds (default
# 2), so that clock drift hits all of them. A patch is what a branch changes, made on the
# development machine and carried as an untracked file of the working tree:
#
#   git diff main..rowmax4 > rowmax4.patch; git diff main..unroll2 > unroll2.patch   # here
#   tools/gpu_ab.sh rowmax4.patch unroll2.patch -- bench_bsa.py --interleave --seqlens 131072  # there
#   tools/gpu_ab.sh est16.patch bench_estimate.py --seq-len 131072      # one patch: no -- needed
#   tools/gpu_ab.sh x.patch -- bench_estimate.py --kernels -- bench_bsa.py --interleave  # two scripts
#
# Several scripts, each after its own --, share the builds: a round runs each script under every
# variant in turn. Records: <variant>-r<round>-<script>.json (the script's --out; a script named
# twice gets -<index> on its second name), logs beside them, build logs <variant>-build.log, packed
# into $OUT/ab.tgz after every round (a device call brings back at most 8 files); after every round
# tools/ab_summary.py writes the comparison so far to $OUT/ab-summary.md, one table per script, and
# the last one is printed at the end. GPU_AB_TESTS="tests/test_estimate_gpu.py ..." runs those
# tests under every patched variant before the benchmarks (log <variant>-tests.log); a variant
# whose tests fail or time out is left out of the rounds. Everything runs against one deadline,
# BUDGET seconds (default 560) after the start, under a device call's 600 s: builds, tests and runs
# get what is left, and a run with under 30 s left is not started (the rounds so far are packed and
# summarised). GPU_AB_TEST_LIMIT and GPU_AB_RUN_LIMIT (seconds) cap one variant's tests and one
# benchmark run, so that a variant that hangs (a barrier waiting forever) costs that much and not
# the rest of the budget. On exit the object folder and the extension in place are a's again: a
# later build on the same machine (whose freshly copied sources may be older than a variant's
# objects, so that nothing recompiles) starts from this tree's build, not from the last variant's.
set -o pipefail
deadline=$(( $(date +%s) + ${BUDGET:-560} ))
budget_for() {  # name, minimum seconds[, cap]: prints the seconds left for it (at most cap), or says it is skipped and fails
  local t=$(( deadline - $(date +%s) ))
  if [ "$t" -lt "$2" ]; then echo "== $1: not started, $t s left of the budget" >&2; return 1; fi
  if [ -n "${3:-}" ] && [ "$3" -lt "$t" ]; then t=$3; fi
  echo "$t"
}
usage="usage: tools/gpu_ab.sh PATCH [PATCH ...] [--] SCRIPT [args] [-- SCRIPT [args] ...]"
patches=()
while [ $# -gt 0 ]; do
  case "$1" in
    --) shift; break ;;
    *.patch|*.diff) patches+=("$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"); shift ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] && [ ${#patches[@]} -ge 1 ] || { echo "$usage"; exit 2; }
args=("$@")  # the scripts and their arguments; job j is args[start[j]] with its len[j] - 1 arguments
start=() len=() names=()  # names[j]: its records' name (the script's, made unique)
add_job() {  # the job of args[$1 .. $2)
  [ "$2" -gt "$1" ] || { echo "$usage (an empty script after --)"; exit 2; }
  local n; n=$(basename "${args[$1]}" .py)
  case " ${names[*]} " in *" $n "*) n=$n-${#names[@]} ;; esac
  start+=("$1") len+=($(($2 - $1))) names+=("$n")
}
from=0
for i in "${!args[@]}"; do
  if [ "${args[i]}" = -- ]; then add_job "$from" "$i"; from=$((i + 1)); fi
done
add_job "$from" "${#args[@]}"
jobs=${#names[@]}
top=${OUT:-$PWD/out}
OUT=$top/ab; mkdir -p "$OUT"
pack() { tar czf "$top/ab.tgz.part" -C "$top" ab && mv "$top/ab.tgz.part" "$top/ab.tgz"; }
here=$(cd "$(dirname "$0")/.." && pwd)
copies=/tmp/proxyattn_ab
rm -rf "$copies" && mkdir -p "$copies"

build_copy() {  # variant name: build this tree as it stands, then copy it (with the extension) aside
  local v=$1
  local t; t=$(budget_for "build of $v" 20) || return 1
  (cd "$here" && OUT=$OUT/$v-build timeout "$t" bash tools/gpu_run.sh build) || return 1
  mv "$OUT/$v-build/build.log" "$OUT/$v-build.log" && rmdir "$OUT/$v-build"
  mkdir -p "$copies/$v" && (cd "$here" && tar --exclude=./build --exclude=./.git --exclude=./out -cf - .) | (cd "$copies/$v" && tar -xf -)
}

build_copy a || { pack; exit 1; }
objects=$(cd "$here" && realpath -m "${PROXYATTN_BUILD_TEMP:-/tmp/proxyattn_build_temp}")  # as gpu_run.sh resolves it
cp -a "$objects" "$copies/a.objects" || { echo "could not keep a's objects"; pack; exit 1; }
restore_a() {  # the sources in place are a's after each patch comes back out: so are the objects then
  # (build/lib.* holds the last variant's link, which the next build would copy over a's extension)
  { rm -rf "$objects" "$here"/build/lib.* && cp -a "$copies/a.objects" "$objects" &&
    cp -a "$copies"/a/proxyattn/_C*.so "$here/proxyattn/"; } || echo "== restoring a's build failed: rebuild from scratch" >&2
}
trap restore_a EXIT
variants=(a)
declare -A commit_of=([a]="${PROXYATTN_COMMIT:-}")  # what each variant's records name as their commit
i=0
for p in "${patches[@]}"; do
  i=$((i + 1))
  v=b$i
  (cd "$here" && patch -p1 --forward --quiet < "$p") || { echo "$(basename "$p") does not apply"; exit 1; }
  build_copy "$v"; ok=$?
  (cd "$here" && patch -p1 -R --quiet < "$p") || { echo "$(basename "$p") does not come back out"; pack; exit 1; }
  [ $ok -eq 0 ] || { pack; exit 1; }
  echo "$v = $(basename "$p")" | tee -a "$OUT/variants.txt"
  commit_of[$v]="${PROXYATTN_COMMIT:-unknown}+$(basename "$p" .patch)"
  variants+=("$v")
done

SITE=/tmp/proxyattn_site
export CUTLASS_PATH=$SITE/cutlass_library/source/include PYTHONUNBUFFERED=1
timed=("${variants[@]}")  # the variants the rounds time: a variant whose tests fail or time out is not timed
if [ -n "${GPU_AB_TESTS:-}" ]; then
  timed=(a)
  for v in "${variants[@]:1}"; do
    t=$(budget_for "tests of $v" 20 "${GPU_AB_TEST_LIMIT:-}") || break
    # shellcheck disable=SC2086
    if (cd "$copies/$v" && PYTHONPATH=$copies/$v:$SITE timeout "$t" python3 -m pytest -q -rs $GPU_AB_TESTS 2>&1 |
          tee "$OUT/$v-tests.log" | tail -15); then
      timed+=("$v")
    else
      echo "== $v: its tests failed or ran out of time ($t s); not timed" | tee -a "$OUT/untimed.txt"
    fi
  done
  pack
fi
summarise() {  # every script's table so far into $top/ab-summary.md
  local j
  for ((j = 0; j < jobs; j++)); do
    [ "$jobs" -eq 1 ] || echo "## ${names[j]}"
    python3 "$here/tools/ab_summary.py" "$OUT" "${names[j]}"
    echo
  done > "$top/ab-summary.md"
}
for round in $(seq 1 "${ROUNDS:-2}"); do
  for ((j = 0; j < jobs; j++)); do
    job=("${args[@]:${start[j]}:${len[j]}}")
    name=${names[j]}
    for v in "${timed[@]}"; do
      t=$(budget_for "$v, $name, round $round" 30 "${GPU_AB_RUN_LIMIT:-}") || break 3
      echo "== $v, $name, round $round"
      (cd "$copies/$v" && PROXYATTN_COMMIT=${commit_of[$v]} PYTHONPATH=$copies/$v:$SITE timeout "$t" python3 "bench/${job[0]}" "${job[@]:1}" --out "$OUT/$v-r$round-$name.json" 2>&1 |
         tee "$OUT/$v-r$round-$name.log" | tail -25)
    done
  done
  pack
  summarise
done
pack  # a round the budget cut short too
summarise
cat "$top/ab-summary.md"
rm -rf "$OUT"
echo "records and logs: $top/ab.tgz; the table above: $top/ab-summary.md"
