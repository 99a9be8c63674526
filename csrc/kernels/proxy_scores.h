// Stage 1 of DESIGN.md section 2 (proxy_block_scores): per proxy group j, pooled heads
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

namespace proxyattn {

struct ProxyScoresParams {
  const void* q;  // fp16 / bf16
  const void* k;
  int64_t q_batch_stride, q_row_stride, q_head_stride;  // elements; batch stride 0 when varlen
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  const int* cu_seqlens_q;  // nullptr for fixed length
  const int* cu_seqlens_k;
  int64_t total_q, total_k;
  int batch, num_heads, num_kv_heads, num_groups, head_dim;
  int max_seqlen_q, max_seqlen_k;
  int nqb, nkb, block_size, stride;
  float softmax_scale;
  bool causal;
  float* scores;    // [B, G, nqb, nkb]
  void* workspace;  // proxy_scores_workspace_bytes: pooled q and k, fp16 hi/lo pairs
};

// Upper bounds of the kept rows per sequence (queries and keys alike).
inline int64_t proxy_scores_kept_rows(int max_seqlen, int stride) {
  return max_seqlen <= 0 ? 0 : (static_cast<int64_t>(max_seqlen) + stride - 1) / stride;
}

// Pooled q and k, each stored as two fp16 arrays (hi, lo) of [B, G, kept rows, D].
inline int64_t proxy_scores_workspace_bytes(int batch, int num_groups, int head_dim, int max_seqlen_q,
                                            int max_seqlen_k, int stride) {
  const int64_t rows = proxy_scores_kept_rows(max_seqlen_q, stride) + proxy_scores_kept_rows(max_seqlen_k, stride);
  return static_cast<int64_t>(batch) * num_groups * rows * head_dim * 2 * 2;
}

template <typename T>
cudaError_t run_proxy_scores(const ProxyScoresParams& p, cudaStream_t stream);

}  // namespace proxyattn
