// Stage 1 (proxy_block_scores): the constants, the kept-row arithmetic, the mapping of query
// blocks onto a CTA's warps and the workspace layout shared by the pool and scores kernels and
// their launcher (proxy_scores.cu, which describes the algorithm). Workspace: the pooled queries
// and keys [B, G, kept rows, D] as 16-bit values (fp16, or bf16 for a (b, group) whose pooled values
// do not fit fp16), a flag per (b, group) saying which, the unit counter and the per-CTA scratch of
// block maxima.
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/estimate/estimate_common.cuh"
#include "kernels/estimate/proxy_scores.h"

namespace proxyattn {
namespace scores {

constexpr int kPoolWarps = 8;
constexpr int kScoreWarps = 8;
constexpr int kScoreThreads = kScoreWarps * 32;
constexpr int kWarpRows = 32;                      // query rows per warp: two m16 tiles share each key fragment
constexpr int kCtaRows = kScoreWarps * kWarpRows;  // query rows a CTA holds = scratch rows per slot
constexpr int kKeyTile = 64;

__device__ inline int kept_query_offset(int nq, int nk, int s) {
  return static_cast<int>(floor_mod64(-(static_cast<int64_t>(nk) - nq), s));
}
__device__ inline int kept_count(int n, int first, int s) {
  return n > first ? static_cast<int>((static_cast<int64_t>(n) - first + s - 1) / s) : 0;
}

// How query blocks map onto the 8 warps of a CTA (host and device).
struct ScoreGeometry {
  int upb;       // warps (32-row slices) per query block
  int bpc;       // query blocks per unit
  int nmb;       // units per (b, group)
  bool aligned;  // S % s == 0 and (S / s) % 8 == 0
};
__host__ __device__ inline ScoreGeometry score_geometry(int S, int s, int nqb) {
  ScoreGeometry g;
  const int rows = static_cast<int>((static_cast<int64_t>(S) + s - 1) / s);  // kept queries of a block, at most
  g.upb = (rows + kWarpRows - 1) / kWarpRows;
  g.bpc = kScoreWarps / g.upb;
  g.nmb = (nqb + g.bpc - 1) / g.bpc;
  g.aligned = S % s == 0 && (S / s) % 8 == 0;
  return g;
}

// Merge two (max, sum) pairs of an online softmax of raw logits x with weights exp2((x - max) * c).
__device__ inline void merge_scaled(float& m, float& l, float m2, float l2, float c) {
  const float mn = fmaxf(m, m2);
  if (mn == -INFINITY) return;
  l = l * exp2f((m - mn) * c) + l2 * exp2f((m2 - mn) * c);
  m = mn;
}

// The last kept key that kept query jrow (sequence offset off = Nk - Nq, first kept query i0) may
// see, -1 when the row is not valid or sees nothing; nkk kept keys.
__device__ inline int kept_row_limit(bool valid, bool causal, int off, int i0, int jrow, int s, int nkk) {
  if (!valid) return -1;
  if (!causal) return nkk - 1;
  const int64_t pos = static_cast<int64_t>(off) + i0 + static_cast<int64_t>(jrow) * s;
  return pos < 0 ? -1 : static_cast<int>(min(pos / s, static_cast<int64_t>(nkk - 1)));
}

// The end of a unit of either scores kernel: A[b, group, m, :] for the unit's query blocks
// mb * bpc + [0, bpc), every element. Block bl's rows are CTA rows bl * rows_blk + [0, rows_blk);
// row r has the final max s_m[r], 1 / sum s_inv[r] and last key block s_nlim[r] (-1: no row), and
// its max logit over key block n at scratch[n * cta_rows + r] for n <= s_nlim[r] (later entries are
// stale and not read). s_blk_nmax[bl]: the largest s_nlim of block bl. Everything is visible to the
// CTA; the caller synchronises before reusing any of it.
template <int kThreads, bool kAligned>
__device__ inline void write_unit_scores(const ProxyScoresParams& p, float c, const float* scratch, int cta_rows,
                                         int rows_blk, int bpc, int mb, int64_t bgrow, const float* s_m,
                                         const float* s_inv, const int* s_nlim, const int* s_blk_nmax) {
  const int S = p.block_size, s = p.stride;
  float* A0 = p.scores + bgrow * p.nqb * p.nkb;
  for (int idx = threadIdx.x; idx < bpc * p.nkb; idx += kThreads) {
    const int bl = idx / p.nkb, n = idx - bl * p.nkb;
    const int mm = mb * bpc + bl;
    if (mm >= p.nqb) continue;
    bool has_key = true;  // key block n holds a kept key (always when s divides S)
    if (!kAligned) {
      const int64_t f0 = ceil_div64(static_cast<int64_t>(n) * S, s), f1 = ceil_div64(static_cast<int64_t>(n + 1) * S, s);
      has_key = f0 < f1;
    }
    float v = 0.f;
    if (n <= s_blk_nmax[bl] && has_key) {
      const float* Ln = scratch + static_cast<int64_t>(n) * cta_rows + bl * rows_blk;
#pragma unroll 8
      for (int r = 0; r < rows_blk; ++r) {
        const int rr = bl * rows_blk + r;
        if (n <= s_nlim[rr]) v = fmaxf(v, exp2f((Ln[r] - s_m[rr]) * c) * s_inv[rr]);
      }
    }
    A0[static_cast<int64_t>(mm) * p.nkb + n] = v;
  }
}

// s_blk_nmax[bl] = max of s_nlim over block bl's rows, for bl < bpc (threads 0 .. bpc - 1).
__device__ inline void block_row_limits(const int* s_nlim, int* s_blk_nmax, int rows_blk, int bpc) {
  if (threadIdx.x < bpc) {
    int v = -1;
    for (int r = 0; r < rows_blk; ++r) v = max(v, s_nlim[threadIdx.x * rows_blk + r]);
    s_blk_nmax[threadIdx.x] = v;
  }
}

inline int64_t align256(int64_t x) { return (x + 255) & ~static_cast<int64_t>(255); }

// Byte offsets of the workspace parts.
struct ScoreWorkspace {
  int64_t rows_q, rows_k;
  int64_t q16, k16, flags, counter, scratch, total;
};
// slots: resident CTAs of the scores kernel, each with cta_rows scratch rows per key block.
inline ScoreWorkspace score_workspace(const ProxyScoresParams& p, int slots, int cta_rows) {
  ScoreWorkspace w;
  w.rows_q = proxy_scores_kept_rows(p.max_seqlen_q, p.stride);
  w.rows_k = proxy_scores_kept_rows(p.max_seqlen_k, p.stride);
  const int64_t bg = static_cast<int64_t>(p.batch) * p.num_groups;
  const int64_t qb = bg * w.rows_q * p.head_dim * 2, kb = bg * w.rows_k * p.head_dim * 2;
  int64_t o = 0;
  w.q16 = o, o = align256(o + qb);
  w.k16 = o, o = align256(o + kb);
  w.flags = o, o += bg * 4;
  w.counter = o = (o + 7) & ~static_cast<int64_t>(7), o = align256(o + 8);
  w.scratch = o, o += static_cast<int64_t>(slots) * p.nkb * cta_rows * 4;
  w.total = o;
  return w;
}

}  // namespace scores
}  // namespace proxyattn
