// Stage 3 (select_blocks), v2: one CTA per (b, proxy group g, query block m), shared by the
// Hq/G heads of the group (they read the same score row and differ only in their budget).
//   k_m = min(c_m, max(f_m + ceil_div(kstar * (c_m - f_m), c_last - f_last), ceil_div(min_budget, S)))
// (64-bit integer arithmetic, second term 0 when c_last == f_last; kstar clamped into
// [0, c_last - f_last] as the reference does); each head takes its r = k_m - f_m best
// non-forced candidates (a contiguous range of key blocks, see split_forced).
// The non-forced candidates are sorted once per row by the total order "larger score
// first, then smaller n" (bitonic sort in shared memory of order-preserving uint32 keys of
// the fp32 scores, -0.0 canonicalised to +0.0, NaN below every number, with 16-bit candidate
// offsets), giving each candidate its rank. A warp per head then writes, in one ascending pass with ballots,
// every candidate that is forced or ranks below r, and pads the row with -1 (indices int16:
// nkb <= 32768). The sort is skipped when every head of the row takes all or none of the
// non-forced candidates.
// Deterministic; bit-identical to any implementation of the same total order.
#include "kernels/estimate/select_blocks.h"

#include "kernels/estimate/estimate_common.cuh"

namespace proxyattn {
namespace {

constexpr int kSelectThreads = 256;
constexpr int kSelectWarps = kSelectThreads / 32;
constexpr uint16_t kPadIndex = 0xffffu;  // > any candidate offset (nkb <= 32768)

static_assert(kSelectMaxBlocks <= 32768, "candidate offsets and output indices are stored in 16 bits");

// Order-preserving key of a score: larger scores get larger keys, -inf the smallest number key
// (0x007fffff); NaN (either sign) ranks below every number with key 0, so it never outranks a
// number (docs/design.md section 2). Forced blocks are never sorted, so no score can displace them.
__device__ inline uint32_t order_key(float f) {
  const uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0u;  // NaN, by its bits (fast math may drop isnan)
  if ((u & 0x7fffffffu) == 0u) return 0x80000000u;  // -0.0 and +0.0 compare equal: one key
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// (key a, index ia) goes before (key b, index ib) in the selection order.
__device__ inline bool goes_before(uint32_t a, uint16_t ia, uint32_t b, uint16_t ib) {
  return a > b || (a == b && ia < ib);
}

__device__ inline int pow2_at_least(int n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

__global__ void __launch_bounds__(kSelectThreads) select_blocks_kernel(const SelectBlocksParams p, int pw_max) {
  extern __shared__ __align__(16) uint32_t keys[];  // [pw_max] keys, then ranks; followed by uint16 idx[pw_max]
  uint16_t* idx = reinterpret_cast<uint16_t*>(keys + pw_max);

  const int m = blockIdx.x, grp = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int S = p.block_size;
  const int hpg = p.num_heads / p.num_groups;
  const int h0 = grp * hpg;
  auto out_row = [&](int h) {
    return p.indices + ((static_cast<int64_t>(b) * p.num_heads + h) * p.nqb + m) * p.nkb;
  };
  auto count_at = [&](int h) -> int& { return p.counts[(static_cast<int64_t>(b) * p.num_heads + h) * p.nqb + m]; };

  const SeqBounds sb = load_seq_bounds(p.cu_seqlens_q, p.cu_seqlens_k, b, p.max_seqlen_q, p.max_seqlen_k,
                                       p.total_q, p.total_k);
  const int nqb_seq = static_cast<int>((static_cast<int64_t>(sb.nq) + S - 1) / S);
  if (m >= nqb_seq) {
    for (int hh = warp; hh < hpg; hh += kSelectWarps) {
      int16_t* out = out_row(h0 + hh);
      if (lane == 0) count_at(h0 + hh) = 0;
      for (int i = lane; i < p.nkb; i += 32) out[i] = -1;
    }
    return;
  }
  const int c = candidate_count(m, sb.nq, sb.nk, S, p.causal);
  const ForcedSplit fs = split_forced(m, sb.nq, sb.nk, S, c, p.sink_blocks, p.local_blocks, p.causal);
  const int c_last = candidate_count(nqb_seq - 1, sb.nq, sb.nk, S, p.causal);
  const ForcedSplit fl =
      split_forced(nqb_seq - 1, sb.nq, sb.nk, S, c_last, p.sink_blocks, p.local_blocks, p.causal);
  const int64_t free_last = c_last - fl.forced;
  const int nc = fs.free_hi - fs.free_lo;
  const int64_t min_blocks = ceil_div64(p.min_budget, S);
  // Non-forced candidates head h takes, in [0, nc].
  auto take = [&](int h) {
    const int64_t kst =
        min(max(static_cast<int64_t>(p.kstar[static_cast<int64_t>(b) * p.num_heads + h]), int64_t(0)), free_last);
    const int64_t extra = free_last > 0 ? ceil_div64(kst * nc, free_last) : 0;
    int64_t km = max(static_cast<int64_t>(fs.forced) + extra, min_blocks);
    km = max(min(km, static_cast<int64_t>(c)), static_cast<int64_t>(fs.forced));
    return static_cast<int>(km) - fs.forced;
  };

  bool need = false;
  for (int hh = tid; hh < hpg; hh += kSelectThreads) {
    const int r = take(h0 + hh);
    need |= r > 0 && r < nc;
  }
  need = __syncthreads_or(need);
  if (need) {
    const float* srow = p.scores + ((static_cast<int64_t>(b) * p.num_groups + grp) * p.nqb + m) * p.nkb + fs.free_lo;
    const int pw = pow2_at_least(nc);
    for (int i = tid; i < pw; i += kSelectThreads) {
      keys[i] = i < nc ? order_key(srow[i]) : 0u;
      idx[i] = i < nc ? static_cast<uint16_t>(i) : kPadIndex;
    }
    __syncthreads();
    // Bitonic sort into the selection order (descending key, ascending index).
    for (int size = 2; size <= pw; size <<= 1) {
      for (int stride = size >> 1; stride > 0; stride >>= 1) {
        for (int i = tid; i < pw / 2; i += kSelectThreads) {
          const int lo = 2 * i - (i & (stride - 1));
          const int hi = lo + stride;
          const bool fwd = (lo & size) == 0;  // this run is sorted in selection order
          const uint32_t ka = keys[lo], kb = keys[hi];
          const uint16_t ia = idx[lo], ib = idx[hi];
          if (goes_before(kb, ib, ka, ia) == fwd) {
            keys[lo] = kb;
            keys[hi] = ka;
            idx[lo] = ib;
            idx[hi] = ia;
          }
        }
        __syncthreads();
      }
    }
    // keys[] becomes the rank of each candidate offset (real entries sort before the padding).
    for (int i = tid; i < nc; i += kSelectThreads) keys[idx[i]] = static_cast<uint32_t>(i);
    __syncthreads();
  }

  // A warp per head: ascending compaction of the forced blocks and the candidates ranked < r.
  for (int hh = warp; hh < hpg; hh += kSelectWarps) {
    const int h = h0 + hh;
    const int r = take(h);
    const int km = fs.forced + r;
    int16_t* out = out_row(h);
    if (lane == 0) count_at(h) = km;
    int pos = 0;
    for (int base = 0; base < c; base += 32) {
      const int n = base + lane;
      bool sel = false;
      if (n < c) {
        if (n < fs.free_lo || n >= fs.free_hi) sel = true;
        else sel = r >= nc ? true : r <= 0 ? false : keys[n - fs.free_lo] < static_cast<uint32_t>(r);
      }
      const unsigned bal = __ballot_sync(0xffffffffu, sel);
      if (sel) out[pos + __popc(bal & ((1u << lane) - 1u))] = static_cast<int16_t>(n);
      pos += __popc(bal);
    }
    for (int i = km + lane; i < p.nkb; i += 32) out[i] = -1;
  }
}

}  // namespace

cudaError_t run_select_blocks(const SelectBlocksParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.num_heads == 0 || p.nqb == 0) return cudaSuccess;
  if (p.nkb > kSelectMaxBlocks || p.num_groups < 1 || p.num_heads % p.num_groups != 0) return cudaErrorInvalidValue;
  int pw = 1;
  while (pw < p.nkb) pw <<= 1;
  const size_t smem = select_blocks_smem_bytes(p.nkb);
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(select_blocks_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  const dim3 grid(p.nqb, p.num_groups, p.batch);
  select_blocks_kernel<<<grid, kSelectThreads, smem, stream>>>(p, pw);
  return cudaGetLastError();
}

}  // namespace proxyattn
