// Block-sparse attention forward, Hopper path (sm_90a: TMA, wgmma, mbarriers, setmaxnreg). Same
// math, parameters and layouts as the portable path (kernels/bsa_fwd_sm80.cuh, kernels/bsa_params.h);
// block_size 128 only (the dispatcher in kernels/bsa_launch.h sends 64 to the sm80 path).
//
// Work items are (query block m, batch b, query head h), in sections of KV heads whose K/V fit in
// L2, heaviest rows first: by query block (bsa_tile in kernels/bsa_params.h), or, with
// PROXYATTN_BSA_SORT=1, by selected-block count (tile_order, sorted by kernels/bsa_order.cu).
// Two kernels: bsa_fwd_sm90_persistent_kernel (the default, described where it is defined below:
// one CTA per SM taking items from a counter, the items' key blocks run as one pipeline) and
// bsa_fwd_sm90_kernel, one CTA per item, described here. Both use 384 threads in three warpgroups:
//   warpgroup 0 (producer, 24 registers): one thread issues TMA loads, Q once, then for every
//     selected key block (walked from the diagonal down by BlockCursor, the order of sm80's
//     TileCursor) K and V into a 2-stage ring (3 with PROXYATTN_BSA_SM90_STAGES=3, variant 1 only);
//     full barriers carry the TMA transaction bytes, empty barriers are released
//     by the 8 consumer warps.
//   warpgroups 1, 2 (consumers, 240 registers; the persistent kernel: 40 and 232): each owns 64 of
//     the 128 query rows.
//     S = Q K^T by wgmma SS (64 x 128 x D), mask only on tiles that cross the causal diagonal or
//     the end of the keys, online softmax in fp32 (exp2; O rescaled only on key blocks where a row
//     of the warp raised its max, or with PROXYATTN_BSA_SM90_LAZY=t moved it more than t log2 units
//     past its reference: online_softmax_tile), P converted to 16 bit in registers, O += P V by
//     wgmma RS (64 x D x 128, V read MN-major from the same K-major smem tile).
//     Epilogue: O / rowsum stored straight from registers (32-bit pairs), lse per row.
//     Three variants (template kVariant, chosen at run time by bsa_sm90_variant in bsa_launch.h):
//     0 serial (each wgmma waited for at once); 1 overlapped (S_j = Q K_j issued with
//     O += P_{j-1} V_{j-1}; the softmax of S_j runs while the P V wgmma is in flight; O rescaled
//     after), the two consumer warpgroups not synchronised with each other; 2 overlapped with
//     pingpong: the warpgroups take turns at issuing their pair of wgmmas (two named barriers), so
//     one warpgroup's softmax runs while the other's wgmmas hold the tensor cores.
//
// Shared memory (SW128 K-major, what TMA writes and wgmma reads): sQ [128, D], sK/sV [stages][128, D],
// 1 + 4 x stages mbarriers. 2 stages: D = 128 160 KB, D = 64 80 KB; 3 stages (variant 1 only,
// PROXYATTN_BSA_SM90_STAGES=3): 224 KB, 112 KB. The persistent kernel: two sQ buffers, 2 stages,
// 192 KB at D = 128, 96 KB at D = 64 (plus 160 bytes of stage descriptions and item queue).
//
// Tensor maps: q/out [rows, D, heads, batch] with the tensors' own strides (varlen: rows = total,
// batch 1, each sequence reached by a row offset). Rows past a tensor's end read as zero. Rows of a
// key tile past a varlen sequence's end may belong to the next sequence: they are masked to
// -inf (P = 0 exactly), so they do not contribute unless V holds inf/NaN there.
//
// Device code is compiled only for sm_90a (__CUDA_ARCH_FEAT_SM90_ALL); on other targets the kernel
// body is empty and the launcher refuses non-sm90 devices.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <type_traits>

#include <cute/tensor.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/array.h>
#include <cutlass/numeric_conversion.h>
#include <cutlass/numeric_types.h>

#include "kernels/bsa_launch.h"
#include "kernels/bsa_params.h"
#include "kernels/estimate_common.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define PROXYATTN_BSA_SM90_DEVICE 1
#else
#define PROXYATTN_BSA_SM90_DEVICE 0
#endif

namespace proxyattn {
namespace bsa_sm90 {

using namespace cute;

template <typename Elem_, int kHeadDim_, int kStages_ = 2>
struct Sm90Traits {
  using Elem = Elem_;  // cutlass::half_t or cutlass::bfloat16_t
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 128;  // query rows per CTA == block_size
  static constexpr int kBlockN = 128;  // keys per tile == block_size
  static constexpr int kStages = kStages_;  // K/V ring depth: 2, or 3 (bsa_sm90_stages)
  static constexpr int kConsumerWarpgroups = kBlockM / 64;
  static constexpr int kNThreads = 128 * (1 + kConsumerWarpgroups);
  static constexpr int kConsumerWarps = 4 * kConsumerWarpgroups;

  using SmemAtom = decltype(GMMA::Layout_K_SW128_Atom<Elem>{});  // 8 x 64, 128-byte swizzle
  using SmemLayoutQ = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));  // (M, D)
  using SmemLayoutKV =
      decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>, Int<kStages>>{}));  // (N, D, stage)
  // V seen as the B operand of O = P V: (D, N, stage), Vt(d, n, s) = V(n, d, s) (MN-major for wgmma).
  using SmemLayoutVt = decltype(composition(
      SmemLayoutKV{},
      make_ordered_layout(Shape<Int<kHeadDim>, Int<kBlockN>, Int<kStages>>{}, Step<_2, _1, _3>{})));

  // Each consumer warpgroup computes 64 rows; the two are tiled along M.
  using TiledMmaS = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Elem, Elem, float, Shape<_64, Int<kBlockN>, Int<kHeadDim>>>(),
      Layout<Shape<Int<kConsumerWarpgroups>, _1, _1>>{}));
  using TiledMmaO = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Elem, Elem, float, Shape<_64, Int<kHeadDim>, Int<kBlockN>>, GMMA::Major::K,
                           GMMA::Major::MN>(),
      Layout<Shape<Int<kConsumerWarpgroups>, _1, _1>>{}));

  // Global views for the tensor maps: (rows, D, heads, batch).
  using GShape = Shape<int32_t, Int<kHeadDim>, int32_t, int32_t>;
  using GStride = Stride<int64_t, _1, int64_t, int64_t>;
  using GTensor = decltype(make_tensor(make_gmem_ptr(static_cast<Elem const*>(nullptr)), GShape{}, GStride{}));
  using TmaQ = decltype(make_tma_copy(SM90_TMA_LOAD{}, std::declval<GTensor>(), SmemLayoutQ{},
                                      Shape<Int<kBlockM>, Int<kHeadDim>>{}, _1{}));
  using TmaKV = decltype(make_tma_copy(SM90_TMA_LOAD{}, std::declval<GTensor>(), take<0, 2>(SmemLayoutKV{}),
                                       Shape<Int<kBlockN>, Int<kHeadDim>>{}, _1{}));

  static constexpr uint32_t kQBytes = kBlockM * kHeadDim * sizeof(Elem);
  static constexpr uint32_t kKVBytes = kBlockN * kHeadDim * sizeof(Elem);

  struct SharedStorage {
    alignas(1024) Elem q[cosize_v<SmemLayoutQ>];
    alignas(1024) Elem k[cosize_v<SmemLayoutKV>];
    alignas(1024) Elem v[cosize_v<SmemLayoutKV>];
    alignas(8) uint64_t bar_q;
    uint64_t full_k[kStages], full_v[kStages], empty_k[kStages], empty_v[kStages];
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));

  // Persistent kernel (bsa_fwd_sm90_persistent_kernel): two Q buffers, so the next work item's Q
  // loads while the current one's last tiles run, the per-stage descriptions the loader hands the
  // consumers (meta) and the scheduler's 2-slot queue of work items (item).
  using SmemLayoutQ2 = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>, _2>{}));  // (M, D, buf)
  struct PersistentStorage {
    alignas(1024) Elem q[cosize_v<SmemLayoutQ2>];
    alignas(1024) Elem k[cosize_v<SmemLayoutKV>];
    alignas(1024) Elem v[cosize_v<SmemLayoutKV>];
    alignas(16) int meta[kStages][8];
    alignas(16) int item[2][16];
    alignas(8) uint64_t full_q[2], empty_q[2];
    uint64_t full_k[kStages], full_v[kStages], empty_k[kStages], empty_v[kStages];
    uint64_t item_full[2], item_empty[2];
  };
  static constexpr int kPersistentSmemBytes = int(sizeof(PersistentStorage));
};

