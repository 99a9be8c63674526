// Block-sparse attention forward, portable sm80 path (mma.sync, cp.async, ldmatrix; runs on
// sm_80 and sm_90). FlashAttention-2 style: one CTA owns one query block (kBlockM = S rows) of one
// (batch, query head) and walks that block's selected key blocks from the index row, each as
// S / kBlockN key tiles, in descending order (the causal diagonal first), with an online softmax in
// fp32 (exp2). Only tiles that cross the causal diagonal or the end of the keys take the masked
// path. See kernels/bsa_params.h for the tensor layouts and kernels/bsa_launch.h for the entry
// points; one explicit instantiation per (dtype, head dim) lives in csrc/instantiations/.
//
// Pipeline per key tile (single K and V buffers, as FA2): wait K -> issue V load -> S = Q K^T ->
// mask -> wait V -> issue the next K load -> online softmax -> O += P V. So the V load overlaps the
// first GEMM and the next K load overlaps the softmax and the second GEMM.
//
// Shared memory: sQ [kBlockM, D] (reused for the output tile), sK and sV [kBlockN, D], swizzled
// 8 x 64 atoms (conflict-free 128-bit cp.async writes and ldmatrix reads).
//
// Debug aid: compile with -DPROXYATTN_BSA_ALWAYS_MASK=1 to send every tile through the masked path.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <type_traits>

#include <cute/tensor.hpp>
#include <cutlass/array.h>
#include <cutlass/numeric_conversion.h>
#include <cutlass/numeric_types.h>

#include "kernels/bsa_launch.h"
#include "kernels/bsa_params.h"
#include "kernels/estimate_common.cuh"

#ifndef PROXYATTN_BSA_ALWAYS_MASK
#define PROXYATTN_BSA_ALWAYS_MASK 0
#endif

namespace proxyattn {
namespace bsa_sm80 {

using namespace cute;

// ---------------------------------------------------------------------------------------------
// Traits: tile sizes, MMA, shared-memory layouts and copy atoms.
// ---------------------------------------------------------------------------------------------
template <typename Elem_, int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_>
struct Sm80Traits {
  using Elem = Elem_;  // cutlass::half_t or cutlass::bfloat16_t
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;  // query rows per CTA == block_size S
  static constexpr int kBlockN = kBlockN_;  // keys per tile; S / kBlockN tiles per key block
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  static_assert(kHeadDim % 64 == 0, "head dim must be a multiple of 64 (swizzle atom width)");
  static_assert(kBlockM % (16 * kNWarps) == 0, "every warp owns whole 16-row MMA tiles");
  static_assert(kBlockM % kBlockN == 0, "a key block is a whole number of key tiles");
  static_assert(kBlockN % 16 == 0, "");

  // Warps tile M; each warp computes rows {16 w + 64 i}. N and K tiles of 16 so that one
  // ldmatrix.x4 feeds two n8 atoms of B.
  using MmaAtom = std::conditional_t<std::is_same_v<Elem, cutlass::half_t>,
                                     MMA_Atom<SM80_16x8x16_F32F16F16F32_TN>,
                                     MMA_Atom<SM80_16x8x16_F32BF16BF16F32_TN>>;
  using TiledMma = TiledMMA<MmaAtom, Layout<Shape<Int<kNWarps>, _1, _1>>, Tile<Int<16 * kNWarps>, _16, _16>>;

