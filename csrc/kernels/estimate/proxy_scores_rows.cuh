// Stage 1 (proxy_block_scores): the per-row work both scores kernels share (proxy_scores_kernel.cuh
// on mma.sync, proxy_scores_sm90.cuh on wgmma), whatever fragment layout holds a thread's logits:
// row limits, the online (max, sum) with weights exp2((x - max) * c), the four lanes of a row
// merged, the per-row statistics and the end of a unit (A from the block maxima in the scratch).
#pragma once

#include <climits>
#include <cmath>
#include <cstdint>

#include "kernels/estimate/proxy_scores_layout.cuh"

namespace proxyattn {
namespace scores {

// One work unit of a scores kernel: query blocks mb * bpc + [0, bpc) of one (b, group).
struct ScoreUnit {
  int mb, b, grp;
  SeqBounds sb;
  int off;      // Nk - Nq of the sequence
  int i0;       // its first kept query row
  int nkk;      // its kept keys
  int nqb_seq;  // its query blocks
  int64_t bgrow;  // b * G + group: the row of the workspace and of A
  int64_t kbgrow;  // the workspace row of its pooled keys: bgrow, or its key group's (key_sharing)
  bool bf16;      // the (b, group)'s pooled rows are bf16 (else fp16); uniform over the unit
};

// Unit u (of bg_count * nmb, heaviest causal query blocks first) of the persistent scores kernels.
__device__ __forceinline__ ScoreUnit score_unit(const ProxyScoresParams& p, long long u, int64_t bg_count, int nmb,
                                               const int* flags) {
  ScoreUnit w;
  w.mb = nmb - 1 - static_cast<int>(u / bg_count);
  const int bgi = static_cast<int>(u % bg_count);
  w.grp = bgi % p.num_groups, w.b = bgi / p.num_groups;
  w.sb = load_seq_bounds(p.cu_seqlens_q, p.cu_seqlens_k, w.b, p.max_seqlen_q, p.max_seqlen_k, p.total_q, p.total_k);
  w.off = w.sb.nk - w.sb.nq;
  w.i0 = kept_query_offset(w.sb.nq, w.sb.nk, p.stride);
  w.nkk = kept_count(w.sb.nk, 0, p.stride);
  w.nqb_seq = ceil_div32(w.sb.nq, p.block_size);
  w.bgrow = static_cast<int64_t>(w.b) * p.num_groups + w.grp;
  w.bf16 = flags[w.bgrow] != 0;
  // The key group's fp16 rows, unless this group or the key group went to bf16: then fix_kernel wrote
  // this group's own keys (bf16, or the key group's fp16 rows copied before it rewrote them).
  const int64_t kg = w.bgrow - w.grp % key_sharing(p);
  w.kbgrow = w.bf16 || flags[kg] != 0 ? w.bgrow : kg;
  return w;
}

// The last kept key that kept query jrow (sequence offset off = Nk - Nq, first kept query i0) may
// see, -1 when the row is not valid or sees nothing; nkk kept keys.
__device__ __forceinline__ int kept_row_limit(bool valid, bool causal, int off, int i0, int jrow, int s, int nkk) {
  if (!valid) return -1;
  if (!causal) return nkk - 1;
  const int64_t pos = static_cast<int64_t>(off) + i0 + static_cast<int64_t>(jrow) * s;
  return pos < 0 ? -1 : static_cast<int>(min(pos / s, static_cast<int64_t>(nkk - 1)));
}

// The end of a unit of either scores kernel: A[b, group, m, :] for the unit's query blocks
// mb * bpc + [0, bpc), every element. Block bl's rows are CTA rows bl * rows_blk + [0, rows_blk)
// (rows_blk a multiple of 8); row r has the final max s_m[r], log2 of its sum s_lg[r] and last key
// block s_nlim[r] (-1: no row), and its max logit over key block n at scratch[n * cta_rows + r] for
// n <= s_nlim[r] (later entries are stale and not read). s_blk_nmax[bl]: the largest s_nlim of block
// bl. Everything is visible to the CTA; the caller synchronises before reusing any of it. The largest
// of a block's terms exp2((L - m) c) / sum is taken in the exponent: one exponential per element of
// A, not per row. Per query block, the elements past s_blk_nmax (no row sees them) are zeros, written
// by the whole CTA; each of the others is read by eight consecutive lanes, each lane a row in eight
// (one whole 32-byte sector of the scratch per load), and merged by shuffles. A warp takes 16
// consecutive elements per trip, four per lane group, so that each lane has four elements' loads in
// flight per row.
template <int kThreads, bool kAligned>
__device__ __forceinline__ void write_unit_scores(const ProxyScoresParams& p, float c, const float* scratch, int cta_rows,
                                         int rows_blk, int bpc, int mb, int64_t bgrow, const float* s_m,
                                         const float* s_lg, const int* s_nlim, const int* s_blk_nmax) {
  constexpr int kLanes = 8;                  // lanes per element of A
  constexpr int kPer = 4;                    // elements per lane group and trip
  constexpr int kGroups = 32 / kLanes;         // lane groups per warp
  constexpr int kWarpElems = kGroups * kPer;
  constexpr int kWarps = kThreads / 32;
  static_assert(kThreads % 32 == 0 && kPer <= kLanes, "whole warps; a lane stores one element");
  const int S = p.block_size, s = p.stride;
  const int warp = threadIdx.x / 32, sub = threadIdx.x % kLanes, gw = threadIdx.x % 32 / kLanes;
  float* A0 = p.scores + bgrow * p.nqb * p.nkb;
  for (int bl = 0; bl < bpc; ++bl) {  // CTA-uniform
    const int mm = mb * bpc + bl;
    if (mm >= p.nqb) break;
    float* Am = A0 + static_cast<int64_t>(mm) * p.nkb;
    const int nlive = s_blk_nmax[bl] + 1;  // elements [0, nlive) have a row that sees them
    for (int n = nlive + threadIdx.x; n < p.nkb; n += kThreads) Am[n] = 0.f;
    const int r0 = bl * rows_blk;
    // Every lane of a warp makes the same trips (the shuffles below take the whole warp).
    for (int base = warp * kWarpElems; base < nlive; base += kWarps * kWarpElems) {
      int n[kPer];
      float e[kPer];  // the largest exponents; none (no row sees the block): A = exp2(-inf) = 0
#pragma unroll
      for (int u = 0; u < kPer; ++u) {
        n[u] = base + gw + kGroups * u;
        bool on = n[u] < nlive;
        if (!kAligned && on) {  // key block n holds a kept key (always when s divides S)
          const int64_t f0 = ceil_div64(static_cast<int64_t>(n[u]) * S, s);
          const int64_t f1 = ceil_div64(static_cast<int64_t>(n[u] + 1) * S, s);
          on = f0 < f1;
        }
        if (!on) n[u] = INT_MAX;  // no row's limit reaches it: nothing is read
        e[u] = -INFINITY;
      }
#pragma unroll 4
      for (int r = sub; r < rows_blk; r += kLanes) {
        const int rr = r0 + r;
        const int lim = s_nlim[rr];
        const float mr = s_m[rr], lr = s_lg[rr];
        float v[kPer];
#pragma unroll
        for (int u = 0; u < kPer; ++u)
          v[u] = n[u] <= lim ? scratch[static_cast<int64_t>(n[u]) * cta_rows + rr] : -INFINITY;
#pragma unroll
        for (int u = 0; u < kPer; ++u) e[u] = fmaxf(e[u], fmaf(v[u] - mr, c, -lr));  // -inf stays -inf
      }
      float mine = -INFINITY;  // lane sub stores element sub of its group
#pragma unroll
      for (int u = 0; u < kPer; ++u) {
#pragma unroll
        for (int o = kLanes / 2; o > 0; o >>= 1) e[u] = fmaxf(e[u], __shfl_xor_sync(0xffffffffu, e[u], o));
        if (sub == u) mine = e[u];
      }
      const int nm = base + gw + kGroups * sub;
      // At most 1: (L - m) c <= 0 and l >= 1, but lg2.approx may round log2(l) below 0 by an ulp.
      if (sub < kPer && nm < nlive) Am[nm] = exp2f(fminf(mine, 0.f));
    }
  }
}

// s_blk_nmax[bl] = max of s_nlim over block bl's rows, for bl < bpc (threads 0 .. bpc - 1).
__device__ __forceinline__ void block_row_limits(const int* s_nlim, int* s_blk_nmax, int rows_blk, int bpc) {
  if (threadIdx.x < bpc) {
    int v = -1;
    for (int r = 0; r < rows_blk; ++r) v = max(v, s_nlim[threadIdx.x * rows_blk + r]);
    s_blk_nmax[threadIdx.x] = v;
  }
}

// The largest and the smallest limit >= 0 of the warp's rows (-1 and INT_MAX when none);
// lim: this thread's rows.
template <int N>
__device__ __forceinline__ void warp_limit_range(const int (&lim)[N], int& hi, int& lo) {
  hi = -1, lo = INT_MAX;
#pragma unroll
  for (int i = 0; i < N; ++i)
    if (lim[i] >= 0) hi = max(hi, lim[i]), lo = min(lo, lim[i]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    hi = max(hi, __shfl_xor_sync(0xffffffffu, hi, o));
    lo = min(lo, __shfl_xor_sync(0xffffffffu, lo, o));
  }
}

// Online (max m, sum l) of a thread's R rows over its N logits x(ri, j) of a key tile, whose
// maxima the caller has (tmax); a sum is rescaled only when its max grows. l is kept in one of two
// frames, the same for the whole warp (`exact`, false at the start of a unit):
// - normally frame fl(m c): l = sum of exp2(x c - fl(m c)), so each weight is one FFMA before the
//   exponential, the product exact inside it; it differs from the sum of exp2((x - m) c) only by
//   the factor exp2(m c - fl(m c)), common to the row, which row_sums_true applies at the end;
// - once some row of the warp reaches |m c| >= kFrameBound (2^29), where that factor could leave fp32's range (a
//   huge softmax_scale's argmax limit), the true frame, exp2((x - m) c) per weight, for the rest of
//   the unit.
// Callers call it converged (a warp vote). No branch around a row's exponentials, so the rows
// interleave; each tile's sum in four independent chains, added pairwise.
template <int R, int N, class X>
__device__ __forceinline__ void online_rows(float (&m)[R], float (&l)[R], bool& exact, X&& x, const float (&tmax)[R],
                                            float c) {
  if (!exact) {
    bool big = false;
#pragma unroll
    for (int ri = 0; ri < R; ++ri) {
      big |= past_frame_bound(fmaxf(m[ri], tmax[ri]), c);
    }
    if (__any_sync(0xffffffffu, big)) {  // to the true frame, from the old maxima's (below the bound)
#pragma unroll
      for (int ri = 0; ri < R; ++ri)
        if (m[ri] != -INFINITY) l[ri] *= frame_to_true(m[ri], c);
      exact = true;
    }
  }
  if (exact) {
#pragma unroll
    for (int ri = 0; ri < R; ++ri) {
      if (tmax[ri] > m[ri]) {
        l[ri] *= exp2f((m[ri] - tmax[ri]) * c);
        m[ri] = tmax[ri];
      }
      const float base = m[ri] == -INFINITY ? 0.f : m[ri];
      l[ri] += tile_weight_sum<N>([&](int j) { return exp2f((x(ri, j) - base) * c); });
    }
  } else {
#pragma unroll
    for (int ri = 0; ri < R; ++ri) {
      if (tmax[ri] > m[ri]) {
        if (m[ri] != -INFINITY) l[ri] *= exp2f(__fsub_rn(__fmul_rn(m[ri], c), __fmul_rn(tmax[ri], c)));
        m[ri] = tmax[ri];
      }
      const float mh = row_frame(m[ri], c);
      l[ri] += tile_weight_sum<N>([&](int j) { return exp2f(fmaf(x(ri, j), c, -mh)); });
    }
  }
}

// Below this many log2 units above a row's frame a tile's weights are taken in that frame
// (online_rows_ahead): each weight at most 2^kAheadSlack.
constexpr float kAheadSlack = 8.f;

// online_rows with the tile's weights taken before its maxima are known, so that the exponentials
// need not wait for them: l is kept in a per-row frame f (a float; l = sum of exp2(x c - f)) that
// stays put while the tile maxima stay within kAheadSlack of it. The caller passes the tile's
// weight sums in frame f (lt: tile_weight_sum of exp2(fma(x, c, -f)), taken before tmax) and its
// maxima. Where some row of the warp gets its first key, would pass the slack or the frame bound,
// or the warp is in the true frame, the whole warp takes online_rows instead (its sums first
// moved to frame fl(m c) unless in the true frame), and lt is dropped. row_sums_true_ahead ends a unit.
template <int R, int N, class X>
__device__ __forceinline__ void online_rows_ahead(float (&m)[R], float (&l)[R], float (&f)[R], bool& exact, X&& x,
                                                  const float (&tmax)[R], const float (&lt)[R], float c) {
  // lt is used only where no row is slow; without this the compiler would sink its exponentials
  // into that branch, behind the vote on the maxima, which is what taking them ahead avoids.
#pragma unroll
  for (int ri = 0; ri < R; ++ri) asm volatile("" ::"f"(lt[ri]));
  bool slow = exact;
#pragma unroll
  for (int ri = 0; ri < R; ++ri)
    slow |= (m[ri] == -INFINITY && tmax[ri] != -INFINITY) || !(fmaf(tmax[ri], c, -f[ri]) <= kAheadSlack) ||
            past_frame_bound(fmaxf(m[ri], tmax[ri]), c);
  if (__any_sync(0xffffffffu, slow)) {
    if (!exact) {
#pragma unroll
      for (int ri = 0; ri < R; ++ri)
        if (m[ri] != -INFINITY) l[ri] *= exp2f(__fsub_rn(f[ri], row_frame(m[ri], c)));
    }
    online_rows<R, N>(m, l, exact, x, tmax, c);
#pragma unroll
    for (int ri = 0; ri < R; ++ri) f[ri] = row_frame(m[ri], c);
  } else {
#pragma unroll
    for (int ri = 0; ri < R; ++ri) {
      l[ri] += lt[ri];
      m[ri] = fmaxf(m[ri], tmax[ri]);
    }
  }
}

// The rows' sums of online_rows_ahead in the true frame, sum of exp2((x - m) c), at the end of a unit.
template <int R>
__device__ __forceinline__ void row_sums_true_ahead(const float (&m)[R], float (&l)[R], const float (&f)[R], bool exact,
                                                    float c) {
  if (exact) return;
#pragma unroll
  for (int ri = 0; ri < R; ++ri)
    if (m[ri] != -INFINITY) l[ri] *= exp2f(fmaf(-m[ri], c, f[ri]));
}

// online_rows with the tile maxima taken here.
template <int R, int N, class X>
__device__ __forceinline__ void online_rows_tile(float (&m)[R], float (&l)[R], bool& exact, X&& x, float c) {
  float tmax[R];
#pragma unroll
  for (int ri = 0; ri < R; ++ri) {
    tmax[ri] = -INFINITY;
#pragma unroll
    for (int j = 0; j < N; ++j) tmax[ri] = fmaxf(tmax[ri], x(ri, j));
  }
  online_rows<R, N>(m, l, exact, x, tmax, c);
}

// The rows' sums in the true frame, sum of exp2((x - m) c), at the end of a unit.
template <int R>
__device__ __forceinline__ void row_sums_true(const float (&m)[R], float (&l)[R], bool exact, float c) {
  if (exact) return;
#pragma unroll
  for (int ri = 0; ri < R; ++ri)
    if (m[ri] != -INFINITY) l[ri] *= frame_to_true(m[ri], c);
}

// The max over the four lanes (a quad) that share a row.
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

// A row's final statistics: its quad's (max, sum) merged; lane t4 == 0 stores the max, log2 of the sum and
// the row's last key block (from lim, its last kept key; -1: no key) for CTA row r.
__device__ __forceinline__ void store_row_stats(float m, float l, int lim, int r, int t4, const ProxyScoresParams& p, float c,
                                       float* s_m, float* s_lg, int* s_nlim) {
#pragma unroll
  for (int o = 1; o < 4; o <<= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
    const float l2 = __shfl_xor_sync(0xffffffffu, l, o);
    merge_scaled(m, l, m2, l2, c);
  }
  if (t4 == 0) {
    const bool on = lim >= 0 && l > 0.f;
    s_m[r] = on ? m : 0.f;
    s_lg[r] = on ? log2f(l) : 0.f;
    s_nlim[r] = on ? static_cast<int>(static_cast<int64_t>(lim) * p.stride / p.block_size) : -1;
  }
}

}  // namespace scores
}  // namespace proxyattn
