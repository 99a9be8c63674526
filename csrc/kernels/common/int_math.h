// Integer arithmetic with Python's rounding (floor toward -inf), shared by the estimation
// kernels, the block-sparse attention kernels and the C++ benchmark's references. Host and
// device; no CUDA headers needed beyond the __host__ __device__ qualifiers.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PROXYATTN_INT_MATH_HD __host__ __device__
#else
#define PROXYATTN_INT_MATH_HD
#endif

namespace proxyattn {

PROXYATTN_INT_MATH_HD inline int64_t floor_div64(int64_t a, int64_t b) {
  int64_t q = a / b;
  return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}
PROXYATTN_INT_MATH_HD inline int64_t floor_mod64(int64_t a, int64_t b) { return a - floor_div64(a, b) * b; }
// Python-style ceil division (-(-a // b)), also right for negative a.
PROXYATTN_INT_MATH_HD inline int64_t ceil_div64(int64_t a, int64_t b) { return -floor_div64(-a, b); }
// Ceiling division of a >= 0 by b > 0 in 32-bit unsigned arithmetic (a + b - 1 < 2^32 for any two
// such ints): the kernels' block, tile and row counts, cheaper than ceil_div64's signed 64-bit form.
PROXYATTN_INT_MATH_HD inline int ceil_div32(int a, int b) {
  return static_cast<int>((static_cast<uint32_t>(a) + static_cast<uint32_t>(b) - 1u) / static_cast<uint32_t>(b));
}

}  // namespace proxyattn
