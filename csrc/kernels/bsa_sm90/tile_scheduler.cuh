// Tile scheduler of the persistent Hopper kernel: warp 1 of the producer warpgroup.
//
// gridDim.x = min(work items, SMs x kCtasPerSm). CTA c runs position c of the work order (bsa_tile in
// kernels/common/bsa_params.h: sections of KV heads whose K/V fit in L2, heaviest query blocks
// first), then positions gridDim.x + atomicAdd(p.tile_counter, 1), each item to whichever CTA gets
// there first. For every position the warp reads the varlen offsets, the selected-block count and
// the first block the row's cursor takes (block_cursor.cuh), and posts the item into a 2-slot queue
// in shared memory (item_full / item_empty barriers), so the loader starts an item without a
// dependent global load. Items whose query block lies past their sequence's end are skipped;
// items with rows but no visible selected block never reach the consumers: this warp stores their
// zeros and lse -inf itself (epilogue.cuh). The last slot posted is a stop mark.
//
// Slot layout (int32, ItemField): kind, b, h, m, q_row0, k_row0, seqlen_q, seqlen_k, the last
// block the cursor may take, the first block taken, its ordinal (entries below it are still to
// walk), and the row's clamped count (for the cursor's repeat test).
#pragma once

#include <cmath>
#include <cstdint>

#include <cutlass/arch/barrier.h>

#include "kernels/bsa_sm90/block_cursor.cuh"
#include "kernels/bsa_sm90/epilogue.cuh"
#include "kernels/bsa_sm90/traits.cuh"
#include "kernels/bsa_sm90/utils.cuh"
#include "kernels/common/bsa_params.h"
#include "kernels/common/bsa_selection.cuh"
#include "kernels/common/seq_bounds.cuh"

namespace proxyattn {
namespace bsa_sm90 {

enum ItemField : int {
  kItemKind = 0,
  kItemB,
  kItemH,
  kItemM,
  kItemQRow0,
  kItemKRow0,
  kItemSeqlenQ,
  kItemSeqlenK,
  kItemLastBlock,
  kItemFirstBlock,
  kItemFirstOrd,
  kItemCount,
  kItemFields
};
enum ItemKind : int { kItemHasBlocks = 0, kItemStop = 1 };

template <class Traits>
__device__ __forceinline__ void run_scheduler(const KernelParams<Traits>& kp, typename Traits::SharedStorage& ss,
                                              int lane) {
  using Elem = typename Traits::Elem;
  using EmptyBarrier = cutlass::arch::ClusterBarrier;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  static_assert(kItemFields <= int(sizeof(ss.item[0]) / sizeof(int)), "item slot too small");
  const BsaParams& p = kp.p;
  const int num_items = p.batch * p.q_heads * p.num_q_blocks;  // < 2^31 (bsa_unsupported_reason)
  const bool varlen = p.cu_seqlens_q != nullptr;

  // The whole warp runs the loop (every lane computes the same item); lane 0 takes positions and
  // posts, and all lanes store the output of items without a visible block.
  uint32_t n = 0;  // slots posted
  int pos = int(blockIdx.x);
  while (true) {
    int f[kItemFields] = {kItemStop};
    int next = num_items;
    if (pos < num_items) {
      // Take the next position now; its latency overlaps the work below.
      // Unsigned: both terms are below 2^31 (the counter, zero at launch, is drawn at most
      // num_items + 2 x gridDim.x times), so the sum cannot wrap.
      int got = 0;
      if (lane == 0) got = atomicAdd(p.tile_counter, 1);
      const uint32_t nx = gridDim.x + uint32_t(__shfl_sync(0xffffffffu, got, 0));
      next = nx < uint32_t(num_items) ? int(nx) : num_items;
      const BsaTile tile = bsa_tile(pos, p);
      const SeqBounds sb = load_seq_bounds(p.cu_seqlens_q, p.cu_seqlens_k, tile.b, p.seqlen_q, p.seqlen_k,
                                           p.total_q, p.total_k);
      const int64_t q_row0 = sb.q_start, k_row0 = sb.k_start;
      const int seqlen_q = sb.nq, seqlen_k = sb.nk;
      const int q_start = tile.m * kBlockM;
      const int q_rows = min(kBlockM, seqlen_q - q_start);
      int count = 0, last_blk = -1;
      if (q_rows > 0) {
        // The last key some row of the item may see; blocks above last_blk hold none of its keys.
        int max_key = seqlen_k - 1;
        if (p.causal) max_key = min(max_key, seqlen_k - seqlen_q + q_start + q_rows - 1);
        count = bsa_row_count(p, tile.b, tile.h, tile.m, max_key);
        last_blk = max_key >= 0 ? max_key / kBlockN : -1;  // <= nkb - 1 as max_key < seqlen_k
      }
      BlockCursor cursor(bsa_index_row(p, tile.b, tile.h, tile.m), count, last_blk);
      const bool any = cursor.advance();
      pos = next < num_items ? next : num_items;
      if (q_rows <= 0) continue;  // past the sequence's end: no rows
      if (!any) {
        Elem* o_ptr = static_cast<Elem*>(p.out) +
                      (varlen ? q_row0 * p.out_row_stride : int64_t(tile.b) * p.out_batch_stride) +
                      int64_t(q_start) * p.out_row_stride + int64_t(tile.h) * p.out_head_stride;
        float* lse_ptr = p.lse + (varlen ? q_row0 : int64_t(tile.b) * p.lse_batch_stride) +
                         int64_t(tile.h) * p.lse_head_stride + q_start;
        store_empty_item<Elem, Traits::kHeadDim>(o_ptr, lse_ptr, q_rows, p.out_row_stride, lane);
        continue;
      }
      f[kItemKind] = kItemHasBlocks;
      f[kItemB] = tile.b;
      f[kItemH] = tile.h;
      f[kItemM] = tile.m;
      f[kItemQRow0] = int(q_row0);  // row counts are below 2^31 on this path (bsa_hopper_unsupported_reason)
      f[kItemKRow0] = int(k_row0);
      f[kItemSeqlenQ] = seqlen_q;
      f[kItemSeqlenK] = seqlen_k;
      f[kItemLastBlock] = last_blk;
      f[kItemFirstBlock] = cursor.blk;
      f[kItemFirstOrd] = cursor.ord;
      f[kItemCount] = count;
    }
    const int slot = n & 1;
    EmptyBarrier::wait(&ss.item_empty[slot], ((n >> 1) & 1) ^ 1);  // fresh: parity 1 passes
    if (lane == 0) {
      compiler_fence();
      CUTE_UNROLL
      for (int i = 0; i < kItemFields; ++i) ss.item[slot][i] = f[i];
      compiler_fence();
      EmptyBarrier::arrive(&ss.item_full[slot]);
    }
    __syncwarp();
    ++n;
    if (f[kItemKind] == kItemStop) break;
  }
}

}  // namespace bsa_sm90
}  // namespace proxyattn
