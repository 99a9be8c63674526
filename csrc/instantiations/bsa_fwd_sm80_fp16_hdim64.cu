// Explicit instantiation of the sm80 block-sparse attention forward for fp16, head dim 64
// (both block sizes, 64 and 128). Kernel body: csrc/kernels/bsa_fwd_sm80.cuh.
#include "kernels/bsa_fwd_sm80.cuh"

namespace proxyattn {
template cudaError_t run_bsa_fwd_sm80<__half, 64>(const BsaParams&, cudaStream_t);
}  // namespace proxyattn
