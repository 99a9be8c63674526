// What stages 1 and 2 of the estimate both read (docs/design.md section 2): q and k (or the paged
// key cache), their strides and the sequences' bounds. ProxyScoresParams and HeadBudgetsParams
// extend it, so a caller fills it once for both stages.
#pragma once

#include <cstdint>

#include "kernels/common/kv_pages.h"

namespace proxyattn {

struct EstimateInputs {
  const void* q;  // fp16 / bf16
  const void* k;
  int64_t q_batch_stride, q_row_stride, q_head_stride;  // elements; batch stride 0 when varlen
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  const int* cu_seqlens_q;  // nullptr for fixed length
  const int* cu_seqlens_k;
  int64_t total_q, total_k;
  KvPages pages;  // paged keys (k the cache [num_pages, page_size, Hkv, D], k strides slot/head)
  int batch, num_heads, num_kv_heads, head_dim;
  int max_seqlen_q, max_seqlen_k;
};

}  // namespace proxyattn
