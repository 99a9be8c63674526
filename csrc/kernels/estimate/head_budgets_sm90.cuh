// Stage 2 probe on Hopper (sm_90a): probe_sm90_kernel, probe_kernel of head_budgets.cu with the
// logits on wgmma instead of mma.sync (the per-row work is the same, head_budgets_probe.cuh).
//
// Grid (splits, Hq, B) as probe_kernel, 256 threads = two warpgroups, two CTAs per SM. The probe
// rows of the head (128, zero past R) go to shared memory once (cp.async, 128-byte swizzle); the
// split's keys stream through a 2-stage ring of 128-key tiles, the next tile in flight. Per tile
// each warpgroup issues one 64 x 128 x D wgmma (SS, fp32 accumulation), waits for it and does the
// tile's row work on the accumulator, as two 64-key halves (probe_tile's unit, so that a key block
// of 64 ends at a half); the other CTA on the SM keeps the tensor cores busy meanwhile (stage 1's
// Hopper kernel made the same trade: a 128-key tile halves the per-key cost of what runs once per
// tile, the copies' issue and the wgmma descriptors). The products of 16-bit values are exact, so
// the logits differ from probe_kernel's only by the order of the fp32 sum.
// The ring, by how the keys lie (kTma):
//   contiguous keys (kTma): a tile is one TMA copy (the keys as a tensor map (rows, D, Hkv, batch))
//     onto its stage's transaction barrier, issued by one thread; a warp waits for the barrier and,
//     after its warpgroup's wgmma, gives the stage back (bsa_sm90::release_stage, as stage 1 does:
//     the last warp issues the copy of the tile two ahead into it): no CTA barrier per tile. Keys of a tile past the sequence's end are zeros (past the map) or the
//     next sequence's (varlen), masked like every key past a row's limit.
//   paged keys: each thread copies its 16-byte chunks by cp.async, a key row read through the page
//     table, and a CTA barrier per tile hands the stage over.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cute/tensor.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/numeric_types.h>

#include "kernels/bsa_sm90/utils.cuh"
#include "kernels/common/chained_launch.cuh"
#include "kernels/estimate/head_budgets_probe.cuh"