template <class Traits>
struct KernelParams {
  BsaParams p;
  typename Traits::TmaQ tma_q;
  typename Traits::TmaKV tma_k;
  typename Traits::TmaKV tma_v;
  int32_t q_rows_total, k_rows_total, q_batches;  // extents the tensor maps were built with
  float lazy_log2;  // online_softmax_tile's threshold (bsa_sm90_lazy_log2, PROXYATTN_BSA_SM90_LAZY)
};

// ---------------------------------------------------------------------------------------------
// Device helpers.
// ---------------------------------------------------------------------------------------------

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

// Converts an fp32 register fragment into a 16-bit one of the same size in place of its registers
// (packed pairs, cvt.rn.bf16x2/f16x2), without an element-wise copy: a 16-bit element copy makes
// the compiler unpack and repack every pair (PRMT/LOP3, ~130 extra instructions per tile).
template <typename To, class TS, class TD>
__device__ __forceinline__ void convert_into(TS const& src, TD& dst) {
  constexpr int kN = decltype(size(src))::value;
  static_assert(kN == decltype(size(dst))::value, "fragments of one size");
  cutlass::NumericArrayConverter<To, float, kN> conv;
  *reinterpret_cast<cutlass::Array<To, kN>*>(dst.data()) =
      conv(*reinterpret_cast<cutlass::Array<float, kN> const*>(src.data()));
}

