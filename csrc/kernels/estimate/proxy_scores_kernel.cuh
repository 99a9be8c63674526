// Stage 1 (proxy_block_scores), kernel 2 of 2: scores_kernel, the persistent one-pass kernel
// over the kept logits (mma.sync on the fp16 halves of pool_kernel's rows, an online row max and
// sum, block maxima into the scratch, A written per unit); proxy_scores.cu describes the algorithm.
#pragma once

#include "kernels/estimate/proxy_scores_layout.cuh"

namespace proxyattn {
namespace scores {

__device__ inline void ldmatrix_x4(uint32_t r[4], const uint16_t* smem) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

// Logits of the warp's 16 rows x kSubKeys keys. bhi / blo point at this lane's ldmatrix row
// of the sub-tile (hi / lo halves of the keys, row pitch D + 8). acc[nt][2e + c] = row
// g + 8e, key 8 nt + 2 t4 + c. Order per product: lo*hi, hi*lo (kLo), hi*hi.
template <int D, bool kLo>
__device__ inline void subtile_logits(float (&acc)[kSubKeys / 8][4], const uint32_t (&qh)[D / 16][4],
                                      const uint32_t (&ql)[D / 16][4], const uint16_t* bhi, const uint16_t* blo) {
  constexpr int kStride = D + 8;
#pragma unroll
  for (int nt = 0; nt < kSubKeys / 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
    for (int np = 0; np < kSubKeys / 16; ++np) {
      uint32_t bh[4], bl[4];
      ldmatrix_x4(bh, bhi + np * 16 * kStride + kk * 16);
      if (kLo) ldmatrix_x4(bl, blo + np * 16 * kStride + kk * 16);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        MmaTraits<half>::mma(acc[2 * np + h], ql[kk], &bh[2 * h]);
        if (kLo) MmaTraits<half>::mma(acc[2 * np + h], qh[kk], &bl[2 * h]);
        MmaTraits<half>::mma(acc[2 * np + h], qh[kk], &bh[2 * h]);
      }
    }
  }
}

template <int D, bool kAligned>
constexpr int score_smem_bytes() {
  return 2 * 2 * kKeyTile * (D + 8) * 2 + (kAligned ? 0 : kScoreWarps * 16 * kStagePitch * 4);
}

template <int D, bool kAligned>
__global__ void __launch_bounds__(kScoreThreads, 2)
    scores_kernel(const ProxyScoresParams p, int64_t rows_q, int64_t rows_k, int64_t ktiles, const half* q_hi,
                  const half* q_lo, const half* k_hi, const half* k_lo, const int* kflags,
                  unsigned long long* counter, float* scratch_all) {
  constexpr int kStride = D + 8;  // halves per smem key row
  constexpr int kTileHalves = kKeyTile * kStride;
  extern __shared__ __align__(16) uint16_t smem[];  // [2 buffers][hi, lo][kKeyTile][kStride] (+ stage)
  __shared__ long long s_unit;
  __shared__ int s_warp_lim[kScoreWarps];
  __shared__ int s_warp_nmax[kScoreWarps];
  __shared__ float s_m[kCtaRows], s_inv[kCtaRows];
  __shared__ int s_nlim[kCtaRows];

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t4 = lane & 3;
  const int S = p.block_size, s = p.stride;
  const ScoreGeometry geo = score_geometry(S, s, p.nqb);
  const int64_t bg_count = static_cast<int64_t>(p.batch) * p.num_groups;
  const long long units = bg_count * geo.nmb;
  float* scratch = scratch_all + static_cast<int64_t>(blockIdx.x) * p.nkb * kCtaRows;
  float* stage = reinterpret_cast<float*>(smem + 4 * kTileHalves) + warp * 16 * kStagePitch;  // !kAligned only
  const int pshift = kAligned ? __ffs(S / s) - 1 : 0;
  const int ld_off = ((lane >> 4) * 8 + (lane & 7)) * kStride + ((lane >> 3) & 1) * 8;  // ldmatrix row (halves)
  const int slot0 = warp * 16;  // this warp's scratch rows: slot0 + g + 8e

  for (;;) {
    if (threadIdx.x == 0) s_unit = static_cast<long long>(atomicAdd(counter, 1ull));
    __syncthreads();
    const long long u = s_unit;
    if (u >= units) break;
    const int mb = geo.nmb - 1 - static_cast<int>(u / bg_count);
    const int bgi = static_cast<int>(u % bg_count);
    const int grp = bgi % p.num_groups, b = bgi / p.num_groups;
    const SeqBounds sb = load_seq_bounds(p.cu_seqlens_q, p.cu_seqlens_k, b, p.max_seqlen_q, p.max_seqlen_k,
                                         p.total_q, p.total_k);
    const int off = sb.nk - sb.nq;
    const int i0 = kept_query_offset(sb.nq, sb.nk, s);
    const int nkk = kept_count(sb.nk, 0, s);  // kept keys of this sequence
    const int nqb_seq = static_cast<int>((static_cast<int64_t>(sb.nq) + S - 1) / S);

    // This warp: query block m, rows [j_lo + sub*16, +16) of the block's kept queries.
    const int blk = warp / geo.upb, sub = warp % geo.upb;
    const int m = mb * geo.bpc + blk;
    const bool warp_on = blk < geo.bpc && m < nqb_seq;
    int j_lo = 0, j_hi = 0;
    if (warp_on) {
      j_lo = kept_count(m * S, i0, s);
      j_hi = kept_count(min((m + 1) * S, sb.nq), i0, s);
    }
    // lim[e]: last kept key row g + 8e may see, -1 when it is padding or sees nothing.
    int lim[2], jrow[2];
    int my_lim = -1, my_min = INT_MAX;
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      jrow[e] = j_lo + sub * 16 + g + 8 * e;
      const bool valid = jrow[e] < j_hi;
      const int64_t pos = static_cast<int64_t>(off) + i0 + static_cast<int64_t>(jrow[e]) * s;
      lim[e] = !valid     ? -1
               : !p.causal ? nkk - 1
               : pos < 0   ? -1
                           : static_cast<int>(min(pos / s, static_cast<int64_t>(nkk - 1)));
      if (lim[e] >= 0) {
        my_lim = max(my_lim, lim[e]);
        my_min = min(my_min, lim[e]);
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      my_lim = max(my_lim, __shfl_xor_sync(0xffffffffu, my_lim, o));
      my_min = min(my_min, __shfl_xor_sync(0xffffffffu, my_min, o));
    }
    if (lane == 0) {
      s_warp_lim[warp] = my_lim;
      s_warp_nmax[warp] = my_lim >= 0 ? static_cast<int>(static_cast<int64_t>(my_lim) * s / S) : -1;
    }
    __syncthreads();
    int cta_lim = -1;
#pragma unroll
    for (int w = 0; w < kScoreWarps; ++w) cta_lim = max(cta_lim, s_warp_lim[w]);
    const int ntiles = (cta_lim + kKeyTile) / kKeyTile;  // tiles holding kept keys [0, cta_lim]

    // Query fragments hi/lo (A operand) from the pooled workspace.
    const int64_t bgrow = static_cast<int64_t>(b) * p.num_groups + grp;
    uint32_t qa_hi[D / 16][4], qa_lo[D / 16][4];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const bool valid = lim[e] >= 0;
      const int64_t r = (bgrow * rows_q + (valid ? jrow[e] : 0)) * D;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const int64_t c0 = r + kk * 16 + 2 * t4;
        qa_hi[kk][e] = valid ? *reinterpret_cast<const uint32_t*>(q_hi + c0) : 0u;
        qa_hi[kk][e + 2] = valid ? *reinterpret_cast<const uint32_t*>(q_hi + c0 + 8) : 0u;
        qa_lo[kk][e] = valid ? *reinterpret_cast<const uint32_t*>(q_lo + c0) : 0u;
        qa_lo[kk][e + 2] = valid ? *reinterpret_cast<const uint32_t*>(q_lo + c0 + 8) : 0u;
      }
    }

