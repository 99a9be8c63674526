// Device helpers shared by the estimation kernels (stages 1-3 of docs/design.md section 2): the
// candidate / forced-block arithmetic of the conventions, thin mma.sync wrappers (m16n8k16, fp32
// accumulate) for fp16 and bf16 operands, cp.async and the merge of online-softmax statistics.
// Sequence bounds and Python-style integer division come from kernels/common/. No torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/common/int_math.h"
#include "kernels/common/seq_bounds.cuh"

namespace proxyattn {

constexpr float kLog2e = 1.4426950408889634f;

// Candidates of query block m: the prefix [0, c_m) of key blocks (conventions).
// Causal: c_m = floor((Nk - Nq + min((m+1)S, Nq) - 1) / S) + 1, clamped into [0, nkb].
__host__ __device__ inline int candidate_count(int m, int nq, int nk, int S, bool causal) {
  const int nkb = ceil_div32(nk, S);
  if (!causal) return nkb;
  const int64_t end = static_cast<int64_t>(m + 1) * S;
  const int64_t last = static_cast<int64_t>(nk) - nq + (end < nq ? end : nq) - 1;
  const int64_t c = floor_div64(last, S) + 1;
  return static_cast<int>(c < 0 ? 0 : c > nkb ? nkb : c);
}

// First local block of query block m with c candidates (docs/design.md section 2): every key block that
// holds some row's own position, plus local - 1 before the earliest. Causal: the own positions of
// the block's rows run from a_m = m*S + Nk - Nq to the last candidate, so the local blocks are
// [max(0, floor(a_m / S) - local + 1), c); with Nk - Nq a multiple of S that is the last `local`
// candidates, otherwise a query block straddles two key blocks and keeps both. Non-causal: the
// last `local` candidates. local == 0: none (returns c).
__host__ __device__ inline int local_start(int m, int nq, int nk, int S, int local, bool causal, int c) {
  if (local <= 0) return c;
  int64_t start = static_cast<int64_t>(c) - local;
  if (causal) start = floor_div64(static_cast<int64_t>(m) * S + nk - nq, S) - local + 1;
  start = start < 0 ? 0 : start;
  return static_cast<int>(start > c ? c : start);
}

// Forced blocks of query block m with c candidates: [0, min(sink, c)) U [local_start, c).
// The non-forced candidates are the contiguous range [free_lo, free_hi) (maybe empty).
struct ForcedSplit {
  int free_lo, free_hi;  // non-forced candidates
  int forced;            // f = c - (free_hi - free_lo)
};

__host__ __device__ inline ForcedSplit split_forced(int m, int nq, int nk, int S, int c, int sink, int local,
                                                    bool causal) {
  ForcedSplit f;
  f.free_lo = sink < c ? sink : c;
  const int ls = local_start(m, nq, nk, S, local, causal, c);
  f.free_hi = ls > f.free_lo ? ls : f.free_lo;
  f.forced = c - (f.free_hi - f.free_lo);
  return f;
}

template <typename T>
struct MmaTraits;

template <>
struct MmaTraits<half> {
  __device__ static inline void mma(float c[4], const uint32_t a[4], const uint32_t b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
  __device__ static inline float2 to_float2(uint32_t v) {
    return __half22float2(*reinterpret_cast<const __half2*>(&v));
  }
};

template <>
struct MmaTraits<__nv_bfloat16> {
  __device__ static inline void mma(float c[4], const uint32_t a[4], const uint32_t b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
  __device__ static inline float2 to_float2(uint32_t v) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
  }
};

// 16-byte asynchronous global->shared copy; src_bytes == 0 zero-fills the destination. The
// destination as a shared-window address (smem_addr) or as a generic pointer.
__device__ inline void cp_async_16(uint32_t smem_addr, const void* gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr), "l"(gmem), "r"(src_bytes));
}
__device__ inline void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  cp_async_16(static_cast<uint32_t>(__cvta_generic_to_shared(smem)), gmem, src_bytes);
}
__device__ inline void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ inline void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// The 16-byte chunks one thread of kThreads copies of every key tile (kKeys rows of D 16-bit
// elements) in the Hopper estimation kernels' cp.async rings: rows row0(tid) + i kRowStep
// (i < kChunks) of the tile, columns col(tid) + [0, 8); dst[i], their shared addresses in stage 0
// of sK, a (keys, D, stage) tensor whose stage b lies b kStageBytes further on.
template <int kThreads, int D, int kKeys>
struct KeyTileChunks {
  static constexpr int kChunkCols = D / 8;
  static constexpr int kRowStep = kThreads / kChunkCols;
  static constexpr int kChunks = kKeys / kRowStep;
  static constexpr uint32_t kStageBytes = kKeys * D * 2;
  static_assert(kRowStep * kChunkCols == kThreads && kChunks * kRowStep == kKeys, "whole chunks per thread");
  __device__ static __forceinline__ int row0(int tid) { return tid / kChunkCols; }
  __device__ static __forceinline__ int col(int tid) { return (tid % kChunkCols) * 8; }
  template <class SmemK>
  __device__ static __forceinline__ void shared_addresses(uint32_t (&dst)[kChunks], SmemK& sK, int tid) {
#pragma unroll
    for (int i = 0; i < kChunks; ++i)
      dst[i] = static_cast<uint32_t>(__cvta_generic_to_shared(&sK(row0(tid) + i * kRowStep, col(tid), 0)));
  }
};