template <typename To, class Engine, class Layout>
__device__ __forceinline__ auto convert_fragment(Tensor<Engine, Layout> const& t) {
  constexpr int kN = decltype(size(t))::value;
  Tensor r = make_tensor<To>(t.layout());
  cutlass::NumericArrayConverter<To, float, kN> conv;
  *reinterpret_cast<cutlass::Array<To, kN>*>(r.data()) =
      conv(*reinterpret_cast<cutlass::Array<float, kN> const*>(t.data()));
  return r;
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// One warpgroup-wide wgmma batch: acc (= or +=) A B over all k-blocks, then wait for completion.
template <bool kZeroInit, class TiledMma, class TA, class TB, class TC>
__device__ __forceinline__ void wg_gemm(TiledMma& mma, TA const& a, TB const& b, TC& c) {
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
  warpgroup_wait<0>();
  warpgroup_fence_operand(c);
  if constexpr (kRegA) warpgroup_fence_operand(const_cast<TA&>(a));
}

// Issues one wgmma batch (acc (= or +=) A B) and commits it, without waiting: the caller waits
// with warpgroup_wait<n>() and fences the accumulator (and a register A) afterwards.
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

// Mask (only tiles crossing the diagonal or the end of the keys: key0 + kBlockN - 1 > full_key)
// and online softmax of one score tile acc_s whose first key is key0: row_max / row_sum updated,
// acc_s replaced by exp2(s - row_max), corr(ri) the factor the previous O rows must be scaled by.
// Row r (sequence-local query row q_start + r) sees keys <= diag + r when causal, all keys below
// seqlen_k otherwise. tScS_rc: the (row, col) coordinates of acc_s's elements.
// row_max is the row's reference max. It moves to the running max only when that exceeds it by
// more than lazy_log2 (log2 units, after the softmax scale; 0 by default: the exact running max,
// PROXYATTN_BSA_SM90_LAZY in kernels/bsa_launch.h), so every exponential is at most 2^lazy_log2.
// corr is exactly 1 for a row that did not move. Returns whether a row of this thread moved; the
// caller rescales O only when a row of the warp did (a multiplication by 1 skipped, so at 0 the
// output is that of rescaling every tile).
template <int kBlockN, class TS, class TC, class TR>
__device__ __forceinline__ bool online_softmax_tile(TS& acc_s, TC const& tScS_rc, int key0, int full_key, int diag,
                                                    int seqlen_k, bool causal, float scale_log2, TR& row_max,
                                                    TR& row_sum, TR& corr, float lazy_log2) {
  Tensor sc = make_tensor(acc_s.data(), acc_rowcol(acc_s.layout()));  // (rows, cols)
  if (key0 + kBlockN - 1 > full_key) {
    CUTE_UNROLL
    for (int ri = 0; ri < size<0>(sc); ++ri) {
      const int r = get<0>(tScS_rc(ri, 0));
      const int limit = (causal ? min(seqlen_k - 1, diag + r) : seqlen_k - 1) - key0;
      CUTE_UNROLL
      for (int ci = 0; ci < size<1>(sc); ++ci) {
        if (get<1>(tScS_rc(0, ci)) > limit) sc(ri, ci) = -INFINITY;
      }
    }
  }
  bool moved = false;
  CUTE_UNROLL
  for (int ri = 0; ri < size<0>(sc); ++ri) {
    float mx = row_max(ri);
    CUTE_UNROLL
    for (int ci = 0; ci < size<1>(sc); ++ci) mx = fmaxf(mx, sc(ri, ci));
    mx = quad_max(mx);
    // First visible key (reference -inf, max finite): +inf > lazy_log2 moves it, corr exp2(-inf) = 0.
    // No visible key so far (both -inf): NaN > lazy_log2 is false; base 0 makes exp2(-inf - 0) = 0.
    const float ref = row_max(ri) * scale_log2, run = mx * scale_log2;
    const bool move = run - ref > lazy_log2;
    corr(ri) = move ? exp2f(ref - run) : 1.f;
    const float base = move ? run : (row_max(ri) == -INFINITY ? 0.f : ref);
    if (move) row_max(ri) = mx;
    moved |= move;
    float sum = 0.f;
    CUTE_UNROLL
    for (int ci = 0; ci < size<1>(sc); ++ci) {
      const float e = exp2f(sc(ri, ci) * scale_log2 - base);
      sc(ri, ci) = e;
      sum += e;
    }
    row_sum(ri) = row_sum(ri) * corr(ri) + sum;
  }
  return moved;
}

// Keeps a tile's softmax ahead of the wait for the P V wgmma meant to overlap it. Without it ptxas
// moved the persistent kernel's wait above all the exponentials (its conversion of P writes the
// registers the in-flight P V still reads, and it hoisted the wait to start those conversions
// early), so the softmax ran after the P V instead of beside it; in the kernel with one CTA per
// item it moved one exponential below the wait once the rescale became conditional. With a branch
// here on a value that needs every exponential of the tile (the row sums), ptxas keeps the wait
// after the softmax; the branch is never taken (a sum of exponentials is not negative, and NaN
// compares false).
// tests/test_sass.py checks the order in the compiled code of every Hopper kernel.
template <class TR>
__device__ __forceinline__ void softmax_fence(TR const& row_sum) {
  float t = 0.f;
  CUTE_UNROLL
  for (int ri = 0; ri < decltype(size(row_sum))::value; ++ri) t += row_sum(ri);
  if (t < 0.f) asm volatile("membar.cta;" ::: "memory");
}

// O rows *= corr, when a row of the warp moved its reference max (moved: this thread's rows;
// corr is 1 for the rows that did not). The condition is uniform over the warp.
template <class TO, class TR>
__device__ __forceinline__ void rescale_rows(TO& acc_o, TR const& corr, bool moved) {
  if (!__any_sync(0xffffffffu, moved)) return;
  Tensor o = make_tensor(acc_o.data(), acc_rowcol(acc_o.layout()));
  CUTE_UNROLL
  for (int ri = 0; ri < size<0>(o); ++ri) {
    CUTE_UNROLL
    for (int cj = 0; cj < size<1>(o); ++cj) o(ri, cj) *= corr(ri);
  }
}

// Epilogue: O / rowsum of the rows below q_rows stored straight from registers as 32-bit column
// pairs at o_ptr (row stride out_row_stride), lse per row at lse_ptr (-inf, and O 0, for a row
// whose sum is 0). mx / sm: the rows' running max and sum; tOcO_rc: acc_o's (row, col) coordinates.
template <typename Elem, class TO, class TC, class TR>
__device__ __forceinline__ void store_rows(TO const& acc_o, TC const& tOcO_rc, TR const& mx, TR const& sm, Elem* o_ptr,
                                           float* lse_ptr, int q_rows, int64_t out_row_stride, float softmax_scale,
                                           int lane) {
  Tensor o = make_tensor(acc_o.data(), acc_rowcol(acc_o.layout()));
  static_assert(decltype(size<1>(o))::value % 2 == 0, "column pairs");
  CUTE_UNROLL
  for (int ri = 0; ri < size<0>(o); ++ri) {
    const float sum = quad_sum(sm(ri));
    const bool empty = sum == 0.f;
    const float inv = empty ? 0.f : 1.f / sum;
    const int r = get<0>(tOcO_rc(ri, 0));
    if (r < q_rows) {
      if ((lane & 3) == 0) lse_ptr[r] = empty ? -INFINITY : mx(ri) * softmax_scale + logf(sum);
      Elem* row_ptr = o_ptr + int64_t(r) * out_row_stride;
      CUTE_UNROLL
      for (int cj = 0; cj < size<1>(o); cj += 2) {
        const int c = get<1>(tOcO_rc(ri, cj));  // even; cj + 1 holds column c + 1
        cutlass::Array<Elem, 2> pair;
        pair[0] = Elem(o(ri, cj) * inv);
        pair[1] = Elem(o(ri, cj + 1) * inv);
        *reinterpret_cast<cutlass::Array<Elem, 2>*>(row_ptr + c) = pair;
      }
    }
  }
}

// Walks the selected key blocks of one index row in descending order (one 128-key tile per block),
// skipping entries outside [0, nkb) and blocks that start past max_key. Producer and consumers each
// run one and see the same sequence. fetch() loads the entry the next advance() takes, so a loop
// can issue that global load early (the consumers do it while a wgmma is in flight) instead of
// waiting for it at the top of the next iteration; advance() loads whatever was not fetched.
struct BlockCursor {
  BsaIndexRow row;  // int16 or int32 entries (kernels/bsa_params.h)
  int ord;
  int blk;
  int next;      // entry ord - 1, valid when fetched
  bool fetched;
  int nkb;
  int max_key;

  __device__ __forceinline__ BlockCursor(const BsaIndexRow& row_, int count, int nkb_, int max_key_)
      : row(row_), ord(count), blk(-1), next(-1), fetched(false), nkb(nkb_), max_key(max_key_) {}

  __device__ __forceinline__ void fetch() {
    if (!fetched && ord > 0) next = row.load(ord - 1);
    fetched = true;
  }

  __device__ __forceinline__ bool advance(int block_n) {
    while (ord > 0) {
      blk = fetched ? next : row.load(ord - 1);
      fetched = false;
      --ord;
      if (blk >= 0 && blk < nkb && blk * block_n <= max_key) return true;
    }
    return false;
  }
};

// ---------------------------------------------------------------------------------------------
// The kernel.
// ---------------------------------------------------------------------------------------------
// kVariant 1, 2: issue S_j = Q K_j together with O += P_{j-1} V_{j-1} and run the softmax of S_j
// while the second wgmma is in flight (intra-warpgroup overlap); 2 adds the turns between the
// consumer warpgroups (pingpong); 0: strictly serial per tile.
template <class Traits, int kVariant>
__global__ void __launch_bounds__(Traits::kNThreads, 1)
    bsa_fwd_sm90_kernel(const __grid_constant__ KernelParams<Traits> kp) {
#if PROXYATTN_BSA_SM90_DEVICE
  using Elem = typename Traits::Elem;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kStages = Traits::kStages;
  using Barrier = cutlass::arch::ClusterTransactionBarrier;
  using EmptyBarrier = cutlass::arch::ClusterBarrier;
  const BsaParams& p = kp.p;

  extern __shared__ __align__(1024) char bsa_smem[];
  auto& ss = *reinterpret_cast<typename Traits::SharedStorage*>(bsa_smem);

  const int warpgroup = threadIdx.x / 128;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  // Work item (kernels/bsa_params.h: bsa_tile's order per kv_section, heaviest rows first, or the
  // sorted order of tile_order); its load is issued before the barrier setup so that hides it.
  const int work = bsa_cta_work(p);

  if (threadIdx.x == 0) {
    Barrier::init(&ss.bar_q, 1);
    CUTE_UNROLL
    for (int s = 0; s < kStages; ++s) {
      Barrier::init(&ss.full_k[s], 1);
      Barrier::init(&ss.full_v[s], 1);
      EmptyBarrier::init(&ss.empty_k[s], Traits::kConsumerWarps);
      EmptyBarrier::init(&ss.empty_v[s], Traits::kConsumerWarps);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  const BsaTile tile = bsa_tile(work, p);
  const int b = tile.b, h = tile.h, m = tile.m;

  const bool varlen = p.cu_seqlens_q != nullptr;
  const SeqBounds sb = load_seq_bounds(p.cu_seqlens_q, p.cu_seqlens_k, b, p.seqlen_q, p.seqlen_k, p.total_q, p.total_k);
  const int64_t q_row0 = sb.q_start, k_row0 = sb.k_start;
  const int seqlen_q = sb.nq, seqlen_k = sb.nk;
  const int q_start = m * kBlockM;
  if (q_start >= seqlen_q) return;  // uniform over the CTA; no barrier follows for anyone
  const int q_rows = min(kBlockM, seqlen_q - q_start);
  const int diag = seqlen_k - seqlen_q + q_start;
  int max_key = seqlen_k - 1;
  if (p.causal) max_key = min(max_key, diag + q_rows - 1);
  const int full_key = p.causal ? min(seqlen_k - 1, diag) : seqlen_k - 1;
  const int kvh = h / (p.q_heads / p.kv_heads);
  const int nkb = (seqlen_k + kBlockN - 1) / kBlockN;
  const int count = bsa_row_count(p, b, h, m, max_key);
  const BsaIndexRow idx_row = bsa_index_row(p, b, h, m);

  Tensor sQ = make_tensor(make_smem_ptr(ss.q), typename Traits::SmemLayoutQ{});     // (M, D)
  Tensor sK = make_tensor(make_smem_ptr(ss.k), typename Traits::SmemLayoutKV{});    // (N, D, stage)
  Tensor sV = make_tensor(make_smem_ptr(ss.v), typename Traits::SmemLayoutKV{});    // (N, D, stage)
  Tensor sVt = make_tensor(make_smem_ptr(ss.v), typename Traits::SmemLayoutVt{});   // (D, N, stage)

  if (warpgroup == 0) {
    // ------------------------------- producer -------------------------------
    cutlass::arch::warpgroup_reg_dealloc<24>();
    if (warp == 0 && lane == 0) {
      BlockCursor cursor(idx_row, count, nkb, max_key);
      if (cursor.advance(kBlockN)) {
        const int qb = varlen ? 0 : b;
        const int32_t q_off = int32_t(q_row0), k_off = int32_t(k_row0);
        // Coordinate tensors of the tensor maps: (rows, D, heads, batch).
        Tensor mQ = kp.tma_q.get_tma_tensor(make_shape(kp.q_rows_total, Int<kHeadDim>{}, p.q_heads, kp.q_batches));
        Tensor mK = kp.tma_k.get_tma_tensor(make_shape(kp.k_rows_total, Int<kHeadDim>{}, p.kv_heads, kp.q_batches));
        Tensor mV = kp.tma_v.get_tma_tensor(make_shape(kp.k_rows_total, Int<kHeadDim>{}, p.kv_heads, kp.q_batches));
        Tensor gQ = local_tile(domain_offset(make_coord(q_off, _0{}), mQ(_, _, h, qb)),
                               Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(m, _0{}));       // (M, D)
        Tensor gK = local_tile(domain_offset(make_coord(k_off, _0{}), mK(_, _, kvh, qb)),
                               Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, _0{}));       // (N, D, blocks)
        Tensor gV = local_tile(domain_offset(make_coord(k_off, _0{}), mV(_, _, kvh, qb)),
                               Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, _0{}));       // (N, D, blocks)
        auto [tQg, tQs] = tma_partition(kp.tma_q, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sQ), group_modes<0, 2>(gQ));
        auto [tKg, tKs] = tma_partition(kp.tma_k, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
        auto [tVg, tVs] = tma_partition(kp.tma_v, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sV), group_modes<0, 2>(gV));

        Barrier::arrive_and_expect_tx(&ss.bar_q, Traits::kQBytes);
        copy(kp.tma_q.with(ss.bar_q), tQg, tQs);
        int i = 0;
        do {
          const int s = i % kStages;
          const uint32_t phase = (i / kStages) & 1;
          EmptyBarrier::wait(&ss.empty_k[s], phase ^ 1);  // a fresh barrier passes parity 1 at once
          Barrier::arrive_and_expect_tx(&ss.full_k[s], Traits::kKVBytes);
          copy(kp.tma_k.with(ss.full_k[s]), tKg(_, cursor.blk), tKs(_, s));
          cursor.fetch();  // the next entry's load overlaps the wait below
          EmptyBarrier::wait(&ss.empty_v[s], phase ^ 1);
          Barrier::arrive_and_expect_tx(&ss.full_v[s], Traits::kKVBytes);
          copy(kp.tma_v.with(ss.full_v[s]), tVg(_, cursor.blk), tVs(_, s));
          ++i;
        } while (cursor.advance(kBlockN));
      }
    }
  } else {
    // ------------------------------- consumers ------------------------------
    cutlass::arch::warpgroup_reg_alloc<240>();
    const int ctid = threadIdx.x - 128;  // 0 .. 255; warpgroup ctid / 128 owns rows 64 (ctid / 128) + [0, 64)
    BlockCursor cursor(idx_row, count, nkb, max_key);

    typename Traits::TiledMmaS mma_s;
    typename Traits::TiledMmaO mma_o;
    auto thr_s = mma_s.get_thread_slice(ctid);
    auto thr_o = mma_o.get_thread_slice(ctid);
    Tensor tSrQ = thr_s.partition_fragment_A(sQ);   // (MMA, MMA_M, MMA_D) descriptors
    Tensor tSrK = thr_s.partition_fragment_B(sK);   // (MMA, MMA_N, MMA_D, stage) descriptors
    Tensor tOrV = thr_o.partition_fragment_B(sVt);  // (MMA, MMA_D, MMA_N, stage) descriptors
    Tensor acc_o = partition_fragment_C(thr_o, Shape<Int<kBlockM>, Int<kHeadDim>>{});  // ((2,2,D/8), 1, 1)

    Tensor cS = make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{});
    Tensor tScS = thr_s.partition_C(cS);
    Tensor tScS_rc = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));

    constexpr int kRows = decltype(size<0>(acc_rowcol(acc_o.layout())))::value;
    Tensor row_max = make_tensor<float>(Shape<Int<kRows>>{});
    Tensor row_sum = make_tensor<float>(Shape<Int<kRows>>{});
    fill(row_max, -INFINITY);
    fill(row_sum, 0.f);
    clear(acc_o);
    const float scale_log2 = p.softmax_scale_log2;

    // Mask (only tiles crossing the diagonal or the end of the keys) and online softmax of one
    // score tile: row_max/row_sum updated, acc_s replaced by exp2(s - max), corr(ri) the factor
    // the previous O rows must be scaled by.
    Tensor corr = make_tensor<float>(Shape<Int<kRows>>{});
    auto softmax_tile = [&](auto& acc_s, int key0) {
      return online_softmax_tile<kBlockN>(acc_s, tScS_rc, key0, full_key, diag, seqlen_k, p.causal, scale_log2,
                                          row_max, row_sum, corr, kp.lazy_log2);
    };
    auto rescale_o = [&](bool moved) { rescale_rows(acc_o, corr, moved); };
    auto release = [&](uint64_t* bar) {
      __syncwarp();
      if (lane == 0) EmptyBarrier::arrive(bar);
    };

    bool have = cursor.advance(kBlockN);
    if (have) Barrier::wait(&ss.bar_q, 0);
    if constexpr (kVariant == 0) {
      // Serial: S = Q K^T, softmax, O += P V, one tile after the other.
      int i = 0;
      while (have) {
        const int s = i % kStages;
        const uint32_t phase = (i / kStages) & 1;
        Tensor acc_s = partition_fragment_C(thr_s, Shape<Int<kBlockM>, Int<kBlockN>>{});  // ((2,2,N/8), 1, 1)
        Barrier::wait(&ss.full_k[s], phase);
        wg_gemm<true>(mma_s, tSrQ, tSrK(_, _, _, s), acc_s);
        release(&ss.empty_k[s]);
        const bool moved = softmax_tile(acc_s, cursor.blk * kBlockN);
        rescale_o(moved);
        Tensor p_elem = convert_fragment<Elem>(acc_s);
        Tensor tOrP = make_tensor(p_elem.data(), acc_to_a_operand(p_elem.layout()));  // ((2,2,2), 1, N/16)
        Barrier::wait(&ss.full_v[s], phase);
        wg_gemm<false>(mma_o, tOrP, tOrV(_, _, _, s), acc_o);
        release(&ss.empty_v[s]);
        have = cursor.advance(kBlockN);
        ++i;
      }
    } else {
      // Overlapped (one warpgroup): S_j = Q K_j and O += P_{j-1} V_{j-1} are issued together; the
      // softmax of S_j runs while the P V wgmma is in flight; O is rescaled by corr_j only after
      // that wgmma has completed (O then holds tiles < j relative to max_{j-1}).
      // Pingpong (kVariant 2): every issue (S alone, S with the previous P V, the last P V) is one
      // turn; a warpgroup waits on its own named barrier before it issues and then arrives on the
      // other's. Both warpgroups walk the same key blocks, so they take the same number of turns;
      // warpgroup 1 hands the first turn to warpgroup 0 up front and warpgroup 0 takes that last
      // arrival back after its loop, so both barriers end balanced (also when there is no key).
      constexpr bool kPingpong = kVariant == 2;
      const int cwg = ctid / 128;
      // Named barrier ids 1 and 2 of cutlass::arch::NamedBarrier, which adds its reserved count
      // (hardware barriers 9 and 10; 0 is __syncthreads).
      constexpr uint32_t kTurnBar = 1;
      auto turn_wait = [&]() {
        if constexpr (kPingpong) cutlass::arch::NamedBarrier::sync(256, kTurnBar + cwg);
      };
      auto turn_pass = [&]() {
        if constexpr (kPingpong) cutlass::arch::NamedBarrier::arrive(256, kTurnBar + (1 - cwg));
      };
      if constexpr (kPingpong) {
        if (cwg == 1) cutlass::arch::NamedBarrier::arrive(256, kTurnBar);
      }
      if (have) {
        Tensor rP = make_tensor<Elem>(partition_fragment_C(thr_s, Shape<Int<kBlockM>, Int<kBlockN>>{}).layout());
        Tensor tOrP = make_tensor(rP.data(), acc_to_a_operand(rP.layout()));  // ((2,2,2), 1, N/16)
        {
          Tensor acc_s = partition_fragment_C(thr_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
          Barrier::wait(&ss.full_k[0], 0);
          turn_wait();
          wg_issue<true>(mma_s, tSrQ, tSrK(_, _, _, 0), acc_s);
          turn_pass();
          warpgroup_wait<0>();
          warpgroup_fence_operand(acc_s);
          release(&ss.empty_k[0]);
          softmax_tile(acc_s, cursor.blk * kBlockN);  // O is 0: no rescale needed
          convert_into<Elem>(acc_s, rP);
        }
        int i = 1;  // tile i is the next S; tile i - 1 is the pending P V
        while (cursor.advance(kBlockN)) {
          const int s = i % kStages, sp = (i - 1) % kStages;
          const uint32_t phase = (i / kStages) & 1, phase_p = ((i - 1) / kStages) & 1;
          Tensor acc_s = partition_fragment_C(thr_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
          Barrier::wait(&ss.full_k[s], phase);
          if constexpr (kPingpong) Barrier::wait(&ss.full_v[sp], phase_p);  // no wait inside a turn
          turn_wait();
          wg_issue<true>(mma_s, tSrQ, tSrK(_, _, _, s), acc_s);
          if constexpr (!kPingpong) Barrier::wait(&ss.full_v[sp], phase_p);
          wg_issue<false>(mma_o, tOrP, tOrV(_, _, _, sp), acc_o);
          turn_pass();
          warpgroup_wait<1>();  // S_i done (groups complete in order)
          warpgroup_fence_operand(acc_s);
          release(&ss.empty_k[s]);
          const bool moved = softmax_tile(acc_s, cursor.blk * kBlockN);
          softmax_fence(row_sum);
          cursor.fetch();       // the next entry's load overlaps the P V wgmma
          warpgroup_wait<0>();  // P_{i-1} V_{i-1} done
          warpgroup_fence_operand(acc_o);
          warpgroup_fence_operand(tOrP);
          release(&ss.empty_v[sp]);
          rescale_o(moved);
          convert_into<Elem>(acc_s, rP);
          ++i;
        }
        const int sp = (i - 1) % kStages;
        Barrier::wait(&ss.full_v[sp], ((i - 1) / kStages) & 1);
        turn_wait();
        wg_issue<false>(mma_o, tOrP, tOrV(_, _, _, sp), acc_o);
        turn_pass();
        warpgroup_wait<0>();
        warpgroup_fence_operand(acc_o);
        warpgroup_fence_operand(tOrP);
        release(&ss.empty_v[sp]);
      }
      if constexpr (kPingpong) {
        if (cwg == 0) cutlass::arch::NamedBarrier::sync(256, kTurnBar);
      }
    }

    // Epilogue: normalise, lse, 32-bit stores of column pairs straight to global memory.
    Elem* o_ptr = static_cast<Elem*>(p.out) + (varlen ? q_row0 * p.out_row_stride : b * p.out_batch_stride) +
                  int64_t(q_start) * p.out_row_stride + int64_t(h) * p.out_head_stride;
    float* lse_ptr = p.lse + (varlen ? q_row0 : b * p.lse_batch_stride) + int64_t(h) * p.lse_head_stride + q_start;
    Tensor cO = make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{});
    Tensor tOcO = thr_o.partition_C(cO);
    Tensor tOcO_rc = make_tensor(tOcO.data(), acc_rowcol(tOcO.layout()));
    store_rows(acc_o, tOcO_rc, row_max, row_sum, o_ptr, lse_ptr, q_rows, p.out_row_stride, p.softmax_scale, lane);
  }