    const int64_t krow0 = bgrow * rows_k;
    const int* tflags = kflags + bgrow * ktiles;
    auto load_tile = [&](int tile, int buf) {
      constexpr int kChunks = kKeyTile * D / 8;  // 16-byte chunks per array
      const int n_chunks = tflags[tile] != 0 ? 2 * kChunks : kChunks;
      for (int c = threadIdx.x; c < n_chunks; c += kScoreThreads) {
        const int which = c / kChunks, cc = c % kChunks;
        const int kr = cc / (D / 8), kc = cc % (D / 8);
        const int kk = tile * kKeyTile + kr;
        const bool ok = kk < nkk;
        const half* srcb = which ? k_lo : k_hi;
        const half* src = ok ? srcb + (krow0 + kk) * D + kc * 8 : srcb;
        cp_async_16(&smem[(buf * 2 + which) * kTileHalves + kr * kStride + kc * 8], src, ok ? 16 : 0);
      }
      cp_async_commit();
    };

    float row_m[2] = {-INFINITY, -INFINITY}, row_l[2] = {0.f, 0.f};
    // kAligned: the current key block run (warp-uniform n) and its per-thread maxima.
    int run_n = -1;
    float run_v[2] = {-INFINITY, -INFINITY};
    auto flush_run = [&]() {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float v = run_v[e];
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
        if (t4 == 0 && lim[e] >= 0) scratch[static_cast<int64_t>(run_n) * kCtaRows + slot0 + g + 8 * e] = v;
      }
    };
    // !kAligned: lane r < 16 owns row r (= g' + 8e') for the block runs.
    const int lim_g0 = __shfl_sync(0xffffffffu, lim[0], (lane & 7) * 4);
    const int lim_g1 = __shfl_sync(0xffffffffu, lim[1], (lane & 7) * 4);
    const int gen_lim = lane < 16 ? ((lane & 8) ? lim_g1 : lim_g0) : -1;
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
      const bool has_lo = tflags[j] != 0;
