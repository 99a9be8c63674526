// Block-sparse attention forward, Hopper path (sm_90a: TMA, wgmma, mbarriers, setmaxnreg). Same
// math, parameters and layouts as the portable path (kernels/bsa_fwd_sm80.cuh, kernels/bsa_params.h);
// block_size 128 only (the dispatcher in kernels/bsa_launch.h sends 64 to the sm80 path).
//
// One CTA per (query block m, batch b, query head h), in sections of KV heads whose K/V fit in L2,
// heaviest rows launched first: by query block (bsa_tile in kernels/bsa_params.h), or, with
// PROXYATTN_BSA_SORT=1, by selected-block count (tile_order, sorted by kernels/bsa_order.cu); 384
// threads in three warpgroups:
//   warpgroup 0 (producer, 24 registers): one thread issues TMA loads, Q once, then for every
//     selected key block (walked from the diagonal down by BlockCursor, the order of sm80's
//     TileCursor) K and V into a 2-stage ring (3 with PROXYATTN_BSA_SM90_STAGES=3, variant 1 only);
//     full barriers carry the TMA transaction bytes, empty barriers are released
//     by the 8 consumer warps.
//   warpgroups 1, 2 (consumers, 240 registers): each owns 64 of the 128 query rows.
//     S = Q K^T by wgmma SS (64 x 128 x D), mask only on tiles that cross the causal diagonal or
//     the end of the keys, online softmax in fp32 (exp2), P converted to 16 bit in registers,
//     O += P V by wgmma RS (64 x D x 128, V read MN-major from the same K-major smem tile).
//     Epilogue: O / rowsum stored straight from registers (32-bit pairs), lse per row.
//     Three variants (template kVariant, chosen at run time by bsa_sm90_variant in bsa_launch.h):
//     0 serial (each wgmma waited for at once); 1 overlapped, the default (S_j = Q K_j issued with
//     O += P_{j-1} V_{j-1}; the softmax of S_j runs while the P V wgmma is in flight; O rescaled
//     after), the two consumer warpgroups not synchronised with each other; 2 overlapped with
//     pingpong: the warpgroups take turns at issuing their pair of wgmmas (two named barriers), so
//     one warpgroup's softmax runs while the other's wgmmas hold the tensor cores.
//
// Shared memory (SW128 K-major, what TMA writes and wgmma reads): sQ [128, D], sK/sV [stages][128, D],
// 1 + 4 x stages mbarriers. 2 stages: D = 128 160 KB, D = 64 80 KB; 3 stages (variant 1 only,
// PROXYATTN_BSA_SM90_STAGES=3): 224 KB, 112 KB.
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
};

