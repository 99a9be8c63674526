// Stage 1 (proxy_block_scores), kernel 1 of 2: pool_kernel, the pooled proxy rows (the fp32
// mean of a group's heads, queries also times sm * log2(e)) as fp16 hi + lo halves in the
// workspace (proxy_scores_layout.cuh); proxy_scores.cu describes the algorithm.
#pragma once

#include "kernels/estimate/proxy_scores_layout.cuh"

namespace proxyattn {
namespace scores {

template <typename T, int D, bool kQuery>
__global__ void __launch_bounds__(kPoolWarps * 32) pool_kernel(const ProxyScoresParams p, int64_t rows_alloc,
                                                             half* out_hi, half* out_lo, int* kflags,
                                                             int64_t ktiles) {
  constexpr int kPer = D / 32;  // elements per lane (even)
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kPoolWarps + warp;
  const int grp = blockIdx.y, b = blockIdx.z;
  if (j >= rows_alloc) return;
  const SeqBounds sb = load_seq_bounds(p.cu_seqlens_q, p.cu_seqlens_k, b, p.max_seqlen_q, p.max_seqlen_k,
                                       p.total_q, p.total_k);
  const int s = p.stride;
  int first, n, h0, nh;
  int64_t start, row_stride, head_stride;
  const T* base;
  float scale;
  if (kQuery) {
    first = kept_query_offset(sb.nq, sb.nk, s);
    n = sb.nq;
    nh = p.num_heads / p.num_groups;
    h0 = grp * nh;
    start = sb.q_start;
    row_stride = p.q_row_stride;
    head_stride = p.q_head_stride;
    base = static_cast<const T*>(p.q) + b * p.q_batch_stride;
    scale = p.softmax_scale * kLog2e / nh;
  } else {
    first = 0;
    n = sb.nk;
    if (p.num_groups <= p.num_kv_heads) {
      nh = p.num_kv_heads / p.num_groups;
      h0 = grp * nh;
    } else {
      nh = 1;
      h0 = grp / (p.num_groups / p.num_kv_heads);
    }
    start = sb.k_start;
    row_stride = p.k_row_stride;
    head_stride = p.k_head_stride;
    base = static_cast<const T*>(p.k) + b * p.k_batch_stride;
    scale = 1.f / nh;
  }
  const int64_t out_row = ((static_cast<int64_t>(b) * p.num_groups + grp) * rows_alloc + j) * D + lane * kPer;
  float acc[kPer];
#pragma unroll
  for (int e = 0; e < kPer; ++e) acc[e] = 0.f;
  if (j < kept_count(n, first, s)) {
    const T* src = base + (start + first + j * s) * row_stride + lane * kPer;
    for (int hh = 0; hh < nh; ++hh) {
      const T* hp = src + (h0 + hh) * head_stride;
#pragma unroll
      for (int e = 0; e < kPer; e += 2) {
        const float2 v = MmaTraits<T>::to_float2(*reinterpret_cast<const uint32_t*>(hp + e));
        acc[e] += v.x;
        acc[e + 1] += v.y;
      }
    }
  }
  bool lo_nonzero = false;
#pragma unroll
  for (int e = 0; e < kPer; e += 2) {
    const float v0 = acc[e] * scale, v1 = acc[e + 1] * scale;
    const half h0v = __float2half_rn(v0), h1v = __float2half_rn(v1);
    const half l0 = __float2half_rn(v0 - __half2float(h0v)), l1 = __float2half_rn(v1 - __half2float(h1v));
    lo_nonzero |= __half2float(l0) != 0.f || __half2float(l1) != 0.f;
    *reinterpret_cast<__half2*>(out_hi + out_row + e) = __halves2half2(h0v, h1v);
    *reinterpret_cast<__half2*>(out_lo + out_row + e) = __halves2half2(l0, l1);
  }
  if (!kQuery && __any_sync(0xffffffffu, lo_nonzero) && lane == 0)
    atomicOr(kflags + (static_cast<int64_t>(b) * p.num_groups + grp) * ktiles + j / kKeyTile, 1);
}

}  // namespace scores
}  // namespace proxyattn
