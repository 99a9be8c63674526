// Online softmax of the Hopper kernel, per 64 x 128 score tile of one consumer warpgroup, in fp32
// and the log2 domain (exp2 of the scores times softmax_scale * log2(e)).
//
// State per accumulator row held by a thread (kRows = 2 rows per thread): row_max, the running
// max of the raw scores, and row_sum, this thread's partial sum of exp2(s * scale_log2 - base)
// (the quad of lanes sharing a row holds the row's four partial sums; the epilogue adds them).
// The running max is exact: it moves on every key block whose max exceeds it, and O is rescaled
// by exp2(old - new) only on the key blocks where some row of the warp moved (a warp vote; corr is
// exactly 1 for the rows that did not), so the output equals that of rescaling on every block.
#pragma once

#include <cmath>

#include <cute/tensor.hpp>

#include "kernels/bsa_sm90/utils.cuh"
#include "kernels/common/fragment.cuh"

namespace proxyattn {
namespace bsa_sm90 {

using namespace cute;

// Mask (only tiles crossing the diagonal or the end of the keys: key0 + kBlockN - 1 > full_key)
// and online softmax of one score tile acc_s whose first key is key0: row_max / row_sum updated,
// acc_s replaced by exp2(s * scale_log2 - base), corr(ri) the factor the previous O rows must be
// scaled by. Row r (sequence-local query row q_start + r) sees keys <= diag + r when causal, all
// keys below seqlen_k otherwise. tScS_rc: the (row, col) coordinates of acc_s's elements.
// Returns whether a row of this thread moved its max; the caller rescales O only when a row of
// the warp did (rescale_rows).
template <int kBlockN, class TS, class TC, class TR>
__device__ __forceinline__ bool online_softmax_tile(TS& acc_s, TC const& tScS_rc, int key0, int full_key, int diag,
                                                    int seqlen_k, bool causal, float scale_log2, TR& row_max,
                                                    TR& row_sum, TR& corr) {
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
    // First visible key (old max -inf, new max finite): +inf > 0 moves it, corr exp2(-inf) = 0.
    // No visible key so far (both -inf): NaN > 0 is false; base 0 makes exp2(-inf - 0) = 0.
    const float ref = row_max(ri) * scale_log2, run = mx * scale_log2;
    const bool move = run - ref > 0.f;
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
// moved the kernel's wait above all the exponentials (its conversion of P writes the registers the
// in-flight P V still reads, and it hoisted the wait to start those conversions early), so the
// softmax ran after the P V instead of beside it. With a branch here on a value that needs every
// exponential of the tile (the row sums), ptxas keeps the wait after the softmax; the branch is
// never taken (a sum of exponentials is not negative, and NaN compares false).
// tests/test_sass.py checks the order in the compiled code of every Hopper kernel.
template <class TR>
__device__ __forceinline__ void softmax_fence(TR const& row_sum) {
  float t = 0.f;
  CUTE_UNROLL
  for (int ri = 0; ri < decltype(size(row_sum))::value; ++ri) t += row_sum(ri);
  if (t < 0.f) asm volatile("membar.cta;" ::: "memory");
}

// O rows *= corr, when a row of the warp moved its max (moved: this thread's rows; corr is 1 for
// the rows that did not). The condition is uniform over the warp.
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

}  // namespace bsa_sm90
}  // namespace proxyattn
