// Stage 2 (head_budgets): what the two probe kernels share (head_budgets.cu describes the
// algorithm): the workspace layout, the probe rows of a CTA, and the per-row work on one 64-key
// tile of logits, whichever instruction computed them (mma.sync in probe_kernel, wgmma in
// probe_sm90_kernel, head_budgets_sm90.cuh). A CTA holds the kProbeRows probe rows of one
// (b, head) as 8 warps of 16 rows; a thread holds rows 16 warp + g and 16 warp + g + 8 (g = lane / 4)
// and, of each 8-key group of a tile, keys 2 t4 and 2 t4 + 1 (t4 = lane % 4): its column `col`
// (0 .. 15) is key 8 (col / 2) + 2 t4 + col % 2 of the tile, the layout of both instructions'
// accumulators.
#pragma once

#include <climits>
#include <cmath>
#include <cstdint>

#include "kernels/estimate/estimate_common.cuh"
#include "kernels/estimate/head_budgets.h"

namespace proxyattn {
namespace budgets {

constexpr int kProbeWarps = kProbeRows / 16;
constexpr int kProbeThreads = kProbeWarps * 32;
constexpr int kKeyTile = 64;
constexpr int kTileCols = kKeyTile / 4;  // a thread's columns per row and tile
static_assert(kTileCols % 4 == 0, "four sum chains per row and tile");

// Workspace parts (see head_budgets_workspace_floats).
struct BudgetWorkspace {
  float2* partial;  // [B*Hq][splits][kProbeRows]
  float* bsum;      // [B*Hq][kProbeRows][nkb]
  float* bref;      // [B*Hq][kProbeRows][nkb]
  float* mass;      // [B*Hq][nkb]
};
__host__ __device__ inline BudgetWorkspace budget_workspace(const HeadBudgetsParams& p, int num_splits) {
  const int64_t bhs = static_cast<int64_t>(p.batch) * p.num_heads;
  BudgetWorkspace w;
  w.partial = reinterpret_cast<float2*>(p.workspace);
  w.bsum = p.workspace + bhs * num_splits * kProbeRows * 2;
  w.bref = w.bsum + bhs * kProbeRows * p.nkb;
  w.mass = w.bref + bhs * kProbeRows * p.nkb;
  return w;
}

// The split of one probe CTA (blockIdx = (split, head, batch)) and this thread's two rows.
struct ProbeSplit {
  SeqBounds sb;
  int R;       // probe rows: the last min(S, Nq) query rows, sequence-local [Nq - R, Nq)
  int k0, k1;  // keys of the split, sequence-local [k0, k1)
  int hk;      // the head's KV head
  int block_shift;  // log2 of the block size S (64 or 128: it divides kProbeSplitKeys, a power of two)
  int64_t row_at[2];  // workspace offset of row e's per-block entries, (bh * kProbeRows + r) * nkb
  int lim[2];  // last key row e sees (sequence-local), -1 when it sees nothing or is padding
  int my_min;  // the smallest lim of a valid row of the warp (INT_MAX when none)
  int64_t bh;
  bool empty;  // no probe row or no key: the split's partials are (-inf, 0)
};
__device__ inline ProbeSplit probe_split(const HeadBudgetsParams& p, int warp, int g) {
  ProbeSplit ps;
  const int sp = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  ps.bh = static_cast<int64_t>(b) * p.num_heads + h;
  ps.sb = load_seq_bounds(p.cu_seqlens_q, p.cu_seqlens_k, b, p.max_seqlen_q, p.max_seqlen_k, p.total_q, p.total_k);
  ps.R = min(p.block_size, ps.sb.nq);
  ps.k0 = sp * kProbeSplitKeys;
  ps.k1 = min(ps.k0 + kProbeSplitKeys, ps.sb.nk);
  ps.empty = ps.R == 0 || ps.k0 >= ps.k1;
  ps.hk = h / (p.num_heads / p.num_kv_heads);
  ps.block_shift = 31 - __clz(p.block_size);
  const int off = ps.sb.nk - ps.sb.nq;
  int my_min = INT_MAX;
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int r = warp * 16 + g + 8 * e;
    ps.row_at[e] = (ps.bh * kProbeRows + r) * p.nkb;
    const bool valid = r < ps.R;
    const int pos = off + (ps.sb.nq - ps.R + r);
    ps.lim[e] = !valid ? -1 : (p.causal ? min(pos, ps.sb.nk - 1) : ps.sb.nk - 1);
    if (valid) my_min = min(my_min, ps.lim[e]);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) my_min = min(my_min, __shfl_xor_sync(0xffffffffu, my_min, o));
  ps.my_min = my_min;
  return ps;
}

// This split's row partials [kProbeRows] in the workspace; an empty split's are written here,
// (-inf, 0), and its CTA has nothing else to do.
__device__ inline float2* probe_partials(const BudgetWorkspace& ws, const ProbeSplit& ps) {
  float2* partial = ws.partial + (ps.bh * gridDim.x + blockIdx.x) * kProbeRows;
  if (ps.empty)
    for (int r = threadIdx.x; r < kProbeRows; r += blockDim.x) partial[r] = make_float2(-INFINITY, 0.f);
  return partial;
}

// Per row: the running max of the raw logits over the split's keys (the same in the row's four
// lanes) and, for the weights exp2((x - max) * scale2), the running sum and the current key block's
// sum. The sums are kept in one of two frames, the same for the whole warp (`exact`): normally
// frame fl(max * scale2) (row_frame), where each weight is one FFMA before the exponential and the
// factor to the true frame (frame_to_true) is applied when a block's sum or the split's leave the
// CTA; once some row of the warp reaches |fl(max * scale2)| >= kFrameBound (a huge scale: its
// argmax limit), the true frame for the rest of the split.
struct ProbeRowsState {
  float run_m[2] = {-INFINITY, -INFINITY}, run_l[2] = {0.f, 0.f}, bpart[2] = {0.f, 0.f};
  bool exact = false;
};

// One tile whose first key is tile0 (sequence-local): x(e, col) is the raw logit of row e and
// column col (-inf past the row's limit, masked only on tiles that need it); then each row's max
// over the tile (four lanes) and the online update of (max, sum) and of the block sum, scale2 =
// softmax_scale * log2(e) in [FLT_MIN, FLT_MAX] (the host clamps the scale). No branch around a
// row's exponentials (while the max is -inf every logit and the sums are too), so the thread's two
// rows interleave; each tile sum in four chains. Callers skip warps without a probe row (the rest
// are converged: a warp vote).
template <class X>
__device__ __forceinline__ void probe_tile(X&& x, int tile0, const ProbeSplit& ps, float scale2, int t4,
                                           ProbeRowsState& st) {
  if (tile0 + kKeyTile - 1 > ps.my_min) {  // warp-uniform: only tiles with a key some row does not see
#pragma unroll
    for (int e = 0; e < 2; ++e)
#pragma unroll
      for (int col = 0; col < kTileCols; ++col)
        if (tile0 + 8 * (col >> 1) + 2 * t4 + (col & 1) > ps.lim[e]) x(e, col) = -INFINITY;
  }
  float mn[2];
  bool big = false;
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    float tmax = -INFINITY;
#pragma unroll
    for (int col = 0; col < kTileCols; ++col) tmax = fmaxf(tmax, x(e, col));
    tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
    tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 2));
    mn[e] = fmaxf(st.run_m[e], tmax);
    big |= past_frame_bound(mn[e], scale2);
  }
  if (!st.exact && __any_sync(0xffffffffu, big)) {  // to the true frame, from the old maxima's
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const float f = st.run_m[e] == -INFINITY ? 1.f : frame_to_true(st.run_m[e], scale2);
      st.run_l[e] *= f;
      st.bpart[e] *= f;
    }
    st.exact = true;
  }
  float corr[2], tile_sum[2];
  if (st.exact) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const float base = mn[e] == -INFINITY ? 0.f : mn[e];
      corr[e] = exp2f((st.run_m[e] - base) * scale2);  // 0 while the max was -inf
      tile_sum[e] = tile_weight_sum<kTileCols>([&](int col) { return exp2f((x(e, col) - base) * scale2); });
    }
  } else {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const float fh = row_frame(mn[e], scale2);
      corr[e] = st.run_m[e] == -INFINITY ? 0.f : exp2f(__fsub_rn(row_frame(st.run_m[e], scale2), fh));
      tile_sum[e] = tile_weight_sum<kTileCols>([&](int col) { return exp2f(fmaf(x(e, col), scale2, -fh)); });
    }
  }
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    st.run_l[e] = st.run_l[e] * corr[e] + tile_sum[e];
    st.bpart[e] = st.bpart[e] * corr[e] + tile_sum[e];
    st.run_m[e] = mn[e];
  }
}

