// Main loop of the persistent Hopper kernel: the producer (one loader thread, warp 0 lane 0 of
// warpgroup 0) and the consumers (warpgroups 1 and 2, 64 query rows each).
//
// The key blocks of all of a CTA's work items form one stream through the 2-stage K/V ring, and
// the consumers treat it as one loop.
//   loader: per item from the scheduler's queue (tile_scheduler.cuh), Q by TMA into one of two
//     buffers (full_q / empty_q), then the K and V tiles of its selected key blocks (BlockCursor,
//     resumed after the block the scheduler took) into the ring; full barriers carry the TMA
//     transaction bytes, empty barriers are released by the 8 consumer warps. Before a stage's
//     full barrier it writes the stage's description (meta[stage], StageMeta): the block, whether
//     it is an item's first (kMetaFirst) or last (kMetaLast) and the item; the end is a kMetaStop
//     stage.
//   consumers: S = Q K^T by wgmma SS (64 x kTileN x D) issued together with O += P V of the previous
//     tile by wgmma RS (64 x D x kTileN, V read MN-major from the same K-major smem tile); a stage is
//     kSub score tiles (traits.cuh: 1 at D = 128, 2 halves at D = 64), released once its last
//     tile's S (K) and P V (V) are done. The softmax of S (softmax.cuh: mask only on tiles crossing
//     the causal diagonal or the end of the keys, exact running max) runs while the P V wgmma is in
//     flight (at D = 64, two CTAs per SM: after it, each warpgroup running P V, then S, then the
//     softmax; Traits::kSoftmaxBesidePV); O is rescaled after it completes; P is converted to 16
//     bits in registers. The first Q K^T of an item is issued together with the last P V of the
//     item before it, and that item's epilogue (epilogue.cuh) runs while nothing waits on it. A
//     stage that continues the current item (the one before it was not kMetaLast) has its Q K^T
//     issued as soon as it lands, its description read after.
// The loader, the scheduler and the consumers count stages (`it`), Q buffers (`nq`) and queue
// slots the same way, so barrier parities agree without any other exchange.
#pragma once

#include <cmath>
#include <cstdint>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

#include "kernels/bsa_sm90/block_cursor.cuh"
#include "kernels/bsa_sm90/epilogue.cuh"
#include "kernels/bsa_sm90/softmax.cuh"
#include "kernels/bsa_sm90/tile_scheduler.cuh"
#include "kernels/bsa_sm90/traits.cuh"
#include "kernels/bsa_sm90/utils.cuh"
#include "kernels/common/bsa_selection.cuh"
#include "kernels/common/fragment.cuh"

