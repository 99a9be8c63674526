// The walk over the selected key blocks of one index row in the Hopper kernel: one 128-key tile
// per block, ordinals count - 1 down to 0 (the causal diagonal first for ascending rows), taking an
// entry only when it lies in [0, last_blk] and no higher ordinal holds the same value (the row read
// as a set, kernels/common/bsa_selection.cuh). last_blk = min(nkb - 1, max_key / 128) with max_key
// the last key some row of the query block may see: blocks above it lie past the sequence or hold
// no key the query block may see. The scheduler warp takes the first block and hands the cursor's
// state to the loader, which takes the rest; the consumers learn every block from the loader's
// stage descriptions, so all of them see one sequence.
#pragma once

#include <climits>

#include "kernels/common/bsa_selection.cuh"

namespace proxyattn {
namespace bsa_sm90 {

// fetch() loads the entry the next advance() reads, so a loop can issue that global load early
// (the loader does it while it waits for a free stage); advance() loads whatever was not fetched.
struct BlockCursor {
  BsaIndexRow row;  // int16 or int32 entries
  int ord;          // ordinal of the current block; entries [0, ord) are still to walk
  int blk;          // the current block
  int next;         // entry ord - 1, valid when fetched
  bool fetched;
  int count;        // entries [0, count) of the row are read (clamped count)
  int lo;           // smallest block taken so far (INT_MAX before the first)
  int last_blk;     // blocks above it are skipped

  __device__ __forceinline__ BlockCursor(const BsaIndexRow& row_, int count_, int last_blk_)
      : row(row_), ord(count_), blk(-1), next(-1), fetched(false), count(count_), lo(INT_MAX), last_blk(last_blk_) {}

  // Continues a walk whose first taken block, blk_ at ordinal ord_, was found by another thread.
  __device__ __forceinline__ void resume(int ord_, int blk_) {
    ord = ord_;
    blk = blk_;
    lo = blk_;
  }

  __device__ __forceinline__ void fetch() {
    if (!fetched && ord > 0) next = row.load(ord - 1);
    fetched = true;
  }

  __device__ __forceinline__ bool advance() {
    while (ord > 0) {
      blk = fetched ? next : row.load(ord - 1);
      fetched = false;
      --ord;
      if (blk < 0 || blk > last_blk) continue;
      if (bsa_block_repeats(row, ord, count, blk, lo)) continue;
      lo = min(lo, blk);
      return true;
    }
    return false;
  }
};

}  // namespace bsa_sm90
}  // namespace proxyattn
