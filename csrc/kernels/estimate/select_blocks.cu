// Stage 3 (select_blocks): one CTA per (b, proxy group g, query block m), shared by the
// Hq/G heads of the group (they read the same score row and differ only in their budget).
//   k_m = min(c_m, max(f_m + ceil_div(kstar * (c_m - f_m), c_last - f_last), ceil_div(min_budget, S)))
// (c_last, f_last: the sequence's last query block, or with budget_seqlen that of a sequence of
// budget_seqlen queries and keys whose chunk the call's rows are)
// (exact integer arithmetic, second term 0 when c_last == f_last; kstar clamped into
// [0, c_last - f_last] as the reference does); each head takes its r = k_m - f_m best
// non-forced candidates (a contiguous range of key blocks, see split_forced).
// Each head's r best non-forced candidates in the total order "larger score first, then
// smaller n" are found without sorting: the candidates' order-preserving uint32 keys of the fp32
// scores (-0.0 canonicalised to +0.0, NaN below every number) go to shared memory once per row,
// then a head's warp finds the key T of rank r by radix selection (four passes of 8-bit digit
// histograms in warp-private shared memory), and writes, in one ascending pass with ballots,
// every candidate that is forced, has a key above T, or has key T and is among the first `need`
// of them (need = r - #keys above T); it pads the row with -1 (indices int16: nkb <= 32768). A
// head that takes all or none of the non-forced candidates needs no selection.
// A CTA has one warp per two heads of the group, at most eight (select_blocks_warps): with few
// heads per group the CTAs are small and many share an SM, since a row's work is a chain of
// dependent passes and an idle warp would only hold an SM's slots.
// A head's row depends on its r alone (the group's heads read one score row), and heads often
// share it (every head of a row at the min_budget floor does): of the heads with one r among 32
// consecutive heads of the group, the first selects and writes its row, and after a CTA barrier
// the others copy it.
// Deterministic; bit-identical to any implementation of the same total order.
#include "kernels/estimate/select_blocks.h"

#include "kernels/common/chained_launch.cuh"
#include "kernels/estimate/estimate_common.cuh"

namespace proxyattn {
namespace {

constexpr int kSelectThreads = 32 * kSelectMaxWarps;  // the largest CTA

static_assert(kSelectMaxBlocks <= 32768, "output indices are stored in 16 bits");

// Order-preserving key of a score: larger scores get larger keys, -inf the smallest number key
// (0x007fffff); NaN (either sign) ranks below every number with key 0, so it never outranks a
// number (docs/design.md section 2). Forced blocks are never ranked, so no score can displace them.
__device__ inline uint32_t order_key(float f) {
  const uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0u;  // NaN, by its bits (fast math may drop isnan)
  if ((u & 0x7fffffffu) == 0u) return 0x80000000u;  // -0.0 and +0.0 compare equal: one key
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// One warp: the key T of rank r (1-based, largest first) among keys[0, nc), 0 < r < nc, and how
// many keys equal to T fall within the first r (need; the keys above T are r - need). hist: 256
// words of this warp's own.
__device__ inline void warp_select(const uint32_t* keys, int nc, int r, uint32_t* hist, int lane, uint32_t& T,
                                   int& need) {
  uint32_t prefix = 0, mask = 0;
  int rr = r;  // rank among the keys that match prefix on the decided bits, in [1, their count]
#pragma unroll 1
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = lane; i < 256; i += 32) hist[i] = 0u;
    __syncwarp();
    for (int i = lane; i < nc; i += 32) {
      const uint32_t k = keys[i];
      if ((k & mask) == prefix) atomicAdd(&hist[(k >> shift) & 255u], 1u);
    }
    __syncwarp();
    // Lane l holds digits 255 - 8 l - e (e = 0..7): the lanes in descending digit order.
    uint32_t cnt[8], sum = 0;
#pragma unroll
    for (int e = 0; e < 8; ++e) sum += (cnt[e] = hist[255 - 8 * lane - e]);
    uint32_t incl = sum;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const uint32_t t = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += t;
    }
    const uint32_t excl = incl - sum;
    const bool mine = excl < static_cast<uint32_t>(rr) && static_cast<uint32_t>(rr) <= incl;
    const int src = __ffs(__ballot_sync(0xffffffffu, mine)) - 1;
    int digit = 0;
    uint32_t before = excl;
    bool found = false;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      if (!found && before + cnt[e] >= static_cast<uint32_t>(rr)) {
        digit = 255 - 8 * lane - e;
        found = true;
      } else if (!found) {
        before += cnt[e];
      }
    }
    digit = __shfl_sync(0xffffffffu, digit, src);
    before = __shfl_sync(0xffffffffu, before, src);
    rr -= static_cast<int>(before);
    prefix |= static_cast<uint32_t>(digit) << shift;
    mask |= 255u << shift;
    __syncwarp();  // every lane has read the histogram before the next pass clears it
  }
  T = prefix;
  need = rr;
}

