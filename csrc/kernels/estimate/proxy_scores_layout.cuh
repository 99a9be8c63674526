// Stage 1 (proxy_block_scores): the constants, the kept-row arithmetic, the mapping of query
// blocks onto a CTA's warps and the workspace layout shared by the pool and scores kernels and
// their launcher (proxy_scores.cu, which describes the algorithm). Workspace: the pooled queries
// and keys [B, G, kept rows, D] as 16-bit values (fp16, or bf16 for a (b, group) whose pooled values
// do not fit fp16; with G > Hkv a group's key rows are written only where no other group's can stand
// in for them, key_sharing), a flag per (b, group) saying which, the unit counter and the per-CTA
// scratch of block maxima.
#pragma once

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
  return n > first ? ceil_div32(n - first, s) : 0;
}

// Groups that share one pooled key row set: with G > Hkv a group's keys are its KV head alone, the
// same for the G / Hkv groups inside that head, so the pool kernel writes them once, into the slot
// of the head's first group (its "key group"); else every group has its own (1).
__host__ __device__ inline int key_sharing(const ProxyScoresParams& p) {
  return p.num_groups > p.num_kv_heads ? p.num_groups / p.num_kv_heads : 1;
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
  const int rows = ceil_div32(S, s);  // kept queries of a block, at most
  g.upb = ceil_div32(rows, kWarpRows);
  g.bpc = kScoreWarps / g.upb;
  g.nmb = ceil_div32(nqb, g.bpc);
  g.aligned = S % s == 0 && (S / s) % 8 == 0;
  return g;
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
