// CTA work order of block_sparse_attention (BsaParams::tile_order): within each segment of the
// natural order of bsa_tile (kernels/bsa_params.h; a section of KV heads of one batch item, or the
// whole grid when kv_section is 0) the work items by descending selected-block count, so the CTAs
// resident at one time have rows of about the same length: they start together, walk their key
// blocks from the diagonal down at the same pace and so read the same part of the KV head's K/V
// from L2, and the longest rows do not end up in the tail.
//
// One CTA per segment, counting sort in shared memory: a histogram over kOrderBins count bins
// (exact up to num_k_blocks = kOrderBins - 1, proportional above), an exclusive scan, then every
// work item takes the next slot of its bin with a shared-memory atomic. Items of one bin land in
// the atomics' arrival order; that changes when a CTA runs, not what it computes (each CTA's output
// depends on its work item alone), so the attention's results stay bitwise deterministic. Counts
// are only a sort key here: any value is clamped into [0, num_k_blocks].
#include "kernels/bsa_launch.h"

#include <climits>

namespace proxyattn {
namespace {

constexpr int kOrderThreads = 1024;
constexpr int kOrderBins = 2048;
static_assert(kOrderBins % kOrderThreads == 0, "whole bins per thread");

// Sort bin of natural work item t: 0 for the largest counts.
__device__ __forceinline__ int order_bin(const BsaParams& p, int t) {
  const BsaTile w = bsa_tile(t, p);
  int c = __ldg(p.counts + int64_t(w.b) * p.counts_batch_stride + int64_t(w.h) * p.counts_head_stride +
                int64_t(w.m) * p.counts_block_stride);
  c = min(max(c, 0), p.num_k_blocks);
  return kOrderBins - 1 - int(int64_t(c) * kOrderBins / (int64_t(p.num_k_blocks) + 1));
}

__global__ void __launch_bounds__(kOrderThreads) bsa_tile_order_kernel(const BsaParams p, int* __restrict__ order) {
  __shared__ int bins[kOrderBins];
  __shared__ int warp_base[kOrderThreads / 32];

  const int nqb = p.num_q_blocks;
  int start, len;
  if (p.kv_section <= 0) {
    start = 0;
    len = p.batch * p.q_heads * nqb;
  } else {
    const int group = p.q_heads / p.kv_heads;
    const int nsec = (p.kv_heads + p.kv_section - 1) / p.kv_section;
    const int b = int(blockIdx.x) / nsec, s = int(blockIdx.x) % nsec;
    const int kv0 = s * p.kv_section;
    const int kv_n = min(p.kv_section, p.kv_heads - kv0);
    start = b * p.q_heads * nqb + kv0 * group * nqb;  // bsa_tile's first item of section s of batch item b
    len = kv_n * group * nqb;
  }

  for (int i = threadIdx.x; i < kOrderBins; i += kOrderThreads) bins[i] = 0;
  __syncthreads();
  for (int i = threadIdx.x; i < len; i += kOrderThreads) atomicAdd(&bins[order_bin(p, start + i)], 1);
  __syncthreads();

  // Exclusive scan of the bins: each thread owns kPer consecutive bins.
  constexpr int kPer = kOrderBins / kOrderThreads;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int own[kPer];
  int sum = 0;
  for (int j = 0; j < kPer; ++j) {
    own[j] = bins[threadIdx.x * kPer + j];
    sum += own[j];
  }
  int incl = sum;
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  if (lane == 31) warp_base[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const int w = warp_base[lane];
    int wi = w;
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, wi, o);
      if (lane >= o) wi += y;
    }
    warp_base[lane] = wi - w;
  }
  __syncthreads();
  int run = warp_base[warp] + incl - sum;
  for (int j = 0; j < kPer; ++j) {
    bins[threadIdx.x * kPer + j] = run;
    run += own[j];
  }
  __syncthreads();

  for (int i = threadIdx.x; i < len; i += kOrderThreads) {
    const int t = start + i;
    order[start + atomicAdd(&bins[order_bin(p, t)], 1)] = t;
  }
}

}  // namespace

cudaError_t run_bsa_tile_order(const BsaParams& p, int* order, cudaStream_t stream) {
  const int64_t items = bsa_tile_order_size(p);
  if (items == 0) return cudaSuccess;
  if (items > int64_t(INT32_MAX) || order == nullptr || p.counts == nullptr || p.kv_heads <= 0 ||
      p.q_heads % p.kv_heads != 0)
    return cudaErrorInvalidValue;
  const int64_t segments =
      p.kv_section <= 0 ? 1 : int64_t(p.batch) * ((p.kv_heads + p.kv_section - 1) / p.kv_section);
  bsa_tile_order_kernel<<<dim3(unsigned(segments)), dim3(kOrderThreads), 0, stream>>>(p, order);
  return cudaGetLastError();
}

}  // namespace proxyattn