namespace proxyattn {
namespace bsa_sm90 {

using namespace cute;

// Stage description fields (int32) and flags.
enum StageMeta : int { kMetaBlock = 0, kMetaFlags, kMetaB, kMetaH, kMetaM, kMetaQRow0, kMetaSeqlenQ, kMetaSeqlenK };
enum : int { kMetaFirst = 1, kMetaStop = 2, kMetaLast = 4 };

template <class Traits, bool kPaged>
__device__ __forceinline__ void run_loader(const KernelParams<Traits>& kp, typename Traits::SharedStorage& ss) {
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kStages = Traits::kStages;
  using Barrier = cutlass::arch::ClusterTransactionBarrier;
  using EmptyBarrier = cutlass::arch::ClusterBarrier;
  const BsaParams& p = kp.p;
  const bool varlen = p.cu_seqlens_q != nullptr;
  Tensor sQ = make_tensor(make_smem_ptr(ss.q), typename Traits::SmemLayoutQ2{});  // (M, D, buf)
  Tensor sK = make_tensor(make_smem_ptr(ss.k), typename Traits::SmemLayoutKV{});  // (N, D, stage)
  Tensor sV = make_tensor(make_smem_ptr(ss.v), typename Traits::SmemLayoutKV{});  // (N, D, stage)
  // Coordinate tensors of the tensor maps: (rows, D, heads, batch).
  Tensor mQ = kp.tma_q.get_tma_tensor(make_shape(kp.q_rows_total, Int<kHeadDim>{}, p.q_heads, kp.q_batches));
  Tensor mK = kp.tma_k.get_tma_tensor(make_shape(kp.k_rows_total, Int<kHeadDim>{}, p.kv_heads, kp.k_batches));
  Tensor mV = kp.tma_v.get_tma_tensor(make_shape(kp.k_rows_total, Int<kHeadDim>{}, p.kv_heads, kp.k_batches));
  uint32_t n = 0;   // slots taken
  int it = 0;       // stages filled
  uint32_t nq = 0;  // Q buffers filled
  // Writes stage s's description (the stage free of its K reads).
  auto write_meta = [&](int s, const int (&md)[8]) {
    compiler_fence();
    CUTE_UNROLL
    for (int i = 0; i < 8; ++i) ss.meta[s][i] = md[i];
    compiler_fence();
  };
  while (true) {
    const int slot = n & 1;
    EmptyBarrier::wait(&ss.item_full[slot], (n >> 1) & 1);
    compiler_fence();
    int f[kItemFields];
    CUTE_UNROLL
    for (int i = 0; i < kItemFields; ++i) f[i] = ss.item[slot][i];
    compiler_fence();
    EmptyBarrier::arrive(&ss.item_empty[slot]);
    ++n;
    const int s0 = it % kStages;
    const uint32_t phase0 = (it / kStages) & 1;
    if (f[kItemKind] == kItemStop) {
      const int md[8] = {0, kMetaStop, 0, 0, 0, 0, 0, 0};
      EmptyBarrier::wait(&ss.empty_k[s0], phase0 ^ 1);
      write_meta(s0, md);
      Barrier::arrive(&ss.full_k[s0]);
      break;
    }
    int md[8] = {f[kItemFirstBlock], kMetaFirst, f[kItemB], f[kItemH], f[kItemM], f[kItemQRow0], f[kItemSeqlenQ],
                 f[kItemSeqlenK]};
    const int b = f[kItemB], h = f[kItemH], m = f[kItemM], kvh = h / (p.q_heads / p.kv_heads);
    const int qb = varlen ? 0 : b;
    BlockCursor cursor(bsa_index_row(p, b, h, m), f[kItemCount], f[kItemLastBlock]);
    cursor.resume(f[kItemFirstOrd], f[kItemFirstBlock]);
    cursor.fetch();  // the entry after the first block, in flight while Q is issued
    Tensor gQ = local_tile(domain_offset(make_coord(f[kItemQRow0], _0{}), mQ(_, _, h, qb)),
                           Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(m, _0{}));   // (M, D)
    auto [tQg, tQs] = tma_partition(kp.tma_q, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sQ), group_modes<0, 2>(gQ));
    const int qbuf = nq & 1;
    EmptyBarrier::wait(&ss.empty_q[qbuf], ((nq >> 1) & 1) ^ 1);
    Barrier::arrive_and_expect_tx(&ss.full_q[qbuf], Traits::kQBytes);
    copy(kp.tma_q.with(ss.full_q[qbuf]), tQg, tQs(_, qbuf));
    ++nq;
    // K/V of every block of the item into the ring: load_k / load_v (stage, block) issue the TMA
    // copies of one block onto the stage's full barrier (kKVBytes each). The cursor moves to the
    // next block before a stage is published, so that the item's last stage says so (kMetaLast):
    // the consumers then know, before they wait for a stage, whether it continues their item.
    auto stream_blocks = [&](auto&& load_k, auto&& load_v) {
      bool more;
      do {
        const int s = it % kStages;
        const uint32_t phase = (it / kStages) & 1;
        const int blk = cursor.blk;
        EmptyBarrier::wait(&ss.empty_k[s], phase ^ 1);
        more = cursor.advance();  // reads the entry fetched a stage earlier
        md[kMetaBlock] = blk;
        md[kMetaFlags] |= more ? 0 : kMetaLast;
        write_meta(s, md);
        md[kMetaFlags] = 0;
        Barrier::arrive_and_expect_tx(&ss.full_k[s], Traits::kKVBytes);
        load_k(s, blk);
        cursor.fetch();  // the next entry's load overlaps the waits until the next stage
        EmptyBarrier::wait(&ss.empty_v[s], phase ^ 1);
        Barrier::arrive_and_expect_tx(&ss.full_v[s], Traits::kKVBytes);
        load_v(s, blk);
        ++it;
      } while (more);
    };
    if constexpr (!kPaged) {
      Tensor gK = local_tile(domain_offset(make_coord(f[kItemKRow0], _0{}), mK(_, _, kvh, qb)),
                             Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, _0{}));   // (N, D, blocks)
      Tensor gV = local_tile(domain_offset(make_coord(f[kItemKRow0], _0{}), mV(_, _, kvh, qb)),
                             Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, _0{}));   // (N, D, blocks)
      auto [tKg, tKs] = tma_partition(kp.tma_k, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
      auto [tVg, tVs] = tma_partition(kp.tma_v, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sV), group_modes<0, 2>(gV));
      stream_blocks([&](int s, int blk) { copy(kp.tma_k.with(ss.full_k[s]), tKg(_, blk), tKs(_, s)); },
                    [&](int s, int blk) { copy(kp.tma_v.with(ss.full_v[s]), tVg(_, blk), tVs(_, s)); });
    } else {
      // Paged: the caches as (slot, D, page). Key t lives in page table[t >> shift] (clamped into
      // the cache), slot t mod page size. Boxes past the sequence's last key (masked) take its last
      // page, so the table is read only inside the sequence's pages.
      const int* table = p.pages.page_table + int64_t(b) * p.pages.table_stride;
      const int shift = p.pages.page_shift, last = p.pages.num_pages - 1;
      const int last_key = max(f[kItemSeqlenK] - 1, 0);
      auto page_of = [table, shift, last, last_key](int key) {
        return max(0, min(table[min(key, last_key) >> shift], last));
      };
      if (shift < 7) {
        // Pages under a key block: piece i of block blk is kPieceRows keys from blk * N + i * kPieceRows.
        constexpr int kPieceRows = Traits::kPieceRows, kPieces = kBlockN / kPieceRows;
        Tensor gK = local_tile(mK(_, _, kvh, _), Shape<Int<kPieceRows>, Int<kHeadDim>>{}, make_coord(_, _0{}, _));
        Tensor gV = local_tile(mV(_, _, kvh, _), Shape<Int<kPieceRows>, Int<kHeadDim>>{}, make_coord(_, _0{}, _));
        Tensor sKp = local_tile(sK, Shape<Int<kPieceRows>, Int<kHeadDim>>{}, make_coord(_, _0{}, _));  // (r, D, i, stage)
        Tensor sVp = local_tile(sV, Shape<Int<kPieceRows>, Int<kHeadDim>>{}, make_coord(_, _0{}, _));
        auto [tKg, tKs] = tma_partition(kp.tma_k_piece, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sKp),
                                        group_modes<0, 2>(gK));  // (TMA, boxes, pages), (TMA, i, stage)
        auto [tVg, tVs] = tma_partition(kp.tma_v_piece, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sVp),
                                        group_modes<0, 2>(gV));
        Tensor tKb = group_modes<1, 3>(tKg);  // (TMA, (boxes, pages))
        Tensor tVb = group_modes<1, 3>(tVg);
        // The block's pages are read once, all kPieces loads in flight together, before its K
        // boxes are issued, and serve its V boxes too (load_v follows load_k for the same block).
        int pages[kPieces];
        auto slot_box = [shift](int key) { return (key & ((1 << shift) - 1)) / kPieceRows; };
        stream_blocks(
            [&](int s, int blk) {
#pragma unroll
              for (int i = 0; i < kPieces; ++i) pages[i] = page_of(blk * kBlockN + i * kPieceRows);
#pragma unroll
              for (int i = 0; i < kPieces; ++i)
                copy(kp.tma_k_piece.with(ss.full_k[s]),
                     tKb(_, make_coord(slot_box(blk * kBlockN + i * kPieceRows), pages[i])), tKs(_, i, s));
            },
            [&](int s, int blk) {
#pragma unroll
              for (int i = 0; i < kPieces; ++i)
                copy(kp.tma_v_piece.with(ss.full_v[s]),
                     tVb(_, make_coord(slot_box(blk * kBlockN + i * kPieceRows), pages[i])), tVs(_, i, s));
            });
      } else {
        // Pages of one or more key blocks: block blk is box (blk * N mod page size) / N of its page.
        Tensor gK = local_tile(mK(_, _, kvh, _), Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, _0{}, _));
        Tensor gV = local_tile(mV(_, _, kvh, _), Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, _0{}, _));
        auto [tKg, tKs] = tma_partition(kp.tma_k, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
        auto [tVg, tVs] = tma_partition(kp.tma_v, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sV), group_modes<0, 2>(gV));
        Tensor tKb = group_modes<1, 3>(tKg);  // (TMA, (boxes, pages))
        Tensor tVb = group_modes<1, 3>(tVg);
        auto box = [&](int key) { return make_coord((key & ((1 << shift) - 1)) / kBlockN, page_of(key)); };
        stream_blocks([&](int s, int blk) { copy(kp.tma_k.with(ss.full_k[s]), tKb(_, box(blk * kBlockN)), tKs(_, s)); },
                      [&](int s, int blk) { copy(kp.tma_v.with(ss.full_v[s]), tVb(_, box(blk * kBlockN)), tVs(_, s)); });
      }
    }
  }
}

