// Explicit instantiation of the sm80 block-sparse attention forward for bf16, head dim 64
// (both block sizes, 64 and 128). Kernel: csrc/kernels/bsa_sm80/.
#include "kernels/bsa_sm80/launch.cuh"

namespace proxyattn {
template cudaError_t run_bsa_fwd_sm80<__nv_bfloat16, 64>(const BsaParams&, cudaStream_t);
}  // namespace proxyattn
