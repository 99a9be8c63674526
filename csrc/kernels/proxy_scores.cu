// Stage 1 (proxy_block_scores) kernels.
//   1. pool_kernel<T, D, is_query>: one warp per kept row j of one (b, group): the fp32 mean
//      of the group's heads (query rows additionally times sm * log2(e)), split into two
//      fp16 halves hi + lo (hi = rn(v), lo = rn(v - hi): ~22 significant bits) and stored in
//      the workspace [B, G, kept rows, D]; rows past the sequence's kept count are zero.
//      Kept query j sits at sequence-local row i0 + j*s with i0 = (-(Nk - Nq)) mod s; kept
//      key j at t = j*s.
//   2. scores_kernel<D>: 8 warps; each warp owns 16 kept-query rows of one query block m
//      ("unit"), the CTA 8 consecutive units (heavy causal units first). Kept keys stream
//      through shared memory in tiles of 64 (cp.async, double-buffered); logits = three
//      fp16 mma.sync m16n8k16 (lo*hi + hi*lo + hi*hi, fp32 accumulate), which carries fp32
//      accuracy (~1e-6 relative). Pass 1: online row max/sum (exp2). Pass 2: p = exp2(x - M)
//      / L, max over the warp's rows, max over each key block's columns, global atomicMax
//      on the fp32 bits (p >= 0, so int order == float order) into A, which the launcher
//      zero-fills first. Tiles past the CTA's causal limit are skipped, past a warp's limit
//      are not computed.
// Values are within ~1e-5 relative of an fp64 evaluation for |pooled values| well inside
// the fp16 range (|qbar * sm * log2e|, |kbar| < 6e4).
#include "kernels/proxy_scores.h"

#include "kernels/estimate_common.cuh"

namespace proxyattn {
namespace {

constexpr int kPoolWarps = 8;
constexpr int kScoreWarps = 8;
constexpr int kScoreThreads = kScoreWarps * 32;
constexpr int kKeyTile = 64;
constexpr int kSubKeys = 32;

__device__ inline int kept_query_offset(int nq, int nk, int s) {
  return static_cast<int>(floor_mod64(-(static_cast<int64_t>(nk) - nq), s));
}
__device__ inline int kept_count(int n, int first, int s) { return n > first ? (n - first + s - 1) / s : 0; }

template <typename T, int D, bool kQuery>
__global__ void __launch_bounds__(kPoolWarps * 32) pool_kernel(const ProxyScoresParams p, int64_t rows_alloc,
                                                             half* out_hi, half* out_lo) {
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
#pragma unroll
  for (int e = 0; e < kPer; e += 2) {
    const float v0 = acc[e] * scale, v1 = acc[e + 1] * scale;
    const half h0v = __float2half_rn(v0), h1v = __float2half_rn(v1);
    const half l0 = __float2half_rn(v0 - __half2float(h0v)), l1 = __float2half_rn(v1 - __half2float(h1v));
    *reinterpret_cast<__half2*>(out_hi + out_row + e) = __halves2half2(h0v, h1v);
    *reinterpret_cast<__half2*>(out_lo + out_row + e) = __halves2half2(l0, l1);
  }
}

template <int D>
__global__ void __launch_bounds__(kScoreThreads, D == 128 ? 1 : 2)
    scores_kernel(const ProxyScoresParams p, int64_t rows_q, int64_t rows_k, const half* q_hi, const half* q_lo,
                  const half* k_hi, const half* k_lo) {
  constexpr int kStride = D + 8;  // halves per smem key row
  constexpr int kTileHalves = kKeyTile * kStride;
  extern __shared__ __align__(16) uint16_t smem[];  // [2 buffers][hi, lo][kKeyTile][kStride]
  __shared__ int warp_lim[kScoreWarps];

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t4 = lane & 3;
  const int grp = blockIdx.y, b = blockIdx.z;
  const int S = p.block_size, s = p.stride;
  const SeqBounds sb = load_seq_bounds(p.cu_seqlens_q, p.cu_seqlens_k, b, p.max_seqlen_q, p.max_seqlen_k,
                                       p.total_q, p.total_k);
  const int off = sb.nk - sb.nq;
  const int i0 = kept_query_offset(sb.nq, sb.nk, s);
  const int nkk = kept_count(sb.nk, 0, s);  // kept keys of this sequence
  const int nqb_seq = static_cast<int>((static_cast<int64_t>(sb.nq) + S - 1) / S);
  const int units_per_block = ((S + s - 1) / s + 15) / 16;

  // This warp's unit: query block m, rows [j_lo + sub*16, +16) of the block's kept queries.
  const int64_t unit = static_cast<int64_t>(gridDim.x - 1 - blockIdx.x) * kScoreWarps + warp;
  const int m = static_cast<int>(unit / units_per_block);
  const int sub = static_cast<int>(unit % units_per_block);
  int j_lo = 0, j_hi = 0;
  if (m < nqb_seq) {
    j_lo = kept_count(m * S, i0, s);
    j_hi = kept_count(min((m + 1) * S, sb.nq), i0, s);
  }
  int lim[2], jrow[2];
  int my_lim = -1;
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    jrow[e] = j_lo + sub * 16 + g + 8 * e;
    const bool valid = jrow[e] < j_hi;
    const int64_t pos = static_cast<int64_t>(off) + i0 + static_cast<int64_t>(jrow[e]) * s;
    lim[e] = !valid ? -1 : !p.causal ? nkk - 1 : pos < 0 ? -1 : static_cast<int>(min(pos / s, static_cast<int64_t>(nkk - 1)));
    my_lim = max(my_lim, lim[e]);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) my_lim = max(my_lim, __shfl_xor_sync(0xffffffffu, my_lim, o));
  if (lane == 0) warp_lim[warp] = my_lim;
  __syncthreads();
  int cta_lim = -1;
#pragma unroll
  for (int w = 0; w < kScoreWarps; ++w) cta_lim = max(cta_lim, warp_lim[w]);
  const int ntiles = (cta_lim + kKeyTile) / kKeyTile;  // tiles holding kept keys [0, cta_lim]
  if (ntiles == 0) return;                              // nothing visible (A stays 0)

