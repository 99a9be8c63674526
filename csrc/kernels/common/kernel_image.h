// Whether this build holds kernels the current device can run: the extension is compiled for the
// targets in PROXYATTN_ARCHS (setup.py, CMakeLists.txt), and a device outside them (a Blackwell GPU,
// or an A100 under a build for 90a alone) has no image of any of its kernels.
#pragma once

#include <cuda_runtime.h>

namespace proxyattn {

// Whether e says something about the build and the device: it holds kernels for the device
// (cudaSuccess) or none (the other two).
inline bool kernel_image_answer(cudaError_t e) {
  return e == cudaSuccess || e == cudaErrorNoKernelImageForDevice || e == cudaErrorInvalidDeviceFunction;
}

// cudaSuccess when the current device can run this build's kernels, else the runtime's error for a
// kernel compiled like all the others (cudaErrorNoKernelImageForDevice or
// cudaErrorInvalidDeviceFunction when the build has none for it; anything else is a failure of the
// query itself), taken off the runtime's error state so that it cannot surface in a later,
// unrelated launch check. The build's answer is kept per device; no synchronisation.
cudaError_t kernel_image_status();

}  // namespace proxyattn
