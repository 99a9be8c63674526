// Epilogue of the Hopper kernel: the output rows of one work item (query block m of head h of
// sequence b) and their lse.
//   store_rows (consumers): O / rowsum straight from the wgmma accumulator registers as 32-bit
//     column pairs into out (row stride out_row_stride, last dimension contiguous), lse = max *
//     softmax_scale + log(sum) per row (natural log); a row whose sum is 0 saw no key: O 0, lse -inf.
//   store_empty_item (scheduler warp): out 0 and lse -inf for an item with no visible selected
//     block, which never reaches the consumers; 16-byte stores over the item's rows.
// Rows at or past q_rows (the end of the sequence) are never written.
#pragma once

#include <cmath>
#include <cstdint>

#include <cute/tensor.hpp>
#include <cutlass/array.h>

#include "kernels/bsa_sm90/utils.cuh"
#include "kernels/common/fragment.cuh"

namespace proxyattn {
namespace bsa_sm90 {

using namespace cute;

// acc_o: the consumer thread's O fragment; tOcO_rc its (row, col) coordinates; mx / sm the rows'
// running max and partial sums; o_ptr / lse_ptr the item's first output row and lse entry.
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

// One warp (all lanes) writes out 0 and lse -inf for the q_rows rows of an item.
template <typename Elem, int kHeadDim>
__device__ __forceinline__ void store_empty_item(Elem* o_ptr, float* lse_ptr, int q_rows, int64_t out_row_stride,
                                                 int lane) {
  constexpr int kChunks = kHeadDim * int(sizeof(Elem)) / 16;  // 16-byte pieces per row
  for (int e = lane; e < q_rows * kChunks; e += 32) {
    const int r = e / kChunks, c = e % kChunks;
    reinterpret_cast<uint4*>(o_ptr + int64_t(r) * out_row_stride)[c] = make_uint4(0, 0, 0, 0);
  }
  for (int r = lane; r < q_rows; r += 32) lse_ptr[r] = -INFINITY;
}

}  // namespace bsa_sm90
}  // namespace proxyattn
