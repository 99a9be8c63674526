// Programmatic dependent launch (sm_90): the kernels of one call follow each other on the stream
// without a launch gap. launch_chained launches a kernel with the stream attribute
// cudaLaunchAttributeProgrammaticStreamSerialization where the build's sm_90a code runs (a plain
// launch elsewhere), so its grid may be scheduled once every CTA of the grid before it has
// called pdl_launch_dependents or exited; under CUDA graph capture this becomes a programmatic edge.
//
// The rule every kernel launched this way keeps: pdl_wait() before its first global memory access,
// read or write (only shared memory, barrier setup and parameter-space data before it). pdl_wait
// returns once the grid before it has completed and its writes are visible, so each kernel sees the
// data order of plain stream order, transitively: a grid completes only after its own CTAs have
// passed their wait. pdl_launch_dependents right after it lets the next grid's CTAs take SM slots as
// this grid's last CTAs drain, where they run up to their own wait. Both are no-ops in a grid
// launched without the attribute and compile to nothing below sm_90.
#pragma once

#include <cuda_runtime.h>

#include <utility>

#include "kernels/common/bsa_launch.h"

namespace proxyattn {

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// The kernel's grid after the work before it on `stream` (see above); the kernel keeps the rule.
template <typename... KernelArgs, typename... Args>
cudaError_t launch_chained(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem_bytes,
                           cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  // Only the sm_90a code holds the wait (sm_80 code has no griddepcontrol), and it runs on compute
  // capability 9.0 devices alone.
#ifdef PROXYATTN_HOPPER_KERNELS
  int dev = 0;
  const bool chained = cudaGetDevice(&dev) == cudaSuccess && bsa_device_arch(dev) == 90;
#else
  const bool chained = false;
#endif
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem_bytes;
  cfg.stream = stream;
  cfg.attrs = chained ? attr : nullptr;
  cfg.numAttrs = chained ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

}  // namespace proxyattn