// One work item as the consumers need it at every tile (from the description of its first stage);
// the rest (ItemRows, traits.cuh) waits in shared memory, in the consumer warp's slot of its Q buffer.
struct ConsumerItem {
  int full_key;  // keys <= full_key are visible to every row
  int qbuf;      // Q buffer
};

template <class Traits>
__device__ __forceinline__ void run_consumers(const KernelParams<Traits>& kp, typename Traits::SharedStorage& ss,
                                              int lane) {
  using Elem = typename Traits::Elem;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kStages = Traits::kStages;
  using Barrier = cutlass::arch::ClusterTransactionBarrier;
  using EmptyBarrier = cutlass::arch::ClusterBarrier;
  const BsaParams& p = kp.p;
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int ctid = threadIdx.x - 128;  // 0 .. 255; warpgroup ctid / 128 owns rows 64 (ctid / 128) + [0, 64)
  Tensor sQ = make_tensor(make_smem_ptr(ss.q), typename Traits::SmemLayoutQ2{});    // (M, D, buf)
  constexpr int kTileN = Traits::kTileN;
  constexpr int kSub = Traits::kSub;
  Tensor sK = make_tensor(make_smem_ptr(ss.k), typename Traits::SmemLayoutKTile{});    // (Nt, D, tile)
  Tensor sVt = make_tensor(make_smem_ptr(ss.v), typename Traits::SmemLayoutVtTile{});  // (D, Nt, tile)

  typename Traits::TiledMmaS mma_s;
  typename Traits::TiledMmaO mma_o;
  auto thr_s = mma_s.get_thread_slice(ctid);
  auto thr_o = mma_o.get_thread_slice(ctid);
  auto wg_s = warpgroup_slice(mma_s, ctid);  // the wgmma descriptors' slices (uniform registers)
  auto wg_o = warpgroup_slice(mma_o, ctid);
  Tensor tSrQ = wg_s.partition_fragment_A(sQ);   // (MMA, MMA_M, MMA_D, buf) descriptors
  Tensor tSrK = wg_s.partition_fragment_B(sK);   // (MMA, MMA_N, MMA_D, tile) descriptors
  Tensor tOrV = wg_o.partition_fragment_B(sVt);  // (MMA, MMA_D, MMA_N, tile) descriptors
  Tensor acc_o = partition_fragment_C(thr_o, Shape<Int<kBlockM>, Int<kHeadDim>>{});  // ((2,2,D/8), 1, 1)

  Tensor cS = make_identity_tensor(Shape<Int<kBlockM>, Int<kTileN>>{});
  Tensor tScS = thr_s.partition_C(cS);
  Tensor tScS_rc = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));
  Tensor cO = make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{});
  Tensor tOcO = thr_o.partition_C(cO);
  Tensor tOcO_rc = make_tensor(tOcO.data(), acc_rowcol(tOcO.layout()));

  constexpr int kRows = decltype(size<0>(acc_rowcol(acc_o.layout())))::value;
  Tensor row_max = make_tensor<float>(Shape<Int<kRows>>{});
  Tensor row_sum = make_tensor<float>(Shape<Int<kRows>>{});
  Tensor old_max = make_tensor<float>(Shape<Int<kRows>>{});
  Tensor old_sum = make_tensor<float>(Shape<Int<kRows>>{});
  Tensor corr = make_tensor<float>(Shape<Int<kRows>>{});
  const float scale_log2 = p.softmax_scale_log2;

  // The item described by a first stage's description md, read into Q buffer qbuf.
  auto (&rows_slot)[2] = ss.item_rows[ctid / 32];  // this warp's ItemRows, per Q buffer
  auto make_item = [&](const int* md, int qbuf) {
    const int b = md[kMetaB], h = md[kMetaH], m = md[kMetaM], q_row0 = md[kMetaQRow0];
    const int seqlen_q = md[kMetaSeqlenQ], seqlen_k = md[kMetaSeqlenK];
    const int q_start = m * kBlockM, diag = seqlen_k - seqlen_q + q_start;
    if (lane == 0) {
      ItemRows r;
      r.o_off = (varlen ? int64_t(q_row0) * p.out_row_stride : int64_t(b) * p.out_batch_stride) +
                int64_t(q_start) * p.out_row_stride + int64_t(h) * p.out_head_stride;
      r.lse_off = (varlen ? int64_t(q_row0) : int64_t(b) * p.lse_batch_stride) + int64_t(h) * p.lse_head_stride +
                  q_start;
      r.q_rows = min(kBlockM, seqlen_q - q_start);
      r.diag = diag;
      r.seqlen_k = seqlen_k;
      rows_slot[qbuf] = r;
    }
    __syncwarp();
    ConsumerItem w;
    w.full_key = p.causal ? min(seqlen_k - 1, diag) : seqlen_k - 1;
    w.qbuf = qbuf;
    return w;
  };
  auto softmax_tile = [&](auto& acc_s, int key0, const ConsumerItem& w) {
    const ItemRows& r = rows_slot[w.qbuf];
    return online_softmax_tile<kTileN>(acc_s, tScS_rc, key0, w.full_key, r.diag, r.seqlen_k, p.causal, scale_log2,
                                        row_max, row_sum, corr);
  };
  auto rescale_o = [&](bool moved) { rescale_rows(acc_o, corr, moved); };
  // Normalise and store item w's rows (acc_o, with the statistics mx / sm), lse per row.
  auto epilogue = [&](const ConsumerItem& w, auto const& mx, auto const& sm) {
    const ItemRows& r = rows_slot[w.qbuf];
    store_rows(acc_o, tOcO_rc, mx, sm, static_cast<Elem*>(p.out) + r.o_off, p.lse + r.lse_off, r.q_rows,
               p.out_row_stride, p.softmax_scale, lane);
  };
  auto release = [&](uint64_t* bar) {
    __syncwarp();
    if (lane == 0) EmptyBarrier::arrive(bar);
  };

  Tensor rP = make_tensor<Elem>(partition_fragment_C(thr_s, Shape<Int<kBlockM>, Int<kTileN>>{}).layout());
  Tensor tOrP = make_tensor(rP.data(), acc_to_a_operand(rP.layout()));  // ((2,2,2), 1, N/16)
  int it = 0;       // stages consumed
  uint32_t nq = 0;  // Q buffers consumed
  // Reads stage s's block and flags (the stage landed: its full_k barrier waited for); a first
  // stage's item fields are read by stage_item. Lane 0 of each warp reads and hands the values to
  // the other lanes, so every read of a stage's description is ordered before the same thread's
  // release of the stage (release() arrives from lane 0), after which the loader may rewrite it.
  auto read_stage = [&](int s, int& blk, int& flags) {
    compiler_fence();
    int b = 0, f = 0;
    if (lane == 0) {
      b = ss.meta[s][kMetaBlock];
      f = ss.meta[s][kMetaFlags];
    }
    compiler_fence();
    blk = __shfl_sync(0xffffffffu, b, 0);
    flags = __shfl_sync(0xffffffffu, f, 0);
  };
  auto take_stage = [&](int s, uint32_t phase, int& blk, int& flags) {
    Barrier::wait(&ss.full_k[s], phase);
    read_stage(s, blk, flags);
  };
  auto stage_item = [&](int s) {
    int md[8];
    compiler_fence();
    CUTE_UNROLL
    for (int i = 0; i < 8; ++i) md[i] = lane == 0 ? ss.meta[s][i] : 0;
    compiler_fence();
    CUTE_UNROLL
    for (int i = 0; i < 8; ++i) md[i] = __shfl_sync(0xffffffffu, md[i], 0);
    const ConsumerItem w = make_item(md, int(nq & 1));
    Barrier::wait(&ss.full_q[w.qbuf], (nq >> 1) & 1);
    ++nq;
    return w;
  };

  // Score tile h of stage s is tile s * kSub + h of the views; the previous tile (h - 1 of the same
  // stage, or the last of stage sp; phase / phase_p the parities of stages s / sp) has its P V
  // pending. Beside (Traits::kSoftmaxBesidePV): the tile's S goes out with that P V, and its softmax
  // runs while the P V is in flight. Serial: the P V first, then S, so that a warpgroup never holds
  // S, P and O at once. A stage's K is released after its last tile's S, its V after its last
  // tile's P V; its full_v is waited for before its first tile's P V. Tile 0 reads the stage's
  // block and flags while a wgmma runs.
  int blk, flags;
  ConsumerItem cur{};  // the item whose rows acc_o holds
  auto cont_tile = [&](auto h_, int s, uint32_t phase, int sp, uint32_t phase_p) {
    constexpr int h = decltype(h_)::value, ph = (h + kSub - 1) % kSub;  // ph: the previous tile's
    const int ps = h == 0 ? sp : s;
    Tensor acc_s = partition_fragment_C(thr_s, Shape<Int<kBlockM>, Int<kTileN>>{});
    if constexpr (Traits::kSoftmaxBesidePV) {
      if constexpr (h == 0) Barrier::wait(&ss.full_k[s], phase);
      wg_issue<true>(mma_s, tSrQ(_, _, _, cur.qbuf), tSrK(_, _, _, s * kSub + h), acc_s);
      if constexpr (ph == 0) Barrier::wait(&ss.full_v[ps], h == 0 ? phase_p : phase);
      wg_issue<false>(mma_o, tOrP, tOrV(_, _, _, ps * kSub + ph), acc_o);
      if constexpr (h == 0) read_stage(s, blk, flags);
      warpgroup_wait<1>();  // S done (groups complete in order)
      warpgroup_fence_operand(acc_s);
      if constexpr (h == kSub - 1) release(&ss.empty_k[s]);
      const bool moved = softmax_tile(acc_s, blk * kBlockN + h * kTileN, cur);
      softmax_fence(row_sum);
      warpgroup_wait<0>();  // the previous P V done
      warpgroup_fence_operand(acc_o);
      warpgroup_fence_operand(tOrP);
      if constexpr (ph == kSub - 1) release(&ss.empty_v[ps]);
      rescale_o(moved);
      convert_into<Elem>(acc_s, rP);
    } else {
      if constexpr (ph == 0) Barrier::wait(&ss.full_v[ps], h == 0 ? phase_p : phase);
      wg_issue<false>(mma_o, tOrP, tOrV(_, _, _, ps * kSub + ph), acc_o);
      if constexpr (h == 0) Barrier::wait(&ss.full_k[s], phase);
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc_o);
      warpgroup_fence_operand(tOrP);
      if constexpr (ph == kSub - 1) release(&ss.empty_v[ps]);
      wg_issue<true>(mma_s, tSrQ(_, _, _, cur.qbuf), tSrK(_, _, _, s * kSub + h), acc_s);
      if constexpr (h == 0) read_stage(s, blk, flags);
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc_s);
      if constexpr (h == kSub - 1) release(&ss.empty_k[s]);
      const bool moved = softmax_tile(acc_s, blk * kBlockN + h * kTileN, cur);
      rescale_o(moved);
      convert_into<Elem>(acc_s, rP);
    }
  };

  // The first stage: the CTA's first item, or the stop mark when it has none.
  take_stage(0, 0, blk, flags);
  if (flags & kMetaStop) return;
  cur = stage_item(0);
  fill(row_max, -INFINITY);
  fill(row_sum, 0.f);
  clear(acc_o);
  {
    Tensor acc_s = partition_fragment_C(thr_s, Shape<Int<kBlockM>, Int<kTileN>>{});
    wg_issue<true>(mma_s, tSrQ(_, _, _, cur.qbuf), tSrK(_, _, _, 0), acc_s);
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc_s);
    if constexpr (kSub == 1) release(&ss.empty_k[0]);
    softmax_tile(acc_s, blk * kBlockN, cur);  // O is 0: no rescale needed
    convert_into<Elem>(acc_s, rP);
  }
  if constexpr (kSub == 2) cont_tile(Int<1>{}, 0, 0, 0, 0);
  it = 1;
  // The last tile's P V is pending at the top of every iteration; stage `it` is the next S. cont:
  // stage `it` continues the current item (stage it - 1 was not the item's last).
  bool cont = !(flags & kMetaLast);
  while (true) {
    const int s = it % kStages, sp = (it - 1) % kStages;
    const uint32_t phase = (it / kStages) & 1, phase_p = ((it - 1) / kStages) & 1;
    if (cont) {
      cont_tile(Int<0>{}, s, phase, sp, phase_p);
    } else {
      // The first tile of the next item (or the stop mark). Beside: its S goes out with the current
      // item's last P V, and the current item is stored once that P V is done. Serial (the branch
      // below, which then runs the stage's second tile as the loop's end does): its S goes out after
      // that P V, and the current item is stored while the S runs. The serial branch keeps its own
      // copy of the loop's end: shared with the loop, ptxas spills consumer registers around the
      // item switch at D = 64 (nvcc 13.0).
      Tensor acc_s = partition_fragment_C(thr_s, Shape<Int<kBlockM>, Int<kTileN>>{});
      take_stage(s, phase, blk, flags);
      if (flags & kMetaStop) break;
      const ConsumerItem nxt = stage_item(s);
      if constexpr (!Traits::kSoftmaxBesidePV) {
        static_assert(kSub == 2, "serial tiles are half key blocks here");
        wg_issue<false>(mma_o, tOrP, tOrV(_, _, _, sp * kSub + kSub - 1), acc_o);
        warpgroup_wait<0>();
        warpgroup_fence_operand(acc_o);
        warpgroup_fence_operand(tOrP);
        release(&ss.empty_v[sp]);
        wg_issue<true>(mma_s, tSrQ(_, _, _, nxt.qbuf), tSrK(_, _, _, s * kSub), acc_s);
        epilogue(cur, row_max, row_sum);  // the current item is complete
        release(&ss.empty_q[cur.qbuf]);
        clear(acc_o);
        fill(row_max, -INFINITY);
        fill(row_sum, 0.f);
        warpgroup_wait<0>();
        warpgroup_fence_operand(acc_s);
        softmax_tile(acc_s, blk * kBlockN, nxt);
        convert_into<Elem>(acc_s, rP);
        cur = nxt;
        cont_tile(Int<1>{}, s, phase, sp, phase_p);
        cont = !(flags & kMetaLast);
        ++it;
        continue;
      }
      wg_issue<true>(mma_s, tSrQ(_, _, _, nxt.qbuf), tSrK(_, _, _, s * kSub), acc_s);
      if constexpr (kSub == 1) Barrier::wait(&ss.full_v[sp], phase_p);
      wg_issue<false>(mma_o, tOrP, tOrV(_, _, _, sp * kSub + kSub - 1), acc_o);
      warpgroup_wait<1>();
      warpgroup_fence_operand(acc_s);
      if constexpr (kSub == 1) release(&ss.empty_k[s]);
      CUTE_UNROLL
      for (int ri = 0; ri < kRows; ++ri) {
        old_max(ri) = row_max(ri);
        old_sum(ri) = row_sum(ri);
      }
      fill(row_max, -INFINITY);
      fill(row_sum, 0.f);
      softmax_tile(acc_s, blk * kBlockN, nxt);
      softmax_fence(row_sum);
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc_o);
      warpgroup_fence_operand(tOrP);
      release(&ss.empty_v[sp]);
      convert_into<Elem>(acc_s, rP);    // P is free: S's registers go before the epilogue's
      epilogue(cur, old_max, old_sum);  // the current item is complete
      release(&ss.empty_q[cur.qbuf]);
      clear(acc_o);
      cur = nxt;
    }
    if constexpr (kSub == 2) cont_tile(Int<1>{}, s, phase, sp, phase_p);
    cont = !(flags & kMetaLast);
    ++it;
  }
  // The last item's last P V, then its epilogue.
  const int sp = (it - 1) % kStages;
  if constexpr (kSub == 1) Barrier::wait(&ss.full_v[sp], ((it - 1) / kStages) & 1);
  wg_issue<false>(mma_o, tOrP, tOrV(_, _, _, sp * kSub + kSub - 1), acc_o);
  warpgroup_wait<0>();
  warpgroup_fence_operand(acc_o);
  warpgroup_fence_operand(tOrP);
  release(&ss.empty_v[sp]);
  epilogue(cur, row_max, row_sum);
}

}  // namespace bsa_sm90
}  // namespace proxyattn