#endif  // PROXYATTN_BSA_SM90_DEVICE
}

// ---------------------------------------------------------------------------------------------
// The persistent kernel (kVariant 3 in run_bsa_fwd_sm90; the default, PROXYATTN_BSA_SM90_PERSISTENT=0
// turns it off).
// ---------------------------------------------------------------------------------------------
// gridDim.x = min(work items, SMs). CTA c runs position c of the work order, then positions
// gridDim.x + atomicAdd(p.tile_counter, 1), so heavy rows go first and the query heads of a KV head
// stay side by side (bsa_tile's order, or tile_order), each item to whichever CTA gets there first.
// The key blocks of all of a CTA's items form one stream through the K/V ring, and the consumers
// treat it as one loop: the first Q K^T of an item is issued together with the last P V of the
// item before it, and that item's epilogue runs while nothing waits on it.
//   warp 0 lane 0 (loader): per item from the scheduler, Q into one of two buffers (full_q/empty_q),
//     then its selected key blocks' K and V into the ring. Before a stage's full barrier it writes
//     the stage's description (meta[stage]: block, flags, b, h, m, q_row0, seqlen_q, seqlen_k): the
//     block, whether it is an item's first (kMetaFirst), and the item; the end is a kMetaStop stage.
//   warp 1 (scheduler): takes the positions, reads the order, the varlen offsets, the count and the
//     first visible index entry, and posts the item into a 2-slot queue (item_full / item_empty),
//     so the loader starts an item without a dependent global load. Items whose query block lies
//     past their sequence's end are skipped; items with rows but no visible selected block never
//     reach the consumers: the scheduler warp stores their zeros and lse -inf itself.
//   consumers: as kVariant 1, with the tile loop running on across items; per-item state (output
//     offsets, mask bounds, Q buffer) comes from the description of the item's first stage.
// The loader, the scheduler and the consumers count stages (`it`), Q buffers (`nq`) and queue
// slots the same way, so barrier parities agree without any other exchange.
enum : int { kMetaFirst = 1, kMetaStop = 2 };
enum : int { kItemBlocks = 0, kItemStop = 1 };