template <class Traits>
struct KernelParams {
  BsaParams p;
  typename Traits::TmaQ tma_q;
  typename Traits::TmaKV tma_k;
  typename Traits::TmaKV tma_v;
  int32_t q_rows_total, k_rows_total, q_batches;  // extents the tensor maps were built with
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
  int64_t q_row0 = 0, k_row0 = 0;
  int seqlen_q = p.seqlen_q, seqlen_k = p.seqlen_k;
  if (varlen) {
    const int64_t q0 = min(max(int64_t(p.cu_seqlens_q[b]), int64_t(0)), p.total_q);
    const int64_t q1 = min(max(int64_t(p.cu_seqlens_q[b + 1]), q0), p.total_q);
    const int64_t k0 = min(max(int64_t(p.cu_seqlens_k[b]), int64_t(0)), p.total_k);
    const int64_t k1 = min(max(int64_t(p.cu_seqlens_k[b + 1]), k0), p.total_k);
    q_row0 = q0;
    k_row0 = k0;
    seqlen_q = int(min(q1 - q0, int64_t(p.seqlen_q)));
    seqlen_k = int(min(k1 - k0, int64_t(p.seqlen_k)));
  }
  const int q_start = m * kBlockM;
  if (q_start >= seqlen_q) return;  // uniform over the CTA; no barrier follows for anyone
  const int q_rows = min(kBlockM, seqlen_q - q_start);
  const int diag = seqlen_k - seqlen_q + q_start;
  int max_key = seqlen_k - 1;
  if (p.causal) max_key = min(max_key, diag + q_rows - 1);
  const int full_key = p.causal ? min(seqlen_k - 1, diag) : seqlen_k - 1;
  const int kvh = h / (p.q_heads / p.kv_heads);
  const int nkb = (seqlen_k + kBlockN - 1) / kBlockN;
  int count = p.counts[b * p.counts_batch_stride + h * p.counts_head_stride + m * p.counts_block_stride];
  count = min(max(count, 0), p.num_k_blocks);
  if (max_key < 0) count = 0;
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
      Tensor sc = make_tensor(acc_s.data(), acc_rowcol(acc_s.layout()));  // (rows, cols)
      if (key0 + kBlockN - 1 > full_key) {
        CUTE_UNROLL
        for (int ri = 0; ri < size<0>(sc); ++ri) {
          const int r = get<0>(tScS_rc(ri, 0));
          const int limit = (p.causal ? min(seqlen_k - 1, diag + r) : seqlen_k - 1) - key0;
          CUTE_UNROLL
          for (int ci = 0; ci < size<1>(sc); ++ci) {
            if (get<1>(tScS_rc(0, ci)) > limit) sc(ri, ci) = -INFINITY;
          }
        }
      }
      CUTE_UNROLL
      for (int ri = 0; ri < size<0>(sc); ++ri) {
        float mx = row_max(ri);
        CUTE_UNROLL
        for (int ci = 0; ci < size<1>(sc); ++ci) mx = fmaxf(mx, sc(ri, ci));
        mx = quad_max(mx);
        // A row with no visible key so far keeps max -inf; base 0 makes exp2(-inf - 0) = 0, not NaN.
        const float base = mx == -INFINITY ? 0.f : mx * scale_log2;
        corr(ri) = exp2f(row_max(ri) * scale_log2 - base);
        row_max(ri) = mx;
        float sum = 0.f;
        CUTE_UNROLL
        for (int ci = 0; ci < size<1>(sc); ++ci) {
          const float e = exp2f(sc(ri, ci) * scale_log2 - base);
          sc(ri, ci) = e;
          sum += e;
        }
        row_sum(ri) = row_sum(ri) * corr(ri) + sum;
      }
    };
    auto rescale_o = [&]() {
      Tensor o = make_tensor(acc_o.data(), acc_rowcol(acc_o.layout()));
      CUTE_UNROLL
      for (int ri = 0; ri < size<0>(o); ++ri) {
        CUTE_UNROLL
        for (int cj = 0; cj < size<1>(o); ++cj) o(ri, cj) *= corr(ri);
      }
    };
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
        softmax_tile(acc_s, cursor.blk * kBlockN);
        rescale_o();
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
          softmax_tile(acc_s, cursor.blk * kBlockN);
          cursor.fetch();       // the next entry's load overlaps the P V wgmma
          warpgroup_wait<0>();  // P_{i-1} V_{i-1} done
          warpgroup_fence_operand(acc_o);
          warpgroup_fence_operand(tOrP);
          release(&ss.empty_v[sp]);
          rescale_o();
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
    Tensor o = make_tensor(acc_o.data(), acc_rowcol(acc_o.layout()));
    Tensor cO = make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{});
    Tensor tOcO = thr_o.partition_C(cO);
    Tensor tOcO_rc = make_tensor(tOcO.data(), acc_rowcol(tOcO.layout()));
    static_assert(decltype(size<1>(o))::value % 2 == 0, "column pairs");
    CUTE_UNROLL
    for (int ri = 0; ri < size<0>(o); ++ri) {
      const float sum = quad_sum(row_sum(ri));
      const bool empty = sum == 0.f;
      const float inv = empty ? 0.f : 1.f / sum;
      const int r = get<0>(tOcO_rc(ri, 0));
      if (r < q_rows) {
        if ((lane & 3) == 0) lse_ptr[r] = empty ? -INFINITY : row_max(ri) * p.softmax_scale + logf(sum);
        Elem* row_ptr = o_ptr + int64_t(r) * p.out_row_stride;
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
#endif  // PROXYATTN_BSA_SM90_DEVICE
}

// Strides of a size-1 dimension are never used; give them a value TMA accepts.
inline int64_t tma_stride(int64_t size, int64_t stride, int64_t fallback) { return size > 1 ? stride : fallback; }

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

  constexpr int kSmem = Traits::kSmemBytes;
  auto kernel = &bsa_fwd_sm90_kernel<Traits, kVariant>;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (err != cudaSuccess) return err;
  kernel<<<dim3(unsigned(grid)), dim3(Traits::kNThreads), kSmem, stream>>>(kp);
  return cudaGetLastError();
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
    default:
      if (bsa_sm90_stages() == 3) return bsa_sm90::launch<Traits3, 1>(params, stream);
      return bsa_sm90::launch<Traits, 1>(params, stream);
  }
}

}  // namespace proxyattn