  // Swizzled 8 x 64 atom: 8 rows of 128 bytes; Swizzle<3,3,3> permutes the eight 16-byte chunks
  // of a row by the row index, so 8 threads writing one column of chunks hit 8 different banks.
  using SmemAtom = decltype(composition(Swizzle<3, 3, 3>{}, Layout<Shape<_8, _64>, Stride<_64, _1>>{}));
  using SmemLayoutQ = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));   // (M, D)
  using SmemLayoutKV = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>>{}));  // (N, D)
  // V seen as (D, N): Vt(d, n) = V(n, d). The inner layout maps (d, n) to n + kBlockN * d, the
  // column-major index of (n, d) in SmemLayoutKV's domain.
  using SmemLayoutVt =
      decltype(composition(SmemLayoutKV{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockN>>{}, GenRowMajor{})));

  using SmemCopyAtom = Copy_Atom<SM75_U32x4_LDSM_N, Elem>;   // Q (A) and K (B) fragments
  using SmemCopyAtomT = Copy_Atom<SM75_U16x8_LDSM_T, Elem>;  // V^T (B) fragments, transposing load
  using SmemCopyAtomO = Copy_Atom<UniversalCopy<uint32_t>, Elem>;  // accumulator pairs -> sO

  // Global <-> shared: 128-bit per thread, 8 threads per 64-element row chunk.
  static constexpr int kElemsPer128 = 16 / sizeof(Elem);
  static constexpr int kThreadsPerRow = 64 / kElemsPer128;
  using GmemThreadLayout = Layout<Shape<Int<kNThreads / kThreadsPerRow>, Int<kThreadsPerRow>>,
                                  Stride<Int<kThreadsPerRow>, _1>>;
  using GmemValLayout = Layout<Shape<_1, Int<kElemsPer128>>>;
  using GmemTiledCopyQKV = decltype(make_tiled_copy(
      Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>, Elem>{}, GmemThreadLayout{}, GmemValLayout{}));
  using GmemTiledCopyO = decltype(make_tiled_copy(Copy_Atom<UniversalCopy<cute::uint128_t>, Elem>{},
                                                  GmemThreadLayout{}, GmemValLayout{}));
  static_assert(kBlockN % (kNThreads / kThreadsPerRow) == 0, "K/V tile rows split evenly over threads");

  static constexpr int kSmemBytes = (kBlockM + 2 * kBlockN) * kHeadDim * int(sizeof(Elem));
};

// ---------------------------------------------------------------------------------------------
// Small device helpers.
// ---------------------------------------------------------------------------------------------

// Accumulator layout ((2, 2), MMA_M, MMA_N) -> (rows (2, MMA_M), cols (2, MMA_N)). Value mode
// (v0, v1) of the m16n8 C fragment holds (row lane/4 + 8 v1, col 2 (lane%4) + v0).
template <class Layout>
__device__ __forceinline__ constexpr auto acc_rowcol(Layout const& l) {
  static_assert(decltype(rank(l))::value == 3, "expected an MMA accumulator layout");
  auto d = logical_divide(l, Shape<_2>{});  // ((2, 2), MMA_M, MMA_N)
  return make_layout(make_layout(get<0, 1>(d), get<1>(d)), make_layout(get<0, 0>(d), get<2>(d)));
}

// Accumulator layout ((2, 2), MMA_M, MMA_N) of S -> A-operand layout ((2, 2, 2), MMA_M, MMA_N / 2)
// of P for the m16n8k16 MMA: the C fragments of two adjacent n8 atoms are one k16 A fragment.
template <class Layout>
__device__ __forceinline__ constexpr auto acc_to_a_operand(Layout const& l) {
  static_assert(decltype(size<2>(l))::value % 2 == 0, "need an even number of n8 atoms");
  auto d = logical_divide(l, Shape<Underscore, Underscore, _2>{});  // ((2, 2), MMA_M, (2, MMA_N / 2))
  return make_layout(make_layout(get<0>(d), get<2, 0>(d)), get<1>(d), get<2, 1>(d));
}

// Owning register copy of an fp32 fragment converted to To (round to nearest).
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

// Row-predicated tiled copy: src/dst (CPY, CPY_ROWS, CPY_COLS), coord the identity partition of the
// same tile. Rows with coordinate >= rows are skipped; with kClear their destination is zeroed.
template <bool kClear, class TiledCopy, class Src, class Dst, class Coord>
__device__ __forceinline__ void copy_rows(TiledCopy const& tiled_copy, Src const& src, Dst&& dst,
                                          Coord const& coord, int rows) {
  CUTE_UNROLL
  for (int mi = 0; mi < size<1>(dst); ++mi) {
    if (get<0>(coord(0, mi, 0)) < rows) {
      CUTE_UNROLL
      for (int ki = 0; ki < size<2>(dst); ++ki) copy(tiled_copy, src(_, mi, ki), dst(_, mi, ki));
    } else if constexpr (kClear) {
      CUTE_UNROLL
      for (int ki = 0; ki < size<2>(dst); ++ki) clear(dst(_, mi, ki));
    }
  }
}

