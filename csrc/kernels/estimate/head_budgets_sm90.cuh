// Stage 2 probe on Hopper (sm_90a): probe_sm90_kernel, probe_kernel of head_budgets.cu with the
// logits on wgmma instead of mma.sync (the per-row work is the same, head_budgets_probe.cuh).
//
// Grid (splits, Hq, B) as probe_kernel, 256 threads = two warpgroups, two CTAs per SM. The probe
// rows of the head (128, zero past R) go to shared memory once (cp.async, 128-byte swizzle); the
// split's keys stream through a 4-stage ring of 64-key tiles (cp.async, three tiles in flight; a
// key row is read through the page table when the keys are paged). Per tile each warpgroup
// issues one 64 x 64 x D wgmma (SS, fp32 accumulation) and, while it runs, does the previous
// tile's row work on its logits, copied out of the accumulator (the shape stage 1's Hopper kernel
// had before its 128-key tiles; the reasons are ptxas's rules for wgmma, given there). The products of 16-bit
// values are exact, so the logits differ from probe_kernel's only by the order of the fp32 sum.
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
constexpr int kStages = 4;  // key tiles in the ring (kStages - 1 in flight ahead)
static_assert(kThreads == kProbeThreads && 64 * kWarpgroups == kProbeRows, "the probe CTA: 8 warps of 16 rows");

template <typename T, int D>
struct Traits {
  using Elem = std::conditional_t<std::is_same_v<T, __half>, cutlass::half_t, cutlass::bfloat16_t>;
  using Atom = decltype(GMMA::Layout_K_SW128_Atom<Elem>{});  // 8 x 64 elements, 128-byte swizzle
  using SmemLayoutQ = decltype(tile_to_shape(Atom{}, Shape<Int<kProbeRows>, Int<D>>{}));
  using SmemLayoutK = decltype(tile_to_shape(Atom{}, Shape<Int<kKeyTile>, Int<D>, Int<kStages>>{}));  // (keys, D, stage)
  using TiledMma = decltype(make_tiled_mma(GMMA::ss_op_selector<Elem, Elem, float, Shape<_64, Int<kKeyTile>, Int<D>>>(),
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
  const int S = p.block_size;
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
  Tensor acc = partition_fragment_C(thr, Shape<Int<kProbeRows>, Int<kKeyTile>>{});  // ((2, 2, 8), 1, 1)
  // (row e, column col): CTA row 16 warp + g + 8 e, key 8 (col / 2) + 2 t4 + col % 2 of the tile.
  Tensor accrc = make_tensor(acc.data(), bsa_sm90::acc_rowcol(acc.layout()));
  static_assert(decltype(size<0>(accrc))::value == 2 && decltype(size<1>(accrc))::value == kTileCols,
                "one thread holds two rows of the tile");
  float prev[2][kTileCols];  // the logits of the tile whose row work runs beside the next tile's wgmma

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
  using Chunks = KeyTileChunks<kThreads, D, kKeyTile>;  // this thread's 16-byte chunks of a key tile
  const int chunk_row0 = Chunks::row0(tid), chunk_col = Chunks::col(tid);
  uint32_t chunk_dst[Chunks::kChunks];
  Chunks::shared_addresses(chunk_dst, sK, tid);
  // Tile `tile` of the split into stage buf: key rows past the split's end are zero.
  auto load_tile = [&](int tile, int buf) {
#pragma unroll
    for (int i = 0; i < Chunks::kChunks; ++i) {
      const int key = ps.k0 + tile * kKeyTile + chunk_row0 + i * Chunks::kRowStep;
      const bool ok = key < ps.k1;
      const T* src = ok ? probe_key_row<T>(p, ps, key) + chunk_col : static_cast<const T*>(p.k);
      cp_async_16(chunk_dst[i] + buf * Chunks::kStageBytes, src, ok ? 16 : 0);
    }
    cp_async_commit();
  };

  const float scale2 = p.softmax_scale * kLog2e;
  ProbeRowsState st;
  const int ntiles = (ps.k1 - ps.k0 + kKeyTile - 1) / kKeyTile;
  // The row work of tile jt on prev, and the end of its key block.
  auto tile_math = [&](int jt) {
    if (!warp_active) return;  // warp-uniform: no probe row in this warp
    const int tile0 = ps.k0 + jt * kKeyTile;
    probe_tile([&](int e, int col) -> float& { return prev[e][col]; }, tile0, ps, scale2, t4, st);
    if ((tile0 + kKeyTile) % S == 0 || jt + 1 == ntiles) probe_block_end(ws, ps, p.nkb, tile0 / S, warp, g, t4, scale2, st);
  };
  // Step j: wait for tile j (and Q), issue its wgmma, refill the stage of tile j - 1 with tile
  // j + 3, do tile j - 1's row work on prev while the wgmma runs, wait for it and copy its
  // logits to prev. As in stage 1's Hopper kernel: every warpgroup issues every tile's wgmma and
  // its wait sits on no branch, so the loop runs one step past the last tile (on a stale stage,
  // logits never read); one commit group per tile slot, empty past the last tile, so waiting for
  // all but the newest two means Q and tiles 0 .. j have landed, and the CTA barrier after that
  // wait means both warpgroups are done with tile j - 1's stage.
  auto step = [&](int j) {
    cp_async_wait<kStages - 2>();
    bsa_sm90::fence_proxy_async_shared();
    __syncthreads();
    bsa_sm90::wg_issue<true>(mma, tQ, tK(_, _, _, j % kStages), acc);
    const int jn = j + kStages - 1;
    if (jn < ntiles) load_tile(jn, jn % kStages);
    else cp_async_commit();
    if (j > 0) tile_math(j - 1);
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc);
#pragma unroll
    for (int e = 0; e < 2; ++e)
#pragma unroll
      for (int col = 0; col < kTileCols; ++col) prev[e][col] = accrc(e, col);
  };
#pragma unroll
  for (int t = 0; t < kStages - 1; ++t) {
    if (t < ntiles) load_tile(t, t);
    else cp_async_commit();
  }
  for (int j = 0; j <= ntiles; ++j) step(j);
  probe_finish(partial, warp, g, t4, scale2, st);
#endif  // PROXYATTN_BSA_SM90_DEVICE
}

}  // namespace budgets_sm90
}  // namespace proxyattn
