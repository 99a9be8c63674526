// Stage 3 (select_blocks): one CTA per (b, h, query block m).
//   k_m = min(c_m, max(f_m + ceil_div(kstar * (c_m - f_m), c_last - f_last), ceil_div(min_budget, S)))
// (64-bit integer arithmetic, second term 0 when c_last == f_last; kstar clamped into
// [0, c_last - f_last] as the reference does).
// The k_m - f_m best non-forced candidates (a contiguous range of key blocks, see
// split_forced) are found by a 4-pass 8-bit radix select on order-preserving uint32 keys of
// the fp32 scores (-0.0 canonicalised to +0.0), which gives the threshold key T and how many
// keys equal to T to take; those go to the lowest n (total order: larger score first, then
// smaller n). A CTA-wide ballot/prefix-sum pass then writes the selected blocks in ascending
// order; the rest of the row is -1. Deterministic; bit-identical to any implementation of the
// same total order.
#include "kernels/select_blocks.h"

#include "kernels/estimate_common.cuh"

namespace proxyattn {
namespace {

constexpr int kSelectThreads = 256;
constexpr int kSelectWarps = kSelectThreads / 32;

__device__ inline uint32_t order_key(float f) {
  if (f == 0.0f) f = 0.0f;  // -0.0 and +0.0 compare equal: give them one key
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Exclusive prefix count of `flag` over the CTA in thread order; `total` gets the CTA count.
// Every thread of the CTA must call it.
__device__ inline int block_scan_flag(bool flag, int* warp_tot, int& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned bal = __ballot_sync(0xffffffffu, flag);
  if (lane == 0) warp_tot[warp] = __popc(bal);
  __syncthreads();
  int off = 0;
  total = 0;
#pragma unroll
  for (int w = 0; w < kSelectWarps; ++w) {
    const int c = warp_tot[w];
    off += (w < warp) ? c : 0;
    total += c;
  }
  __syncthreads();
  return off + __popc(bal & ((1u << lane) - 1u));
}

__global__ void __launch_bounds__(kSelectThreads) select_blocks_kernel(const SelectBlocksParams p) {
  extern __shared__ uint32_t keys[];  // keys of the non-forced candidates, [nc]
  __shared__ int hist[256];
  __shared__ int warp_tot[kSelectWarps];
  __shared__ uint32_t s_prefix;
  __shared__ int s_rank;

  const int m = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x;
  const int S = p.block_size;
  const int64_t row = (static_cast<int64_t>(b) * p.num_heads + h) * p.nqb + m;
  int* out = p.indices + row * p.nkb;

  const SeqBounds sb = load_seq_bounds(p.cu_seqlens_q, p.cu_seqlens_k, b, p.max_seqlen_q, p.max_seqlen_k,
                                       p.total_q, p.total_k);
  const int nqb_seq = static_cast<int>((static_cast<int64_t>(sb.nq) + S - 1) / S);
  if (m >= nqb_seq) {
    if (tid == 0) p.counts[row] = 0;
    for (int i = tid; i < p.nkb; i += kSelectThreads) out[i] = -1;
    return;
  }
  const int c = candidate_count(m, sb.nq, sb.nk, S, p.causal);
  const ForcedSplit fs = split_forced(c, p.sink_blocks, p.local_blocks);
  const int c_last = candidate_count(nqb_seq - 1, sb.nq, sb.nk, S, p.causal);
  const ForcedSplit fl = split_forced(c_last, p.sink_blocks, p.local_blocks);
  const int64_t free_last = c_last - fl.forced;
  const int nc = fs.free_hi - fs.free_lo;
  const int64_t kst =
      min(max(static_cast<int64_t>(p.kstar[static_cast<int64_t>(b) * p.num_heads + h]), int64_t(0)), free_last);
  const int64_t extra = free_last > 0 ? ceil_div64(kst * nc, free_last) : 0;
  int64_t km = max(static_cast<int64_t>(fs.forced) + extra, ceil_div64(p.min_budget, S));
  km = max(min(km, static_cast<int64_t>(c)), static_cast<int64_t>(fs.forced));
  const int r = static_cast<int>(km) - fs.forced;  // non-forced blocks to take, in [0, nc]

  if (tid == 0) p.counts[row] = static_cast<int>(km);
  for (int i = static_cast<int>(km) + tid; i < p.nkb; i += kSelectThreads) out[i] = -1;
  if (r == nc) {  // every candidate
    for (int i = tid; i < c; i += kSelectThreads) out[i] = i;
    return;
  }
  if (r == 0) {  // forced blocks only
    for (int i = tid; i < c; i += kSelectThreads) {
      if (i < fs.free_lo) out[i] = i;
      else if (i >= fs.free_hi) out[fs.free_lo + (i - fs.free_hi)] = i;
    }
    return;
  }

  const int g = h / (p.num_heads / p.num_groups);
  const float* srow = p.scores + ((static_cast<int64_t>(b) * p.num_groups + g) * p.nqb + m) * p.nkb;
  for (int i = tid; i < nc; i += kSelectThreads) keys[i] = order_key(srow[fs.free_lo + i]);

  // Radix select: T = the r-th largest key, `rem` = how many keys equal to T are taken.
  uint32_t prefix = 0;
  int rem = r;
  for (int pass = 0; pass < 4; ++pass) {
    const int shift = 24 - 8 * pass;
    const uint32_t hi_mask = pass == 0 ? 0u : (0xffffffffu << (32 - 8 * pass));
    for (int i = tid; i < 256; i += kSelectThreads) hist[i] = 0;
    __syncthreads();
    for (int i = tid; i < nc; i += kSelectThreads) {
      const uint32_t k = keys[i];
      if ((k & hi_mask) == prefix) atomicAdd(&hist[(k >> shift) & 255u], 1);
    }
    __syncthreads();
    if (tid < 32) {
      const int lane = tid;
      int cnt[8], sum = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        cnt[j] = hist[255 - 8 * lane - j];
        sum += cnt[j];
      }
      int incl = sum;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int v = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += v;
      }
      const unsigned hit = __ballot_sync(0xffffffffu, incl >= rem);
      if (lane == __ffs(hit) - 1) {
        int acc = incl - sum;
        for (int j = 0; j < 8; ++j) {
          if (acc + cnt[j] >= rem) {
            s_prefix = prefix | (static_cast<uint32_t>(255 - 8 * lane - j) << shift);
            s_rank = rem - acc;
            break;
          }
          acc += cnt[j];
        }
      }
    }
    __syncthreads();
    prefix = s_prefix;
    rem = s_rank;
  }
  const uint32_t T = prefix;

