// Stage 1 (proxy_block_scores), kernel 1 of 2: the pooled proxy rows, rounded to 16 bits for the
// scores kernel's single tensor-core product (proxy_scores.cu describes the algorithm).
//   pool_kernel: D/8 lanes per kept row of one (b, group), 8 elements each (one 16-byte load per
//     head; q and k are 16-byte aligned with strides in multiples of 8, checked by the op), so a
//     warp pools 32/(D/8) rows: the mean of the group's heads, summed in fp32 in head order and
//     divided by the head count (IEEE division), rounded to fp16; a finite mean whose fp16
//     rounding overflows marks the (b, group) in `flags`. Keys are pooled once per key group
//     (key_sharing: with G > Hkv the groups inside one KV head share its keys), into the slot of
//     the head's first group, and an overflow marks every group that shares them.
//   fix_kernel: for each marked (b, group), the queries and keys again, rounded to bf16 (fp32's
//     range) into its own rows; a marked key group first copies its fp16 keys into the rows of the
//     unmarked groups that share them. Without a mark it returns at once.
// reference.group_pool computes the same values (except fp32 subnormals, which the build's fast-math
// flushes to 0 in the head sum; fp16 rounds them to 0 anyway, so only a bf16-fallback group can differ).
#pragma once

#include "kernels/common/chained_launch.cuh"
#include "kernels/estimate/proxy_scores_layout.cuh"

