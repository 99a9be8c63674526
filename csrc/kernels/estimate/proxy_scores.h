// Stage 1 of docs/design.md section 2 (proxy_block_scores): per proxy group j, pooled heads
// qbar_j (mean of the group's query heads) and kbar_j (mean of its distinct KV heads); kept
// queries are those whose absolute position Nk - Nq + i is a multiple of the stride s, kept
// keys those with t % s == 0; each kept query takes a softmax (scale sm) over the kept keys
// it may see (causal, bottom-right) and A[b, j, m, n] = max of p_i[t] over kept queries of
// query block m and kept keys of key block n (0 where there is no kept pair).
// Inputs q [B, Nq, Hq, D] / k [B, Nk, Hkv, D] (or varlen [total, H, D]) fp16/bf16, any
// row/head/batch strides (multiples of 8 elements), last dim contiguous. Output fp32
// [B, G, nqb, nkb] contiguous, every element written.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/estimate/estimate_inputs.h"

namespace proxyattn {

struct ProxyScoresParams : EstimateInputs {
  int num_groups;
  int nqb, nkb, block_size, stride;
  float softmax_scale;
  bool causal;
  bool portable;    // the mma.sync kernel even where the Hopper one applies (comparisons, tests)
  float* scores;    // [B, G, nqb, nkb]
  void* workspace;  // proxy_scores_workspace_bytes(*this) bytes, 256-byte aligned
};

// Upper bounds of the kept rows per sequence (queries and keys alike).
inline int64_t proxy_scores_kept_rows(int max_seqlen, int stride) {
  return max_seqlen <= 0 ? 0 : (static_cast<int64_t>(max_seqlen) + stride - 1) / stride;
}

// Workspace of run_proxy_scores for these params (every field but scores / workspace set):
// pooled q and k as 16-bit rows [B, G, kept rows, D] (with G > Hkv the keys of a KV head's groups
// mostly in its first group's rows), one flag per (b, group) (fp16 or bf16), a work counter, and
// the per-row block-max scratch of the persistent scores kernel: (resident CTAs)
// x nkb x (CTA rows) fp32, the mma.sync kernel 256 rows (1 KiB per key block per resident CTA, ~2
// per SM: 270 MB at nkb = 1024, i.e. 128k tokens on 132 SMs, 2.2 GB at 1M), the Hopper kernel 128
// rows (half that). Queries the current device (arch, SM count, occupancy); no synchronisation.
int64_t proxy_scores_workspace_bytes(const ProxyScoresParams& p);

template <typename T>
cudaError_t run_proxy_scores(const ProxyScoresParams& p, cudaStream_t stream);

}  // namespace proxyattn
