// Small helpers of the Hopper kernels (attention and stages 1 and 2 of the estimate): the macro that
// says whether sm_90a device code is being compiled, views of wgmma accumulator fragments, the issue
// of one warpgroup-wide wgmma batch, a compiler fence around shared-memory hand-offs, the start and
// the stage release of the estimate kernels' TMA key rings, and the host's tensor-map strides.
#pragma once

#include <type_traits>

#include <cstdint>

#include <cute/tensor.hpp>
#include <cute/arch/copy_sm90_desc.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/arch/barrier.h>

// 1 while compiling device code for sm_90a (wgmma, TMA, setmaxnreg); kernel bodies are empty elsewhere.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define PROXYATTN_BSA_SM90_DEVICE 1
#else
#define PROXYATTN_BSA_SM90_DEVICE 0
#endif

namespace proxyattn {
namespace bsa_sm90 {

using namespace cute;

// sm90 accumulator layout ((2, 2, N/8), MMA_M, MMA_N) -> (rows (2, MMA_M), cols (2, N/8, MMA_N)).
// Value (v0, v1, v2) of a thread holds row lane/4 + 8 v1 (+ 16 warp), column 2 (lane%4) + v0 + 8 v2.
template <class Layout>
__device__ __forceinline__ constexpr auto acc_rowcol(Layout const& l) {
  static_assert(decltype(rank(l))::value == 3, "expected an MMA accumulator layout");
  static_assert(decltype(rank<0>(l))::value == 3, "expected an sm90 GMMA accumulator");
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)), make_layout(get<0, 0>(l), get<0, 2>(l), get<2>(l)));
}

// Accumulator layout ((2, 2, N/8), MMA_M, MMA_N) of S -> register A-operand layout
// ((2, 2, 2), MMA_M, N/16 * MMA_N) of P for the 64xDx16 RS wgmma: value (v0, v1, v2) of the A
// fragment is row lane/4 + 8 v1, k 2 (lane%4) + v0 + 8 v2, so two adjacent n8 groups form one k16.
template <class Layout>
__device__ __forceinline__ constexpr auto acc_to_a_operand(Layout const& l) {
  auto v = logical_divide(get<0>(l), Shape<Underscore, Underscore, _2>{});  // (2, 2, (2, N/16))
  return make_layout(make_layout(get<0>(v), get<1>(v), get<2, 0>(v)), get<1>(l),
                     coalesce(make_layout(get<2, 1>(v), get<2>(l))));
}

// Issues one wgmma batch (acc (= or +=) A B over all k-blocks) and commits it, without waiting: the
// caller waits with warpgroup_wait<n>() and fences the accumulator (and a register A) afterwards.
template <bool kZeroInit, class TiledMma, class TA, class TB, class TC>
__device__ __forceinline__ void wg_issue(TiledMma& mma, TA const& a, TB const& b, TC& c) {
  constexpr bool kRegA = !std::is_base_of_v<GMMA::DescriptorIterator, typename TiledMma::FrgTypeA>;
  if constexpr (kRegA) warpgroup_fence_operand(const_cast<TA&>(a));
  warpgroup_fence_operand(c);
  warpgroup_arrive();
  if constexpr (kZeroInit) mma.accumulate_ = GMMA::ScaleOut::Zero;
  CUTE_UNROLL
  for (int kb = 0; kb < size<2>(a); ++kb) {
    cute::gemm(mma, a(_, _, kb), b(_, _, kb), c);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
}

// The slice of a warpgroup-wide TiledMma for the wgmma descriptors of thread tid's warpgroup, by a
// warp-uniform index (lane 0's warpgroup), so that the descriptors stay in uniform registers, off
// the path from a stage's barrier to its wgmma (FlashAttention-3 and -4 slice the same way). The
// accumulators' partitions still take the thread's own slice.
template <class TiledMma>
__device__ __forceinline__ auto warpgroup_slice(TiledMma const& mma, int tid) {
  return mma.get_slice(__shfl_sync(0xffffffffu, tid / 128, 0) * 128);
}

// Generic-proxy writes to shared memory (cp.async, st.shared) made visible to wgmma's reads.
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Compiler fence between C++ shared-memory accesses and the barrier asm (which has no memory clobber).
__device__ __forceinline__ void compiler_fence() { asm volatile("" ::: "memory"); }

// A TMA key ring's start, by one thread: its tensor map prefetched, each stage's transaction barrier
// set up for one arrival (the thread that issues the stage's copy) and its release count (release_stage)
// cleared, and the barriers made visible to the copies.
template <int kStages>
__device__ __forceinline__ void init_ring(cute::TmaDescriptor const* tma_desc, uint64_t (&full)[kStages],
                                          int (&release)[kStages]) {
  cute::prefetch_tma_descriptor(tma_desc);
#pragma unroll
  for (int st = 0; st < kStages; ++st) {
    cutlass::arch::ClusterTransactionBarrier::init(&full[st], 1);
    release[st] = 0;
  }
  cutlass::arch::fence_barrier_init();
}

// A ring stage given back after a warpgroup's wgmma on it has completed (the estimate kernels' key
// rings, fed by TMA): lane 0 of each of the CTA's kWarps warps adds one to `count` (CTA-scope fences
// on both sides order the wgmma's reads before the next copy's writes), and the warp that makes it
// kWarps resets it and calls refill() (the copy of the stage's next tile), so no thread waits for a
// free stage.
template <int kWarps, class Refill>
__device__ __forceinline__ void release_stage(int lane, int& count, Refill&& refill) {
  __syncwarp();
  if (lane == 0) {
    __threadfence_block();
    if (atomicAdd(&count, 1) == kWarps - 1) {
      __threadfence_block();
      count = 0;
      refill();
    }
  }
}

// A tensor map's stride of a dimension of `size`: a size-1 dimension's stride is never used, so it
// gets `fallback`, a value TMA accepts (a 16-byte multiple).
inline int64_t tma_stride(int64_t size, int64_t stride, int64_t fallback) { return size > 1 ? stride : fallback; }

}  // namespace bsa_sm90
}  // namespace proxyattn
