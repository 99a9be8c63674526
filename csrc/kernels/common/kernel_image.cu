// kernel_image.h: one empty kernel, compiled for the same targets as every other kernel of the
// build, stands for all of them.
#include "kernels/common/kernel_image.h"

#include <atomic>

namespace proxyattn {
namespace {
__global__ void image_probe_kernel() {}
}  // namespace

cudaError_t kernel_image_status() {
  static std::atomic<int> cache[64] = {};  // per device: 0 not asked yet, else the answer + 1
  int dev = -1;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    const cudaError_t e = cudaGetLastError();
    return e == cudaSuccess ? cudaErrorInvalidDevice : e;
  }
  const bool cached = dev >= 0 && dev < 64;
  if (cached) {
    const int v = cache[dev].load(std::memory_order_relaxed);
    if (v != 0) return static_cast<cudaError_t>(v - 1);
  }
  cudaFuncAttributes attr;
  const cudaError_t e = cudaFuncGetAttributes(&attr, image_probe_kernel);
  if (e != cudaSuccess) (void)cudaGetLastError();
  // Only the build's answer is kept; another error (memory, a capture in progress) may pass.
  if (cached && kernel_image_answer(e)) cache[dev].store(static_cast<int>(e) + 1, std::memory_order_relaxed);
  return e;
}

}  // namespace proxyattn