#pragma unroll 1
      for (int st = 0; st < kKeyTile / kSubKeys; ++st) {
        const int kk0 = j * kKeyTile + st * kSubKeys;
        if (kk0 > my_lim) continue;  // warp-uniform
        const uint16_t* bhi = smem + ((j & 1) * 2) * kTileHalves + st * kSubKeys * kStride + ld_off;
        float acc[kSubKeys / 8][4];
        if (has_lo) subtile_logits<D, true>(acc, qa_hi, qa_lo, bhi, bhi + kTileHalves);
        else subtile_logits<D, false>(acc, qa_hi, qa_lo, bhi, bhi + kTileHalves);
        if (kk0 + kSubKeys - 1 > my_min) {  // causal edge or past the last key: mask
#pragma unroll
          for (int nt = 0; nt < kSubKeys / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e)
#pragma unroll
              for (int c = 0; c < 2; ++c)
                if (kk0 + nt * 8 + 2 * t4 + c > lim[e]) acc[nt][2 * e + c] = -INFINITY;
        }
        // Online (max, sum) per thread and row.
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float tmax = -INFINITY;
#pragma unroll
          for (int nt = 0; nt < kSubKeys / 8; ++nt) tmax = fmaxf(tmax, fmaxf(acc[nt][2 * e], acc[nt][2 * e + 1]));
          const float mn = fmaxf(row_m[e], tmax);
          if (mn != -INFINITY) {
            float sum = row_l[e] * exp2f(row_m[e] - mn);
#pragma unroll
            for (int nt = 0; nt < kSubKeys / 8; ++nt)
#pragma unroll
              for (int c = 0; c < 2; ++c) sum += exp2f(acc[nt][2 * e + c] - mn);
            row_m[e] = mn;
            row_l[e] = sum;
          }
        }
        // Per-row maxima per key block.
        if (kAligned) {
#pragma unroll
          for (int nt = 0; nt < kSubKeys / 8; ++nt) {
            if (kk0 + nt * 8 > my_lim) break;  // masked for every row; n could pass nkb - 1
            const int n = (kk0 + nt * 8) >> pshift;  // warp-uniform
            if (n != run_n) {
              if (run_n >= 0) flush_run();
              run_n = n;
              run_v[0] = run_v[1] = -INFINITY;
            }
#pragma unroll
            for (int e = 0; e < 2; ++e) run_v[e] = fmaxf(run_v[e], fmaxf(acc[nt][2 * e], acc[nt][2 * e + 1]));
          }
        } else {
#pragma unroll
          for (int nt = 0; nt < kSubKeys / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e)
#pragma unroll
              for (int c = 0; c < 2; ++c) stage[(g + 8 * e) * kStagePitch + nt * 8 + 2 * t4 + c] = acc[nt][2 * e + c];
          __syncwarp();
          if (gen_lim >= kk0) {
            const int cend = min(kSubKeys, gen_lim - kk0 + 1);
            for (int c = 0; c < cend; ++c) {
              const int n = static_cast<int>(static_cast<int64_t>(kk0 + c) * s / S);
              const float x = stage[lane * kStagePitch + c];
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

    // Final row statistics: merge the four lanes of each row.
#pragma unroll
    for (int e = 0; e < 2; ++e) {
#pragma unroll
      for (int o = 1; o < 4; o <<= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, row_m[e], o);
        const float l2 = __shfl_xor_sync(0xffffffffu, row_l[e], o);
        merge_max_sum(row_m[e], row_l[e], m2, l2);
      }
      if (t4 == 0) {
        const int r = slot0 + g + 8 * e;
        const bool on = lim[e] >= 0 && row_l[e] > 0.f;
        s_m[r] = on ? row_m[e] : 0.f;
        s_inv[r] = on ? 1.f / row_l[e] : 0.f;
        s_nlim[r] = on ? static_cast<int>(static_cast<int64_t>(lim[e]) * s / S) : -1;
      }
    }
    __syncthreads();  // scratch rows and row statistics are visible to the whole CTA

    // A[b, grp, m, :] of the unit's query blocks, every element.
    const int rows_blk = geo.upb * 16;
    float* A0 = p.scores + bgrow * p.nqb * p.nkb;
    for (int idx = threadIdx.x; idx < geo.bpc * p.nkb; idx += kScoreThreads) {
      const int bl = idx / p.nkb, n = idx - bl * p.nkb;
      const int mm = mb * geo.bpc + bl;
      if (mm >= p.nqb) continue;
      int nmax = -1;
      for (int w = bl * geo.upb; w < (bl + 1) * geo.upb; ++w) nmax = max(nmax, s_warp_nmax[w]);
      bool has_key = true;  // key block n holds a kept key (always when s divides S)
      if (!kAligned) {
        const int64_t f0 = ceil_div64(static_cast<int64_t>(n) * S, s), f1 = ceil_div64(static_cast<int64_t>(n + 1) * S, s);
        has_key = f0 < f1;
      }
      float v = 0.f;
      if (n <= nmax && has_key) {
        const float* Ln = scratch + static_cast<int64_t>(n) * kCtaRows + bl * rows_blk;
#pragma unroll 8
        for (int r = 0; r < rows_blk; ++r) {  // entries past a row's last block are stale: not read
          const int rr = bl * rows_blk + r;
          if (n <= s_nlim[rr]) v = fmaxf(v, exp2f(Ln[r] - s_m[rr]) * s_inv[rr]);
        }
      }
      A0[static_cast<int64_t>(mm) * p.nkb + n] = v;
    }
    __syncthreads();  // statistics, scratch and s_unit are reused by the next unit
  }
}

}  // namespace scores
}  // namespace proxyattn
