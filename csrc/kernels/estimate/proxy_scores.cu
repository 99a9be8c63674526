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

#include "kernels/estimate/proxy_pool.cuh"
#include "kernels/estimate/proxy_scores_kernel.cuh"

namespace proxyattn {
namespace {

using namespace scores;

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
