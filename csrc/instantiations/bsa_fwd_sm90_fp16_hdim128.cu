// Explicit instantiation of the Hopper (sm_90a) block-sparse attention forward for fp16, head dim 128
// (block size 128). Kernel: csrc/kernels/bsa_sm90/ (empty body on non-sm_90a targets).
#include "kernels/bsa_sm90/launch.cuh"

namespace proxyattn {
template cudaError_t run_bsa_fwd_sm90<__half, 128>(const BsaParams&, cudaStream_t);
}  // namespace proxyattn
