// Stage 1 (proxy_block_scores) kernels, v2 (one pass over the logits).
//   1. pool_kernel<T, D, is_query>: one warp per kept row j of one (b, group): the fp32 mean
//      of the group's heads (query rows additionally times sm * log2(e)), split into two
//      fp16 halves hi + lo (hi = rn(v), lo = rn(v - hi): ~22 significant bits) and stored in
//      the workspace [B, G, kept rows, D]; rows past the sequence's kept count are zero.
//      Kept query j sits at sequence-local row i0 + j*s with i0 = (-(Nk - Nq)) mod s; kept
//      key j at t = j*s. Key rows also set a flag per 64-key tile when any lo part is
//      nonzero (for a single bf16/fp16 KV head per group, kbar is exact in fp16 and lo == 0).
//   2. scores_kernel<D, kAligned>: persistent, 8 warps, one work unit at a time from an
//      atomic counter (heaviest causal units first). A unit is `bpc` consecutive query
//      blocks of one (b, group); each block's kept queries are split over `upb` warps of
//      16 rows (upb = ceil(ceil(S/s)/16), bpc = 8/upb). Kept keys stream through shared
//      memory in tiles of 64 (cp.async, double-buffered). Logits x (log2 domain) = fp16
//      mma.sync m16n8k16 with fp32 accumulation: lo*hi + hi*lo + hi*hi (the hi*lo product is
//      skipped on tiles whose key lo parts are all zero: adding exact zeros changes nothing).
//      One pass: per row an online (max, sum) of exp2(x) per thread, and the max logit of
//      the row over each key block, L[row][n], written to this CTA's slot of a global
//      scratch [nkb][128 rows]. At the end of the unit, with the rows' final max M_r and
//      sum l_r: A[m, n] = max over rows r of block m of exp2(L[r][n] - M_r) / l_r (exp2 is
//      monotonic, so this is the max of the row's probabilities inside block n); every
//      element of the unit's rows of A is written (0 where no kept pair).
//      kAligned (S % s == 0 and (S/s) % 8 == 0): an 8-key group never straddles key blocks,
//      so block maxima come from per-thread maxima + two quad shuffles. Otherwise each warp
//      stages its 16 x 32 logits in shared memory and lanes 0..15 fold their row's columns
//      into block runs.
// Values are within ~1e-5 relative of an fp64 evaluation for |pooled values| well inside
// the fp16 range (|qbar * sm * log2e|, |kbar| < 6e4).
#include "kernels/estimate/proxy_scores.h"

#include <algorithm>
#include <climits>

#include "kernels/estimate/estimate_common.cuh"

