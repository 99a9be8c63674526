// Stage 1 (proxy_block_scores), kernel 2 of 2: scores_kernel, the persistent one-pass kernel over
// the kept logits (one 16-bit mma.sync product on pool_kernel's rows, an online row max and sum,
// block maxima into the scratch, A written per unit); proxy_scores.cu describes the algorithm.
#pragma once

#include "kernels/common/chained_launch.cuh"
#include "kernels/estimate/proxy_scores_rows.cuh"

namespace proxyattn {
namespace scores {

__device__ inline void ldmatrix_x4(uint32_t r[4], const uint16_t* smem) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

// Keys per sub-tile (the logits a warp holds at once): 16 at D = 128 keeps the two m16 tiles'
// query fragments, accumulators and row state near the 128 registers of two CTAs per SM (ptxas
// spills a few bytes of per-unit values, read once per key tile).
template <int D>
constexpr int sub_keys() {
  return D >= 128 ? 16 : 32;
}

// Logits (raw q.k, fp32) of the warp's 32 rows x sub_keys<D>() keys. b points at this lane's
// ldmatrix row of the sub-tile (row pitch D + 8). acc[mt][nt][2e + c] = row 16 mt + 8 e + g, key
// 8 nt + 2 t4 + c. Each key fragment feeds both m16 tiles.
template <typename T16, int D>
__device__ inline void subtile_logits(float (&acc)[2][sub_keys<D>() / 8][4], const uint32_t (&qa)[2][D / 16][4],
                                      const uint16_t* b) {
  constexpr int kStride = D + 8, kNt = sub_keys<D>() / 8;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < kNt; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
    for (int np = 0; np < kNt / 2; ++np) {
      uint32_t bf[4];
      ldmatrix_x4(bf, b + np * 16 * kStride + kk * 16);
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) MmaTraits<T16>::mma(acc[mt][2 * np + h], qa[mt][kk], &bf[2 * h]);
    }
  }
}

template <int D, bool kAligned>
constexpr int score_smem_bytes() {
  return 2 * kKeyTile * (D + 8) * 2 + (kAligned ? 0 : kScoreWarps * kWarpRows * (sub_keys<D>() + 1) * 4);
}