namespace proxyattn {
namespace budgets_sm90 {

using namespace cute;
using namespace budgets;

constexpr int kWarpgroups = 2;
constexpr int kThreads = 128 * kWarpgroups;
constexpr int kKeys = 128;  // keys per tile: two of probe_tile's 64-key halves
constexpr int kStages = 2;  // key tiles in the ring (the next in flight)
static_assert(kThreads == kProbeThreads && 64 * kWarpgroups == kProbeRows, "the probe CTA: 8 warps of 16 rows");

template <typename T, int D>
struct Traits {
  using Elem = std::conditional_t<std::is_same_v<T, __half>, cutlass::half_t, cutlass::bfloat16_t>;
  using Atom = decltype(GMMA::Layout_K_SW128_Atom<Elem>{});  // 8 x 64 elements, 128-byte swizzle
  using SmemLayoutQ = decltype(tile_to_shape(Atom{}, Shape<Int<kProbeRows>, Int<D>>{}));
  using SmemLayoutK = decltype(tile_to_shape(Atom{}, Shape<Int<kKeys>, Int<D>, Int<kStages>>{}));  // (keys, D, stage)
  using TiledMma = decltype(make_tiled_mma(GMMA::ss_op_selector<Elem, Elem, float, Shape<_64, Int<kKeys>, Int<D>>>(),
                                           Layout<Shape<Int<kWarpgroups>, _1, _1>>{}));
  // The keys as the tensor map's (rows, D, Hkv, batch): rows of one sequence (fixed length) or of
  // all of them (varlen, one batch).
  using GTensorK = decltype(make_tensor(make_gmem_ptr(static_cast<Elem const*>(nullptr)),
                                        Shape<int32_t, Int<D>, int32_t, int32_t>{},
                                        Stride<int64_t, _1, int64_t, int64_t>{}));
  using TmaK = decltype(make_tma_copy(SM90_TMA_LOAD{}, std::declval<GTensorK>(), take<0, 2>(SmemLayoutK{}),
                                      Shape<Int<kKeys>, Int<D>>{}, _1{}));
  static constexpr uint32_t kTileBytes = kKeys * D * sizeof(Elem);
  struct SharedStorage {
    alignas(1024) Elem q[cosize_v<SmemLayoutQ>];
    alignas(1024) Elem k[cosize_v<SmemLayoutK>];
    alignas(8) uint64_t full[kStages];  // kTma: a stage's key tile has landed (transaction barrier)
    int release[kStages];               // kTma: warps done with a stage's wgmma
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));
};

// tma_k, k_rows, k_batches: the keys' tensor map and its row and batch extents (kTma only).
template <typename T, int D, bool kTma>
__global__ void __launch_bounds__(kThreads, 2)
    probe_sm90_kernel(const HeadBudgetsParams p, const __grid_constant__ typename Traits<T, D>::TmaK tma_k,
                      int32_t k_rows, int32_t k_batches) {
#if PROXYATTN_BSA_SM90_DEVICE
  pdl_wait();  // chained_launch.cuh: before any global memory access
  pdl_launch_dependents();
  using Tr = Traits<T, D>;
  extern __shared__ __align__(1024) char smem_raw[];
  auto& ss = *reinterpret_cast<typename Tr::SharedStorage*>(smem_raw);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
  const BudgetWorkspace ws = budget_workspace(p, gridDim.x);
  const ProbeSplit ps = probe_split(p, warp, g);
  float2* partial = probe_partials(ws, ps);
  if (ps.empty) return;
  const bool warp_active = warp * 16 < ps.R;

  Tensor sQ = make_tensor(make_smem_ptr(ss.q), typename Tr::SmemLayoutQ{});  // (rows, D)
  Tensor sK = make_tensor(make_smem_ptr(ss.k), typename Tr::SmemLayoutK{});  // (keys, D, stage)
  typename Tr::TiledMma mma;
  auto thr = mma.get_thread_slice(tid);
  auto wg = bsa_sm90::warpgroup_slice(mma, tid);  // the descriptors' slice (uniform registers)
  Tensor tQ = wg.partition_fragment_A(sQ);  // (MMA, MMA_M, MMA_D) descriptors
  Tensor tK = wg.partition_fragment_B(sK);  // (MMA, MMA_N, MMA_D, stage) descriptors
  Tensor acc = partition_fragment_C(thr, Shape<Int<kProbeRows>, Int<kKeys>>{});  // ((2, 2, 16), 1, 1)
  // (row e, column col): CTA row 16 warp + g + 8 e, key 8 (col / 2) + 2 t4 + col % 2 of the tile; a
  // half's columns are kTileCols consecutive ones.
  Tensor accrc = make_tensor(acc.data(), bsa_sm90::acc_rowcol(acc.layout()));
  static_assert(decltype(size<0>(accrc))::value == 2 && decltype(size<1>(accrc))::value == 2 * kTileCols,
                "one thread holds two rows of the tile");
  static_assert(kKeys == 2 * kKeyTile && kProbeSplitKeys % kKeys == 0, "a split is whole tiles of two halves");

  using Barrier = cutlass::arch::ClusterTransactionBarrier;
  // kTma: tile `tile` of the split into stage st by one thread; the split starts at row k_start + k0
  // of the map (k_start 0 at fixed length, where the batch is the map's last coordinate).
  Tensor mK = tma_k.get_tma_tensor(make_shape(k_rows, Int<D>{}, p.num_kv_heads, k_batches));
  const bool varlen = p.cu_seqlens_k != nullptr;
  Tensor gK = local_tile(domain_offset(make_coord(static_cast<int32_t>(ps.sb.k_start + ps.k0), _0{}),
                                       mK(_, _, ps.hk, varlen ? 0 : static_cast<int>(blockIdx.z))),
                         Shape<Int<kKeys>, Int<D>>{}, make_coord(_, _0{}));  // (keys, D, tiles)
  auto issue_tile = [&](int tile, int st) {
    auto [tKg, tKs] = tma_partition(tma_k, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
    Barrier::arrive_and_expect_tx(&ss.full[st], Tr::kTileBytes);
    copy(tma_k.with(ss.full[st]), tKg(_, tile), tKs(_, st));
  };
  const int ntiles = ceil_div32(ps.k1 - ps.k0, kKeys);
  if constexpr (kTma) {
    if (tid == 0) {
      bsa_sm90::init_ring(tma_k.get_tma_descriptor(), ss.full, ss.release);
#pragma unroll
      for (int j = 0; j < kStages; ++j)
        if (j < ntiles) issue_tile(j, j);
    }
  }
  // Probe rows r < R: sequence-local query row Nq - R + r; rows past R are zero.
  {
    const T* qb = static_cast<const T*>(p.q) + blockIdx.z * p.q_batch_stride + blockIdx.y * p.q_head_stride;
    constexpr int kChunks = kProbeRows * D / 8;  // 16-byte chunks
    for (int ch = tid; ch < kChunks; ch += kThreads) {
      const int r = ch / (D / 8), kc = ch % (D / 8);
      const bool ok = r < ps.R;
      const T* src = ok ? qb + (ps.sb.q_start + (ps.sb.nq - ps.R + r)) * p.q_row_stride + kc * 8 : qb;
      cp_async_16(&sQ(r, kc * 8), src, ok ? 16 : 0);
    }
    cp_async_commit();
  }
  // Paged keys: this thread's 16-byte chunks of a key tile.
  using Chunks = KeyTileChunks<kThreads, D, kKeys>;
  const int chunk_row0 = Chunks::row0(tid), chunk_col = Chunks::col(tid);
  uint32_t chunk_dst[Chunks::kChunks];
  Chunks::shared_addresses(chunk_dst, sK, tid);
  // Paged keys: tile `tile` of the split into stage buf, each key row through the page table; rows
  // past the split's end are zero.
  auto load_tile = [&](int tile, int buf) {
    const int key0 = ps.k0 + tile * kKeys + chunk_row0;
#pragma unroll
    for (int i = 0; i < Chunks::kChunks; ++i) {
      const int key = key0 + i * Chunks::kRowStep;
      const bool ok = key < ps.k1;
      const T* src = ok ? probe_key_row<T>(p, ps, key) + chunk_col : static_cast<const T*>(p.k);
      cp_async_16(chunk_dst[i] + buf * Chunks::kStageBytes, src, ok ? 16 : 0);
    }
    cp_async_commit();
  };

  const float scale2 = p.softmax_scale * kLog2e;
  ProbeRowsState st;
  // The row work of tile jt on the accumulator, half by half, and the end of each key block (a
  // block of S in {64, 128} keys ends at a half's end; the split's last block at its last half).
  auto tile_math = [&](int jt) {
    if (!warp_active) return;  // warp-uniform: no probe row in this warp
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int tile0 = ps.k0 + jt * kKeys + h * kKeyTile;
      if (tile0 >= ps.k1) break;  // warp-uniform: the split ends in the first half
      probe_tile([&](int e, int col) -> float& { return accrc(e, h * kTileCols + col); }, tile0, ps, scale2, t4, st);
      if (probe_block_ends(ps, tile0) || tile0 + kKeyTile >= ps.k1)
        probe_block_end(ws, ps, tile0 >> ps.block_shift, warp, g, t4, scale2, st);
    }
  };
  if constexpr (kTma) {
    // Q in shared memory (and the barriers initialised) for every warp; then tile j: wait for its
    // stage's barrier, its wgmma and the wait for it, the stage released (the warp that completes
    // the count issues the copy of tile j + kStages into it), its row work.
    cp_async_wait<0>();
    bsa_sm90::fence_proxy_async_shared();
    __syncthreads();
    for (int j = 0; j < ntiles; ++j) {
      const int stg = j % kStages;
      Barrier::wait(&ss.full[stg], (j / kStages) & 1);
      bsa_sm90::wg_issue<true>(mma, tQ, tK(_, _, _, stg), acc);
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc);
      bsa_sm90::release_stage<kThreads / 32>(lane, ss.release[stg], [&] {
        if (j + kStages < ntiles) issue_tile(j + kStages, stg);
      });
      tile_math(j);
    }
  } else {
    // Tile j: wait for it (and, for j = 0, Q), a CTA barrier (both warpgroups are done with tile
    // j - 1's stage, and tile j is visible to the async proxy), issue the copy of tile j + 1 into
    // that stage, then tile j's wgmma, its wait and its row work. Every warpgroup issues every
    // tile's wgmma and its wait sits on no branch.
    load_tile(0, 0);
    for (int j = 0; j < ntiles; ++j) {
      cp_async_wait<0>();
      bsa_sm90::fence_proxy_async_shared();
      __syncthreads();
      if (j + 1 < ntiles) load_tile(j + 1, (j + 1) % kStages);
      bsa_sm90::wg_issue<true>(mma, tQ, tK(_, _, _, j % kStages), acc);
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc);
      tile_math(j);
    }
  }
  probe_finish(partial, warp, g, t4, scale2, st);
#endif  // PROXYATTN_BSA_SM90_DEVICE
}

}  // namespace budgets_sm90
}  // namespace proxyattn
