// The persistent Hopper block-sparse attention kernel (sm_90a): Traits::kCtasPerSm CTAs per SM (two at
// D = 64, one at D = 128), 384 threads in
// three warpgroups, work items taken from a counter (tile_scheduler.cuh), the items' key blocks run
// as one pipeline (mainloop.cuh). Same math, parameters and layouts as the portable kernel
// (kernels/bsa_sm80/, kernels/common/bsa_params.h); block_size 128 only. Two instantiations per
// (dtype, head dim): contiguous and paged K/V (only the loader differs).
//   warpgroup 0 (producer, setmaxnreg kProducerRegs): warp 0 lane 0 loads (TMA), warp 1 schedules;
//     its other threads leave at once.
//   warpgroups 1, 2 (consumers, setmaxnreg kConsumerRegs): wgmma, online softmax, epilogue.
// Device code is compiled only for sm_90a (__CUDA_ARCH_FEAT_SM90_ALL); on other targets the body is
// empty, and bsa_plan (kernels/common/bsa_launch.h) never chooses this kernel on other devices.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include "kernels/common/chained_launch.cuh"
#include "kernels/bsa_sm90/mainloop.cuh"
#include "kernels/bsa_sm90/tile_scheduler.cuh"
#include "kernels/bsa_sm90/traits.cuh"

namespace proxyattn {
namespace bsa_sm90 {

// kPaged: K/V read through the page table (chosen by the launcher from the params, so the
// contiguous kernel's loader keeps its registers).
template <class Traits, bool kPaged>
__global__ void __launch_bounds__(Traits::kNThreads, Traits::kCtasPerSm)
    bsa_fwd_sm90_persistent_kernel(const __grid_constant__ KernelParams<Traits> kp) {
#if PROXYATTN_BSA_SM90_DEVICE
  pdl_wait();  // chained_launch.cuh: before any global memory access
  pdl_launch_dependents();
  using Barrier = cutlass::arch::ClusterTransactionBarrier;
  using EmptyBarrier = cutlass::arch::ClusterBarrier;
  extern __shared__ __align__(1024) char bsa_smem[];
  auto& ss = *reinterpret_cast<typename Traits::SharedStorage*>(bsa_smem);

  const int warpgroup = threadIdx.x / 128;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;

  if (threadIdx.x == 0) {
    CUTE_UNROLL
    for (int i = 0; i < 2; ++i) {
      Barrier::init(&ss.full_q[i], 1);
      EmptyBarrier::init(&ss.empty_q[i], Traits::kConsumerWarps);
      EmptyBarrier::init(&ss.item_full[i], 1);
      EmptyBarrier::init(&ss.item_empty[i], 1);
    }
    CUTE_UNROLL
    for (int s = 0; s < Traits::kStages; ++s) {
      Barrier::init(&ss.full_k[s], 1);
      Barrier::init(&ss.full_v[s], 1);
      EmptyBarrier::init(&ss.empty_k[s], Traits::kConsumerWarps);
      EmptyBarrier::init(&ss.empty_v[s], Traits::kConsumerWarps);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();  // the only CTA-wide barrier: idle producer threads leave below

  if (warpgroup == 0) {
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegs>();
    if (warp == 1) {
      run_scheduler<Traits>(kp, ss, lane);
    } else if (warp == 0 && lane == 0) {
      run_loader<Traits, kPaged>(kp, ss);
    }
  } else {
    cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegs>();
    run_consumers<Traits>(kp, ss, lane);
  }
#endif  // PROXYATTN_BSA_SM90_DEVICE
}

}  // namespace bsa_sm90
}  // namespace proxyattn
