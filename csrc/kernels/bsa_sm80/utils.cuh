// Device helpers of the portable kernel: views of mma.sync m16n8 accumulator fragments, a
// row-predicated tiled copy, and the two GEMMs of a key tile (S = Q K^T from shared memory,
// O += P V with P in registers), each overlapping the ldmatrix of k-slice k + 1 with MMA k.
#pragma once

#include <cute/tensor.hpp>

namespace proxyattn {
namespace bsa_sm80 {

using namespace cute;

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

}  // namespace bsa_sm80
}  // namespace proxyattn