// Compiler fence between C++ shared-memory accesses and the barrier asm (which has no memory clobber).
__device__ __forceinline__ void compiler_fence() { asm volatile("" ::: "memory"); }

// One work item as the consumers need it (from the description of its first stage).
struct ConsumerItem {
  int64_t o_off;    // element offset of the item's first output row (head h)
  int64_t lse_off;  // offset of its first lse entry
  int q_rows;       // rows of the query block inside the sequence
  int diag;         // seqlen_k - seqlen_q + q_start
  int full_key;     // keys <= full_key are visible to every row
  int seqlen_k;
  int qbuf;         // Q buffer
};

template <class Traits>
__global__ void __launch_bounds__(Traits::kNThreads, 1)
    bsa_fwd_sm90_persistent_kernel(const __grid_constant__ KernelParams<Traits> kp) {
#if PROXYATTN_BSA_SM90_DEVICE
  using Elem = typename Traits::Elem;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kStages = Traits::kStages;
  using Barrier = cutlass::arch::ClusterTransactionBarrier;
  using EmptyBarrier = cutlass::arch::ClusterBarrier;
  const BsaParams& p = kp.p;
  const int num_items = p.batch * p.q_heads * p.num_q_blocks;  // < 2^31 (the launcher checks)

  extern __shared__ __align__(1024) char bsa_smem[];
  auto& ss = *reinterpret_cast<typename Traits::PersistentStorage*>(bsa_smem);

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
    for (int s = 0; s < kStages; ++s) {
      Barrier::init(&ss.full_k[s], 1);
      Barrier::init(&ss.full_v[s], 1);
      EmptyBarrier::init(&ss.empty_k[s], Traits::kConsumerWarps);
      EmptyBarrier::init(&ss.empty_v[s], Traits::kConsumerWarps);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();  // the only CTA-wide barrier: idle producer threads leave below

  const bool varlen = p.cu_seqlens_q != nullptr;
  Tensor sQ = make_tensor(make_smem_ptr(ss.q), typename Traits::SmemLayoutQ2{});    // (M, D, buf)
  Tensor sK = make_tensor(make_smem_ptr(ss.k), typename Traits::SmemLayoutKV{});    // (N, D, stage)
  Tensor sV = make_tensor(make_smem_ptr(ss.v), typename Traits::SmemLayoutKV{});    // (N, D, stage)
  Tensor sVt = make_tensor(make_smem_ptr(ss.v), typename Traits::SmemLayoutVt{});   // (D, N, stage)

  if (warpgroup == 0) {
    cutlass::arch::warpgroup_reg_dealloc<40>();
    if (warp == 1) {
      // ------------------------------- scheduler ------------------------------
      // The whole warp runs the loop (every lane computes the same item); lane 0 takes positions and
      // posts, and all lanes store the output of items without a visible block.
      // Slot fields: 0 kind, 1 b, 2 h, 3 m, 4 q_row0, 5 k_row0, 6 seqlen_q, 7 seqlen_k, 8 max_key,
      // 9 nkb, 10 first visible block, 11 entries left before it (BlockCursor::ord).
      uint32_t n = 0;  // slots posted
      int pos = int(blockIdx.x);
      while (true) {
        int f[12] = {kItemStop, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
        int next = num_items;
        if (pos < num_items) {
          // Take the next position now; its latency overlaps the work below.
          // Unsigned: both terms are below 2^31 (the counter, zero at launch, is drawn at most
          // num_items + 2 x gridDim.x times), so the sum cannot wrap.
          int got = 0;
          if (lane == 0) got = atomicAdd(p.tile_counter, 1);
          const uint32_t nx = gridDim.x + uint32_t(__shfl_sync(0xffffffffu, got, 0));
          next = nx < uint32_t(num_items) ? int(nx) : num_items;
          const BsaTile tile = bsa_tile(bsa_order_work(p, pos), p);
          const SeqBounds sb = load_seq_bounds(p.cu_seqlens_q, p.cu_seqlens_k, tile.b, p.seqlen_q, p.seqlen_k,
                                               p.total_q, p.total_k);
          const int64_t q_row0 = sb.q_start, k_row0 = sb.k_start;
          const int seqlen_q = sb.nq, seqlen_k = sb.nk;
          const int q_start = tile.m * kBlockM;
          const int q_rows = min(kBlockM, seqlen_q - q_start);
          int count = 0, max_key = -1;
          const int nkb = (seqlen_k + kBlockN - 1) / kBlockN;
          if (q_rows > 0) {
            max_key = seqlen_k - 1;
            if (p.causal) max_key = min(max_key, seqlen_k - seqlen_q + q_start + q_rows - 1);
            count = bsa_row_count(p, tile.b, tile.h, tile.m, max_key);
          }
          BlockCursor cursor(bsa_index_row(p, tile.b, tile.h, tile.m), count, nkb, max_key);
          const bool any = cursor.advance(kBlockN);
          pos = next < num_items ? next : num_items;
          if (q_rows <= 0) continue;  // past the sequence's end: no rows
          if (!any) {
            // No visible key: out 0 and lse -inf for the item's rows (16-byte stores over the rows).
            Elem* o_ptr = static_cast<Elem*>(p.out) +
                          (varlen ? q_row0 * p.out_row_stride : int64_t(tile.b) * p.out_batch_stride) +
                          int64_t(q_start) * p.out_row_stride + int64_t(tile.h) * p.out_head_stride;
            float* lse_ptr = p.lse + (varlen ? q_row0 : int64_t(tile.b) * p.lse_batch_stride) +
                             int64_t(tile.h) * p.lse_head_stride + q_start;
            constexpr int kChunks = kHeadDim * int(sizeof(Elem)) / 16;  // 16-byte pieces per row
            for (int e = lane; e < q_rows * kChunks; e += 32) {
              const int r = e / kChunks, c = e % kChunks;
              reinterpret_cast<uint4*>(o_ptr + int64_t(r) * p.out_row_stride)[c] = make_uint4(0, 0, 0, 0);
            }
            for (int r = lane; r < q_rows; r += 32) lse_ptr[r] = -INFINITY;
            continue;
          }
          f[0] = kItemBlocks;
          f[1] = tile.b;
          f[2] = tile.h;
          f[3] = tile.m;
          f[4] = int(q_row0);  // row counts are below 2^31 on this path (bsa_sm90_unsupported_reason)
          f[5] = int(k_row0);
          f[6] = seqlen_q;
          f[7] = seqlen_k;
          f[8] = max_key;
          f[9] = nkb;
          f[10] = cursor.blk;
          f[11] = cursor.ord;
        }
        const int slot = n & 1;
        EmptyBarrier::wait(&ss.item_empty[slot], ((n >> 1) & 1) ^ 1);  // fresh: parity 1 passes
        if (lane == 0) {
          compiler_fence();
          CUTE_UNROLL
          for (int i = 0; i < 12; ++i) ss.item[slot][i] = f[i];
          compiler_fence();
          EmptyBarrier::arrive(&ss.item_full[slot]);
        }
        __syncwarp();
        ++n;
        if (f[0] == kItemStop) break;
      }
    } else if (warp == 0 && lane == 0) {
      // -------------------------------- loader --------------------------------
      Tensor mQ = kp.tma_q.get_tma_tensor(make_shape(kp.q_rows_total, Int<kHeadDim>{}, p.q_heads, kp.q_batches));
      Tensor mK = kp.tma_k.get_tma_tensor(make_shape(kp.k_rows_total, Int<kHeadDim>{}, p.kv_heads, kp.q_batches));
      Tensor mV = kp.tma_v.get_tma_tensor(make_shape(kp.k_rows_total, Int<kHeadDim>{}, p.kv_heads, kp.q_batches));
      const int group = p.q_heads / p.kv_heads;
      uint32_t n = 0;   // slots taken
      int it = 0;       // stages filled
      uint32_t nq = 0;  // Q buffers filled
      // Waits for stage s to be free of its K reads and writes its description.
      auto stage_meta = [&](int s, uint32_t phase, const int (&md)[8]) {
        EmptyBarrier::wait(&ss.empty_k[s], phase ^ 1);
        compiler_fence();
        CUTE_UNROLL
        for (int i = 0; i < 8; ++i) ss.meta[s][i] = md[i];
        compiler_fence();
      };
      while (true) {
        const int slot = n & 1;
        EmptyBarrier::wait(&ss.item_full[slot], (n >> 1) & 1);
        compiler_fence();
        int f[12];
        CUTE_UNROLL
        for (int i = 0; i < 12; ++i) f[i] = ss.item[slot][i];
        compiler_fence();
        EmptyBarrier::arrive(&ss.item_empty[slot]);
        ++n;
        const int s0 = it % kStages;
        const uint32_t phase0 = (it / kStages) & 1;
        if (f[0] == kItemStop) {
          const int md[8] = {0, kMetaStop, 0, 0, 0, 0, 0, 0};
          stage_meta(s0, phase0, md);
          Barrier::arrive(&ss.full_k[s0]);
          break;
        }
        // Stage description: 0 block, 1 flags, 2 b, 3 h, 4 m, 5 q_row0, 6 seqlen_q, 7 seqlen_k.
        int md[8] = {f[10], kMetaFirst, f[1], f[2], f[3], f[4], f[6], f[7]};
        const int b = f[1], h = f[2], m = f[3], kvh = h / group;
        const int qb = varlen ? 0 : b;
        BlockCursor cursor(bsa_index_row(p, b, h, m), 0, f[9], f[8]);
        cursor.ord = f[11];
        cursor.blk = f[10];
        Tensor gQ = local_tile(domain_offset(make_coord(f[4], _0{}), mQ(_, _, h, qb)),
                               Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(m, _0{}));   // (M, D)
        Tensor gK = local_tile(domain_offset(make_coord(f[5], _0{}), mK(_, _, kvh, qb)),
                               Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, _0{}));   // (N, D, blocks)
        Tensor gV = local_tile(domain_offset(make_coord(f[5], _0{}), mV(_, _, kvh, qb)),
                               Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, _0{}));   // (N, D, blocks)
        auto [tQg, tQs] = tma_partition(kp.tma_q, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sQ), group_modes<0, 2>(gQ));
        auto [tKg, tKs] = tma_partition(kp.tma_k, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
        auto [tVg, tVs] = tma_partition(kp.tma_v, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sV), group_modes<0, 2>(gV));
        const int qbuf = nq & 1;
        EmptyBarrier::wait(&ss.empty_q[qbuf], ((nq >> 1) & 1) ^ 1);
        Barrier::arrive_and_expect_tx(&ss.full_q[qbuf], Traits::kQBytes);
        copy(kp.tma_q.with(ss.full_q[qbuf]), tQg, tQs(_, qbuf));
        ++nq;
        do {
          const int s = it % kStages;
          const uint32_t phase = (it / kStages) & 1;
          md[0] = cursor.blk;
          stage_meta(s, phase, md);
          md[1] = 0;
          Barrier::arrive_and_expect_tx(&ss.full_k[s], Traits::kKVBytes);
          copy(kp.tma_k.with(ss.full_k[s]), tKg(_, cursor.blk), tKs(_, s));
          cursor.fetch();  // the next entry's load overlaps the wait below
          EmptyBarrier::wait(&ss.empty_v[s], phase ^ 1);
          Barrier::arrive_and_expect_tx(&ss.full_v[s], Traits::kKVBytes);
          copy(kp.tma_v.with(ss.full_v[s]), tVg(_, cursor.blk), tVs(_, s));
          ++it;
        } while (cursor.advance(kBlockN));
      }
    }
  } else {
    // ------------------------------- consumers ------------------------------
    cutlass::arch::warpgroup_reg_alloc<232>();
    const int ctid = threadIdx.x - 128;  // 0 .. 255; warpgroup ctid / 128 owns rows 64 (ctid / 128) + [0, 64)

    typename Traits::TiledMmaS mma_s;
    typename Traits::TiledMmaO mma_o;
    auto thr_s = mma_s.get_thread_slice(ctid);
    auto thr_o = mma_o.get_thread_slice(ctid);
    Tensor tSrQ = thr_s.partition_fragment_A(sQ);   // (MMA, MMA_M, MMA_D, buf) descriptors
    Tensor tSrK = thr_s.partition_fragment_B(sK);   // (MMA, MMA_N, MMA_D, stage) descriptors
    Tensor tOrV = thr_o.partition_fragment_B(sVt);  // (MMA, MMA_D, MMA_N, stage) descriptors
    Tensor acc_o = partition_fragment_C(thr_o, Shape<Int<kBlockM>, Int<kHeadDim>>{});  // ((2,2,D/8), 1, 1)

    Tensor cS = make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{});
    Tensor tScS = thr_s.partition_C(cS);
    Tensor tScS_rc = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));
    Tensor cO = make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{});
    Tensor tOcO = thr_o.partition_C(cO);
    Tensor tOcO_rc = make_tensor(tOcO.data(), acc_rowcol(tOcO.layout()));

    constexpr int kRows = decltype(size<0>(acc_rowcol(acc_o.layout())))::value;
    Tensor row_max = make_tensor<float>(Shape<Int<kRows>>{});
    Tensor row_sum = make_tensor<float>(Shape<Int<kRows>>{});
    Tensor old_max = make_tensor<float>(Shape<Int<kRows>>{});
    Tensor old_sum = make_tensor<float>(Shape<Int<kRows>>{});
    Tensor corr = make_tensor<float>(Shape<Int<kRows>>{});
    const float scale_log2 = p.softmax_scale_log2;

    // The item described by a first stage's description md.
    auto make_item = [&](const int* md, int qbuf) {
      const int b = md[2], h = md[3], m = md[4], q_row0 = md[5], seqlen_q = md[6], seqlen_k = md[7];
      const int q_start = m * kBlockM;
      ConsumerItem w;
      w.o_off = (varlen ? int64_t(q_row0) * p.out_row_stride : int64_t(b) * p.out_batch_stride) +
                int64_t(q_start) * p.out_row_stride + int64_t(h) * p.out_head_stride;
      w.lse_off = (varlen ? int64_t(q_row0) : int64_t(b) * p.lse_batch_stride) + int64_t(h) * p.lse_head_stride +
                  q_start;
      w.q_rows = min(kBlockM, seqlen_q - q_start);
      w.diag = seqlen_k - seqlen_q + q_start;
      w.full_key = p.causal ? min(seqlen_k - 1, w.diag) : seqlen_k - 1;
      w.seqlen_k = seqlen_k;
      w.qbuf = qbuf;
      return w;
    };
    auto softmax_tile = [&](auto& acc_s, int key0, const ConsumerItem& w) {
      return online_softmax_tile<kBlockN>(acc_s, tScS_rc, key0, w.full_key, w.diag, w.seqlen_k, p.causal,
                                          scale_log2, row_max, row_sum, corr, kp.lazy_log2);
    };
    auto rescale_o = [&](bool moved) { rescale_rows(acc_o, corr, moved); };
    // Normalise and store item w's rows (acc_o, with the statistics mx / sm), lse per row.
    auto epilogue = [&](const ConsumerItem& w, auto const& mx, auto const& sm) {
      store_rows(acc_o, tOcO_rc, mx, sm, static_cast<Elem*>(p.out) + w.o_off, p.lse + w.lse_off, w.q_rows,
                 p.out_row_stride, p.softmax_scale, lane);
    };
    auto release = [&](uint64_t* bar) {
      __syncwarp();
      if (lane == 0) EmptyBarrier::arrive(bar);
    };

    Tensor rP = make_tensor<Elem>(partition_fragment_C(thr_s, Shape<Int<kBlockM>, Int<kBlockN>>{}).layout());
    Tensor tOrP = make_tensor(rP.data(), acc_to_a_operand(rP.layout()));  // ((2,2,2), 1, N/16)
    int it = 0;       // stages consumed
    uint32_t nq = 0;  // Q buffers consumed
    // Waits for stage `it` and reads its block and flags (md[0], md[1]); a first stage's item fields
    // are read by stage_item. Lane 0 of each warp reads and hands the values to the other lanes,
    // so every read of a stage's description is ordered before the same thread's release of the
    // stage (release() arrives from lane 0), after which the loader may rewrite it.
    auto take_stage = [&](int s, uint32_t phase, int& blk, int& flags) {
      Barrier::wait(&ss.full_k[s], phase);
      compiler_fence();
      int b = 0, f = 0;
      if (lane == 0) {
        b = ss.meta[s][0];
        f = ss.meta[s][1];
      }
      compiler_fence();
      blk = __shfl_sync(0xffffffffu, b, 0);
      flags = __shfl_sync(0xffffffffu, f, 0);
    };
    auto stage_item = [&](int s) {
      int md[8];
      compiler_fence();
      CUTE_UNROLL
      for (int i = 0; i < 8; ++i) md[i] = lane == 0 ? ss.meta[s][i] : 0;
      compiler_fence();
      CUTE_UNROLL
      for (int i = 0; i < 8; ++i) md[i] = __shfl_sync(0xffffffffu, md[i], 0);
      const ConsumerItem w = make_item(md, int(nq & 1));
      Barrier::wait(&ss.full_q[w.qbuf], (nq >> 1) & 1);
      ++nq;
      return w;
    };

    // The first stage: the CTA's first item, or the stop mark when it has none.
    int blk, flags;
    take_stage(0, 0, blk, flags);
    if (flags & kMetaStop) return;
    ConsumerItem cur = stage_item(0);
    fill(row_max, -INFINITY);
    fill(row_sum, 0.f);
    clear(acc_o);
    {
      Tensor acc_s = partition_fragment_C(thr_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
      wg_issue<true>(mma_s, tSrQ(_, _, _, cur.qbuf), tSrK(_, _, _, 0), acc_s);
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc_s);
      release(&ss.empty_k[0]);
      softmax_tile(acc_s, blk * kBlockN, cur);  // O is 0: no rescale needed
      convert_into<Elem>(acc_s, rP);
    }
    it = 1;
    // Stage it - 1's P V is pending at the top of every iteration; stage `it` is the next S.
    while (true) {
      const int s = it % kStages, sp = (it - 1) % kStages;
      const uint32_t phase = (it / kStages) & 1, phase_p = ((it - 1) / kStages) & 1;
      take_stage(s, phase, blk, flags);
      if (flags & kMetaStop) break;
      Tensor acc_s = partition_fragment_C(thr_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
      if (flags == 0) {
        // Another block of the current item: the loop of kVariant 1.
        wg_issue<true>(mma_s, tSrQ(_, _, _, cur.qbuf), tSrK(_, _, _, s), acc_s);
        Barrier::wait(&ss.full_v[sp], phase_p);
        wg_issue<false>(mma_o, tOrP, tOrV(_, _, _, sp), acc_o);
        warpgroup_wait<1>();  // S done (groups complete in order)
        warpgroup_fence_operand(acc_s);
        release(&ss.empty_k[s]);
        const bool moved = softmax_tile(acc_s, blk * kBlockN, cur);
        softmax_fence(row_sum);
        warpgroup_wait<0>();  // the previous P V done
        warpgroup_fence_operand(acc_o);
        warpgroup_fence_operand(tOrP);
        release(&ss.empty_v[sp]);
        rescale_o(moved);
        convert_into<Elem>(acc_s, rP);
      } else {
        // The first block of the next item, issued with the current item's last P V; the current
        // item is stored once that P V is done.
        const ConsumerItem nxt = stage_item(s);
        wg_issue<true>(mma_s, tSrQ(_, _, _, nxt.qbuf), tSrK(_, _, _, s), acc_s);
        Barrier::wait(&ss.full_v[sp], phase_p);
        wg_issue<false>(mma_o, tOrP, tOrV(_, _, _, sp), acc_o);
        warpgroup_wait<1>();
        warpgroup_fence_operand(acc_s);
        release(&ss.empty_k[s]);
        CUTE_UNROLL
        for (int ri = 0; ri < kRows; ++ri) {
          old_max(ri) = row_max(ri);
          old_sum(ri) = row_sum(ri);
        }
        fill(row_max, -INFINITY);
        fill(row_sum, 0.f);
        softmax_tile(acc_s, blk * kBlockN, nxt);
        softmax_fence(row_sum);
        warpgroup_wait<0>();
        warpgroup_fence_operand(acc_o);
        warpgroup_fence_operand(tOrP);
        release(&ss.empty_v[sp]);
        epilogue(cur, old_max, old_sum);  // the current item is complete
        release(&ss.empty_q[cur.qbuf]);
        clear(acc_o);
        cur = nxt;
        convert_into<Elem>(acc_s, rP);
      }
      ++it;
    }
    // The last item's last P V, then its epilogue.
    const int sp = (it - 1) % kStages;
    Barrier::wait(&ss.full_v[sp], ((it - 1) / kStages) & 1);
    wg_issue<false>(mma_o, tOrP, tOrV(_, _, _, sp), acc_o);
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc_o);
    warpgroup_fence_operand(tOrP);
    release(&ss.empty_v[sp]);
    epilogue(cur, row_max, row_sum);
  }
