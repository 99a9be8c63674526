// Compile-time shape of the Hopper block-sparse attention kernel (sm_90a): tiles, warpgroups,
// shared-memory layouts, wgmma tilings, tensor-map types, and the kernel's parameters.
//
// One CTA: 384 threads, three warpgroups. Warpgroup 0 is the producer side (a loader thread and a
// scheduler warp), warpgroups 1 and 2 the consumers, each owning 64 of the 128 query rows.
// Shared memory (SW128 K-major, what TMA writes and wgmma reads): two Q buffers sQ [128, D, 2] (the
// next work item's Q loads while the current one's last tiles run), a 2-stage K/V ring sK/sV
// [128, D, 2], the per-stage descriptions the loader hands the consumers (meta), the scheduler's
// 2-slot queue of work items (item), the consumer warps' output fields per item (item_rows) and the
// mbarriers: 192 KB at D = 128, 96 KB at D = 64.
// D = 128: one CTA per SM, score tiles of a whole key block (64 x 128 per consumer warpgroup).
// D = 64: two CTAs per SM (four consumer warps per scheduler to issue from), which holds a consumer
// thread to 104 registers, so its score tiles are half key blocks (64 x 64: a stage is kSub = 2
// tiles, the consumers' views of the ring SmemLayoutKTile / SmemLayoutVtTile).
// Tensor maps: q/k/v as [rows, D, heads, batch] with the tensors' own strides (varlen: rows =
// total, batch 1, each sequence reached by a row offset).
#pragma once

#include <cstdint>
#include <utility>

#include <cute/tensor.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>

#include "kernels/bsa_sm90/utils.cuh"
#include "kernels/common/bsa_params.h"

namespace proxyattn {
namespace bsa_sm90 {

using namespace cute;

// The output rows of a consumer warp's work item, kept in shared memory while its tiles run.
struct ItemRows {
  int64_t o_off;    // element offset of the item's first output row (head h)
  int64_t lse_off;  // offset of its first lse entry
  int q_rows;       // rows of the query block inside the sequence
  int diag;         // seqlen_k - seqlen_q + q_start
  int seqlen_k;
  int pad;
};

template <typename Elem_, int kHeadDim_>
struct Sm90Traits {
  using Elem = Elem_;  // cutlass::half_t or cutlass::bfloat16_t
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 128;  // query rows per work item == block_size
  static constexpr int kBlockN = 128;  // keys per stage == block_size
  static constexpr int kStages = 2;    // K/V ring depth (a third stage measured no consistent gain)
  static constexpr int kConsumerWarpgroups = kBlockM / 64;
  static constexpr int kNThreads = 128 * (1 + kConsumerWarpgroups);
  static constexpr int kConsumerWarps = 4 * kConsumerWarpgroups;
  static constexpr int kCtasPerSm = kHeadDim == 64 ? 2 : 1;
  static constexpr int kTileN = kCtasPerSm == 2 ? 64 : kBlockN;  // keys per score tile
  static constexpr int kSub = kBlockN / kTileN;                  // score tiles per stage
  // Whether a tile's softmax runs beside the previous tile's P V wgmma (its P and O then stay held):
  // with two CTAs per SM it runs after it, the other warpgroups on the SM keeping the tensor cores busy.
  static constexpr bool kSoftmaxBesidePV = kCtasPerSm == 1;
  // setmaxnreg per thread: producer warpgroup, consumer warpgroups, within what a CTA holds from its
  // launch (65536 / (kNThreads * kCtasPerSm) per thread, in steps of 8).
  static constexpr int kProducerRegs = kCtasPerSm == 2 ? 24 : 40;
  static constexpr int kConsumerRegs = kCtasPerSm == 2 ? 104 : 232;
  static_assert(128 * (kProducerRegs + kConsumerWarpgroups * kConsumerRegs) <=
                    65536 / (kNThreads * kCtasPerSm) / 8 * 8 * kNThreads, "setmaxnreg beyond the launch's registers");