// Row e's sum v in the true frame of its max m (v as kept by probe_tile).
__device__ __forceinline__ float probe_true_sum(float v, float m, float scale2, const ProbeRowsState& st) {
  return st.exact || m == -INFINITY ? v : v * frame_to_true(m, scale2);
}

// Whether the 64-key tile whose first key is tile0 ends its key block.
__device__ __forceinline__ bool probe_block_ends(const ProbeSplit& ps, int tile0) {
  return ((tile0 + kKeyTile) & ((1 << ps.block_shift) - 1)) == 0;
}

// The end of key block n: each row's block sum (its four lanes added; in the true frame) and
// reference max (raw) to the workspace (lanes t4 == 0, probe rows r < R: also those that see no key,
// whose entries the finalize reads), and the block sums restarted.
__device__ __forceinline__ void probe_block_end(const BudgetWorkspace& ws, const ProbeSplit& ps, int n, int warp,
                                                int g, int t4, float scale2, ProbeRowsState& st) {
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    float v = st.bpart[e];
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    v += __shfl_xor_sync(0xffffffffu, v, 2);
    const int r = warp * 16 + g + 8 * e;
    if (t4 == 0 && r < ps.R) {
      const int64_t at = ps.row_at[e] + n;
      ws.bsum[at] = probe_true_sum(v, st.run_m[e], scale2, st);
      ws.bref[at] = st.run_m[e];
    }
    st.bpart[e] = 0.f;
  }
}