namespace proxyattn {
namespace scores {

constexpr int kPoolPer = 8;  // elements of a row per lane: one 16-byte load per head

// Kept rows one warp pools (D / kPoolPer lanes each).
template <int D>
__host__ __device__ constexpr int pool_rows_per_warp() {
  return 32 / (D / kPoolPer);
}

// The kept row j of one (b, group): the mean of its heads, elements sub * kPoolPer + [0, kPoolPer)
// (0 past the sequence's kept rows).
template <typename T, int D>
__device__ inline void pooled_row(const ProxyScoresParams& p, const SeqBounds& sb, int b, int grp, bool query,
                                  int64_t j, int sub, float (&out)[kPoolPer]) {
  constexpr int kPer = kPoolPer;
  const int s = p.stride;
  int first, n, h0, nh;
  int64_t start, row_stride, head_stride;
  const T* base;
  if (query) {
    first = kept_query_offset(sb.nq, sb.nk, s);
    n = sb.nq;
    nh = p.num_heads / p.num_groups;
    h0 = grp * nh;
    start = sb.q_start;
    row_stride = p.q_row_stride;
    head_stride = p.q_head_stride;
    base = static_cast<const T*>(p.q) + b * p.q_batch_stride;
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
  }
#pragma unroll
  for (int e = 0; e < kPer; ++e) out[e] = 0.f;
  if (j >= kept_count(n, first, s)) return;
  const int64_t t = first + j * s;  // sequence-local row
  const T* src = base + sub * kPer +
                 (!query && p.pages.paged() ? p.pages.offset(b, static_cast<int>(t), p.pages.k_page_stride, row_stride)
                                            : (start + t) * row_stride);
#pragma unroll 4
  for (int hh = 0; hh < nh; ++hh) {
    const uint4 raw = *reinterpret_cast<const uint4*>(src + (h0 + hh) * head_stride);
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int e = 0; e < kPer; e += 2) {
      const float2 v = MmaTraits<T>::to_float2(w[e / 2]);
      out[e] += v.x;
      out[e + 1] += v.y;
    }
  }
  const float fnh = static_cast<float>(nh);
#pragma unroll
  for (int e = 0; e < kPer; ++e) out[e] = __fdiv_rn(out[e], fnh);
}

__device__ inline uint32_t pack16(half a, half b) {
  const __half2 h = __halves2half2(a, b);
  return *reinterpret_cast<const uint32_t*>(&h);
}
__device__ inline uint32_t pack16(__nv_bfloat16 a, __nv_bfloat16 b) {
  const __nv_bfloat162 h = __halves2bfloat162(a, b);
  return *reinterpret_cast<const uint32_t*>(&h);
}

template <typename T, int D, bool kQuery>
__global__ void __launch_bounds__(kPoolWarps * 32) pool_kernel(const ProxyScoresParams p, int64_t rows_alloc,
                                                             uint16_t* out, int* flags) {
  pdl_wait();  // chained_launch.cuh: before any global memory access
  pdl_launch_dependents();
  constexpr int kPer = kPoolPer, kLanes = D / kPoolPer;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, sub = lane % kLanes;
  const int64_t j = (static_cast<int64_t>(blockIdx.x) * kPoolWarps + warp) * pool_rows_per_warp<D>() + lane / kLanes;
  // Keys: one CTA row per key group (key_sharing), whose overflow marks every group sharing its keys.
  const int share = kQuery ? 1 : key_sharing(p);
  const int grp = blockIdx.y * share, b = blockIdx.z;
  const SeqBounds sb = load_seq_bounds(p.cu_seqlens_q, p.cu_seqlens_k, b, p.max_seqlen_q, p.max_seqlen_k,
                                       p.total_q, p.total_k);
  const int64_t bg = static_cast<int64_t>(b) * p.num_groups + grp;
  bool overflow = false;
  if (j < rows_alloc) {
    float v[kPer];
    pooled_row<T, D>(p, sb, b, grp, kQuery, j, sub, v);
    uint32_t w[kPer / 2];
#pragma unroll
    for (int e = 0; e < kPer; e += 2) {
      const half a = __float2half_rn(v[e]), c = __float2half_rn(v[e + 1]);
      overflow |= (__hisinf(a) && isfinite(v[e])) || (__hisinf(c) && isfinite(v[e + 1]));
      w[e / 2] = pack16(a, c);
    }
    reinterpret_cast<uint4*>(out)[(bg * rows_alloc + j) * kLanes + sub] = make_uint4(w[0], w[1], w[2], w[3]);
  }
  if (__any_sync(0xffffffffu, overflow) && lane == 0)
    for (int i = 0; i < share; ++i) flags[bg + i] = 1;
}

template <typename T, int D>
__global__ void __launch_bounds__(kPoolWarps * 32) fix_kernel(const ProxyScoresParams p, int64_t rows_q,
                                                            int64_t rows_k, uint16_t* q16, uint16_t* k16,
                                                            const int* flags) {
  pdl_wait();  // chained_launch.cuh: before any global memory access
  pdl_launch_dependents();
  constexpr int kPer = kPoolPer, kLanes = D / kPoolPer, kRowsW = pool_rows_per_warp<D>();
  const int grp = blockIdx.y, b = blockIdx.z;
  const int64_t bg = static_cast<int64_t>(b) * p.num_groups + grp;
  if (flags[bg] == 0) return;
  const int share = key_sharing(p);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, sub = lane % kLanes;
  const SeqBounds sb = load_seq_bounds(p.cu_seqlens_q, p.cu_seqlens_k, b, p.max_seqlen_q, p.max_seqlen_k,
                                       p.total_q, p.total_k);
  const int64_t step = static_cast<int64_t>(gridDim.x) * kPoolWarps;
  for (int which = 0; which < 2; ++which) {
    const int64_t rows = which == 0 ? rows_q : rows_k;
    uint16_t* out = which == 0 ? q16 : k16;
    for (int64_t jw = static_cast<int64_t>(blockIdx.x) * kPoolWarps + warp; jw * kRowsW < rows; jw += step) {
      const int64_t j = jw * kRowsW + lane / kLanes;
      if (j >= rows) break;
      float v[kPer];
      pooled_row<T, D>(p, sb, b, grp, which == 0, j, sub, v);
      uint32_t w[kPer / 2];
#pragma unroll
      for (int e = 0; e < kPer; e += 2) w[e / 2] = pack16(__float2bfloat16_rn(v[e]), __float2bfloat16_rn(v[e + 1]));
      uint4* row = reinterpret_cast<uint4*>(out) + (bg * rows + j) * kLanes + sub;
      // A key group's fp16 keys go first to the groups that share them and stay fp16 (score_unit then
      // reads them there).
      if (which == 1 && grp % share == 0)
        for (int i = 1; i < share; ++i)
          if (flags[bg + i] == 0) row[static_cast<int64_t>(i) * rows * kLanes] = *row;
      *row = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
}

}  // namespace scores
}  // namespace proxyattn