  using SmemAtom = decltype(GMMA::Layout_K_SW128_Atom<Elem>{});  // 8 x 64, 128-byte swizzle
  using SmemLayoutQ = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));  // (M, D)
  using SmemLayoutQ2 = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>, _2>{}));  // (M, D, buf)
  using SmemLayoutKV =
      decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>, Int<kStages>>{}));  // (N, D, stage)
  // V seen as the B operand of O = P V: (D, N, stage), Vt(d, n, s) = V(n, d, s) (MN-major for wgmma).
  using SmemLayoutVt = decltype(composition(
      SmemLayoutKV{},
      make_ordered_layout(Shape<Int<kHeadDim>, Int<kBlockN>, Int<kStages>>{}, Step<_2, _1, _3>{})));

  // The consumers' view of the ring: (kTileN, D, tile) with tile = stage * kSub + sub-tile, the same
  // memory as (kBlockN, D, stage) (key rows fill whole swizzle atoms, stage after stage), and V as
  // the B operand of O = P V per tile.
  using SmemLayoutKTile =
      decltype(tile_to_shape(SmemAtom{}, Shape<Int<kTileN>, Int<kHeadDim>, Int<kStages * kSub>>{}));
  using SmemLayoutVtTile = decltype(composition(
      SmemLayoutKTile{},
      make_ordered_layout(Shape<Int<kHeadDim>, Int<kTileN>, Int<kStages * kSub>>{}, Step<_2, _1, _3>{})));
  static_assert(kSub == 1 || kHeadDim == 64, "sub-tiles only where a key row is one swizzle atom wide");

  // Each consumer warpgroup computes 64 rows; the two are tiled along M.
  using TiledMmaS = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Elem, Elem, float, Shape<_64, Int<kTileN>, Int<kHeadDim>>>(),
      Layout<Shape<Int<kConsumerWarpgroups>, _1, _1>>{}));
  using TiledMmaO = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Elem, Elem, float, Shape<_64, Int<kHeadDim>, Int<kTileN>>, GMMA::Major::K,
                           GMMA::Major::MN>(),
      Layout<Shape<Int<kConsumerWarpgroups>, _1, _1>>{}));

  // Global views for the tensor maps: (rows, D, heads, batch).
  using GShape = Shape<int32_t, Int<kHeadDim>, int32_t, int32_t>;
  using GStride = Stride<int64_t, _1, int64_t, int64_t>;
  using GTensor = decltype(make_tensor(make_gmem_ptr(static_cast<Elem const*>(nullptr)), GShape{}, GStride{}));
  using TmaQ = decltype(make_tma_copy(SM90_TMA_LOAD{}, std::declval<GTensor>(), SmemLayoutQ{},
                                      Shape<Int<kBlockM>, Int<kHeadDim>>{}, _1{}));
  using TmaKV = decltype(make_tma_copy(SM90_TMA_LOAD{}, std::declval<GTensor>(), take<0, 2>(SmemLayoutKV{}),
                                       Shape<Int<kBlockN>, Int<kHeadDim>>{}, _1{}));

  // Paged K/V with pages under a key block: a block is kBlockN / kPieceRows boxes of kPieceRows
  // rows, each from its own page, into the rows of the stage it covers (the stage layout restricted
  // to kPieceRows rows: a whole number of 1024-byte swizzle periods, so every piece swizzles alike).
  static constexpr int kPieceRows = 16;
  using SmemLayoutKVPiece =
      decltype(layout<0>(zipped_divide(take<0, 2>(SmemLayoutKV{}), Shape<Int<kPieceRows>, Int<kHeadDim>>{})));
  using TmaKVPiece = decltype(make_tma_copy(SM90_TMA_LOAD{}, std::declval<GTensor>(), SmemLayoutKVPiece{},
                                            Shape<Int<kPieceRows>, Int<kHeadDim>>{}, _1{}));

  static constexpr uint32_t kQBytes = kBlockM * kHeadDim * sizeof(Elem);
  static constexpr uint32_t kKVBytes = kBlockN * kHeadDim * sizeof(Elem);

  // meta[stage]: the stage's description (mainloop.cuh, StageMeta); item[slot]: a queued work item
  // (tile_scheduler.cuh, ItemField).
  struct SharedStorage {
    alignas(1024) Elem q[cosize_v<SmemLayoutQ2>];
    alignas(1024) Elem k[cosize_v<SmemLayoutKV>];
    alignas(1024) Elem v[cosize_v<SmemLayoutKV>];
    alignas(16) int meta[kStages][8];
    alignas(16) int item[2][16];
    alignas(16) ItemRows item_rows[kConsumerWarps][2];  // per consumer warp and Q buffer
    alignas(8) uint64_t full_q[2], empty_q[2];
    uint64_t full_k[kStages], full_v[kStages], empty_k[kStages], empty_v[kStages];
    uint64_t item_full[2], item_empty[2];
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));
};

template <class Traits>
struct KernelParams {
  BsaParams p;
  typename Traits::TmaQ tma_q;
  typename Traits::TmaKV tma_k;
  typename Traits::TmaKV tma_v;
  typename Traits::TmaKVPiece tma_k_piece;  // paged K/V, pages under a key block (else unused)
  typename Traits::TmaKVPiece tma_v_piece;
  // Extents the tensor maps were built with: rows and batches of q, and of k/v (paged K/V: the
  // slots of a page and the pages, so a key block is one box of its page).
  int32_t q_rows_total, k_rows_total, q_batches, k_batches;
};

}  // namespace bsa_sm90
}  // namespace proxyattn