// acc += A B with both operands in shared memory, ldmatrix of k-slice k+1 overlapping MMA k.
template <class TiledMma, class Acc, class RegA, class RegB, class SmemA, class SmemB, class CopyA,
          class CopyB, class ThrCopyA, class ThrCopyB>
__device__ __forceinline__ void gemm_ss(Acc& acc, RegA& rA, RegB& rB, SmemA const& sA, SmemB const& sB,
                                        TiledMma const& mma, CopyA const& copy_a, CopyB const& copy_b,
                                        ThrCopyA const& thr_a, ThrCopyB const& thr_b) {
  Tensor rA_view = thr_a.retile_D(rA);
  Tensor rB_view = thr_b.retile_D(rB);
  static_assert(decltype(size<1>(rA_view) == size<1>(sA))::value, "A: M modes differ");
  static_assert(decltype(size<1>(rB_view) == size<1>(sB))::value, "B: N modes differ");
  copy(copy_a, sA(_, _, 0), rA_view(_, _, 0));
  copy(copy_b, sB(_, _, 0), rB_view(_, _, 0));
  CUTE_UNROLL
  for (int k = 0; k < size<2>(rA); ++k) {
    if (k + 1 < size<2>(rA)) {
      copy(copy_a, sA(_, _, k + 1), rA_view(_, _, k + 1));
      copy(copy_b, sB(_, _, k + 1), rB_view(_, _, k + 1));
    }
    cute::gemm(mma, rA(_, _, k), rB(_, _, k), acc);
  }
}

// acc += A B with A already in registers (P) and B in shared memory (V^T).
template <class TiledMma, class Acc, class RegA, class RegB, class SmemB, class CopyB, class ThrCopyB>
__device__ __forceinline__ void gemm_rs(Acc& acc, RegA const& rA, RegB& rB, SmemB const& sB,
                                        TiledMma const& mma, CopyB const& copy_b, ThrCopyB const& thr_b) {
  Tensor rB_view = thr_b.retile_D(rB);
  static_assert(decltype(size<1>(rB_view) == size<1>(sB))::value, "B: N modes differ");
  copy(copy_b, sB(_, _, 0), rB_view(_, _, 0));
  CUTE_UNROLL
  for (int k = 0; k < size<2>(rA); ++k) {
    if (k + 1 < size<2>(rA)) copy(copy_b, sB(_, _, k + 1), rB_view(_, _, k + 1));
    cute::gemm(mma, rA(_, _, k), rB(_, _, k), acc);
  }
}

// Walks the key tiles of one index row in descending order: ordinals count-1 .. 0 of the row, each
// selected block as kSub tiles from the highest. Skips entries outside [0, nkb) and tiles that
// start past max_key (the last key any row of the query block may see). Uniform over the CTA. The
// next raw entry is loaded one block ahead to keep its latency off the critical path.
template <int kSub, int kBlockN>
struct TileCursor {
  BsaIndexRow row;  // int16 or int32 entries (kernels/bsa_params.h)
  int ord;       // ordinal of the current block in the row
  int sub;       // current tile inside the block
  int blk;       // current block
  int next_raw;  // idx[ord - 1], or -1
  int nkb;
  int max_key;

  __device__ __forceinline__ TileCursor(const BsaIndexRow& row_, int count, int nkb_, int max_key_)
      : row(row_), ord(count), sub(0), blk(-1), nkb(nkb_), max_key(max_key_) {
    next_raw = count > 0 ? row.load(count - 1) : -1;
  }

  // Moves to the next valid tile; false when the row is exhausted.
  __device__ __forceinline__ bool advance() {
    while (true) {
      if (sub > 0) {
        --sub;
      } else {
        if (ord <= 0) return false;
        --ord;
        blk = next_raw;
        next_raw = ord > 0 ? row.load(ord - 1) : -1;
        if (blk < 0 || blk >= nkb) continue;  // sub stays 0: the next turn takes the next block
        sub = kSub - 1;
      }
      if (tile() * kBlockN <= max_key) return true;
    }
  }