namespace proxyattn {
namespace {

constexpr int kPoolWarps = 8;
constexpr int kScoreWarps = 8;
constexpr int kScoreThreads = kScoreWarps * 32;
constexpr int kCtaRows = kScoreWarps * 16;  // query rows a CTA holds = scratch rows per slot
constexpr int kKeyTile = 64;
constexpr int kSubKeys = 32;
constexpr int kStagePitch = kSubKeys + 1;  // floats per staged logit row (generic path)

__device__ inline int kept_query_offset(int nq, int nk, int s) {
  return static_cast<int>(floor_mod64(-(static_cast<int64_t>(nk) - nq), s));
}
__device__ inline int kept_count(int n, int first, int s) { return n > first ? (n - first + s - 1) / s : 0; }

// How query blocks map onto the 8 warps of a CTA (host and device).
struct ScoreGeometry {
  int upb;       // warps (16-row slices) per query block
  int bpc;       // query blocks per unit
  int nmb;       // units per (b, group)
  bool aligned;  // S % s == 0 and (S / s) % 8 == 0
};
__host__ __device__ inline ScoreGeometry score_geometry(int S, int s, int nqb) {
  ScoreGeometry g;
  const int rows = (S + s - 1) / s;  // kept queries of a query block, at most (<= 128)
  g.upb = (rows + 15) / 16;
  g.bpc = kScoreWarps / g.upb;
  g.nmb = (nqb + g.bpc - 1) / g.bpc;
  g.aligned = S % s == 0 && (S / s) % 8 == 0;
  return g;
}

inline int64_t align256(int64_t x) { return (x + 255) & ~static_cast<int64_t>(255); }

// Byte offsets of the workspace parts.
struct ScoreWorkspace {
  int64_t rows_q, rows_k, ktiles;
  int64_t q_hi, q_lo, k_hi, k_lo, flags, counter, scratch, total;
};
ScoreWorkspace score_workspace(const ProxyScoresParams& p, int slots) {
  ScoreWorkspace w;
  w.rows_q = proxy_scores_kept_rows(p.max_seqlen_q, p.stride);
  w.rows_k = proxy_scores_kept_rows(p.max_seqlen_k, p.stride);
  w.ktiles = (w.rows_k + kKeyTile - 1) / kKeyTile;
  const int64_t bg = static_cast<int64_t>(p.batch) * p.num_groups;
  const int64_t qb = bg * w.rows_q * p.head_dim * 2, kb = bg * w.rows_k * p.head_dim * 2;
  int64_t o = 0;
  w.q_hi = o, o = align256(o + qb);
  w.q_lo = o, o = align256(o + qb);
  w.k_hi = o, o = align256(o + kb);
  w.k_lo = o, o = align256(o + kb);
  w.flags = o, o += bg * w.ktiles * 4;
  w.counter = o = (o + 7) & ~static_cast<int64_t>(7), o = align256(o + 8);
  w.scratch = o, o += static_cast<int64_t>(slots) * p.nkb * kCtaRows * 4;
  w.total = o;
  return w;
}

template <typename T, int D, bool kQuery>
__global__ void __launch_bounds__(kPoolWarps * 32) pool_kernel(const ProxyScoresParams p, int64_t rows_alloc,
                                                             half* out_hi, half* out_lo, int* kflags,
                                                             int64_t ktiles) {
  constexpr int kPer = D / 32;  // elements per lane (even)
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kPoolWarps + warp;
  const int grp = blockIdx.y, b = blockIdx.z;
  if (j >= rows_alloc) return;
  const SeqBounds sb = load_seq_bounds(p.cu_seqlens_q, p.cu_seqlens_k, b, p.max_seqlen_q, p.max_seqlen_k,
                                       p.total_q, p.total_k);
  const int s = p.stride;
  int first, n, h0, nh;
  int64_t start, row_stride, head_stride;
  const T* base;
  float scale;
  if (kQuery) {
    first = kept_query_offset(sb.nq, sb.nk, s);
    n = sb.nq;
    nh = p.num_heads / p.num_groups;
    h0 = grp * nh;
    start = sb.q_start;
    row_stride = p.q_row_stride;
    head_stride = p.q_head_stride;
    base = static_cast<const T*>(p.q) + b * p.q_batch_stride;
    scale = p.softmax_scale * kLog2e / nh;
  } else {
    first = 0;
    n = sb.nk;
    if (p.num_groups <= p.num_kv_heads) {
      nh = p.num_kv_heads / p.num_groups;
      h0 = grp * nh;
    } else {
      nh = 1;
      h0 = grp / (p.num_groups / p.num_kv_heads);
    }
    start = sb.k_start;
    row_stride = p.k_row_stride;
    head_stride = p.k_head_stride;
    base = static_cast<const T*>(p.k) + b * p.k_batch_stride;
    scale = 1.f / nh;
  }
  const int64_t out_row = ((static_cast<int64_t>(b) * p.num_groups + grp) * rows_alloc + j) * D + lane * kPer;
  float acc[kPer];
#pragma unroll
  for (int e = 0; e < kPer; ++e) acc[e] = 0.f;
  if (j < kept_count(n, first, s)) {
    const T* src = base + (start + first + j * s) * row_stride + lane * kPer;
    for (int hh = 0; hh < nh; ++hh) {
      const T* hp = src + (h0 + hh) * head_stride;
#pragma unroll
      for (int e = 0; e < kPer; e += 2) {
        const float2 v = MmaTraits<T>::to_float2(*reinterpret_cast<const uint32_t*>(hp + e));
        acc[e] += v.x;
        acc[e + 1] += v.y;
      }
    }
  }
  bool lo_nonzero = false;
#pragma unroll
  for (int e = 0; e < kPer; e += 2) {
    const float v0 = acc[e] * scale, v1 = acc[e + 1] * scale;
    const half h0v = __float2half_rn(v0), h1v = __float2half_rn(v1);
    const half l0 = __float2half_rn(v0 - __half2float(h0v)), l1 = __float2half_rn(v1 - __half2float(h1v));
    lo_nonzero |= __half2float(l0) != 0.f || __half2float(l1) != 0.f;
    *reinterpret_cast<__half2*>(out_hi + out_row + e) = __halves2half2(h0v, h1v);
    *reinterpret_cast<__half2*>(out_lo + out_row + e) = __halves2half2(l0, l1);
  }
  if (!kQuery && __any_sync(0xffffffffu, lo_nonzero) && lane == 0)
    atomicOr(kflags + (static_cast<int64_t>(b) * p.num_groups + grp) * ktiles + j / kKeyTile, 1);
}

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

template <int D, bool kAligned>
cudaError_t prepare_scores(int* slots, const ProxyScoresParams& p) {
  constexpr int smem = score_smem_bytes<D, kAligned>();
  cudaError_t e = cudaFuncSetAttribute(scores_kernel<D, kAligned>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (e != cudaSuccess) return e;
  int dev = 0, sms = 0, occ = 0;
  if ((e = cudaGetDevice(&dev)) != cudaSuccess) return e;
  if ((e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev)) != cudaSuccess) return e;
  if ((e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, scores_kernel<D, kAligned>, kScoreThreads, smem)) !=
      cudaSuccess)
    return e;
  const ScoreGeometry geo = score_geometry(p.block_size, p.stride, p.nqb);
  const int64_t units = static_cast<int64_t>(p.batch) * p.num_groups * geo.nmb;
  *slots = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(units, static_cast<int64_t>(sms) * std::max(occ, 1))));
  return cudaSuccess;
}

