// Register-fragment helpers shared by the attention kernels (CuTe tensors of MMA accumulators):
// reductions over the four lanes that hold one accumulator row (lane / 4 equal), and the
// conversion of an fp32 fragment into 16-bit elements with packed conversions (cvt.rn.bf16x2 /
// f16x2) instead of element-wise copies.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/array.h>
#include <cutlass/numeric_conversion.h>

namespace proxyattn {

// Max / sum over the quad of lanes (lane ^ 1, lane ^ 2) that share an accumulator row.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Owning register copy of an fp32 fragment converted to To (round to nearest), same layout.
template <typename To, class Engine, class Layout>
__device__ __forceinline__ auto convert_fragment(cute::Tensor<Engine, Layout> const& t) {
  constexpr int kN = decltype(cute::size(t))::value;
  cute::Tensor r = cute::make_tensor<To>(t.layout());
  cutlass::NumericArrayConverter<To, float, kN> conv;
  *reinterpret_cast<cutlass::Array<To, kN>*>(r.data()) =
      conv(*reinterpret_cast<cutlass::Array<float, kN> const*>(t.data()));
  return r;
}

// Converts an fp32 fragment into a 16-bit one of the same size in place of dst's registers: a
// 16-bit element-wise copy makes the compiler unpack and repack every pair (PRMT/LOP3, ~130 extra
// instructions per 64 x 128 tile).
template <typename To, class TS, class TD>
__device__ __forceinline__ void convert_into(TS const& src, TD& dst) {
  constexpr int kN = decltype(cute::size(src))::value;
  static_assert(kN == decltype(cute::size(dst))::value, "fragments of one size");
  cutlass::NumericArrayConverter<To, float, kN> conv;
  *reinterpret_cast<cutlass::Array<To, kN>*>(dst.data()) =
      conv(*reinterpret_cast<cutlass::Array<float, kN> const*>(src.data()));
}

}  // namespace proxyattn
