// Host launcher of the portable kernel for one (dtype, head dim), both block sizes: one CTA per
// work item, 4 warps; query tile = one query block, key tiles of 64 (a 128-key block is two).
// Explicitly instantiated in csrc/instantiations/bsa_fwd_sm80_<dtype>_hdim<D>.cu; reached through
// run_bsa_fwd (kernels/common/bsa_launch.h) with parameters bsa_plan accepted.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <type_traits>

#include <cutlass/numeric_types.h>

#include "kernels/bsa_sm80/kernel.cuh"
#include "kernels/bsa_sm80/traits.cuh"
#include "kernels/common/bsa_launch.h"
#include "kernels/common/bsa_params.h"

namespace proxyattn {
namespace bsa_sm80 {

template <class Traits>
cudaError_t launch(const BsaParams& p, cudaStream_t stream) {
  const int64_t grid = int64_t(p.num_q_blocks) * p.q_heads * p.batch;
  if (grid == 0) return cudaSuccess;
  if (grid > int64_t(INT32_MAX)) return cudaErrorInvalidConfiguration;
  if (p.kv_section < 1) return cudaErrorInvalidValue;
  constexpr int kSmem = Traits::kSmemBytes;
  auto kernel = p.pages.paged() ? &bsa_fwd_sm80_kernel<Traits, true> : &bsa_fwd_sm80_kernel<Traits, false>;
  if (kSmem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
    if (err != cudaSuccess) return err;
  }
  return launch_chained(kernel, dim3(unsigned(grid)), dim3(Traits::kNThreads), kSmem, stream, p);
}

}  // namespace bsa_sm80

template <typename Elem, int kHeadDim>
cudaError_t run_bsa_fwd_sm80(const BsaParams& params, cudaStream_t stream) {
  static_assert(std::is_same_v<Elem, __half> || std::is_same_v<Elem, __nv_bfloat16>, "Elem: __half or __nv_bfloat16");
  using CuteElem = std::conditional_t<std::is_same_v<Elem, __half>, cutlass::half_t, cutlass::bfloat16_t>;
  if (params.head_dim != kHeadDim || (params.block_size != 64 && params.block_size != 128))
    return cudaErrorInvalidValue;
  // Query tile = one query block; key tiles of 64 (a 128-key block is two tiles).
  if (params.block_size == 128)
    return bsa_sm80::launch<bsa_sm80::Sm80Traits<CuteElem, kHeadDim, 128, 64, 4>>(params, stream);
  return bsa_sm80::launch<bsa_sm80::Sm80Traits<CuteElem, kHeadDim, 64, 64, 4>>(params, stream);
}

}  // namespace proxyattn
