// Stage 1 (proxy_block_scores) on Hopper (sm_90a): scores_sm90_kernel, the scores kernel of
// proxy_scores_kernel.cuh with the logits on wgmma instead of mma.sync (proxy_scores.cu describes
// the algorithm; the pool kernels and the workspace are the same).
//
// Persistent, 256 threads = two warpgroups, two CTAs per SM, one unit at a time from the atomic
// counter (heaviest causal units first). A unit is `bpc` consecutive query blocks of one
// (b, group), each block's kept queries in a slot of `rows_blk` CTA rows (S/s rounded up to 16, a
// warp's rows), 128 rows in all: warpgroup w holds rows 64 w + [0, 64), warp i of it rows
// 16 i + [0, 16). Per unit the pooled query rows go to shared memory once (cp.async, 128-byte
// swizzle, zero for padding rows), then the kept keys stream through a 4-stage ring of 64-key
// tiles (cp.async, three tiles in flight). Per tile each warpgroup issues one 64 x 64 x D wgmma
// (SS, fp16 or bf16 as the (b, group)'s flag says, fp32 accumulation, into one of two
// accumulators in turn) and, while it runs, does the previous tile's math on the other: per row the same online (max, sum) and per-key-block maxima as the
// mma.sync kernel. Only the aligned geometry (S % s == 0 and (S/s) % 8 == 0): a key block is a
// whole number of 8-key column groups, so block maxima are per-thread maxima and two quad
// shuffles; S/s is a template parameter, so a tile's blocks (and their maxima, from which the
// tile maximum follows) are fixed at compile time. A thread's key chunks have their addresses
// computed once per kernel. The end of a unit (A from the scratch) is write_unit_scores, shared
// with the other kernel. The wgmma products of 16-bit values are exact and accumulate in fp32, so logits differ
// from the mma.sync kernel's only by the order of the sum.
#pragma once

#include <climits>
#include <cmath>
#include <cstdint>

#include <cute/tensor.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/numeric_types.h>

#include "kernels/bsa_sm90/utils.cuh"
#include "kernels/estimate/proxy_scores_rows.cuh"

namespace proxyattn {
namespace scores_sm90 {

using namespace cute;

constexpr int kWarpgroups = 2;
constexpr int kThreads = 128 * kWarpgroups;
constexpr int kRows = 64 * kWarpgroups;  // query rows per CTA = scratch rows per slot
constexpr int kKeys = 64;                // kept keys per tile
constexpr int kStages = 4;               // key tiles in the ring (kStages - 1 in flight ahead)

// Query blocks of one unit: rows_blk CTA rows each (a multiple of 16), bpc of them.
struct Geometry {
  int rows_blk, bpc, nmb;
};
__host__ __device__ inline Geometry geometry(int S, int s, int nqb) {
  Geometry g;
  const int rows = (S + s - 1) / s;
  g.rows_blk = (rows + 15) / 16 * 16;
  g.bpc = kRows / g.rows_blk;
  g.nmb = (nqb + g.bpc - 1) / g.bpc;
  return g;
}

template <int D>
struct Traits {
  using Atom = decltype(GMMA::Layout_K_SW128_Atom<cutlass::half_t>{});  // 8 x 64 halves, 128-byte swizzle
  using SmemLayoutQ = decltype(tile_to_shape(Atom{}, Shape<Int<kRows>, Int<D>>{}));
  using SmemLayoutK = decltype(tile_to_shape(Atom{}, Shape<Int<kKeys>, Int<D>, Int<kStages>>{}));  // (keys, D, stage)
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
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));
};