// row[from, to) = -1 by one warp, 16-byte stores where the row's alignment allows (a row starts
// on any 2-byte boundary).
__device__ inline void pad_row(int16_t* row, int from, int to, int lane) {
  if (from >= to) return;
  int16_t* p = row + from;
  int n = to - from;
  const int head = min(n, static_cast<int>(((16u - (reinterpret_cast<uintptr_t>(p) & 15u)) & 15u) >> 1));
  if (lane < head) p[lane] = -1;
  p += head;
  n -= head;
  int4* v = reinterpret_cast<int4*>(p);
  const int nv = n >> 3;
  for (int i = lane; i < nv; i += 32) v[i] = make_int4(-1, -1, -1, -1);
  if (lane < (n & 7)) p[(nv << 3) + lane] = -1;
}

__global__ void __launch_bounds__(kSelectThreads) select_blocks_kernel(const SelectBlocksParams p) {
  pdl_wait();  // chained_launch.cuh: before any global memory access
  pdl_launch_dependents();
  // Each warp's digit histogram [warps][256], then the order keys of the row's non-forced
  // candidates [nkb].
  extern __shared__ __align__(16) uint32_t smem[];
  const int m = blockIdx.x, grp = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int nthreads = blockDim.x, nwarps = nthreads >> 5;
  uint32_t* const keys = smem + nwarps * 256;
  const int S = p.block_size;
  const int hpg = p.num_heads / p.num_groups;
  const int h0 = grp * hpg;
  auto out_row = [&](int h) {
    return p.indices + ((static_cast<int64_t>(b) * p.num_heads + h) * p.nqb + m) * p.nkb;
  };
  auto count_at = [&](int h) -> int& { return p.counts[(static_cast<int64_t>(b) * p.num_heads + h) * p.nqb + m]; };

  const SeqBounds sb = load_seq_bounds(p.cu_seqlens_q, p.cu_seqlens_k, b, p.max_seqlen_q, p.max_seqlen_k,
                                       p.total_q, p.total_k);
  const int nqb_seq = ceil_div32(sb.nq, S);
  if (m >= nqb_seq) {
    for (int hh = warp; hh < hpg; hh += nwarps) {
      if (lane == 0) count_at(h0 + hh) = 0;
      pad_row(out_row(h0 + hh), 0, p.nkb, lane);
    }
    return;
  }
  const int c = candidate_count(m, sb.nq, sb.nk, S, p.causal);
  const ForcedSplit fs = split_forced(m, sb.nq, sb.nk, S, c, p.sink_blocks, p.local_blocks, p.causal);
  // The budgets' scale: the last query block of this sequence, or of a longer one whose chunk this is.
  const int lq = p.budget_seqlen > 0 ? p.budget_seqlen : sb.nq, lk = p.budget_seqlen > 0 ? p.budget_seqlen : sb.nk;
  const int m_last = ceil_div32(lq, S) - 1;
  const int c_last = candidate_count(m_last, lq, lk, S, p.causal);
  const ForcedSplit fl = split_forced(m_last, lq, lk, S, c_last, p.sink_blocks, p.local_blocks, p.causal);
  const int free_last = c_last - fl.forced;
  const int nc = fs.free_hi - fs.free_lo;
  const int min_blocks = ceil_div32(p.min_budget, S);  // min_budget >= 0
  // Non-forced candidates head h takes, in [0, nc]; 32-bit arithmetic suffices, every count being
  // at most kSelectMaxBlocks (the op holds budget_seqlen to kSelectMaxBlocks blocks: kstar * nc <= 2^30).
  auto take = [&](int h) {
    const int kst = min(max(p.kstar[static_cast<int64_t>(b) * p.num_heads + h], 0), free_last);
    const int extra = free_last > 0 ? ceil_div32(kst * nc, free_last) : 0;
    return max(min(max(fs.forced + extra, min_blocks), c), fs.forced) - fs.forced;
  };

  bool any = false;  // some head takes part of the non-forced candidates: their keys are needed
  for (int hh = tid; hh < hpg; hh += nthreads) {
    const int r = take(h0 + hh);
    any |= r > 0 && r < nc;
  }
  any = __syncthreads_or(any);
  if (any) {
    const float* srow = p.scores + ((static_cast<int64_t>(b) * p.num_groups + grp) * p.nqb + m) * p.nkb + fs.free_lo;
    for (int i = tid; i < nc; i += nthreads) keys[i] = order_key(srow[i]);
    __syncthreads();
  }

  // Heads are taken in chunks of 32: lane l of a warp holds the r of the chunk's head l (-1 past
  // the group), read once per chunk and warp. A head copies the row of the first head of its chunk
  // with its r (its source; itself when none comes before it), which has no earlier head with that
  // r in the chunk and so writes its row itself.
  int chunk = -1, chunk_r = -1;
  auto head_r = [&](int hh, int& src) {
    const int base = hh & ~31;
    if (base != chunk) {  // warp-uniform
      chunk = base;
      chunk_r = base + lane < hpg ? take(h0 + base + lane) : -1;
    }
    const int r = __shfl_sync(0xffffffffu, chunk_r, hh - base);
    src = base + __ffs(__ballot_sync(0xffffffffu, lane <= hh - base && chunk_r == r)) - 1;
    return r;
  };

  // Each head that writes its row, on its warp: its threshold, then an ascending compaction of the
  // forced blocks and the candidates within its first r.
  bool copies = false;  // some head of this CTA copies another's row
  for (int hh = warp; hh < hpg; hh += nwarps) {
    const int h = h0 + hh;
    int src;
    const int r = head_r(hh, src);
    if (src != hh) {
      copies = true;
      continue;
    }
    const int km = fs.forced + r;
    uint32_t T = 0;
    int need = 0;
    if (r > 0 && r < nc) warp_select(keys, nc, r, smem + warp * 256, lane, T, need);
    int16_t* out = out_row(h);
    if (lane == 0) count_at(h) = km;
    int pos = 0, ties = 0;  // ties: candidates with key T met so far
    for (int base = 0; base < c; base += 32) {
      const int n = base + lane;
      bool sel = false, tie = false;
      if (n < c) {
        if (n < fs.free_lo || n >= fs.free_hi) {
          sel = true;
        } else if (r >= nc) {
          sel = true;
        } else if (r > 0) {
          const uint32_t k = keys[n - fs.free_lo];
          sel = k > T;
          tie = k == T;
        }
      }
      const unsigned tb = __ballot_sync(0xffffffffu, tie);
      if (tie) sel = ties + __popc(tb & ((1u << lane) - 1u)) < need;
      ties += __popc(tb);
      const unsigned bal = __ballot_sync(0xffffffffu, sel);
      if (sel) out[pos + __popc(bal & ((1u << lane) - 1u))] = static_cast<int16_t>(n);
      pos += __popc(bal);
    }
    pad_row(out, km, p.nkb, lane);
  }
  // The other heads copy their source's row, written before the barrier (which orders the CTA's
  // global writes before its reads after it).
  if (!__syncthreads_or(copies)) return;
  for (int hh = warp; hh < hpg; hh += nwarps) {
    const int h = h0 + hh;
    int src;
    const int r = head_r(hh, src);
    if (src == hh) continue;
    const int km = fs.forced + r;
    const int16_t* in = out_row(h0 + src);
    int16_t* out = out_row(h);
    if (lane == 0) count_at(h) = km;
    for (int i = lane; i < km; i += 32) out[i] = in[i];
    pad_row(out, km, p.nkb, lane);
  }
}

}  // namespace