  // Query fragments hi/lo (A operand) from the pooled workspace.
  const int64_t qrow0 = (static_cast<int64_t>(b) * p.num_groups + grp) * rows_q;
  uint32_t qa_hi[D / 16][4], qa_lo[D / 16][4];
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const bool valid = lim[e] >= 0;
    const int64_t r = (qrow0 + (valid ? jrow[e] : 0)) * D;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const int64_t c0 = r + kk * 16 + 2 * t4;
      qa_hi[kk][e] = valid ? *reinterpret_cast<const uint32_t*>(q_hi + c0) : 0u;
      qa_hi[kk][e + 2] = valid ? *reinterpret_cast<const uint32_t*>(q_hi + c0 + 8) : 0u;
      qa_lo[kk][e] = valid ? *reinterpret_cast<const uint32_t*>(q_lo + c0) : 0u;
      qa_lo[kk][e + 2] = valid ? *reinterpret_cast<const uint32_t*>(q_lo + c0 + 8) : 0u;
    }
  }

  const int64_t krow0 = (static_cast<int64_t>(b) * p.num_groups + grp) * rows_k;
  auto load_tile = [&](int tile, int buf) {
    constexpr int kChunks = kKeyTile * D / 8;
#pragma unroll
    for (int c = threadIdx.x; c < 2 * kChunks; c += kScoreThreads) {
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

  float* A_row = p.scores + ((static_cast<int64_t>(b) * p.num_groups + grp) * p.nqb + m) * p.nkb;
  float row_m[2] = {-INFINITY, -INFINITY}, row_l[2] = {0.f, 0.f}, row_inv[2] = {0.f, 0.f};

  for (int pass = 0; pass < 2; ++pass) {
    load_tile(0, 0);
    for (int j = 0; j < ntiles; ++j) {
      if (j + 1 < ntiles) {
        load_tile(j + 1, (j + 1) & 1);
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
      // Two sub-tiles of kSubKeys keys each keep the accumulators small (no spills at D = 128).
#pragma unroll 1
      for (int st = 0; st < kKeyTile / kSubKeys; ++st) {
      const int kk0 = j * kKeyTile + st * kSubKeys;
      if (kk0 <= my_lim) {
        const uint32_t* khi = reinterpret_cast<const uint32_t*>(smem + ((j & 1) * 2) * kTileHalves + st * kSubKeys * kStride);
        const uint32_t* klo = reinterpret_cast<const uint32_t*>(smem + ((j & 1) * 2 + 1) * kTileHalves + st * kSubKeys * kStride);
        float acc[kSubKeys / 8][4];
#pragma unroll
        for (int nt = 0; nt < kSubKeys / 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
          for (int nt = 0; nt < kSubKeys / 8; ++nt) {
            const int w0 = ((nt * 8 + g) * kStride + kk * 16 + 2 * t4) / 2;
            const uint32_t bh[2] = {khi[w0], khi[w0 + 4]};
            const uint32_t bl[2] = {klo[w0], klo[w0 + 4]};
            MmaTraits<half>::mma(acc[nt], qa_lo[kk], bh);
            MmaTraits<half>::mma(acc[nt], qa_hi[kk], bl);
            MmaTraits<half>::mma(acc[nt], qa_hi[kk], bh);
          }
        }
        const int col0 = kk0 + 2 * t4;
        if (pass == 0) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float tmax = -INFINITY;
#pragma unroll
            for (int nt = 0; nt < kSubKeys / 8; ++nt)
#pragma unroll
              for (int c = 0; c < 2; ++c) {
                const float x = col0 + nt * 8 + c <= lim[e] ? acc[nt][2 * e + c] : -INFINITY;
                acc[nt][2 * e + c] = x;
                tmax = fmaxf(tmax, x);
              }
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
        } else {
          // Column max over the warp's 16 rows (lanes 0..3 end up holding columns 2*t4 + {0,1}
          // of every n-tile, ascending), folded into runs of equal key block n.
          int cur_n = -1;
          float cur_v = 0.f;
#pragma unroll
          for (int nt = 0; nt < kSubKeys / 8; ++nt)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              float v = 0.f;
#pragma unroll
              for (int e = 0; e < 2; ++e)
                if (col0 + nt * 8 + c <= lim[e]) v = fmaxf(v, exp2f(acc[nt][2 * e + c] - row_m[e]) * row_inv[e]);
#pragma unroll
              for (int o = 4; o < 32; o <<= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
              const int n = static_cast<int>(static_cast<int64_t>(col0 + nt * 8 + c) * s / S);
              if (n != cur_n) {
                if (g == 0 && cur_v > 0.f) atomicMax(reinterpret_cast<int*>(A_row + cur_n), __float_as_int(cur_v));
                cur_n = n;
                cur_v = 0.f;
              }
              cur_v = fmaxf(cur_v, v);
            }
          if (g == 0 && cur_v > 0.f) atomicMax(reinterpret_cast<int*>(A_row + cur_n), __float_as_int(cur_v));
        }
      }
      }
      __syncthreads();  // the buffer read above is refilled next iteration
    }
    if (pass == 0) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
#pragma unroll
        for (int o = 1; o < 4; o <<= 1) {
          const float m2 = __shfl_xor_sync(0xffffffffu, row_m[e], o);
          const float l2 = __shfl_xor_sync(0xffffffffu, row_l[e], o);
          merge_max_sum(row_m[e], row_l[e], m2, l2);
        }
        row_inv[e] = row_l[e] > 0.f ? 1.f / row_l[e] : 0.f;
      }
    }
  }
}

