// Plain-data parameters of the block-sparse attention forward (DESIGN.md section 2, stage 4).
//
// out[b, i, h, :] = softmax_j(scale * q[b, i, h, :] . k[b, j, kvh, :]) @ v[b, j, kvh, :] over the keys j
// of the selected key blocks indices[b, h, m, 0 .. counts[b, h, m]) of the row's query block
// m = i / block_size that row i may see (causal: j <= seqlen_k - seqlen_q + i), kvh = h / (q_heads /
// kv_heads). lse[b, h, i] = natural-log sum of exp of those scaled scores (-inf, and out 0, when the
// row sees no key).
//
// Layouts (element strides, last dimension of q/k/v/out contiguous):
//   fixed length  q/out [B, Nq, Hq, D], k/v [B, Nk, Hkv, D]: address = b*batch_stride + row*row_stride
//                 + h*head_stride; lse [B, Hq, Nq] at b*lse_batch_stride + h*lse_head_stride + row.
//   varlen        q/out [total_q, Hq, D], k/v [total_k, Hkv, D], cu_seqlens_q/k int32 [B + 1] on the
//                 device: sequence b holds rows [cu[b], cu[b+1]); batch strides are ignored; lse
//                 [Hq, total_q] at h*lse_head_stride + cu_seqlens_q[b] + row.
//   counts        int32 [B, Hq, num_q_blocks]; indices int16 or int32 [B, Hq, num_q_blocks,
//                 num_k_blocks] (num_k_blocks = index row length K), any strides; exactly one of
//                 BsaParams::indices (int32) and BsaParams::indices16 (int16, what select_blocks
//                 writes) is set. Entries past counts, and entries outside
//                 [0, ceil(seqlen_k_b / block_size)), are ignored.
//
// Used by the torch glue (csrc/ops/bsa_op.cpp), by the Hopper kernel and by the standalone C++
// benchmark; keep it free of torch and CuTe.
#pragma once

#include <cstdint>

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

  // Block selection (device), see the layout comment above.
  const int* counts = nullptr;
  int64_t counts_batch_stride = 0, counts_head_stride = 0, counts_block_stride = 0;
  // Exactly one of indices (int32) and indices16 (int16) is non-null; the strides below are in
  // elements of whichever is set. Read through BsaIndexRow (bsa_index_row below).
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

  // Work order of the CTAs (set by the launchers, see bsa_tile below): 0 = all query heads of a
  // query block side by side; n > 0 = sections of n KV heads, each finished before the next.
  int kv_section = 0;

  // Optional device workspace of batch * q_heads * num_q_blocks int32 (bsa_tile_order_size in
  // kernels/bsa_launch.h), or nullptr. When set and run_bsa_fwd sorts (bsa_sort_tiles), it first
  // writes there, per segment of the order above (a section of KV heads of one batch item, or the
  // whole grid with kv_section 0), the segment's work items by descending selected-block count,
  // and CTA i (the persistent sm90 kernel: position i, bsa_order_work) then runs item tile_order[i]
  // (bsa_cta_work). nullptr or no sort: CTA (position) i runs item i.
  int* tile_order = nullptr;

  // Device int32 that is zero when the kernel starts, needed by the persistent sm90 kernel
  // (bsa_needs_tile_counter in kernels/bsa_launch.h): its CTAs take work items i = gridDim.x +
  // atomicAdd(tile_counter, 1) after their first one (blockIdx.x), in the order above.
  int* tile_counter = nullptr;
};

struct BsaTile {
  int b, h, m;
};

// The work item of CTA `tile` in [0, batch * q_heads * num_q_blocks). Heaviest query blocks
// first in both orders (causal rows grow with m).
//   kv_section == 0: heads fastest, then batch items, then query blocks from the last one down.
//   kv_section == n: per batch item, sections of n KV heads (the last may be smaller); inside a
//     section the query blocks from the last one down, the section's query heads fastest. The
//     CTAs resident at one time then read the K/V of few KV heads, which stay in L2.
PROXYATTN_HOST_DEVICE inline BsaTile bsa_tile(int tile, const BsaParams& p) {
  const int nqb = p.num_q_blocks;
  if (p.kv_section <= 0) {
    const int rest = tile / p.q_heads;
    return {rest % p.batch, tile % p.q_heads, nqb - 1 - rest / p.batch};
  }
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

// One index row of the selection, read on the device. Exactly one of p32 / p16 is set (from
// BsaParams::indices / indices16); the branch on it is uniform over the CTA. stride: elements
// between consecutive entries.
struct BsaIndexRow {
  const int* p32;
  const int16_t* p16;
  int64_t stride;
#if defined(__CUDACC__)
  // Entry e of the row (sign-extended from int16 when p16 is set).
  __device__ __forceinline__ int load(int e) const {
    const int64_t off = int64_t(e) * stride;
    return p16 != nullptr ? static_cast<int>(__ldg(p16 + off)) : __ldg(p32 + off);
  }
#endif
};

#if defined(__CUDACC__)
// The work item (bsa_tile's argument) of this CTA.
__device__ __forceinline__ int bsa_cta_work(const BsaParams& p) {
  return p.tile_order != nullptr ? __ldg(p.tile_order + blockIdx.x) : int(blockIdx.x);
}

// The work item of position i of the order (persistent kernels: positions taken from a counter).
__device__ __forceinline__ int bsa_order_work(const BsaParams& p, int i) {
  return p.tile_order != nullptr ? __ldg(p.tile_order + i) : i;
}

// Selected-block count of (b, h, m), clamped into [0, num_k_blocks]; 0 when no row of the query
// block sees a key (max_key < 0).
__device__ __forceinline__ int bsa_row_count(const BsaParams& p, int b, int h, int m, int max_key) {
  const int count = p.counts[b * p.counts_batch_stride + h * p.counts_head_stride + m * p.counts_block_stride];
  return max_key < 0 ? 0 : min(max(count, 0), p.num_k_blocks);
}

// The index row of (batch b, query head h, query block m).
__device__ __forceinline__ BsaIndexRow bsa_index_row(const BsaParams& p, int b, int h, int m) {
  const int64_t off = b * p.indices_batch_stride + h * p.indices_head_stride + m * p.indices_block_stride;
  if (p.indices16 != nullptr) return {nullptr, p.indices16 + off, p.indices_entry_stride};
  return {p.indices + off, nullptr, p.indices_entry_stride};
}
#endif

}  // namespace proxyattn
