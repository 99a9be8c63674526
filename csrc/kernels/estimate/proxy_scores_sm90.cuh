// Stage 1 (proxy_block_scores) on Hopper (sm_90a): scores_sm90_kernel, the scores kernel of
// proxy_scores_kernel.cuh with the logits on wgmma instead of mma.sync (proxy_scores.cu describes
// the algorithm; the pool kernels and the workspace are the same).
//
// Persistent, 256 threads = two warpgroups, two CTAs per SM, one unit at a time from the atomic
// counter (heaviest causal units first), software-pipelined: the next unit is taken, and its query
// rows and first two key tiles fetched, before the end of the current one (write_unit_scores) runs.
// A unit is `bpc` consecutive query blocks of one (b, group), each block's kept queries in a slot
// of `rows_blk` CTA rows (S/s rounded up to 16, a warp's rows), 128 rows in all: warpgroup w holds
// rows 64 w + [0, 64), warp i of it rows 16 i + [0, 16). Per unit the pooled query rows go to
// shared memory once (cp.async, 128-byte swizzle, zero for padding rows), then the kept keys stream
// through a 2-stage ring of 128-key tiles by TMA (one thread issues a tile's copy onto the stage's
// transaction barrier; the next tile is in flight while this one is used). Per tile each warpgroup
// waits for the stage's barrier, issues one 64 x 128 x D wgmma (SS, fp16 or bf16 as the
// (b, group)'s flag says, fp32 accumulation), waits for it, releases the stage (one arrival per
// warp on a shared counter; the warp that makes it eight issues the copy of the tile two ahead into
// it, so no thread ever waits for a free stage) and does the tile's math: per row the online
// (max, sum), its weights taken before the tile's maxima in a lazy frame (online_rows_ahead; the
// mma.sync kernel takes them after, in frame fl(m c), so the sums differ at the rounding level),
// and the per-key-block maxima. No CTA barrier per tile: a warpgroup runs up to a tile ahead of the
// other, and the other CTA on the SM keeps the tensor cores busy meanwhile. A 128-key tile halves
// the per-key cost of everything done once per tile (wgmma descriptors, the frame test, the online
// rescale). Key rows past the (b, group)'s kept keys are whatever the workspace holds there
// (another group's rows, possibly never written, or zeros past its end): the mask turns their
// logits to -inf.
// Only the aligned geometry (S % s == 0 and (S/s) % 8 == 0): a key block is a whole number of 8-key
// column groups, so block maxima are per-thread maxima and two quad shuffles; S/s is a template
// parameter, so a tile's blocks (and their maxima, from which the tile maximum follows) are fixed
// at compile time. The end of a unit (A from the scratch) is write_unit_scores, shared with the
// other kernel. The wgmma products of 16-bit values are exact and accumulate in fp32, so logits
// differ from the mma.sync kernel's only by the order of the sum.
#pragma once

#include <climits>
#include <cmath>
#include <cstdint>

#include <cute/tensor.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/numeric_types.h>

#include "kernels/bsa_sm90/utils.cuh"
#include "kernels/common/chained_launch.cuh"
#include "kernels/estimate/proxy_scores_rows.cuh"

