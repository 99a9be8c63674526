// The portable block-sparse attention kernel (sm80 path: mma.sync, cp.async, ldmatrix; runs on
// sm_80 and later, the fallback wherever the Hopper kernel does not run). FlashAttention-2 style:
// one CTA owns one query block (kBlockM = S rows) of one (batch, query head) and walks that block's
// selected key blocks (TileCursor, tile_cursor.cuh), each as S / kBlockN key tiles, in descending
// order, with an online softmax in fp32 (exp2). Only tiles that cross the causal diagonal or the end
// of the keys take the masked path. Layouts: kernels/common/bsa_params.h.
// Paged K/V (p.pages.paged(), uniform over the grid): each K/V tile row is looked up in the page
// table (copy_rows_paged, utils.cuh) into the same shared layout; the rest is the same code.
//
// Pipeline per key tile (single K and V buffers, as FA2): wait K -> issue V load -> S = Q K^T ->
// mask -> wait V -> issue the next K load -> online softmax -> O += P V. So the V load overlaps the
// first GEMM and the next K load overlaps the softmax and the second GEMM.
// Epilogue: O / rowsum and lse per row, O through sQ (reused as sO) for 128-bit stores.
//
// Grid: one CTA per work item (b, h, m) in bsa_tile's order (kernels/common/bsa_params.h).
#pragma once

#include <cmath>
#include <cstdint>

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "kernels/bsa_sm80/tile_cursor.cuh"
#include "kernels/bsa_sm80/traits.cuh"
#include "kernels/bsa_sm80/utils.cuh"
#include "kernels/common/chained_launch.cuh"
#include "kernels/common/bsa_params.h"
#include "kernels/common/bsa_selection.cuh"
#include "kernels/common/fragment.cuh"
#include "kernels/common/int_math.h"
#include "kernels/common/seq_bounds.cuh"

namespace proxyattn {
namespace bsa_sm80 {

using namespace cute;

// One work item (b, h, m); kPaged: K/V rows through the page table.
template <class Traits, bool kPaged>
__device__ __forceinline__ void bsa_fwd_sm80_item(const BsaParams& p) {
  using Elem = typename Traits::Elem;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kSub = kBlockM / kBlockN;  // key tiles per key block (block_size == kBlockM)

  extern __shared__ __align__(128) char bsa_smem[];

  const int tid = threadIdx.x;
  // Work item (bsa_tile's order per kv_section, heaviest rows first).
  const BsaTile tile = bsa_tile(int(blockIdx.x), p);
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
  // Paged: k_ptr / v_ptr are the KV head in the cache; every key's page and slot come per tile.
  const Elem* k_ptr = static_cast<const Elem*>(p.k) +
                      (kPaged ? 0 : varlen ? k_row0 * p.k_row_stride : b * p.k_batch_stride) +
                      int64_t(kvh) * p.k_head_stride;
  const Elem* v_ptr = static_cast<const Elem*>(p.v) +
                      (kPaged ? 0 : varlen ? k_row0 * p.v_row_stride : b * p.v_batch_stride) +
                      int64_t(kvh) * p.v_head_stride;
  Elem* o_ptr = static_cast<Elem*>(p.out) + (varlen ? q_row0 * p.out_row_stride : b * p.out_batch_stride) +
                int64_t(q_start) * p.out_row_stride + int64_t(h) * p.out_head_stride;
  float* lse_ptr = p.lse + (varlen ? q_row0 : b * p.lse_batch_stride) + int64_t(h) * p.lse_head_stride + q_start;

  // Index row of (b, h, m).
  const int nkb = ceil_div32(seqlen_k, kBlockM);
  const int count = bsa_row_count(p, b, h, m, max_key);  // 0 when no row of this tile sees any key
  TileCursor<kSub, kBlockN> cursor(bsa_index_row(p, b, h, m), count, nkb, max_key);

  // Global views. K/V: the whole sequence as (seqlen_k, D), tiled into (kBlockN, D, n_tiles); not
  // read when paged.
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

  // K/V tile `t` into sK/sV, rows past seqlen_k zeroed: contiguous through the tiled copy, paged
  // row by row through the page table into the same shared addresses. Same fences and waits.
  auto load_tile = [&](auto const& tg, auto& ts, const Elem* base, int64_t page_stride, int64_t row_stride, int t) {
    if constexpr (kPaged) {
      copy_rows_paged(base, ts, tKVcKV, seqlen_k - t * kBlockN, p.pages, b, t * kBlockN, page_stride, row_stride);
    } else {
      copy_rows<true>(gmem_copy, tg(_, _, _, t), ts, tKVcKV, seqlen_k - t * kBlockN);
    }
  };
  auto load_k = [&](int t) { load_tile(tKgK, tKsK, k_ptr, p.pages.k_page_stride, p.k_row_stride, t); };
  auto load_v = [&](int t) { load_tile(tVgV, tVsV, v_ptr, p.pages.v_page_stride, p.v_row_stride, t); };

  bool have = cursor.advance();
  if (have) {
    copy_rows<true>(gmem_copy, tQgQ, tQsQ, tQcQ, q_rows);
    load_k(cursor.tile());
    cp_async_fence();
  }

  while (have) {
    const int tile = cursor.tile();
    const int key0 = tile * kBlockN;

    cp_async_wait<0>();  // K (and, first time, Q) landed
    __syncthreads();     // ... for every thread; and every thread is done reading the old V
    load_v(tile);
    cp_async_fence();

    Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});  // (MMA, MMA_M, MMA_N)
    clear(acc_s);
    gemm_ss(acc_s, tSrQ, tSrK, tSsQ, tSsK, tiled_mma, s2r_q, s2r_k, s2r_q_thr, s2r_k_thr);

    Tensor s = make_tensor(acc_s.data(), acc_rowcol(acc_s.layout()));  // (rows, cols)
    if (key0 + kBlockN - 1 > full_key) {
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
      load_k(cursor.tile());
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

// Paged or contiguous is one branch per CTA; each path is its own inlined copy of the item, so the
// contiguous one keeps the register allocation of a kernel without pages (a branch at every copy
// instead cost 10-20 registers and crossed 168, the limit for three CTAs per SM, at D = S = 64).
// kPaged is chosen by the launcher from p.pages.paged(), so each variant gets its own registers.
template <class Traits, bool kPaged>
__global__ void __launch_bounds__(Traits::kNThreads, 2) bsa_fwd_sm80_kernel(const BsaParams p) {
  pdl_wait();  // chained_launch.cuh: before any global memory access
  pdl_launch_dependents();
  bsa_fwd_sm80_item<Traits, kPaged>(p);
}

}  // namespace bsa_sm80
}  // namespace proxyattn
