// The walk over the key tiles of one index row in the portable kernel: ordinals count - 1 down to
// 0 (the causal diagonal first for ascending rows), each taken block as kSub tiles of kBlockN keys
// from the highest. A block is taken when it lies in [0, nkb), holds a key some row of the query
// block may see (it starts at or before max_key) and no higher ordinal holds the same value (the
// row read as a set, kernels/common/bsa_selection.cuh); tiles of it that start past max_key are
// skipped. Uniform over the CTA. The next raw entry is loaded one block ahead to keep its latency
// off the critical path.
#pragma once

#include <climits>

#include "kernels/common/bsa_selection.cuh"

namespace proxyattn {
namespace bsa_sm80 {

template <int kSub, int kBlockN>
struct TileCursor {
  BsaIndexRow row;  // int16 or int32 entries
  int count;     // entries [0, count) of the row are read (clamped count)
  int ord;       // ordinal of the current block in the row
  int sub;       // current tile inside the block
  int blk;       // current block
  int next_raw;  // idx[ord - 1], or -1
  int lo;        // smallest block taken so far (INT_MAX before the first)
  int nkb;
  int max_key;

  __device__ __forceinline__ TileCursor(const BsaIndexRow& row_, int count_, int nkb_, int max_key_)
      : row(row_), count(count_), ord(count_), sub(0), blk(-1), lo(INT_MAX), nkb(nkb_), max_key(max_key_) {
    next_raw = count_ > 0 ? row.load(count_ - 1) : -1;
  }

  // Moves to the next valid tile; false when the row is exhausted.
  __device__ __forceinline__ bool advance() {
    while (true) {
      if (sub > 0) {
        --sub;
      } else {
        if (ord <= 0) return false;
        --ord;
        blk = next_raw;
        next_raw = ord > 0 ? row.load(ord - 1) : -1;
        // sub stays 0 on a skipped entry: the next turn takes the next one.
        if (blk < 0 || blk >= nkb || blk * (kSub * kBlockN) > max_key) continue;
        if (bsa_block_repeats(row, ord, count, blk, lo)) continue;
        lo = min(lo, blk);
        sub = kSub - 1;
      }
      if (tile() * kBlockN <= max_key) return true;
    }
  }

  __device__ __forceinline__ int tile() const { return blk * kSub + sub; }
};

}  // namespace bsa_sm80
}  // namespace proxyattn