// c = sm * log2(e) clamped into [FLT_MIN, FLT_MAX] by the launcher (as for the mma.sync kernel).
// kBlockKeys = S / s, the kept keys of one key block (a power of two from 8 to 128), fixed at compile
// time so that a tile's key blocks are known: kKeys / kBlockKeys whole blocks per tile, or half of
// one at 128.
template <int D, int kBlockKeys>
__global__ void __launch_bounds__(kThreads, 2)
    scores_sm90_kernel(const ProxyScoresParams p, float c, int64_t rows_q, int64_t rows_k, const uint16_t* q16,
                       const uint16_t* k16, const int* flags, unsigned long long* counter, float* scratch_all) {
#if PROXYATTN_BSA_SM90_DEVICE
  using Tr = Traits<D>;
  using scores::kept_count;
  extern __shared__ __align__(1024) char smem_raw[];
  auto& ss = *reinterpret_cast<typename Tr::SharedStorage*>(smem_raw);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
  const int S = p.block_size, s = p.stride;
  const Geometry geo = geometry(S, s, p.nqb);
  static_assert(kBlockKeys >= 8 && kBlockKeys <= 2 * kKeys && (kBlockKeys & (kBlockKeys - 1)) == 0,
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
  // Two accumulators: tile j's wgmma writes acc[j % 2] while tile j - 1's math reads and masks
  // acc[(j - 1) % 2] in place (no copy; a register a wgmma in flight may write is never read).
  Tensor acc0 = partition_fragment_C(thr_h, Shape<Int<kRows>, Int<kKeys>>{});  // ((2, 2, kKeys/8), 1, 1)
  Tensor acc1 = partition_fragment_C(thr_h, Shape<Int<kRows>, Int<kKeys>>{});
  // (row ri, column ci): CTA row 16 warp + g + 8 ri, key 2 t4 + (ci & 1) + 8 (ci >> 1) of the tile.
  Tensor accrc0 = make_tensor(acc0.data(), bsa_sm90::acc_rowcol(acc0.layout()));
  Tensor accrc1 = make_tensor(acc1.data(), bsa_sm90::acc_rowcol(acc1.layout()));
  constexpr int kCols = kKeys / 4;
  static_assert(decltype(size<0>(accrc0))::value == 2 && decltype(size<1>(accrc0))::value == kCols,
                "one thread holds two rows of the tile");

  // This thread's 16-byte chunks of a key tile, fixed for the whole kernel: chunk i's global offset
  // is a constant i kRowStep D past the first's (one swizzle period per stage).
  using Chunks = KeyTileChunks<kThreads, D, kKeys>;
  const int chunk_row0 = Chunks::row0(tid), chunk_col = Chunks::col(tid);
  uint32_t chunk_dst[Chunks::kChunks];
  Chunks::shared_addresses(chunk_dst, sKh, tid);

  for (;;) {
    if (tid == 0) ss.unit = static_cast<long long>(atomicAdd(counter, 1ull));
    __syncthreads();
    const long long u = ss.unit;
    if (u >= units) break;
    const scores::ScoreUnit w = scores::score_unit(p, u, bg_count, geo.nmb, flags);
    const int mb = w.mb, off = w.off, i0 = w.i0, nkk = w.nkk, nqb_seq = w.nqb_seq;
    const SeqBounds& sb = w.sb;
    const int64_t bgrow = w.bgrow;
    const bool bf16 = w.bf16;  // CTA-uniform

    // CTA row r: query block mb * bpc + r / rows_blk, kept query j_lo(m) + r % rows_blk of it; the
    // kept query row it loads, or -1 for padding.
    auto kept_row = [&](int r) {
      const int bl = r / geo.rows_blk, jj = r - bl * geo.rows_blk;
      const int m = mb * geo.bpc + bl;
      if (bl >= geo.bpc || m >= nqb_seq) return -1;
      const int j = kept_count(m * S, i0, s) + jj;
      return j < kept_count(min((m + 1) * S, sb.nq), i0, s) ? j : -1;
    };
    int lim[2];
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) {
      const int j = kept_row(16 * warp + g + 8 * ri);
      lim[ri] = scores::kept_row_limit(j >= 0, p.causal, off, i0, j, s, nkk);
    }
    int my_lim, my_min;
    scores::warp_limit_range(lim, my_lim, my_min);
    if (lane == 0) ss.warp_lim[warp] = my_lim;
    __syncthreads();
    int cta_lim = -1;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) cta_lim = max(cta_lim, ss.warp_lim[w]);
    const int ntiles = (cta_lim + kKeys) / kKeys;  // tiles holding kept keys [0, cta_lim]

    const int64_t qrow0 = bgrow * rows_q, krow0 = bgrow * rows_k;
    auto load_q = [&]() {
      constexpr int kChunks = kRows * D / 8;  // 16-byte chunks
      for (int ch = tid; ch < kChunks; ch += kThreads) {
        const int r = ch / (D / 8), kc = ch % (D / 8);
        const int j = kept_row(r);
        const uint16_t* src = j >= 0 ? q16 + (qrow0 + j) * D + kc * 8 : q16;
        cp_async_16(&sQh(r, kc * 8), src, j >= 0 ? 16 : 0);
      }
      proxyattn::cp_async_commit();
    };
    const uint16_t* k_unit = k16 + krow0 * D;
    // Tile `tile` into stage buf: every chunk of a tile inside the kept keys (CTA-uniform test),
    // else zero-filled rows past them (their source is never read).
    auto load_tile = [&](int tile, int buf) {
      const uint16_t* src = k_unit + (static_cast<int64_t>(tile) * kKeys + chunk_row0) * D + chunk_col;
      const uint32_t dst = buf * Chunks::kStageBytes;
      if ((tile + 1) * kKeys <= nkk) {
#pragma unroll
        for (int i = 0; i < Chunks::kChunks; ++i) cp_async_16(chunk_dst[i] + dst, src + i * Chunks::kRowStep * D, 16);
      } else {
        const int rows = nkk - tile * kKeys - chunk_row0;  // chunk i holds a kept key when i kRowStep < rows
#pragma unroll
        for (int i = 0; i < Chunks::kChunks; ++i) {
          const bool ok = i * Chunks::kRowStep < rows;
          cp_async_16(chunk_dst[i] + dst, ok ? src + i * Chunks::kRowStep * D : k16, ok ? 16 : 0);
        }
      }
      proxyattn::cp_async_commit();
    };

    float row_m[2] = {-INFINITY, -INFINITY}, row_l[2] = {0.f, 0.f};
    bool row_exact = false;  // online_rows' frame
    // Row ri's largest logit in key block n (all four lanes of the row merged), stored for
    // write_unit_scores; lanes t4 == 0 store.
    auto store_block_max = [&](int n, const float (&v)[2]) {
#pragma unroll
      for (int ri = 0; ri < 2; ++ri) {
        const float m = scores::quad_max(v[ri]);
        if (t4 == 0 && lim[ri] >= 0) scratch[static_cast<int64_t>(n) * kRows + 16 * warp + g + 8 * ri] = m;
      }
    };
    float half_max[2];  // kBlockKeys = 2 kKeys: the block's maxima over its first tile

    // The math of tile jt (mask, block maxima, online max and sum) on its accumulator (row, column
    // view arc); it runs while the next tile's wgmma is in flight.
    auto tile_math = [&](int jt, auto& arc) {
      auto rc = [&](int ri, int ci) -> float& { return arc(ri, ci); };
      // No branch around a read of the accumulator but this warp-uniform one, and the mask is a
      // select (ptxas serialises every wgmma otherwise), so a tile past the warp's rows (at most
      // two per unit) is masked whole and its math adds nothing.
      const int kk0 = jt * kKeys;
      if (kk0 + kKeys - 1 > min(my_min, my_lim)) {  // causal edge, past the last key or no row: mask
#pragma unroll
        for (int ri = 0; ri < 2; ++ri)
#pragma unroll
          for (int ci = 0; ci < kCols; ++ci)
            rc(ri, ci) = kk0 + 2 * t4 + (ci & 1) + 8 * (ci >> 1) > lim[ri] ? -INFINITY : rc(ri, ci);
      }
      // Per row, this thread's maxima per key block of the tile (its columns 2 nt, 2 nt + 1
      // hold keys 8 nt + [0, 8), so a block of kBlockKeys keys is kBlockKeys / 8 column
      // pairs), and the tile maximum from them.
      constexpr int kBlocks = kBlockKeys <= kKeys ? kKeys / kBlockKeys : 1;
      constexpr int kPairs = kCols / 2 / kBlocks;
      float bmax[kBlocks][2], tmax[2];
#pragma unroll
      for (int ri = 0; ri < 2; ++ri) {
#pragma unroll
        for (int b = 0; b < kBlocks; ++b) {
          float v = fmaxf(rc(ri, 2 * b * kPairs), rc(ri, 2 * b * kPairs + 1));
#pragma unroll
          for (int e = 1; e < kPairs; ++e)
            v = fmaxf(v, fmaxf(rc(ri, 2 * (b * kPairs + e)), rc(ri, 2 * (b * kPairs + e) + 1)));
          bmax[b][ri] = v;
          tmax[ri] = b == 0 ? v : fmaxf(tmax[ri], v);
        }
      }
      // Online (max, sum) per thread and row; a sum is rescaled only when its max grows.
      scores::online_rows<2, kCols>(row_m, row_l, row_exact, rc, tmax, c);
      // Block maxima to the scratch, for blocks with a key some row of the warp sees (later
      // blocks are masked for every row, and their index could pass nkb - 1).
      if constexpr (kBlockKeys <= kKeys) {
#pragma unroll
        for (int b = 0; b < kBlocks; ++b)
          if (kk0 + b * kBlockKeys <= my_lim) store_block_max(kk0 / kBlockKeys + b, bmax[b]);
      } else {  // a block is two tiles: store after its second, or after the warp's last tile
        if ((jt & 1) == 0) {
          half_max[0] = tmax[0], half_max[1] = tmax[1];
        } else {
          half_max[0] = fmaxf(half_max[0], tmax[0]), half_max[1] = fmaxf(half_max[1], tmax[1]);
        }
        if (kk0 <= my_lim && ((jt & 1) == 1 || kk0 + kKeys > my_lim)) store_block_max(kk0 / kBlockKeys, half_max);
      }
    };
    // Iteration j: wait for tile j, issue its wgmma into accw (acc[j % 2]), refill the stage of tile
    // j - 1 with tile j + 3, do tile j - 1's math on the other accumulator while the wgmma runs,
    // and wait for it. ptxas serialises every wgmma if a wait sits on a branch, or if an
    // accumulator is read on a branch while the wgmma that wrote it is on another (the fp16 / bf16
    // choice), so: the whole loop is instantiated per type, iteration 0 (no math) is peeled, every
    // warpgroup issues the wgmma of every tile, and the loop runs two iterations per trip (one per
    // accumulator), to an even j >= ntiles: one or two past the last tile, on stale stages whose
    // logits are masked whole and add nothing. One commit group per tile slot, empty past the last
    // tile: at the top of iteration j the groups committed are Q, tiles 0-2 and one per earlier
    // iteration, so waiting for all but the newest two means Q and tiles 0 .. j have landed; the
    // CTA barrier after that wait also means every warpgroup has finished its wgmma of tile j - 1,
    // so that stage can take tile j + 3.
    auto run_tiles = [&](auto& mma, auto& tQ, auto& tK) {
      auto issue = [&](int j, auto& accw) {
        proxyattn::cp_async_wait<kStages - 2>();
        bsa_sm90::fence_proxy_async_shared();
        __syncthreads();
        bsa_sm90::wg_issue<true>(mma, tQ, tK(_, _, _, j % kStages), accw);
        const int jn = j + kStages - 1;
        if (jn < ntiles) load_tile(jn, jn % kStages);
        else proxyattn::cp_async_commit();
      };
      auto step = [&](int j, auto& accw, auto& accr, auto& accr_rc) {
        issue(j, accw);
        warpgroup_fence_operand(accr);
        tile_math(j - 1, accr_rc);
        warpgroup_wait<0>();
        warpgroup_fence_operand(accw);
      };
      issue(0, acc0);
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc0);
      const int last = (ntiles + 1) & ~1;  // the last iteration: even, >= ntiles
      for (int j = 1; j <= last; j += 2) {
        step(j, acc1, acc0, accrc0);
        step(j + 1, acc0, acc1, accrc1);
      }
    };

    if (ntiles > 0) {
      load_q();
#pragma unroll
      for (int t = 0; t < kStages - 1; ++t) {
        if (t < ntiles) load_tile(t, t);
        else proxyattn::cp_async_commit();
      }
      if (bf16) run_tiles(mma_b, tQb, tKb);
      else run_tiles(mma_h, tQh, tKh);
    }

    // Final row statistics (the sums in the true frame): merge the four lanes of each row.
    scores::row_sums_true<2>(row_m, row_l, row_exact, c);
#pragma unroll
    for (int ri = 0; ri < 2; ++ri)
      scores::store_row_stats(row_m[ri], row_l[ri], lim[ri], 16 * warp + g + 8 * ri, t4, p, c, ss.m, ss.lg, ss.nlim);
    __syncthreads();  // scratch rows and row statistics are visible to the whole CTA
    scores::block_row_limits(ss.nlim, ss.blk_nmax, geo.rows_blk, geo.bpc);
    __syncthreads();
    scores::write_unit_scores<kThreads, true>(p, c, scratch, kRows, geo.rows_blk, geo.bpc, mb, bgrow, ss.m, ss.lg,
                                              ss.nlim, ss.blk_nmax);
    __syncthreads();  // statistics, scratch and the unit are reused by the next unit
  }
#endif  // PROXYATTN_BSA_SM90_DEVICE
}

}  // namespace scores_sm90
}  // namespace proxyattn
