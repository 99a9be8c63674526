// Host launcher of the Hopper kernel for one (dtype, head dim): tensor maps for q/k/v (paged K/V:
// over the caches as (slot, D, head, page)), the grid
// (min(work items, SMs x kCtasPerSm) persistent CTAs), the dynamic shared memory, the launch on the stream.
// Explicitly instantiated in csrc/instantiations/bsa_fwd_sm90_<dtype>_hdim<D>.cu; reached through
// run_bsa_fwd (kernels/common/bsa_launch.h) with parameters bsa_plan accepted for the Hopper path.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <type_traits>

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "kernels/bsa_sm90/kernel.cuh"
#include "kernels/bsa_sm90/traits.cuh"
#include "kernels/common/bsa_launch.h"
#include "kernels/common/bsa_params.h"

namespace proxyattn {
namespace bsa_sm90 {

template <class Traits>
cudaError_t launch(const BsaParams& p, cudaStream_t stream) {
  using Elem = typename Traits::Elem;
  constexpr int D = Traits::kHeadDim;
  const int64_t grid = int64_t(p.num_q_blocks) * p.q_heads * p.batch;
  if (grid == 0) return cudaSuccess;
  if (grid > int64_t(INT32_MAX)) return cudaErrorInvalidConfiguration;
  if (p.tile_counter == nullptr || p.kv_section < 1) return cudaErrorInvalidValue;

  const bool varlen = p.cu_seqlens_q != nullptr, paged = p.pages.paged();
  KernelParams<Traits> kp;
  kp.p = p;
  kp.q_rows_total = int32_t(varlen ? p.total_q : p.seqlen_q);
  kp.q_batches = varlen ? 1 : p.batch;
  // Paged K/V: the caches as (slot, D, head, page); a key block is one box of its page (pages of
  // 128 or 256) or kBlockN / kPieceRows boxes of kPieceRows slots (smaller pages).
  kp.k_rows_total = int32_t(paged ? p.pages.page_size() : varlen ? p.total_k : p.seqlen_k);
  kp.k_batches = paged ? p.pages.num_pages : kp.q_batches;
  const int64_t dflt = D;  // 16-byte multiple, used for unused strides
  auto make_g = [&](const void* ptr, int32_t rows, int heads, int32_t batches, int64_t rs, int64_t hs, int64_t bs) {
    return make_tensor(make_gmem_ptr(static_cast<Elem const*>(ptr)),
                       make_shape(rows, Int<D>{}, int32_t(heads), batches),
                       make_stride(tma_stride(rows, rs, dflt), _1{}, tma_stride(heads, hs, dflt),
                                   tma_stride(batches, bs, dflt)));
  };
  auto gQ = make_g(p.q, kp.q_rows_total, p.q_heads, kp.q_batches, p.q_row_stride, p.q_head_stride, p.q_batch_stride);
  auto gK = make_g(p.k, kp.k_rows_total, p.kv_heads, kp.k_batches, p.k_row_stride, p.k_head_stride,
                   paged ? p.pages.k_page_stride : p.k_batch_stride);
  auto gV = make_g(p.v, kp.k_rows_total, p.kv_heads, kp.k_batches, p.v_row_stride, p.v_head_stride,
                   paged ? p.pages.v_page_stride : p.v_batch_stride);
  kp.tma_q = make_tma_copy(SM90_TMA_LOAD{}, gQ, typename Traits::SmemLayoutQ{},
                           Shape<Int<Traits::kBlockM>, Int<D>>{}, _1{});
  kp.tma_k = make_tma_copy(SM90_TMA_LOAD{}, gK, take<0, 2>(typename Traits::SmemLayoutKV{}),
                           Shape<Int<Traits::kBlockN>, Int<D>>{}, _1{});
  kp.tma_v = make_tma_copy(SM90_TMA_LOAD{}, gV, take<0, 2>(typename Traits::SmemLayoutKV{}),
                           Shape<Int<Traits::kBlockN>, Int<D>>{}, _1{});
  if (paged && p.pages.page_size() < Traits::kBlockN) {
    kp.tma_k_piece = make_tma_copy(SM90_TMA_LOAD{}, gK, typename Traits::SmemLayoutKVPiece{},
                                   Shape<Int<Traits::kPieceRows>, Int<D>>{}, _1{});
    kp.tma_v_piece = make_tma_copy(SM90_TMA_LOAD{}, gV, typename Traits::SmemLayoutKVPiece{},
                                   Shape<Int<Traits::kPieceRows>, Int<D>>{}, _1{});
  }

  constexpr int kSmem = Traits::kSmemBytes;
  static_assert(kSmem <= 227 * 1024 && Traits::kCtasPerSm * (kSmem + 1024) <= 228 * 1024,
                "beyond the sm90 shared memory of a CTA or of an SM (1 KB reserved per CTA)");
  auto kernel = paged ? &bsa_fwd_sm90_persistent_kernel<Traits, true>
                      : &bsa_fwd_sm90_persistent_kernel<Traits, false>;
  int dev = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess && bsa_device_arch(dev) != 90) return cudaErrorNoKernelImageForDevice;
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess) err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  // Room for kCtasPerSm CTAs' shared memory on an SM.
  if (err == cudaSuccess)
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
  if (err != cudaSuccess) return err;
  const int64_t slots = int64_t(sms > 0 ? sms : 1) * Traits::kCtasPerSm;
  const int ctas = int(grid < slots ? grid : slots);
  return launch_chained(kernel, dim3(unsigned(ctas)), dim3(Traits::kNThreads), kSmem, stream, kp);
}

}  // namespace bsa_sm90

template <typename Elem, int kHeadDim>
cudaError_t run_bsa_fwd_sm90(const BsaParams& params, cudaStream_t stream) {
  static_assert(std::is_same_v<Elem, __half> || std::is_same_v<Elem, __nv_bfloat16>, "Elem: __half or __nv_bfloat16");
  using CuteElem = std::conditional_t<std::is_same_v<Elem, __half>, cutlass::half_t, cutlass::bfloat16_t>;
  if (params.head_dim != kHeadDim || params.block_size != bsa_sm90::Sm90Traits<CuteElem, kHeadDim>::kBlockM)
    return cudaErrorInvalidValue;
  return bsa_sm90::launch<bsa_sm90::Sm90Traits<CuteElem, kHeadDim>>(params, stream);
}

}  // namespace proxyattn