  __device__ __forceinline__ int tile() const { return blk * kSub + sub; }
};

// ---------------------------------------------------------------------------------------------
// The kernel. Grid: one CTA per (query block, batch, query head), heads fastest, query blocks from
// the last (most candidates under causal masking) to the first.
// ---------------------------------------------------------------------------------------------
template <class Traits>
__global__ void __launch_bounds__(Traits::kNThreads, 2) bsa_fwd_sm80_kernel(const BsaParams p) {
  using Elem = typename Traits::Elem;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kSub = kBlockM / kBlockN;  // key tiles per key block (block_size == kBlockM)

  extern __shared__ __align__(128) char bsa_smem[];

  const int tid = threadIdx.x;
  // Work item (kernels/bsa_params.h: bsa_tile's order per kv_section, heaviest rows first, or the
  // sorted order of tile_order).
  const BsaTile tile = bsa_tile(bsa_cta_work(p), p);
  const int b = tile.b, h = tile.h, m = tile.m;

  // Sequence bounds (varlen: clamped into the packed tensors and the max lengths).
  const bool varlen = p.cu_seqlens_q != nullptr;
  const SeqBounds sb = load_seq_bounds(p.cu_seqlens_q, p.cu_seqlens_k, b, p.seqlen_q, p.seqlen_k, p.total_q, p.total_k);
  const int64_t q_row0 = sb.q_start, k_row0 = sb.k_start;
  const int seqlen_q = sb.nq, seqlen_k = sb.nk;
  const int q_start = m * kBlockM;
  if (q_start >= seqlen_q) return;  // past this sequence: no rows to write
  const int q_rows = min(kBlockM, seqlen_q - q_start);

  // Visibility: query row r (tile-local) sees keys <= seqlen_k - seqlen_q + q_start + r (causal).
  const int diag = seqlen_k - seqlen_q + q_start;  // limit of tile row 0
  int max_key = seqlen_k - 1;                        // last key any row of the tile sees
  if (p.causal) max_key = min(max_key, diag + q_rows - 1);
  const int full_key = p.causal ? min(seqlen_k - 1, diag) : seqlen_k - 1;  // seen by every row

  const int kvh = h / (p.q_heads / p.kv_heads);
  const Elem* q_ptr = static_cast<const Elem*>(p.q) + (varlen ? q_row0 * p.q_row_stride : b * p.q_batch_stride) +
                      int64_t(q_start) * p.q_row_stride + int64_t(h) * p.q_head_stride;
  const Elem* k_ptr = static_cast<const Elem*>(p.k) + (varlen ? k_row0 * p.k_row_stride : b * p.k_batch_stride) +
                      int64_t(kvh) * p.k_head_stride;
  const Elem* v_ptr = static_cast<const Elem*>(p.v) + (varlen ? k_row0 * p.v_row_stride : b * p.v_batch_stride) +
                      int64_t(kvh) * p.v_head_stride;
  Elem* o_ptr = static_cast<Elem*>(p.out) + (varlen ? q_row0 * p.out_row_stride : b * p.out_batch_stride) +
                int64_t(q_start) * p.out_row_stride + int64_t(h) * p.out_head_stride;
  float* lse_ptr = p.lse + (varlen ? q_row0 : b * p.lse_batch_stride) + int64_t(h) * p.lse_head_stride + q_start;

  // Index row of (b, h, m).
  const int nkb = (seqlen_k + kBlockM - 1) / kBlockM;
  const int count = bsa_row_count(p, b, h, m, max_key);  // 0 when no row of this tile sees any key
  TileCursor<kSub, kBlockN> cursor(bsa_index_row(p, b, h, m), count, nkb, max_key);

  // Global views. K/V: the whole sequence as (seqlen_k, D), tiled into (kBlockN, D, n_tiles).
  Tensor gQ = make_tensor(make_gmem_ptr(q_ptr), Shape<Int<kBlockM>, Int<kHeadDim>>{},
                          make_stride(p.q_row_stride, _1{}));                              // (M, D)
  Tensor mK = make_tensor(make_gmem_ptr(k_ptr), make_shape(seqlen_k, Int<kHeadDim>{}),
                          make_stride(p.k_row_stride, _1{}));                              // (Nk, D)
  Tensor mV = make_tensor(make_gmem_ptr(v_ptr), make_shape(seqlen_k, Int<kHeadDim>{}),
                          make_stride(p.v_row_stride, _1{}));                              // (Nk, D)
  Tensor gK = local_tile(mK, Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, 0));    // (N, D, tiles)
  Tensor gV = local_tile(mV, Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, 0));    // (N, D, tiles)
  Tensor gO = make_tensor(make_gmem_ptr(o_ptr), Shape<Int<kBlockM>, Int<kHeadDim>>{},
                          make_stride(p.out_row_stride, _1{}));                            // (M, D)

  // Shared memory.
  Elem* smem = reinterpret_cast<Elem*>(bsa_smem);
  Tensor sQ = make_tensor(make_smem_ptr(smem), typename Traits::SmemLayoutQ{});            // (M, D)
  Tensor sK = make_tensor(sQ.data() + size(sQ), typename Traits::SmemLayoutKV{});         // (N, D)
  Tensor sV = make_tensor(sK.data() + size(sK), typename Traits::SmemLayoutKV{});         // (N, D)
  Tensor sVt = make_tensor(sV.data(), typename Traits::SmemLayoutVt{});                   // (D, N)
  Tensor sO = make_tensor(sQ.data(), typename Traits::SmemLayoutQ{});                     // (M, D), aliases sQ

  // Global -> shared copies, with identity tensors for row predicates.
  typename Traits::GmemTiledCopyQKV gmem_copy;
  auto gmem_thr = gmem_copy.get_thread_slice(tid);
  Tensor tQgQ = gmem_thr.partition_S(gQ);   // (CPY, CPY_M, CPY_D)
  Tensor tQsQ = gmem_thr.partition_D(sQ);
  Tensor tKgK = gmem_thr.partition_S(gK);   // (CPY, CPY_N, CPY_D, tiles)
  Tensor tKsK = gmem_thr.partition_D(sK);
  Tensor tVgV = gmem_thr.partition_S(gV);
  Tensor tVsV = gmem_thr.partition_D(sV);
  Tensor cQ = make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{});
  Tensor cKV = make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{});
  Tensor tQcQ = gmem_thr.partition_S(cQ);
  Tensor tKVcKV = gmem_thr.partition_S(cKV);

  // MMA fragments and shared -> register copies.
  typename Traits::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tid);
  Tensor tSrQ = thr_mma.partition_fragment_A(sQ);    // (MMA, MMA_M, MMA_D)
  Tensor tSrK = thr_mma.partition_fragment_B(sK);    // (MMA, MMA_N, MMA_D)
  Tensor tOrVt = thr_mma.partition_fragment_B(sVt);  // (MMA, MMA_D, MMA_N)
  Tensor acc_o = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kHeadDim>>{});  // (MMA, MMA_M, MMA_D)

  auto s2r_q = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto s2r_q_thr = s2r_q.get_thread_slice(tid);
  Tensor tSsQ = s2r_q_thr.partition_S(sQ);
  auto s2r_k = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto s2r_k_thr = s2r_k.get_thread_slice(tid);
  Tensor tSsK = s2r_k_thr.partition_S(sK);
  auto s2r_v = make_tiled_copy_B(typename Traits::SmemCopyAtomT{}, tiled_mma);
  auto s2r_v_thr = s2r_v.get_thread_slice(tid);
  Tensor tOsVt = s2r_v_thr.partition_S(sVt);

  // (row, col) of every accumulator element of S, as (rows (2, MMA_M), cols (2, MMA_N)).
  Tensor cS = make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor tScS = thr_mma.partition_C(cS);
  Tensor tScS_rc = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));

  // Online-softmax state of this thread's rows: raw-score max and a thread-partial sum.
  constexpr int kRows = decltype(size<0>(acc_rowcol(acc_o.layout())))::value;
  Tensor row_max = make_tensor<float>(Shape<Int<kRows>>{});
  Tensor row_sum = make_tensor<float>(Shape<Int<kRows>>{});
  fill(row_max, -INFINITY);
  fill(row_sum, 0.f);
  clear(acc_o);
  const float scale_log2 = p.softmax_scale_log2;

  bool have = cursor.advance();
  if (have) {
    copy_rows<true>(gmem_copy, tQgQ, tQsQ, tQcQ, q_rows);
    copy_rows<true>(gmem_copy, tKgK(_, _, _, cursor.tile()), tKsK, tKVcKV, seqlen_k - cursor.tile() * kBlockN);
    cp_async_fence();
  }

  while (have) {
    const int tile = cursor.tile();
    const int key0 = tile * kBlockN;

    cp_async_wait<0>();  // K (and, first time, Q) landed
    __syncthreads();     // ... for every thread; and every thread is done reading the old V
    copy_rows<true>(gmem_copy, tVgV(_, _, _, tile), tVsV, tKVcKV, seqlen_k - key0);
    cp_async_fence();

    Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});  // (MMA, MMA_M, MMA_N)
    clear(acc_s);
    gemm_ss(acc_s, tSrQ, tSrK, tSsQ, tSsK, tiled_mma, s2r_q, s2r_k, s2r_q_thr, s2r_k_thr);

    Tensor s = make_tensor(acc_s.data(), acc_rowcol(acc_s.layout()));  // (rows, cols)
    if (PROXYATTN_BSA_ALWAYS_MASK || key0 + kBlockN - 1 > full_key) {
      // Tile crosses the diagonal or the end of the keys: mask key > min(seqlen_k - 1, row limit).
      CUTE_UNROLL
      for (int ri = 0; ri < size<0>(s); ++ri) {
        const int r = get<0>(tScS_rc(ri, 0));
        const int limit = (p.causal ? min(seqlen_k - 1, diag + r) : seqlen_k - 1) - key0;
        CUTE_UNROLL
        for (int ci = 0; ci < size<1>(s); ++ci) {
          if (get<1>(tScS_rc(0, ci)) > limit) s(ri, ci) = -INFINITY;
        }
      }
    }

    cp_async_wait<0>();  // V landed
    __syncthreads();     // ... for every thread; and every thread is done reading K
    have = cursor.advance();
    if (have) {
      copy_rows<true>(gmem_copy, tKgK(_, _, _, cursor.tile()), tKsK, tKVcKV, seqlen_k - cursor.tile() * kBlockN);
      cp_async_fence();
    }

    // Online softmax in the log2 domain. A row with no visible key so far keeps max -inf; its
    // exponent base is taken as 0 so exp2(-inf - 0) = 0 instead of NaN.
    Tensor o = make_tensor(acc_o.data(), acc_rowcol(acc_o.layout()));
    CUTE_UNROLL
    for (int ri = 0; ri < size<0>(s); ++ri) {
      float mx = row_max(ri);
      CUTE_UNROLL
      for (int ci = 0; ci < size<1>(s); ++ci) mx = fmaxf(mx, s(ri, ci));
      mx = quad_max(mx);
      const float base = mx == -INFINITY ? 0.f : mx * scale_log2;
      const float corr = exp2f(row_max(ri) * scale_log2 - base);
      row_max(ri) = mx;
      float sum = 0.f;
      CUTE_UNROLL
      for (int ci = 0; ci < size<1>(s); ++ci) {
        const float e = exp2f(s(ri, ci) * scale_log2 - base);
        s(ri, ci) = e;
        sum += e;
      }
      row_sum(ri) = row_sum(ri) * corr + sum;
      CUTE_UNROLL
      for (int cj = 0; cj < size<1>(o); ++cj) o(ri, cj) *= corr;
    }

    Tensor p_elem = convert_fragment<Elem>(acc_s);
    Tensor tOrP = make_tensor(p_elem.data(), acc_to_a_operand(p_elem.layout()));  // (MMA, MMA_M, MMA_N/2)
    gemm_rs(acc_o, tOrP, tOrVt, tOsVt, tiled_mma, s2r_v, s2r_v_thr);
  }

  // Epilogue: normalise, write lse (fp32, natural log) and O (through sO for 128-bit stores).
  Tensor o = make_tensor(acc_o.data(), acc_rowcol(acc_o.layout()));
  Tensor cO = make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{});
  Tensor tOcO = thr_mma.partition_C(cO);
  Tensor tOcO_rc = make_tensor(tOcO.data(), acc_rowcol(tOcO.layout()));
  CUTE_UNROLL
  for (int ri = 0; ri < size<0>(o); ++ri) {
    const float sum = quad_sum(row_sum(ri));
    const bool empty = sum == 0.f;  // no visible key (a visible key contributes exp2(0) = 1)
    const float inv = empty ? 0.f : 1.f / sum;
    CUTE_UNROLL
    for (int cj = 0; cj < size<1>(o); ++cj) o(ri, cj) *= inv;
    const int r = get<0>(tOcO_rc(ri, 0));
    if (get<1>(tOcO_rc(ri, 0)) == 0 && r < q_rows) {
      lse_ptr[r] = empty ? -INFINITY : row_max(ri) * p.softmax_scale + logf(sum);
    }
  }

  Tensor r_o = convert_fragment<Elem>(acc_o);
  cp_async_wait<0>();
  __syncthreads();  // sQ (aliased by sO) is no longer read by any thread
  auto r2s_o = make_tiled_copy_C(typename Traits::SmemCopyAtomO{}, tiled_mma);
  auto r2s_o_thr = r2s_o.get_thread_slice(tid);
  Tensor taccOrO = r2s_o_thr.retile_S(r_o);
  Tensor taccOsO = r2s_o_thr.partition_D(sO);
  copy(r2s_o, taccOrO, taccOsO);
  __syncthreads();

  typename Traits::GmemTiledCopyO gmem_copy_o;
  auto gmem_thr_o = gmem_copy_o.get_thread_slice(tid);
  Tensor tOsO = gmem_thr_o.partition_S(sO);  // (CPY, CPY_M, CPY_D)
  Tensor tOgO = gmem_thr_o.partition_D(gO);
  Tensor tOrO = make_tensor<Elem>(shape(tOgO));
  copy(gmem_copy_o, tOsO, tOrO);
  Tensor tOcO_g = gmem_thr_o.partition_D(cO);
  copy_rows<false>(gmem_copy_o, tOrO, tOgO, tOcO_g, q_rows);
}

