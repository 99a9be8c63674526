// Device helpers shared by the estimation kernels (stages 1-3 of DESIGN.md section 2):
// per-sequence bounds (fixed length or varlen, lengths clamped into [0, max_seqlen]),
// the candidate / forced-block arithmetic of the conventions, and thin mma.sync wrappers
// (m16n8k16, fp32 accumulate) for fp16 and bf16 operands. No torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace proxyattn {

constexpr float kLog2e = 1.4426950408889634f;

__host__ __device__ inline int64_t floor_div64(int64_t a, int64_t b) {
  int64_t q = a / b;
  return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}
__host__ __device__ inline int64_t floor_mod64(int64_t a, int64_t b) { return a - floor_div64(a, b) * b; }
// Python-style ceil division (-(-a // b)), also right for negative a.
__host__ __device__ inline int64_t ceil_div64(int64_t a, int64_t b) { return -floor_div64(-a, b); }

// One sequence of a (possibly varlen) batch. Fixed length: starts 0 (the batch stride
// addresses the item), lengths = max_seqlen. Varlen: starts and lengths from cu_seqlens,
// clamped so that a bad cu_seqlens value can never index outside [0, total).
struct SeqBounds {
  int64_t q_start, k_start;
  int nq, nk;
};

__device__ inline SeqBounds load_seq_bounds(const int* cu_q, const int* cu_k, int b, int max_q, int max_k,
                                            int64_t total_q, int64_t total_k) {
  SeqBounds s;
  if (cu_q == nullptr) {
    s.q_start = 0;
    s.nq = max_q;
  } else {
    int64_t a = min(max(static_cast<int64_t>(cu_q[b]), int64_t(0)), total_q);
    int64_t e = min(max(static_cast<int64_t>(cu_q[b + 1]), a), total_q);
    s.q_start = a;
    s.nq = static_cast<int>(min(e - a, static_cast<int64_t>(max_q)));
  }
  if (cu_k == nullptr) {
    s.k_start = 0;
    s.nk = max_k;
  } else {
    int64_t a = min(max(static_cast<int64_t>(cu_k[b]), int64_t(0)), total_k);
    int64_t e = min(max(static_cast<int64_t>(cu_k[b + 1]), a), total_k);
    s.k_start = a;
    s.nk = static_cast<int>(min(e - a, static_cast<int64_t>(max_k)));
  }
  return s;
}

// Candidates of query block m: the prefix [0, c_m) of key blocks (conventions).
// Causal: c_m = floor((Nk - Nq + min((m+1)S, Nq) - 1) / S) + 1, clamped into [0, nkb].
__host__ __device__ inline int candidate_count(int m, int nq, int nk, int S, bool causal) {
  const int nkb = static_cast<int>((static_cast<int64_t>(nk) + S - 1) / S);
  if (!causal) return nkb;
  const int64_t end = static_cast<int64_t>(m + 1) * S;
  const int64_t last = static_cast<int64_t>(nk) - nq + (end < nq ? end : nq) - 1;
  const int64_t c = floor_div64(last, S) + 1;
  return static_cast<int>(c < 0 ? 0 : c > nkb ? nkb : c);
}

// First local block of query block m with c candidates (DESIGN.md section 2): every key block that
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

// 16-byte asynchronous global->shared copy; src_bytes == 0 zero-fills the destination.
__device__ inline void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}
__device__ inline void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ inline void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Merge two (max, sum) pairs of an online softmax in the log2 domain; -inf max means empty.
__device__ inline void merge_max_sum(float& m, float& l, float m2, float l2) {
  const float mn = fmaxf(m, m2);
  if (mn == -INFINITY) return;
  l = l * exp2f(m - mn) + l2 * exp2f(m2 - mn);
  m = mn;
}

}  // namespace proxyattn
