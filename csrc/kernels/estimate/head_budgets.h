// Stage 2 of docs/design.md section 2 (head_budgets): per (b, query head h), probe the last
// min(S, Nq) query rows against every key of the head's KV head (unstrided, causal
// bottom-right, fp32 softmax per row), form the block masses w[n] over the c_last
// candidates (mean over rows, normalised to sum 1), and count the fewest non-forced blocks
// (descending w, after the forced blocks' mass `base`) whose cumulative mass reaches gamma.
// Inputs q [B, Nq, Hq, D] / k [B, Nk, Hkv, D] (or varlen [total, H, D]) fp16/bf16 with
// any row/head/batch strides (multiples of 8 elements, last dim contiguous). Output
// kstar int32 [B, Hq]. Two kernels: one pass over split keys (row statistics and per-row
// block sums), then one CTA per head merges, forms the block masses, sorts and counts.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/estimate/estimate_inputs.h"

namespace proxyattn {

constexpr int kProbeRows = 128;       // >= block size: one CTA holds every probe row
constexpr int kProbeSplitKeys = 2048;  // keys per CTA of the probe (a multiple of the block size)
static_assert((kProbeSplitKeys & (kProbeSplitKeys - 1)) == 0,
              "a power of two, so every block size dividing it (run_head_budgets checks) is one too");
constexpr int kBudgetMaxBlocks = 32768;

struct HeadBudgetsParams : EstimateInputs {
  int nkb, block_size;
  float gamma;
  int sink_blocks, local_blocks;
  float softmax_scale;
  bool causal;
  bool portable;  // the mma.sync probe even where the Hopper one applies (comparisons, tests)
  int* kstar;     // [B, Hq]
  // Workspace (fp32), see head_budgets_workspace_floats.
  float* workspace;
};

inline int head_budgets_num_splits(int max_seqlen_k) {
  return max_seqlen_k <= 0 ? 1 : (max_seqlen_k + kProbeSplitKeys - 1) / kProbeSplitKeys;
}

// Partial (max, sum) per split and row [B*Hq][splits][kProbeRows] (float2); per row and key
// block the block's sum of exp2(x - ref) and its reference max ref, [B*Hq][kProbeRows][nkb]
// each; block masses [B*Hq][nkb]. O(Hq * N) floats: 4 * Hq * N * 128 / S bytes per array.
inline int64_t head_budgets_workspace_floats(int batch, int num_heads, int max_seqlen_k, int nkb) {
  const int64_t bh = static_cast<int64_t>(batch) * num_heads;
  return bh * (2LL * kProbeRows * head_budgets_num_splits(max_seqlen_k) + (2LL * kProbeRows + 1) * nkb);
}

// Dynamic shared memory of the finalize kernel: the block masses of a head, one float per key block
// for the power of two of blocks its sort spans (131072 bytes at kBudgetMaxBlocks; the op checks
// the device's limit).
inline size_t head_budgets_finalize_smem_bytes(int nkb) {
  size_t pw = 1;
  while (pw < static_cast<size_t>(nkb)) pw <<= 1;
  return pw * sizeof(float);
}

template <typename T>
cudaError_t run_head_budgets(const HeadBudgetsParams& p, cudaStream_t stream);

}  // namespace proxyattn