cudaError_t score_slots(int* slots, const ProxyScoresParams& p) {
  const bool aligned = score_geometry(p.block_size, p.stride, p.nqb).aligned;
  if (p.head_dim == 64) return aligned ? prepare_scores<64, true>(slots, p) : prepare_scores<64, false>(slots, p);
  if (p.head_dim == 128) return aligned ? prepare_scores<128, true>(slots, p) : prepare_scores<128, false>(slots, p);
  return cudaErrorInvalidValue;
}

template <int D, bool kAligned>
void launch_scores_kernel(const ProxyScoresParams& p, const ScoreWorkspace& w, int slots, cudaStream_t stream) {
  char* ws = static_cast<char*>(p.workspace);
  scores_kernel<D, kAligned><<<slots, kScoreThreads, score_smem_bytes<D, kAligned>(), stream>>>(
      p, w.rows_q, w.rows_k, w.ktiles, reinterpret_cast<const half*>(ws + w.q_hi),
      reinterpret_cast<const half*>(ws + w.q_lo), reinterpret_cast<const half*>(ws + w.k_hi),
      reinterpret_cast<const half*>(ws + w.k_lo), reinterpret_cast<const int*>(ws + w.flags),
      reinterpret_cast<unsigned long long*>(ws + w.counter), reinterpret_cast<float*>(ws + w.scratch));
}

template <typename T, int D>
cudaError_t launch_scores(const ProxyScoresParams& p, cudaStream_t stream) {
  int slots = 0;
  cudaError_t e = score_slots(&slots, p);
  if (e != cudaSuccess) return e;
  const ScoreWorkspace w = score_workspace(p, slots);
  char* ws = static_cast<char*>(p.workspace);
  if ((e = cudaMemsetAsync(ws + w.flags, 0, static_cast<size_t>(w.counter + 8 - w.flags), stream)) != cudaSuccess)
    return e;
  const dim3 pool_q((w.rows_q + kPoolWarps - 1) / kPoolWarps, p.num_groups, p.batch);
  const dim3 pool_k((w.rows_k + kPoolWarps - 1) / kPoolWarps, p.num_groups, p.batch);
  if (w.rows_q > 0) {
    pool_kernel<T, D, true><<<pool_q, kPoolWarps * 32, 0, stream>>>(p, w.rows_q, reinterpret_cast<half*>(ws + w.q_hi),
                                                                    reinterpret_cast<half*>(ws + w.q_lo), nullptr, 0);
    if ((e = cudaGetLastError()) != cudaSuccess) return e;
  }
  if (w.rows_k > 0) {
    pool_kernel<T, D, false><<<pool_k, kPoolWarps * 32, 0, stream>>>(
        p, w.rows_k, reinterpret_cast<half*>(ws + w.k_hi), reinterpret_cast<half*>(ws + w.k_lo),
        reinterpret_cast<int*>(ws + w.flags), w.ktiles);
    if ((e = cudaGetLastError()) != cudaSuccess) return e;
  }
  if (score_geometry(p.block_size, p.stride, p.nqb).aligned) launch_scores_kernel<D, true>(p, w, slots, stream);
  else launch_scores_kernel<D, false>(p, w, slots, stream);
  return cudaGetLastError();
}

}  // namespace

int64_t proxy_scores_workspace_bytes(const ProxyScoresParams& p) {
  int slots = 1;
  if (p.batch > 0 && p.num_groups > 0 && p.nqb > 0 && p.nkb > 0 && p.stride >= 1 && score_slots(&slots, p) != cudaSuccess)
    return -1;
  return score_workspace(p, slots).total;
}

template <typename T>
cudaError_t run_proxy_scores(const ProxyScoresParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.num_groups == 0 || p.nqb == 0 || p.nkb == 0) return cudaSuccess;
  if (p.stride < 1) return cudaErrorInvalidValue;
  if (p.head_dim == 64) return launch_scores<T, 64>(p, stream);
  if (p.head_dim == 128) return launch_scores<T, 128>(p, stream);
  return cudaErrorInvalidValue;
}

template cudaError_t run_proxy_scores<half>(const ProxyScoresParams&, cudaStream_t);
template cudaError_t run_proxy_scores<__nv_bfloat16>(const ProxyScoresParams&, cudaStream_t);

}  // namespace proxyattn