// c = sm * log2(e), clamped into [FLT_MIN, FLT_MAX] by the launcher: logits are raw q.k and every
// weight is exp2((x - max) * c), finite and without 0 * inf for any scale.
template <int D, bool kAligned>
__global__ void __launch_bounds__(kScoreThreads, 2)
    scores_kernel(const ProxyScoresParams p, float c, int64_t rows_q, int64_t rows_k, const uint16_t* q16,
                  const uint16_t* k16, const int* flags, unsigned long long* counter, float* scratch_all) {
  pdl_wait();  // chained_launch.cuh: before any global memory access
  pdl_launch_dependents();
  constexpr int kSub = sub_keys<D>(), kNt = kSub / 8, kPitch = kSub + 1;
  constexpr int kStride = D + 8;  // halves per smem key row
  constexpr int kTileHalves = kKeyTile * kStride;
  extern __shared__ __align__(16) uint16_t smem[];  // [2 buffers][kKeyTile][kStride] (+ stage)
  __shared__ long long s_unit;
  __shared__ int s_warp_lim[kScoreWarps];
  __shared__ int s_blk_nmax[kScoreWarps];
  __shared__ float s_m[kCtaRows], s_lg[kCtaRows];
  __shared__ int s_nlim[kCtaRows];

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t4 = lane & 3;
  const int S = p.block_size, s = p.stride;
  const ScoreGeometry geo = score_geometry(S, s, p.nqb);
  const int64_t bg_count = static_cast<int64_t>(p.batch) * p.num_groups;
  const long long units = bg_count * geo.nmb;
  float* scratch = scratch_all + static_cast<int64_t>(blockIdx.x) * p.nkb * kCtaRows;
  float* stage = reinterpret_cast<float*>(smem + 2 * kTileHalves) + warp * kWarpRows * kPitch;  // !kAligned only
  const int pshift = kAligned ? __ffs(S / s) - 1 : 0;
  const int ld_off = ((lane >> 4) * 8 + (lane & 7)) * kStride + ((lane >> 3) & 1) * 8;  // ldmatrix row (halves)
  const int slot0 = warp * kWarpRows;  // this warp's scratch rows: slot0 + 8 i + g

  for (;;) {
    if (threadIdx.x == 0) s_unit = static_cast<long long>(atomicAdd(counter, 1ull));
    __syncthreads();
    const long long u = s_unit;
    if (u >= units) break;
    const ScoreUnit w = score_unit(p, u, bg_count, geo.nmb, flags);
    const int mb = w.mb, off = w.off, i0 = w.i0, nkk = w.nkk, nqb_seq = w.nqb_seq;
    const SeqBounds& sb = w.sb;
    const int64_t bgrow = w.bgrow;
    const bool bf16 = w.bf16;

    // This warp: query block m, rows [j_lo + sub*32, +32) of the block's kept queries.
    const int blk = warp / geo.upb, sub = warp % geo.upb;
    const int m = mb * geo.bpc + blk;
    const bool warp_on = blk < geo.bpc && m < nqb_seq;
    int j_lo = 0, j_hi = 0;
    if (warp_on) {
      j_lo = kept_count(m * S, i0, s);
      j_hi = kept_count(min((m + 1) * S, sb.nq), i0, s);
    }
    // Row i of this thread (i = 2 mt + e) is warp row 8 i + g. lim[i]: the last kept key it may
    // see, -1 when it is padding or sees nothing.
    int lim[4], jrow[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      jrow[i] = j_lo + sub * kWarpRows + 8 * i + g;
      lim[i] = kept_row_limit(jrow[i] < j_hi, p.causal, off, i0, jrow[i], s, nkk);
    }
    int my_lim, my_min;
    warp_limit_range(lim, my_lim, my_min);
    if (lane == 0) s_warp_lim[warp] = my_lim;
    __syncthreads();
    int cta_lim = -1;
#pragma unroll
    for (int w = 0; w < kScoreWarps; ++w) cta_lim = max(cta_lim, s_warp_lim[w]);
    const int ntiles = (cta_lim + kKeyTile) / kKeyTile;  // tiles holding kept keys [0, cta_lim]

    // Query fragments (A operand) of the two m16 tiles, from the pooled workspace.
    uint32_t qa[2][D / 16][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int mt = i >> 1, e = i & 1;
      const bool valid = lim[i] >= 0;
      const int64_t r = (bgrow * rows_q + (valid ? jrow[i] : 0)) * D;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const int64_t c0 = r + kk * 16 + 2 * t4;
        qa[mt][kk][e] = valid ? *reinterpret_cast<const uint32_t*>(q16 + c0) : 0u;
        qa[mt][kk][e + 2] = valid ? *reinterpret_cast<const uint32_t*>(q16 + c0 + 8) : 0u;
      }
    }

    const int64_t krow0 = w.kbgrow * rows_k;
    auto load_tile = [&](int tile, int buf) {
      constexpr int kChunks = kKeyTile * D / 8;  // 16-byte chunks per tile
      for (int ch = threadIdx.x; ch < kChunks; ch += kScoreThreads) {
        const int kr = ch / (D / 8), kc = ch % (D / 8);
        const int kk = tile * kKeyTile + kr;
        const bool ok = kk < nkk;
        const uint16_t* src = ok ? k16 + (krow0 + kk) * D + kc * 8 : k16;
        cp_async_16(&smem[buf * kTileHalves + kr * kStride + kc * 8], src, ok ? 16 : 0);
      }
      cp_async_commit();
    };

    float row_m[4], row_l[4];
    bool row_exact = false;  // online_rows' frame
#pragma unroll
    for (int i = 0; i < 4; ++i) row_m[i] = -INFINITY, row_l[i] = 0.f;
    // kAligned: the current key block run (warp-uniform n) and its per-thread maxima.
    int run_n = -1;
    float run_v[4];
    auto flush_run = [&]() {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float v = quad_max(run_v[i]);
        if (t4 == 0 && lim[i] >= 0) scratch[static_cast<int64_t>(run_n) * kCtaRows + slot0 + 8 * i + g] = v;
      }
    };
    // !kAligned: lane r owns warp row r (= 8 i + g') for the block runs.
    int gen_lim = -1;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int li = __shfl_sync(0xffffffffu, lim[i], (lane & 7) * 4);
      if ((lane >> 3) == i) gen_lim = li;
    }
    int gen_n = -1;
    float gen_v = -INFINITY;

    if (ntiles > 0) load_tile(0, 0);
    for (int j = 0; j < ntiles; ++j) {
      if (j + 1 < ntiles) {
        load_tile(j + 1, (j + 1) & 1);
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
#pragma unroll 1
      for (int st = 0; st < kKeyTile / kSub; ++st) {
        const int kk0 = j * kKeyTile + st * kSub;
        if (kk0 > my_lim) continue;  // warp-uniform
        const uint16_t* bt = smem + (j & 1) * kTileHalves + st * kSub * kStride + ld_off;
        float acc[2][kNt][4];
        if (bf16) subtile_logits<__nv_bfloat16, D>(acc, qa, bt);
        else subtile_logits<half, D>(acc, qa, bt);
        if (kk0 + kSub - 1 > my_min) {  // causal edge or past the last key: mask
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int nt = 0; nt < kNt; ++nt)
#pragma unroll
              for (int cc = 0; cc < 2; ++cc)
                if (kk0 + nt * 8 + 2 * t4 + cc > lim[i]) acc[i >> 1][nt][2 * (i & 1) + cc] = -INFINITY;
        }
        // Online (max, sum) per thread and row; a sum is rescaled only when its max grows.
        online_rows_tile<4, 2 * kNt>(
            row_m, row_l, row_exact, [&](int i, int x) -> float { return acc[i >> 1][x >> 1][2 * (i & 1) + (x & 1)]; }, c);
        // Per-row maxima per key block.
        if (kAligned) {
#pragma unroll
          for (int nt = 0; nt < kNt; ++nt) {
            if (kk0 + nt * 8 > my_lim) break;  // masked for every row; n could pass nkb - 1
            const int n = (kk0 + nt * 8) >> pshift;  // warp-uniform
            if (n != run_n) {
              if (run_n >= 0) flush_run();
              run_n = n;
#pragma unroll
              for (int i = 0; i < 4; ++i) run_v[i] = -INFINITY;
            }
#pragma unroll
            for (int i = 0; i < 4; ++i)
              run_v[i] = fmaxf(run_v[i], fmaxf(acc[i >> 1][nt][2 * (i & 1)], acc[i >> 1][nt][2 * (i & 1) + 1]));
          }
        } else {
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int nt = 0; nt < kNt; ++nt)
#pragma unroll
              for (int cc = 0; cc < 2; ++cc)
                stage[(8 * i + g) * kPitch + nt * 8 + 2 * t4 + cc] = acc[i >> 1][nt][2 * (i & 1) + cc];
          __syncwarp();
          if (gen_lim >= kk0) {
            const int cend = min(kSub, gen_lim - kk0 + 1);
            for (int cc = 0; cc < cend; ++cc) {
              const int n = static_cast<int>(static_cast<int64_t>(kk0 + cc) * s / S);
              const float x = stage[lane * kPitch + cc];
              if (n != gen_n) {
                if (gen_n >= 0) scratch[static_cast<int64_t>(gen_n) * kCtaRows + slot0 + lane] = gen_v;
                gen_n = n;
                gen_v = x;
              } else {
                gen_v = fmaxf(gen_v, x);
              }
            }
          }
          __syncwarp();
        }
      }
      __syncthreads();  // the buffer read above is refilled next iteration
    }
    if (kAligned) {
      if (run_n >= 0) flush_run();
    } else if (gen_n >= 0) {
      scratch[static_cast<int64_t>(gen_n) * kCtaRows + slot0 + lane] = gen_v;
    }

    // Final row statistics (the sums in the true frame): merge the four lanes of each row.
    row_sums_true<4>(row_m, row_l, row_exact, c);
#pragma unroll
    for (int i = 0; i < 4; ++i) store_row_stats(row_m[i], row_l[i], lim[i], slot0 + 8 * i + g, t4, p, c, s_m, s_lg, s_nlim);
    __syncthreads();  // scratch rows and row statistics are visible to the whole CTA
    block_row_limits(s_nlim, s_blk_nmax, geo.upb * kWarpRows, geo.bpc);
    __syncthreads();
    write_unit_scores<kScoreThreads, kAligned>(p, c, scratch, kCtaRows, geo.upb * kWarpRows, geo.bpc, mb, bgrow, s_m,
                                               s_lg, s_nlim, s_blk_nmax);
    __syncthreads();  // statistics, scratch and s_unit are reused by the next unit
  }
}

}  // namespace scores
}  // namespace proxyattn