cudaError_t run_select_blocks(const SelectBlocksParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.num_heads == 0 || p.nqb == 0) return cudaSuccess;
  if (p.nkb > kSelectMaxBlocks || p.num_groups < 1 || p.num_heads % p.num_groups != 0) return cudaErrorInvalidValue;
  const int warps = select_blocks_warps(p.num_heads / p.num_groups);
  const size_t smem = select_blocks_smem_bytes(p.nkb, warps);
  // The CTAs are small and read their row once: the most shared memory, so that shared memory does
  // not bound how many share an SM. A hint: if it fails the default stays, and its error is cleared
  // so that no later check reports it.
  if (cudaFuncSetAttribute(select_blocks_kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                           cudaSharedmemCarveoutMaxShared) != cudaSuccess)
    (void)cudaGetLastError();
  if (smem > 48 * 1024) {  // past what a CTA gets unasked
    const cudaError_t e = cudaFuncSetAttribute(select_blocks_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(smem));
    if (e != cudaSuccess) {
      (void)cudaGetLastError();  // returned to the op, which raises it; not left for a later check
      return e;
    }
  }
  const dim3 grid(p.nqb, p.num_groups, p.batch);
  return launch_chained(select_blocks_kernel, grid, 32 * warps, smem, stream, p);
}

}  // namespace proxyattn