  // Ascending compaction over the candidates [0, c).
  int eq_carry = 0, sel_carry = 0;
  for (int base = 0; base < c; base += kSelectThreads) {
    const int n = base + tid;
    const bool valid = n < c;
    const bool forced = valid && (n < fs.free_lo || n >= fs.free_hi);
    const bool is_free = valid && !forced;
    const uint32_t k = is_free ? keys[n - fs.free_lo] : 0u;
    const bool eq = is_free && k == T;
    int tot;
    const int eq_rank = eq_carry + block_scan_flag(eq, warp_tot, tot);
    eq_carry += tot;
    const bool sel = forced || (is_free && (k > T || (eq && eq_rank < rem)));
    const int pos = sel_carry + block_scan_flag(sel, warp_tot, tot);
    sel_carry += tot;
    if (sel) out[pos] = n;
  }
}

}  // namespace

cudaError_t run_select_blocks(const SelectBlocksParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.num_heads == 0 || p.nqb == 0) return cudaSuccess;
  if (p.nkb > kSelectMaxBlocks) return cudaErrorInvalidValue;
  const size_t smem = static_cast<size_t>(p.nkb > 0 ? p.nkb : 1) * sizeof(uint32_t);
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(select_blocks_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  const dim3 grid(p.nqb, p.num_heads, p.batch);
  select_blocks_kernel<<<grid, kSelectThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace proxyattn