template <typename T, int D>
cudaError_t launch_scores(const ProxyScoresParams& p, cudaStream_t stream) {
  const int64_t rows_q = proxy_scores_kept_rows(p.max_seqlen_q, p.stride);
  const int64_t rows_k = proxy_scores_kept_rows(p.max_seqlen_k, p.stride);
  half* ws = static_cast<half*>(p.workspace);
  const int64_t nq_el = static_cast<int64_t>(p.batch) * p.num_groups * rows_q * D;
  const int64_t nk_el = static_cast<int64_t>(p.batch) * p.num_groups * rows_k * D;
  half *q_hi = ws, *q_lo = ws + nq_el, *k_hi = ws + 2 * nq_el, *k_lo = ws + 2 * nq_el + nk_el;

  cudaError_t e = cudaMemsetAsync(p.scores, 0,
                                  static_cast<size_t>(p.batch) * p.num_groups * p.nqb * p.nkb * sizeof(float), stream);
  if (e != cudaSuccess) return e;
  if (rows_q == 0 || rows_k == 0) return cudaSuccess;
  pool_kernel<T, D, true><<<dim3((rows_q + kPoolWarps - 1) / kPoolWarps, p.num_groups, p.batch), kPoolWarps * 32, 0,
                            stream>>>(p, rows_q, q_hi, q_lo);
  if ((e = cudaGetLastError()) != cudaSuccess) return e;
  pool_kernel<T, D, false><<<dim3((rows_k + kPoolWarps - 1) / kPoolWarps, p.num_groups, p.batch), kPoolWarps * 32, 0,
                             stream>>>(p, rows_k, k_hi, k_lo);
  if ((e = cudaGetLastError()) != cudaSuccess) return e;

  const int units_per_block = ((p.block_size + p.stride - 1) / p.stride + 15) / 16;
  const int64_t units = static_cast<int64_t>(p.nqb) * units_per_block;
  const int smem = 2 * 2 * kKeyTile * (D + 8) * static_cast<int>(sizeof(half));
  if ((e = cudaFuncSetAttribute(scores_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem)) != cudaSuccess)
    return e;
  const dim3 grid(static_cast<unsigned>((units + kScoreWarps - 1) / kScoreWarps), p.num_groups, p.batch);
  scores_kernel<D><<<grid, kScoreThreads, smem, stream>>>(p, rows_q, rows_k, q_hi, q_lo, k_hi, k_lo);
  return cudaGetLastError();
}

}  // namespace

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
