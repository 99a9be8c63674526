// Device-side reading of a block-sparse attention selection (docs/design.md section 2, stage 4): the
// clamped count of one (b, h, m), its index row (int16 or int32 entries, any stride), and the test
// that makes the row a set.
//
// Both kernel families walk a row from ordinal count - 1 down to 0 (the causal diagonal first for
// the ascending rows select_blocks writes) and take an entry only when it lies in [0, nkb), its
// block holds a key some row of the query block may see, and no entry at a higher ordinal holds
// the same value. The last test is free on the normal path: with `lo` the smallest block taken so
// far, an entry below lo cannot repeat one (every taken value is >= lo, and an equal entry at a
// higher ordinal would have been valid and visible, hence taken). An ascending row walks strictly
// downwards, so only unsorted or repeated entries (>= lo) scan the entries already walked.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/common/bsa_params.h"

namespace proxyattn {

// One index row of the selection. Exactly one of p32 / p16 is set (from BsaParams::indices /
// indices16); the branch on it is uniform over the CTA. stride: elements between consecutive
// entries.
struct BsaIndexRow {
  const int* p32;
  const int16_t* p16;
  int64_t stride;

  // Entry e of the row (sign-extended from int16 when p16 is set).
  __device__ __forceinline__ int load(int e) const {
    const int64_t off = int64_t(e) * stride;
    return p16 != nullptr ? static_cast<int>(__ldg(p16 + off)) : __ldg(p32 + off);
  }
};

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

// Whether block `blk` (in range and visible), read at ordinal `ord` of a row walked downwards from
// ordinal count - 1, repeats an entry of a higher ordinal; lo: the smallest block taken so far
// (INT_MAX before the first). The caller takes blk when this is false and then sets lo = min(lo, blk).
__device__ __forceinline__ bool bsa_block_repeats(const BsaIndexRow& row, int ord, int count, int blk, int lo) {
  if (blk < lo) return false;
  for (int e = ord + 1; e < count; ++e) {
    if (row.load(e) == blk) return true;
  }
  return false;
}

}  // namespace proxyattn
