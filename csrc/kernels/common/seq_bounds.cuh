// Bounds of one sequence of a fixed-length or varlen batch, read on the device by every kernel
// family (estimation and attention). Fixed length: starts 0 (the batch stride addresses the
// item), lengths = max_seqlen. Varlen: starts and lengths from cu_seqlens int32 [B + 1], clamped
// so that a bad cu_seqlens value can never index outside [0, total) and no length exceeds
// max_seqlen.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace proxyattn {

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

}  // namespace proxyattn