// The split's (raw max, sum) per row: in the true frame, the four lanes merged, lane t4 == 0 stores.
__device__ __forceinline__ void probe_finish(float2* partial, int warp, int g, int t4, float scale2,
                                             ProbeRowsState& st) {
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    float m = st.run_m[e], l = probe_true_sum(st.run_l[e], m, scale2, st);
#pragma unroll
    for (int o = 1; o < 4; o <<= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
      const float l2 = __shfl_xor_sync(0xffffffffu, l, o);
      merge_scaled(m, l, m2, l2, scale2);
    }
    if (t4 == 0) partial[warp * 16 + g + 8 * e] = make_float2(m, l);
  }
}

// Global address of key `key` (sequence-local) of the probe's KV head, column 0.
template <typename T>
__device__ __forceinline__ const T* probe_key_row(const HeadBudgetsParams& p, const ProbeSplit& ps, int key) {
  const T* kb = static_cast<const T*>(p.k) + blockIdx.z * p.k_batch_stride + ps.hk * p.k_head_stride;
  return kb + (p.pages.paged() ? p.pages.offset(blockIdx.z, key, p.pages.k_page_stride, p.k_row_stride)
                               : (ps.sb.k_start + key) * p.k_row_stride);
}

}  // namespace budgets
}  // namespace proxyattn