// The sum of a row's N weights w(j) of a tile in four independent chains, added pairwise (one
// chain when N is not a multiple of 4).
template <int N, class X>
__device__ __forceinline__ float tile_weight_sum(X&& w) {
  constexpr int kChains = N % 4 == 0 ? 4 : 1;
  float sum[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int j = 0; j < N; ++j) {
    const float e = w(j);
    sum[j % kChains] = j < kChains ? e : sum[j % kChains] + e;  // exp2 is never -0: e equals 0 + e
  }
  return (sum[0] + sum[1]) + (sum[2] + sum[3]);
}

// Merge two (max, sum) pairs of an online softmax of raw logits x with weights exp2((x - max) * c).
__device__ __forceinline__ void merge_scaled(float& m, float& l, float m2, float l2, float c) {
  const float mn = fmaxf(m, m2);
  if (mn == -INFINITY) return;
  l = l * exp2f((m - mn) * c) + l2 * exp2f((m2 - mn) * c);
  m = mn;
}

// The frame fl(m c) of a row's sums whose max is m (0 while m is -inf), in which each weight is one
// FFMA before the exponential, exp2(fma(x, c, -fl(m c))) (proxy_scores_rows.cuh online_rows, head_budgets_probe.cuh).
__device__ __forceinline__ float row_frame(float m, float c) { return m == -INFINITY ? 0.f : __fmul_rn(m, c); }

// Below this |fl(m c)| a weight in frame fl(m c) is within 2^16 of the true one (the frame's rounding
// is at most half an ulp); past it the kernels weigh exp2((x - m) c) instead.
constexpr float kFrameBound = 0x1p29f;

// exp2(fl(m c) - m c): the factor from frame fl(m c) to the true one (m finite, |fl(m c)| < kFrameBound).
__device__ __forceinline__ float frame_to_true(float m, float c) { return exp2f(-fmaf(m, c, -__fmul_rn(m, c))); }

// Whether a row whose max becomes mn must leave frame fl(m c) for the true one: |fl(mn c)| reaches
// kFrameBound (a huge softmax scale, its argmax limit). The rule of both kernels that use the frame.
__device__ __forceinline__ bool past_frame_bound(float mn, float c) {
  return mn != -INFINITY && !(fabsf(__fmul_rn(mn, c)) < kFrameBound);
}

}  // namespace proxyattn
