// Host entry points of the block-sparse attention forward: the per-instantiation launcher
// (defined in bsa_fwd_sm80.cuh, explicitly instantiated in csrc/instantiations/) and a small
// dispatcher over dtype and head dim. Torch-free and CuTe-free, so the torch glue and the C++
// benchmark can include it with a host compiler.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>

#include "kernels/bsa_params.h"

namespace proxyattn {

// Elem: __half or __nv_bfloat16. kHeadDim: 64 or 128. Dispatches on params.block_size (64/128).
// Returns the error of the launch (cudaErrorInvalidValue for unsupported parameters).
template <typename Elem, int kHeadDim>
cudaError_t run_bsa_fwd_sm80(const BsaParams& params, cudaStream_t stream);

// Defined once each in csrc/instantiations/bsa_fwd_sm80_<dtype>_hdim<D>.cu; declared extern so
// no other translation unit compiles a kernel body.
extern template cudaError_t run_bsa_fwd_sm80<__half, 64>(const BsaParams&, cudaStream_t);
extern template cudaError_t run_bsa_fwd_sm80<__half, 128>(const BsaParams&, cudaStream_t);
extern template cudaError_t run_bsa_fwd_sm80<__nv_bfloat16, 64>(const BsaParams&, cudaStream_t);
extern template cudaError_t run_bsa_fwd_sm80<__nv_bfloat16, 128>(const BsaParams&, cudaStream_t);

// Empty when the sm80 kernel supports these parameters, else what is wrong, naming the value.
inline std::string bsa_unsupported_reason(const BsaParams& p) {
  if (p.head_dim != 64 && p.head_dim != 128)
    return "head_dim must be 64 or 128, got " + std::to_string(p.head_dim);
  if (p.block_size != 64 && p.block_size != 128)
    return "block_size must be 64 or 128, got " + std::to_string(p.block_size);
  if (p.kv_heads <= 0 || p.q_heads <= 0 || p.q_heads % p.kv_heads != 0)
    return "q_heads (" + std::to_string(p.q_heads) + ") must be a positive multiple of kv_heads (" +
           std::to_string(p.kv_heads) + ")";
  if (!(p.softmax_scale > 0.f) || p.softmax_scale > 3.0e38f)
    return "softmax_scale must be positive and finite, got " + std::to_string(p.softmax_scale);
  if (p.num_k_blocks < 1) return "index rows must hold at least one entry, got " + std::to_string(p.num_k_blocks);
  if (p.batch < 0 || p.seqlen_q < 0 || p.seqlen_k < 0) return "negative batch or sequence length";
  return {};
}

// Runs the forward on `stream`: dispatches on dtype and head dim. The default case returns
// cudaErrorInvalidValue; bsa_unsupported_reason() names the offending value.
inline cudaError_t run_bsa_fwd(const BsaParams& params, bool is_bf16, cudaStream_t stream) {
  if (!bsa_unsupported_reason(params).empty()) return cudaErrorInvalidValue;
  switch (params.head_dim) {
    case 64:
      return is_bf16 ? run_bsa_fwd_sm80<__nv_bfloat16, 64>(params, stream)
                     : run_bsa_fwd_sm80<__half, 64>(params, stream);
    case 128:
      return is_bf16 ? run_bsa_fwd_sm80<__nv_bfloat16, 128>(params, stream)
                     : run_bsa_fwd_sm80<__half, 128>(params, stream);
    default:
      return cudaErrorInvalidValue;  // unreachable: bsa_unsupported_reason names head_dim
  }
}

}  // namespace proxyattn