namespace proxyattn {
namespace scores_sm90 {

using namespace cute;

constexpr int kWarpgroups = 2;
constexpr int kThreads = 128 * kWarpgroups;
constexpr int kRows = 64 * kWarpgroups;  // query rows per CTA = scratch rows per slot
constexpr int kKeys = 128;               // kept keys per tile
constexpr int kStages = 2;               // key tiles in the ring (the next in flight)

// Query blocks of one unit: rows_blk CTA rows each (a multiple of 16), bpc of them.
struct Geometry {
  int rows_blk, bpc, nmb;
};
__host__ __device__ inline Geometry geometry(int S, int s, int nqb) {
  Geometry g;
  const int rows = ceil_div32(S, s);
  g.rows_blk = (rows + 15) / 16 * 16;
  g.bpc = kRows / g.rows_blk;
  g.nmb = ceil_div32(nqb, g.bpc);
  return g;
}

template <int D>
struct Traits {
  using Atom = decltype(GMMA::Layout_K_SW128_Atom<cutlass::half_t>{});  // 8 x 64 halves, 128-byte swizzle
  using SmemLayoutQ = decltype(tile_to_shape(Atom{}, Shape<Int<kRows>, Int<D>>{}));
  using SmemLayoutK = decltype(tile_to_shape(Atom{}, Shape<Int<kKeys>, Int<D>, Int<kStages>>{}));  // (keys, D, stage)
  // The pooled keys of every (b, group) as one (rows, D) tensor for the tensor map; the copy moves
  // bits, so fp16 stands for either 16-bit type.
  using GTensorK = decltype(make_tensor(make_gmem_ptr(static_cast<cutlass::half_t const*>(nullptr)),
                                        Shape<int32_t, Int<D>>{}, Stride<int64_t, _1>{}));
  using TmaK = decltype(make_tma_copy(SM90_TMA_LOAD{}, std::declval<GTensorK>(), take<0, 2>(SmemLayoutK{}),
                                      Shape<Int<kKeys>, Int<D>>{}, _1{}));
  static constexpr uint32_t kTileBytes = kKeys * D * 2;
  template <class T>
  using TiledMma = decltype(make_tiled_mma(GMMA::ss_op_selector<T, T, float, Shape<_64, Int<kKeys>, Int<D>>>(),
                                           Layout<Shape<Int<kWarpgroups>, _1, _1>>{}));
  struct SharedStorage {
    alignas(1024) cutlass::half_t q[cosize_v<SmemLayoutQ>];
    alignas(1024) cutlass::half_t k[cosize_v<SmemLayoutK>];
    float m[kRows], lg[kRows];
    int nlim[kRows];
    int warp_lim[kThreads / 32];
    int blk_nmax[kRows / 16];
    long long unit;
    alignas(8) uint64_t full[kStages];  // a stage's key tile has landed (TMA transaction barrier)
    int release[kStages];               // warps done with a stage's wgmma (see the kernel)
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));
};

// c = sm * log2(e) clamped into [FLT_MIN, FLT_MAX] by the launcher (as for the mma.sync kernel).
// kBlockKeys = S / s, the kept keys of one key block (a power of two from 8 to 128), fixed at compile
// time so that a tile's key blocks are known: kKeys / kBlockKeys whole blocks per tile.
template <int D, int kBlockKeys>
__global__ void __launch_bounds__(kThreads, 2)
    scores_sm90_kernel(const ProxyScoresParams p, float c, int64_t rows_q, int64_t rows_k, const uint16_t* q16,
                       const __grid_constant__ typename Traits<D>::TmaK tma_k, int32_t k_rows_total, const int* flags,
                       unsigned long long* counter, float* scratch_all) {
#if PROXYATTN_BSA_SM90_DEVICE
  pdl_wait();  // chained_launch.cuh: before any global memory access
  pdl_launch_dependents();
  using Tr = Traits<D>;
  using scores::kept_count;
  extern __shared__ __align__(1024) char smem_raw[];
  auto& ss = *reinterpret_cast<typename Tr::SharedStorage*>(smem_raw);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
  const int S = p.block_size, s = p.stride;
  const Geometry geo = geometry(S, s, p.nqb);
  static_assert(kBlockKeys >= 8 && kBlockKeys <= kKeys && (kBlockKeys & (kBlockKeys - 1)) == 0,
                "a key block is 8 to 128 kept keys, a power of two");
  const int64_t bg_count = static_cast<int64_t>(p.batch) * p.num_groups;
  const long long units = bg_count * geo.nmb;
  float* scratch = scratch_all + static_cast<int64_t>(blockIdx.x) * p.nkb * kRows;

  Tensor sQh = make_tensor(make_smem_ptr(ss.q), typename Tr::SmemLayoutQ{});  // (rows, D)
  Tensor sKh = make_tensor(make_smem_ptr(ss.k), typename Tr::SmemLayoutK{});  // (keys, D, stage)
  Tensor sQb = make_tensor(make_smem_ptr(reinterpret_cast<cutlass::bfloat16_t*>(ss.q)), typename Tr::SmemLayoutQ{});
  Tensor sKb = make_tensor(make_smem_ptr(reinterpret_cast<cutlass::bfloat16_t*>(ss.k)), typename Tr::SmemLayoutK{});
  typename Tr::template TiledMma<cutlass::half_t> mma_h;
  typename Tr::template TiledMma<cutlass::bfloat16_t> mma_b;
  auto thr_h = mma_h.get_thread_slice(tid);
  auto wg_h = bsa_sm90::warpgroup_slice(mma_h, tid);  // the descriptors' slices (uniform registers)
  auto wg_b = bsa_sm90::warpgroup_slice(mma_b, tid);
  Tensor tQh = wg_h.partition_fragment_A(sQh);  // (MMA, MMA_M, MMA_D) descriptors
  Tensor tKh = wg_h.partition_fragment_B(sKh);  // (MMA, MMA_N, MMA_D, stage) descriptors
  Tensor tQb = wg_b.partition_fragment_A(sQb);
  Tensor tKb = wg_b.partition_fragment_B(sKb);
  Tensor acc = partition_fragment_C(thr_h, Shape<Int<kRows>, Int<kKeys>>{});  // ((2, 2, kKeys/8), 1, 1)
  // (row ri, column ci): CTA row 16 warp + g + 8 ri, key 2 t4 + (ci & 1) + 8 (ci >> 1) of the tile.
  Tensor accrc = make_tensor(acc.data(), bsa_sm90::acc_rowcol(acc.layout()));
  constexpr int kCols = kKeys / 4;
  static_assert(decltype(size<0>(accrc))::value == 2 && decltype(size<1>(accrc))::value == kCols,
                "one thread holds two rows of the tile");

  using Barrier = cutlass::arch::ClusterTransactionBarrier;
  if (tid == 0) bsa_sm90::init_ring(tma_k.get_tma_descriptor(), ss.full, ss.release);
  // The pooled keys as the tensor map's coordinates, (rows of every (b, group), D).
  Tensor mK = tma_k.get_tma_tensor(make_shape(k_rows_total, Int<D>{}));
  int it = 0;  // key tiles this CTA has consumed: tile `it` sits in stage it % kStages, phase (it / kStages) & 1

  // A unit as this thread sees it: the unit, its two rows' last kept keys, the warp's largest and
  // smallest of them, and the key tiles the CTA runs (after the warps' limits are in ss.warp_lim).
  struct Unit {
    long long u;
    scores::ScoreUnit w;
    int lim[2], my_lim, my_min, ntiles;
  };
  // CTA row r: query block mb * bpc + r / rows_blk, kept query j_lo(m) + r % rows_blk of it; the
  // kept query row it loads, or -1 for padding.
  auto kept_row = [&](const scores::ScoreUnit& w, int r) {
    const int bl = r / geo.rows_blk, jj = r - bl * geo.rows_blk;
    const int m = w.mb * geo.bpc + bl;
    if (bl >= geo.bpc || m >= w.nqb_seq) return -1;
    const int j = kept_count(m * S, w.i0, s) + jj;
    return j < kept_count(min((m + 1) * S, w.sb.nq), w.i0, s) ? j : -1;
  };
  // Unit ss.unit (visible to every thread): its rows' limits, and the warp's range of them in
  // ss.warp_lim (read back by tiles_of after a CTA barrier).
  auto begin_unit = [&](Unit& x) {
    x.u = ss.unit;
    if (x.u >= units) return;
    x.w = scores::score_unit(p, x.u, bg_count, geo.nmb, flags);
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) {
      const int j = kept_row(x.w, 16 * warp + g + 8 * ri);
      x.lim[ri] = scores::kept_row_limit(j >= 0, p.causal, x.w.off, x.w.i0, j, s, x.w.nkk);
    }
    scores::warp_limit_range(x.lim, x.my_lim, x.my_min);
    if (lane == 0) ss.warp_lim[warp] = x.my_lim;
  };
  auto tiles_of = [&](Unit& x) {
    int cta_lim = -1;
#pragma unroll
    for (int wi = 0; wi < kThreads / 32; ++wi) cta_lim = max(cta_lim, ss.warp_lim[wi]);
    x.ntiles = x.u < units ? (cta_lim + kKeys) / kKeys : 0;  // tiles holding kept keys [0, cta_lim]
  };
  // The copy of unit x's key tile `tile` into stage st (one thread): rows past the kept keys are the
  // workspace's next rows (masked, written or not) or, past its end, zeros.
  auto issue_tile = [&](const Unit& x, int tile, int st) {
    Tensor gK = local_tile(domain_offset(make_coord(static_cast<int32_t>(x.w.kbgrow * rows_k), _0{}), mK),
                           Shape<Int<kKeys>, Int<D>>{}, make_coord(tile, _0{}));  // (keys, D)
    auto [tKg, tKs] = tma_partition(tma_k, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sKh), group_modes<0, 2>(gK));
    Barrier::arrive_and_expect_tx(&ss.full[st], Tr::kTileBytes);
    copy(tma_k.with(ss.full[st]), tKg, tKs(_, st));
  };
  // Unit x's first tiles (both stages are free: the last unit's wgmmas have completed) and its
  // pooled query rows (cp.async, zero for padding rows), in flight until the unit's tile loop.
  auto prefetch_unit = [&](const Unit& x) {
    if (x.ntiles == 0) return;
    if (tid == 0) {
#pragma unroll
      for (int j = 0; j < kStages; ++j)
        if (j < x.ntiles) issue_tile(x, j, (it + j) % kStages);
    }
    constexpr int kChunks = kRows * D / 8;  // 16-byte chunks
    const int64_t qrow0 = x.w.bgrow * rows_q;
    for (int ch = tid; ch < kChunks; ch += kThreads) {
      const int r = ch / (D / 8), kc = ch % (D / 8);
      const int j = kept_row(x.w, r);
      const uint16_t* src = j >= 0 ? q16 + (qrow0 + j) * D + kc * 8 : q16;
      cp_async_16(&sQh(r, kc * 8), src, j >= 0 ? 16 : 0);
    }
    proxyattn::cp_async_commit();
  };

  // The units are software-pipelined: a unit's first key tiles and query rows are fetched during
  // the previous unit's end (write_unit_scores), and its limits computed there.
  Unit cur;
  if (tid == 0) ss.unit = static_cast<long long>(atomicAdd(counter, 1ull));
  __syncthreads();
  begin_unit(cur);
  __syncthreads();  // the warps' limits
  tiles_of(cur);
  prefetch_unit(cur);
  while (cur.u < units) {
    const scores::ScoreUnit& w = cur.w;
    const int lim[2] = {cur.lim[0], cur.lim[1]};
    const int my_lim = cur.my_lim, my_min = cur.my_min, ntiles = cur.ntiles;
    const bool bf16 = w.bf16;  // CTA-uniform

    float row_m[2] = {-INFINITY, -INFINITY}, row_l[2] = {0.f, 0.f}, row_f[2] = {0.f, 0.f};
    bool row_exact = false;  // online_rows' frame
    // Row ri's largest logit in key block n (all four lanes of the row merged), stored for
    // write_unit_scores when `on` (lanes t4 == 0 store). The shuffles run on every lane whatever
    // `on` says, so that no branch surrounds them.
    auto store_block_max = [&](int n, const float (&v)[2], bool on) {
#pragma unroll
      for (int ri = 0; ri < 2; ++ri) {
        const float m = scores::quad_max(v[ri]);
        if (on && t4 == 0 && lim[ri] >= 0) scratch[static_cast<int64_t>(n) * kRows + 16 * warp + g + 8 * ri] = m;
      }
    };
    // The math of tile jt (mask, block maxima, online max and sum) on the accumulator (row, column
    // view arc), after its wgmma has completed.
    auto tile_math = [&](int jt, auto& arc) {
      auto rc = [&](int ri, int ci) -> float& { return arc(ri, ci); };
      // No branch around a read of the accumulator but this warp-uniform one, and the mask is a
      // select, so a tile past the warp's rows (every tile for a warp without rows) is masked whole
      // and its math adds nothing.
      const int kk0 = jt * kKeys;
      if (kk0 + kKeys - 1 > min(my_min, my_lim)) {  // causal edge, past the last key or no row: mask
#pragma unroll
        for (int ri = 0; ri < 2; ++ri)
#pragma unroll
          for (int ci = 0; ci < kCols; ++ci)
            rc(ri, ci) = kk0 + 2 * t4 + (ci & 1) + 8 * (ci >> 1) > lim[ri] ? -INFINITY : rc(ri, ci);
      }
      // The tile's weights in the rows' frames, before (and independent of) its maxima.
      float lt[2];
#pragma unroll
      for (int ri = 0; ri < 2; ++ri)
        lt[ri] = tile_weight_sum<kCols>([&](int ci) { return exp2f(fmaf(rc(ri, ci), c, -row_f[ri])); });
      // Per row, this thread's maximum in each key block of the tile (its columns 2 nt, 2 nt + 1
      // hold keys 8 nt + [0, 8), so a block of kBlockKeys keys is kBlockKeys / 8 column pairs),
      // stored as soon as it is known (for blocks with a key some row of the warp sees: later
      // blocks are masked for every row, and their index could pass nkb - 1), and the tile maximum
      // from them.
      constexpr int kBlocks = kKeys / kBlockKeys;
      constexpr int kPairs = kCols / 2 / kBlocks;
      float tmax[2];
#pragma unroll
      for (int b = 0; b < kBlocks; ++b) {
        float bmax[2];
#pragma unroll
        for (int ri = 0; ri < 2; ++ri) {
          float v = fmaxf(rc(ri, 2 * b * kPairs), rc(ri, 2 * b * kPairs + 1));
#pragma unroll
          for (int e = 1; e < kPairs; ++e)
            v = fmaxf(v, fmaxf(rc(ri, 2 * (b * kPairs + e)), rc(ri, 2 * (b * kPairs + e) + 1)));
          bmax[ri] = v;
          tmax[ri] = b == 0 ? v : fmaxf(tmax[ri], v);
        }
        store_block_max(kk0 / kBlockKeys + b, bmax, kk0 + b * kBlockKeys <= my_lim);
      }
      // Online (max, sum) per thread and row (online_rows_ahead: the weights above are kept
      // unless some row of the warp must leave its frame).
      scores::online_rows_ahead<2, kCols>(row_m, row_l, row_f, row_exact, rc, tmax, lt, c);
    };
    // Iteration j (tile t = it + j of the CTA, stage t % kStages): wait for the stage's tile,
    // issue its wgmma, wait for that, release the stage (bsa_sm90::release_stage: the warp that
    // completes the count issues the copy of tile j + kStages into it) and do the tile's math. The
    // loop is instantiated per 16-bit type (ptxas serialises every wgmma if the accumulator is read
    // on a branch while the wgmma that wrote it sits on another), and every warpgroup issues the
    // wgmma of every tile.
    auto run_tiles = [&](auto& mma, auto& tQ, auto& tK) {
      for (int j = 0; j < ntiles; ++j) {
        const int t = it + j, st = t % kStages;
        Barrier::wait(&ss.full[st], (t / kStages) & 1);
        bsa_sm90::wg_issue<true>(mma, tQ, tK(_, _, _, st), acc);
        warpgroup_wait<0>();
        warpgroup_fence_operand(acc);
        bsa_sm90::release_stage<kThreads / 32>(lane, ss.release[st], [&] {
          if (j + kStages < ntiles) issue_tile(cur, j + kStages, st);
        });
        tile_math(j, accrc);
      }
    };

    if (ntiles > 0) {
      proxyattn::cp_async_wait<0>();
      bsa_sm90::fence_proxy_async_shared();
      __syncthreads();  // Q is in shared memory for every warpgroup's wgmma
      if (bf16) run_tiles(mma_b, tQb, tKb);
      else run_tiles(mma_h, tQh, tKh);
      it += ntiles;
    }

    // Final row statistics (the sums in the true frame): merge the four lanes of each row.
    scores::row_sums_true_ahead<2>(row_m, row_l, row_f, row_exact, c);
#pragma unroll
    for (int ri = 0; ri < 2; ++ri)
      scores::store_row_stats(row_m[ri], row_l[ri], lim[ri], 16 * warp + g + 8 * ri, t4, p, c, ss.m, ss.lg, ss.nlim);
    if (tid == 0) ss.unit = static_cast<long long>(atomicAdd(counter, 1ull));
    // Scratch rows and row statistics are visible to the whole CTA, every wgmma of the unit has
    // completed (Q and the key ring are free) and the next unit is known.
    __syncthreads();
    scores::block_row_limits(ss.nlim, ss.blk_nmax, geo.rows_blk, geo.bpc);
    Unit next;
    begin_unit(next);
    __syncthreads();  // the block limits and the next unit's warp limits
    tiles_of(next);
    prefetch_unit(next);
    scores::write_unit_scores<kThreads, true>(p, c, scratch, kRows, geo.rows_blk, geo.bpc, w.mb, w.bgrow, ss.m,
                                              ss.lg, ss.nlim, ss.blk_nmax);
    __syncthreads();  // statistics and scratch are reused by the next unit
    cur = next;
  }
#endif  // PROXYATTN_BSA_SM90_DEVICE
}

}  // namespace scores_sm90
}  // namespace proxyattn
