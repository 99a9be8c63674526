// Plain-data parameters of the block-sparse attention forward (docs/design.md section 2, stage 4), and
// the order in which the kernels take their work items.
//
// out[b, i, h, :] = softmax_j(scale * q[b, i, h, :] . k[b, j, kvh, :]) @ v[b, j, kvh, :] over the keys j
// of the selected key blocks of the row's query block m = i / block_size that row i may see (causal:
// j <= seqlen_k - seqlen_q + i), kvh = h / (q_heads / kv_heads). The selected blocks are a set: the
// distinct values among indices[b, h, m, 0 .. count) (count = counts[b, h, m] clamped into
// [0, num_k_blocks]) that lie in [0, ceil(seqlen_k_b / block_size)); order and repetition do not
// matter. lse[b, h, i] = natural-log sum of exp of those scaled scores (-inf, and out 0, when the row
// sees no key).
//
// Layouts (element strides, last dimension of q/k/v/out contiguous):
//   fixed length  q/out [B, Nq, Hq, D], k/v [B, Nk, Hkv, D]: address = b*batch_stride + row*row_stride
//                 + h*head_stride; lse [B, Hq, Nq] at b*lse_batch_stride + h*lse_head_stride + row.
//   varlen        q/out [total_q, Hq, D], k/v [total_k, Hkv, D], cu_seqlens_q/k int32 [B + 1] on the
//                 device: sequence b holds rows [cu[b], cu[b+1]); batch strides are ignored; lse
//                 [Hq, total_q] at h*lse_head_stride + cu_seqlens_q[b] + row.
//   paged         q/out and lse as varlen; k/v the caches [num_pages, page_size, Hkv, D] of a serving
//                 engine, read through pages (kernels/common/kv_pages.h): k_row_stride / k_head_stride
//                 are the slot and head strides, pages.k_page_stride the page stride (v likewise);
//                 cu_seqlens_k holds the prefix sums of the key lengths, whose starts are not used.
//                 The Hopper kernel loads whole boxes (128 or 16 slots) of a page, so the slots past a
//                 sequence's last key in its last page must hold finite values (they are masked).
//   counts        int32 [B, Hq, num_q_blocks]; indices int16 or int32 [B, Hq, num_q_blocks,
//                 num_k_blocks] (num_k_blocks = index row length K), any strides; exactly one of
//                 BsaParams::indices (int32) and BsaParams::indices16 (int16, what select_blocks
//                 writes) is set. Read on the device through kernels/common/bsa_selection.cuh.
//
// Used by the torch glue (csrc/ops/bsa_op.cpp), the launchers (kernels/common/bsa_launch.h), both
// kernel families and the standalone C++ benchmark; keep it free of torch and CuTe.
#pragma once

#include <cstdint>

#include "kernels/common/kv_pages.h"

#if defined(__CUDACC__)
#define PROXYATTN_HOST_DEVICE __host__ __device__
#else
#define PROXYATTN_HOST_DEVICE
#endif

namespace proxyattn {

struct BsaParams {
  // Tensors (device pointers). q, k, v, out hold fp16 or bf16 (all the same); lse is fp32.
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;

  // Element strides. Batch strides are unused for varlen.
  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  int64_t out_batch_stride = 0, out_row_stride = 0, out_head_stride = 0;
  int64_t lse_batch_stride = 0, lse_head_stride = 0;  // row stride is 1

  // Varlen: int32 [batch + 1] prefix sums (device), else nullptr (fixed length). total_q/k are
  // the packed row counts (q.size(0), k.size(0)); the kernel clamps every sequence into them.
  const int* cu_seqlens_q = nullptr;
  const int* cu_seqlens_k = nullptr;
  int64_t total_q = 0, total_k = 0;

  // Paged K/V (page_table non-null; varlen q), see the layout comment above.
  KvPages pages;

  // Block selection (device), see the layout comment above.
  const int* counts = nullptr;
  int64_t counts_batch_stride = 0, counts_head_stride = 0, counts_block_stride = 0;
  // Exactly one of indices (int32) and indices16 (int16) is non-null; the strides below are in
  // elements of whichever is set. Read through BsaIndexRow (kernels/common/bsa_selection.cuh).
  const int* indices = nullptr;
  const int16_t* indices16 = nullptr;
  int64_t indices_batch_stride = 0, indices_head_stride = 0, indices_block_stride = 0,
          indices_entry_stride = 1;

  int batch = 0;
  int q_heads = 0;
  int kv_heads = 0;      // q_heads % kv_heads == 0; query head h reads KV head h / (q_heads / kv_heads)
  int head_dim = 0;      // 64 or 128
  int seqlen_q = 0;      // Nq (fixed) or max_seqlen_q (varlen upper bound)
  int seqlen_k = 0;      // Nk (fixed) or max_seqlen_k (varlen upper bound)
  int block_size = 0;    // S: 64 or 128; the query tile of one CTA is one query block
  int num_q_blocks = 0;  // ceil(seqlen_q / S)
  int num_k_blocks = 0;  // K, the length of one index row (usually ceil(seqlen_k / S))

  float softmax_scale = 0.f;       // > 0
  float softmax_scale_log2 = 0.f;  // softmax_scale * log2(e)
  bool causal = false;             // bottom-right aligned

  // Work order (bsa_tile below): sections of kv_section KV heads, each finished before the next.
  // Set by run_bsa_fwd from its BsaPlan (kernels/common/bsa_launch.h), always >= 1; callers leave it.
  int kv_section = 0;

  // Device int32 that is zero when the kernel starts, needed by the Hopper kernel (BsaPlan::path
  // kHopper): its CTAs take work items i = gridDim.x + atomicAdd(tile_counter, 1) after their
  // first one (blockIdx.x), in bsa_tile's order.
  int* tile_counter = nullptr;
};

struct BsaTile {
  int b, h, m;
};

// Work item `tile` in [0, batch * q_heads * num_q_blocks): per batch item, sections of kv_section
// KV heads (the last may be smaller); inside a section the query blocks from the last one down
// (causal rows grow with m: heaviest first), the section's query heads fastest. The CTAs resident
// at one time then read the K/V of few KV heads, which stay in L2. kv_section >= 1.
PROXYATTN_HOST_DEVICE inline BsaTile bsa_tile(int tile, const BsaParams& p) {
  const int nqb = p.num_q_blocks;
  const int group = p.q_heads / p.kv_heads;  // query heads per KV head
  const int per_batch = nqb * p.q_heads;
  const int b = tile / per_batch;
  const int t = tile - b * per_batch;
  const int full = nqb * p.kv_section * group;  // tiles of one full section
  const int s = t / full;
  const int kv0 = s * p.kv_section;
  const int kv_n = (p.kv_heads - kv0 < p.kv_section) ? p.kv_heads - kv0 : p.kv_section;
  const int heads = kv_n * group;
  const int r = t - s * full;
  return {b, kv0 * group + r % heads, nqb - 1 - r / heads};
}

}  // namespace proxyattn
