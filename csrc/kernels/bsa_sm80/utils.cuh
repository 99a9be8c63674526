// Device helpers of the portable kernel: views of mma.sync m16n8 accumulator fragments, a
// row-predicated tiled copy and its paged counterpart for K/V tiles, and the two GEMMs of a key
// tile (S = Q K^T from shared memory, O += P V with P in registers), each overlapping the ldmatrix
// of k-slice k + 1 with MMA k.
#pragma once

#include <cstdint>

#include <cute/tensor.hpp>

#include "kernels/common/kv_pages.h"

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

// copy_rows<true> for a K or V tile read through pages (kernels/common/kv_pages.h): row r of the
// tile is key key0 + r of sequence b, at base + pages.offset(b, key0 + r, page_stride, row_stride)
// (base: the KV head in the cache), one table lookup per row, all issued before the copies. dst and
// coord are the tiled copy's partitions of the shared tile and of its identity tensor; each 16-byte
// chunk goes by cp.async to dst(0, mi, ki), the address the tiled copy writes (same swizzle). Rows
// >= rows (>= 1) are zeroed, as copy_rows<true> does.
template <class Elem, class Dst, class Coord>
__device__ __forceinline__ void copy_rows_paged(const Elem* base, Dst&& dst, Coord const& coord, int rows,
                                                const KvPages& pages, int b, int key0, int64_t page_stride,
                                                int64_t row_stride) {
  static_assert(decltype(size<0>(dst))::value * sizeof(Elem) == 16, "one 16-byte chunk per copy");
  constexpr int kRows = decltype(size<1>(dst))::value;
  int64_t off[kRows];
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    const int r = min(get<0>(coord(0, mi, 0)), rows - 1);  // clamped: the table is read inside the sequence
    off[mi] = pages.offset(b, key0 + r, page_stride, row_stride);
  }
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    if (get<0>(coord(0, mi, 0)) < rows) {
      CUTE_UNROLL
      for (int ki = 0; ki < size<2>(dst); ++ki) {
        SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>::copy(
            *reinterpret_cast<const cute::uint128_t*>(base + off[mi] + get<1>(coord(0, mi, ki))),
            *reinterpret_cast<cute::uint128_t*>(&dst(0, mi, ki)));
      }
    } else {
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