#endif  // PROXYATTN_BSA_SM90_DEVICE
}

// Strides of a size-1 dimension are never used; give them a value TMA accepts.
inline int64_t tma_stride(int64_t size, int64_t stride, int64_t fallback) { return size > 1 ? stride : fallback; }

// kVariant 0-2: bsa_fwd_sm90_kernel, one CTA per work item; 3: bsa_fwd_sm90_persistent_kernel.
template <class Traits, int kVariant>
cudaError_t launch(const BsaParams& p, cudaStream_t stream) {
  using Elem = typename Traits::Elem;
  constexpr int D = Traits::kHeadDim;
  const int64_t grid = int64_t(p.num_q_blocks) * p.q_heads * p.batch;
  if (grid == 0) return cudaSuccess;
  if (grid > int64_t(INT32_MAX)) return cudaErrorInvalidConfiguration;

  const bool varlen = p.cu_seqlens_q != nullptr;
  KernelParams<Traits> kp;
  kp.p = p;
  kp.p.kv_section = bsa_kv_section(p);
  kp.q_rows_total = int32_t(varlen ? p.total_q : p.seqlen_q);
  kp.k_rows_total = int32_t(varlen ? p.total_k : p.seqlen_k);
  kp.q_batches = varlen ? 1 : p.batch;
  kp.lazy_log2 = bsa_sm90_lazy_log2();
  const int64_t dflt = D;  // 16-byte multiple, used for unused strides
  auto make_g = [&](const void* ptr, int32_t rows, int heads, int64_t rs, int64_t hs, int64_t bs) {
    return make_tensor(make_gmem_ptr(static_cast<Elem const*>(ptr)),
                       make_shape(rows, Int<D>{}, int32_t(heads), int32_t(kp.q_batches)),
                       make_stride(tma_stride(rows, rs, dflt), _1{}, tma_stride(heads, hs, dflt),
                                   tma_stride(kp.q_batches, bs, dflt)));
  };
  auto gQ = make_g(p.q, kp.q_rows_total, p.q_heads, p.q_row_stride, p.q_head_stride, p.q_batch_stride);
  auto gK = make_g(p.k, kp.k_rows_total, p.kv_heads, p.k_row_stride, p.k_head_stride, p.k_batch_stride);
  auto gV = make_g(p.v, kp.k_rows_total, p.kv_heads, p.v_row_stride, p.v_head_stride, p.v_batch_stride);
  kp.tma_q = make_tma_copy(SM90_TMA_LOAD{}, gQ, typename Traits::SmemLayoutQ{},
                           Shape<Int<Traits::kBlockM>, Int<D>>{}, _1{});
  kp.tma_k = make_tma_copy(SM90_TMA_LOAD{}, gK, take<0, 2>(typename Traits::SmemLayoutKV{}),
                           Shape<Int<Traits::kBlockN>, Int<D>>{}, _1{});
  kp.tma_v = make_tma_copy(SM90_TMA_LOAD{}, gV, take<0, 2>(typename Traits::SmemLayoutKV{}),
                           Shape<Int<Traits::kBlockN>, Int<D>>{}, _1{});

  if constexpr (kVariant == 3) {
    if (p.tile_counter == nullptr) return cudaErrorInvalidValue;
    constexpr int kSmem = Traits::kPersistentSmemBytes;
    static_assert(kSmem <= 227 * 1024, "persistent kernel beyond the sm90 shared memory limit");
    auto kernel = &bsa_fwd_sm90_persistent_kernel<Traits>;
    int dev = 0, sms = 0;
    cudaError_t err = cudaGetDevice(&dev);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    if (err == cudaSuccess) err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
    if (err != cudaSuccess) return err;
    const int ctas = int(grid < int64_t(sms) ? grid : int64_t(sms > 0 ? sms : 1));
    kernel<<<dim3(unsigned(ctas)), dim3(Traits::kNThreads), kSmem, stream>>>(kp);
    return cudaGetLastError();
  } else {
    constexpr int kSmem = Traits::kSmemBytes;
    auto kernel = &bsa_fwd_sm90_kernel<Traits, kVariant>;
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
    if (err != cudaSuccess) return err;
    kernel<<<dim3(unsigned(grid)), dim3(Traits::kNThreads), kSmem, stream>>>(kp);
    return cudaGetLastError();
  }
}

}  // namespace bsa_sm90

