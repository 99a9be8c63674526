#!/usr/bin/env bash
# Set up what is missing, build proxyattn, and run it once:
#
#   bash tools/quickstart.sh [python -m proxyattn options, e.g. --seq-len 32768]
#
# 1. pip packages: torch==2.14.1 ninja pybind11 nvidia-cutlass==4.2.0.0 numpy, each installed only
#    when it does not import (an installed torch of another release is kept and used; CUTLASS_PATH,
#    when set, replaces nvidia-cutlass).
# 2. the package and its CUDA extension: `pip install --no-build-isolation -e .`, unless
#    proxyattn._C already imports from this checkout and is newer than csrc/ and setup.py.
#    About 6 minutes on 2 cores; ninja's [k/N] progress is shown, the full log kept in a file.
# 3. python3 -m proxyattn "$@".
#
# Environment: PYTHON (default python3); the build honours CUDA_HOME, CUTLASS_PATH,
# PROXYATTN_ARCHS, MAX_JOBS and NVCC_THREADS (see setup.py). tools/test.sh sources this file for
# steps 1 and 2.
set -euo pipefail

PA_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PA_PYTHON="${PYTHON:-python3}"

pa_say() { printf '[proxyattn] %s\n' "$*"; }

# pa_pip_missing SPEC...: install the SPECs ("module=requirement") whose module does not import.
pa_pip_missing() {
  local spec mod req missing=()
  for spec in "$@"; do
    mod="${spec%%=*}"
    req="${spec#*=}"
    if "$PA_PYTHON" -c "import $mod" >/dev/null 2>&1; then
      continue
    fi
    missing+=("$req")
  done
  if ((${#missing[@]} == 0)); then
    return 0
  fi
  pa_say "installing ${missing[*]}"
  "$PA_PYTHON" -m pip install "${missing[@]}"
}

pa_setup_build_deps() {
  local specs=("torch=torch==2.14.1" "ninja=ninja" "pybind11=pybind11" "numpy=numpy")
  if [[ -z "${CUTLASS_PATH:-}" ]]; then
    specs+=("cutlass_library=nvidia-cutlass==4.2.0.0")
  fi
  pa_pip_missing "${specs[@]}"
  "$PA_PYTHON" -c "import torch; print('[proxyattn] using torch', torch.__version__, 'built for CUDA', torch.version.cuda)"
}

# Prints why the extension must be (re)built, or nothing when the installed one is current.
pa_build_reason() {
  (cd / && "$PA_PYTHON" - "$PA_ROOT" <<'EOF'
import os, sys
root = sys.argv[1]
try:
    import proxyattn._C as ext
except Exception as e:  # not installed, not built, or built against another torch
    print(f"proxyattn._C does not import ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    sys.exit()
so = os.path.realpath(ext.__file__)
if not so.startswith(os.path.realpath(root) + os.sep):
    print(f"proxyattn._C comes from {so}, not from this checkout")
    sys.exit()
built = os.path.getmtime(so)
for base in ("csrc", "setup.py"):
    path = os.path.join(root, base)
    files = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    newer = [f for f in files if os.path.getmtime(f) > built]
    if newer:
        print(f"{os.path.relpath(newer[0], root)} is newer than the built extension")
        sys.exit()
EOF
  )
}

pa_build() {
  local reason log rc
  reason="$(pa_build_reason)"
  if [[ -z "$reason" ]]; then
    pa_say "proxyattn._C is built and current"
    return 0
  fi
  log="${TMPDIR:-/tmp}/proxyattn-build-$$.log"
  pa_say "building proxyattn ($reason)"
  pa_say "the CUDA build takes about 6 minutes on 2 cores (less with more); full log: $log"
  set +e
  (cd "$PA_ROOT" && "$PA_PYTHON" -m pip install -v --no-build-isolation -e . 2>&1) | tee "$log" |
    grep --line-buffered -E '^\s*\[[0-9]+/[0-9]+\]' |
    sed -E -u -e 's#^\s*(\[[0-9]+/[0-9]+\]).* -c ([^ ]+).*#\1 \2#' -e 's#^\s*(\[[0-9]+/[0-9]+\]) .* -o ([^ ]+).*#\1 link \2#' \
      -e "s#$PA_ROOT/##"
  rc=${PIPESTATUS[0]}
  set -e
  if ((rc != 0)); then
    pa_say "build failed (exit $rc); the end of $log:"
    tail -n 40 "$log" >&2
    return "$rc"
  fi
  reason="$(pa_build_reason)"
  if [[ -n "$reason" ]]; then
    pa_say "pip finished but $reason; see $log" >&2
    return 1
  fi
  pa_say "built; $(cd / && "$PA_PYTHON" -c 'import proxyattn._C as e; print(e.__file__)')"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  pa_setup_build_deps
  pa_build
  cd "$PA_ROOT"
  exec "$PA_PYTHON" -m proxyattn "$@"
fi
