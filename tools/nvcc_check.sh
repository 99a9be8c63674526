#!/usr/bin/env bash
# Compile one csrc/ source with the extension's flags, without linking, to find
# compile errors and read the ptxas resource report on a machine without a GPU.
#   tools/nvcc_check.sh csrc/instantiations/foo.cu [extra nvcc flags]
set -euo pipefail
src=$1; shift
top=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
read -r TORCH_INC PY_INC CUTLASS_SRC < <($py - <<'PY'
import importlib.util, os, sysconfig, torch
from torch.utils.cpp_extension import include_paths
spec = importlib.util.find_spec("cutlass_library")
cut = os.environ.get("CUTLASS_PATH") or os.path.join(list(spec.submodule_search_locations)[0], "source", "include")
print(":".join(include_paths("cuda")), sysconfig.get_paths()["include"], cut)
PY
)
inc=(-I"$top/csrc" -I"$CUTLASS_SRC" -I"$CUTLASS_SRC/../tools/util/include" -I"$PY_INC")
IFS=: read -ra tinc <<<"$TORCH_INC"; for d in "${tinc[@]}"; do inc+=(-isystem "$d"); done
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda-13.0}
out=${OUT_OBJ:-/tmp/nvcc_check_$(basename "$src").o}
case "$src" in
  *.cu) "$CUDA_HOME/bin/nvcc" -c "$src" -o "$out" -std=c++20 -O3 -DNDEBUG -DPROXYATTN_HOPPER_KERNELS -lineinfo --use_fast_math \
          --expt-relaxed-constexpr --expt-extended-lambda -Xptxas=--warn-on-spills,-v \
          -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a \
          -U__CUDA_NO_HALF_OPERATORS__ -U__CUDA_NO_HALF_CONVERSIONS__ \
          -U__CUDA_NO_BFLOAT16_OPERATORS__ -U__CUDA_NO_BFLOAT16_CONVERSIONS__ \
          -Xcompiler -fPIC -D_GLIBCXX_USE_CXX11_ABI=1 "${inc[@]}" "$@" ;;
  *.cpp) g++ -c "$src" -o "$out" -std=c++20 -O2 -fPIC -DNDEBUG -DPROXYATTN_HOPPER_KERNELS -D_GLIBCXX_USE_CXX11_ABI=1 \
          "${inc[@]}" -I"$CUDA_HOME/include" "$@" ;;
esac
echo "ok: $src -> $out"
