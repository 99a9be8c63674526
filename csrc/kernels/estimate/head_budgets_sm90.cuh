// Stage 2 probe on Hopper (sm_90a): probe_sm90_kernel, probe_kernel of head_budgets.cu with the
// logits on wgmma instead of mma.sync (the per-row work is the same, head_budgets_probe.cuh).
//
// Grid (splits, Hq, B) as probe_kernel, 256 threads = two warpgroups, two CTAs per SM. The probe
// rows of the head (128, zero past R) go to shared memory once (cp.async, 128-byte swizzle); the
// split's keys stream through a 2-stage ring of 128-key tiles (cp.async, the next tile in flight;
// a key row is read through the page table when the keys are paged). Per tile each warpgroup
// issues one 64 x 128 x D wgmma (SS, fp32 accumulation), waits for it and does the tile's row work
// on the accumulator, as two 64-key halves (probe_tile's unit, so that a key block of 64 ends at a
// half); the other CTA on the SM keeps the tensor cores busy meanwhile (stage 1's Hopper kernel
// made the same trade: a 128-key tile halves the per-key cost of what runs once per tile, the CTA
// barrier, the copies' issue and the wgmma descriptors). The products of 16-bit values are exact,
// so the logits differ from probe_kernel's only by the order of the fp32 sum.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cute/tensor.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/numeric_types.h>

#include "kernels/bsa_sm90/utils.cuh"
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
  struct SharedStorage {
    alignas(1024) Elem q[cosize_v<SmemLayoutQ>];
    alignas(1024) Elem k[cosize_v<SmemLayoutK>];
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 2) probe_sm90_kernel(const HeadBudgetsParams p) {
#if PROXYATTN_BSA_SM90_DEVICE
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
  using Chunks = KeyTileChunks<kThreads, D, kKeys>;  // this thread's 16-byte chunks of a key tile
  const int chunk_row0 = Chunks::row0(tid), chunk_col = Chunks::col(tid);
  uint32_t chunk_dst[Chunks::kChunks];
  Chunks::shared_addresses(chunk_dst, sK, tid);
  // Tile `tile` of the split into stage buf: key rows past the split's end are zero. Unpaged keys:
  // the thread's first chunk of tile 0 addressed once, a chunk kRowStep rows and a tile kKeys rows
  // further on, without a test per chunk on the tiles that lie inside the split (all but the
  // last); paged keys: each row through the page table.
  const bool paged = p.pages.paged();
  const T* chunk0 = paged ? static_cast<const T*>(p.k) : probe_key_row<T>(p, ps, ps.k0 + chunk_row0) + chunk_col;
  const int64_t chunk_step = int64_t(Chunks::kRowStep) * p.k_row_stride, tile_step = int64_t(kKeys) * p.k_row_stride;
  auto load_tile = [&](int tile, int buf) {
    const int key0 = ps.k0 + tile * kKeys + chunk_row0;
    if (paged) {
#pragma unroll
      for (int i = 0; i < Chunks::kChunks; ++i) {
        const int key = key0 + i * Chunks::kRowStep;
        const bool ok = key < ps.k1;
        const T* src = ok ? probe_key_row<T>(p, ps, key) + chunk_col : static_cast<const T*>(p.k);
        cp_async_16(chunk_dst[i] + buf * Chunks::kStageBytes, src, ok ? 16 : 0);
      }
    } else if (ps.k0 + (tile + 1) * kKeys <= ps.k1) {  // CTA-uniform: every key of the tile in the split
      const T* src = chunk0 + tile * tile_step;
#pragma unroll
      for (int i = 0; i < Chunks::kChunks; ++i, src += chunk_step)
        cp_async_16(chunk_dst[i] + buf * Chunks::kStageBytes, src, 16);
    } else {
      const T* tile_src = chunk0 + tile * tile_step;
#pragma unroll
      for (int i = 0; i < Chunks::kChunks; ++i) {
        const bool ok = key0 + i * Chunks::kRowStep < ps.k1;
        cp_async_16(chunk_dst[i] + buf * Chunks::kStageBytes, ok ? tile_src + i * chunk_step : static_cast<const T*>(p.k),
                    ok ? 16 : 0);
      }
    }
    cp_async_commit();
  };

  const float scale2 = p.softmax_scale * kLog2e;
  ProbeRowsState st;
  const int ntiles = ceil_div32(ps.k1 - ps.k0, kKeys);
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
  // Tile j: wait for it (and, for j = 0, Q), a CTA barrier (both warpgroups are done with tile
  // j - 1's stage, and tile j is visible to the async proxy), issue the copy of tile j + 1 into
  // that stage, then tile j's wgmma, its wait and its row work. Every warpgroup issues every tile's
  // wgmma and its wait sits on no branch.
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
  probe_finish(partial, warp, g, t4, scale2, st);
#endif  // PROXYATTN_BSA_SM90_DEVICE
}

}  // namespace budgets_sm90
}  // namespace proxyattn