template <class Traits>
cudaError_t launch(const BsaParams& p, cudaStream_t stream) {
  const int64_t grid = int64_t(p.num_q_blocks) * p.q_heads * p.batch;
  if (grid == 0) return cudaSuccess;
  if (grid > int64_t(INT32_MAX)) return cudaErrorInvalidConfiguration;
  constexpr int kSmem = Traits::kSmemBytes;
  auto kernel = &bsa_fwd_sm80_kernel<Traits>;
  if (kSmem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
    if (err != cudaSuccess) return err;
  }
  BsaParams ordered = p;
  ordered.kv_section = bsa_kv_section(p);
  kernel<<<dim3(unsigned(grid)), dim3(Traits::kNThreads), kSmem, stream>>>(ordered);
  return cudaGetLastError();
}

}  // namespace bsa_sm80

template <typename Elem, int kHeadDim>
cudaError_t run_bsa_fwd_sm80(const BsaParams& params, cudaStream_t stream) {
  static_assert(std::is_same_v<Elem, __half> || std::is_same_v<Elem, __nv_bfloat16>, "Elem: __half or __nv_bfloat16");
  using CuteElem = std::conditional_t<std::is_same_v<Elem, __half>, cutlass::half_t, cutlass::bfloat16_t>;
  if (params.head_dim != kHeadDim || !bsa_unsupported_reason(params).empty()) return cudaErrorInvalidValue;
  // Query tile = one query block; key tiles of 64 (a 128-key block is two tiles).
  if (params.block_size == 128)
    return bsa_sm80::launch<bsa_sm80::Sm80Traits<CuteElem, kHeadDim, 128, 64, 4>>(params, stream);
  return bsa_sm80::launch<bsa_sm80::Sm80Traits<CuteElem, kHeadDim, 64, 64, 4>>(params, stream);
}

}  // namespace proxyattn