template <typename Elem, int kHeadDim>
cudaError_t run_bsa_fwd_sm90(const BsaParams& params, cudaStream_t stream) {
  static_assert(std::is_same_v<Elem, __half> || std::is_same_v<Elem, __nv_bfloat16>, "Elem: __half or __nv_bfloat16");
  using CuteElem = std::conditional_t<std::is_same_v<Elem, __half>, cutlass::half_t, cutlass::bfloat16_t>;
  if (params.head_dim != kHeadDim || !bsa_unsupported_reason(params).empty() ||
      !bsa_sm90_unsupported_reason(params).empty())
    return cudaErrorInvalidValue;
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (bsa_device_arch(dev) != 90) return cudaErrorNoKernelImageForDevice;  // sm_90a code only
  using Traits = bsa_sm90::Sm90Traits<CuteElem, kHeadDim, 2>;
  using Traits3 = bsa_sm90::Sm90Traits<CuteElem, kHeadDim, 3>;  // variant 1 (overlapped, no pingpong) only
  static_assert(Traits3::kSmemBytes <= 227 * 1024, "3-stage ring beyond the sm90 shared memory limit");
  switch (bsa_sm90_variant()) {
    case 0: return bsa_sm90::launch<Traits, 0>(params, stream);
    case 2: return bsa_sm90::launch<Traits, 2>(params, stream);
    case 3: return bsa_sm90::launch<Traits, 3>(params, stream);
    default:
      if (bsa_sm90_stages() == 3) return bsa_sm90::launch<Traits3, 1>(params, stream);
      return bsa_sm90::launch<Traits, 1>(params, stream);
  }
}

}  // namespace proxyattn
