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
  const int off = ps.sb.nk - ps.sb.nq;
  int my_min = INT_MAX;
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int r = warp * 16 + g + 8 * e;
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

// Per row: the running (max, sum) over the split's keys, the max the same in the row's four
// lanes, and the running sum of the current key block in the same frame.
struct ProbeRowsState {
  float run_m[2] = {-INFINITY, -INFINITY}, run_l[2] = {0.f, 0.f}, bpart[2] = {0.f, 0.f};
};

// One tile whose first key is tile0 (sequence-local): x(e, col) is the raw logit of row e and
// column col (written back scaled by scale2 = softmax_scale * log2(e), and -inf past the row's
// limit, masked only on tiles that need it); then each row's max over the tile (four lanes) and
// the online update of (max, sum) and of the block sum. Callers skip warps without a probe row.
template <class X>
__device__ __forceinline__ void probe_tile(X&& x, int tile0, const ProbeSplit& ps, float scale2, int t4,
                                           ProbeRowsState& st) {
#pragma unroll
  for (int e = 0; e < 2; ++e)
#pragma unroll
    for (int col = 0; col < kTileCols; ++col) x(e, col) *= scale2;
  if (tile0 + kKeyTile - 1 > ps.my_min) {  // warp-uniform: only tiles with a key some row does not see
#pragma unroll
    for (int e = 0; e < 2; ++e)
#pragma unroll
      for (int col = 0; col < kTileCols; ++col)
        if (tile0 + 8 * (col >> 1) + 2 * t4 + (col & 1) > ps.lim[e]) x(e, col) = -INFINITY;
  }
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    float tmax = -INFINITY;
#pragma unroll
    for (int col = 0; col < kTileCols; ++col) tmax = fmaxf(tmax, x(e, col));
    tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
    tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 2));
    // No branch (while the max is -inf every logit and the sums are too: exp2(-inf - 0) adds 0
    // and corr is 0), so the thread's two rows interleave; the tile's sum in four chains.
    const float mn = fmaxf(st.run_m[e], tmax);
    const float base = mn == -INFINITY ? 0.f : mn;
    const float corr = exp2f(st.run_m[e] - base);
    float sum[4];
#pragma unroll
    for (int col = 0; col < kTileCols; ++col) {
      const float v = exp2f(x(e, col) - base);
      sum[col % 4] = col < 4 ? v : sum[col % 4] + v;
    }
    const float tile_sum = (sum[0] + sum[1]) + (sum[2] + sum[3]);
    st.run_l[e] = st.run_l[e] * corr + tile_sum;
    st.bpart[e] = st.bpart[e] * corr + tile_sum;
    st.run_m[e] = mn;
  }
}

// The end of key block n: each row's block sum (its four lanes added) and reference max to the
// workspace (lanes t4 == 0, probe rows r < R: also those that see no key, whose entries the
// finalize reads), and the block sums restarted.
__device__ __forceinline__ void probe_block_end(const BudgetWorkspace& ws, const ProbeSplit& ps, int nkb, int n,
                                                int warp, int g, int t4, ProbeRowsState& st) {
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    float v = st.bpart[e];
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    v += __shfl_xor_sync(0xffffffffu, v, 2);
    const int r = warp * 16 + g + 8 * e;
    if (t4 == 0 && r < ps.R) {
      const int64_t at = (ps.bh * kProbeRows + r) * nkb + n;
      ws.bsum[at] = v;
      ws.bref[at] = st.run_m[e];
    }
    st.bpart[e] = 0.f;
  }
}

// The split's (max, sum) per row: the four lanes merged, lane t4 == 0 stores.
__device__ __forceinline__ void probe_finish(float2* partial, int warp, int g, int t4, ProbeRowsState& st) {
#pragma unroll
  for (int e = 0; e < 2; ++e) {
#pragma unroll
    for (int o = 1; o < 4; o <<= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, st.run_m[e], o);
      const float l2 = __shfl_xor_sync(0xffffffffu, st.run_l[e], o);
      merge_max_sum(st.run_m[e], st.run_l[e], m2, l2);
    }
    if (t4 == 0) partial[warp * 16 + g + 8 * e] = make_float2(st.run_m[e], st.run_l[e]);
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
