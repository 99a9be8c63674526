// Compile-time shape of the portable block-sparse attention kernel (sm80: mma.sync, cp.async,
// ldmatrix; runs on sm_80 and later): tile sizes, MMA tiling, shared-memory layouts and copy atoms.
//
// One CTA owns one query block (kBlockM = S rows) of one (batch, query head); kNWarps warps tile M,
// each computing rows {16 w + 64 i}. Key tiles of kBlockN keys (a 128-key block is two 64-key
// tiles). Shared memory: sQ [kBlockM, D] (reused for the output tile), sK and sV [kBlockN, D],
// swizzled 8 x 64 atoms (conflict-free 128-bit cp.async writes and ldmatrix reads).
#pragma once

#include <type_traits>

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

namespace proxyattn {
namespace bsa_sm80 {

using namespace cute;

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

}  // namespace bsa_sm80
}  // namespace proxyattn
