// Whether this build holds kernels the current device can run: the extension is compiled for the
// targets in PROXYATTN_ARCHS (setup.py, CMakeLists.txt), and a device outside them (a Blackwell GPU,
// or an A100 under a build for 90a alone) has no image of any of its kernels.
#pragma once

#include <cuda_runtime.h>

namespace proxyattn {

// cudaSuccess when the current device can run this build's kernels, else the runtime's answer for
// a kernel compiled like all the others (cudaErrorNoKernelImageForDevice or
// cudaErrorInvalidDeviceFunction), taken off the runtime's error state so that it cannot surface in
// a later, unrelated launch check. Queried once per device; no synchronisation.
cudaError_t kernel_image_status();

}  // namespace proxyattn
