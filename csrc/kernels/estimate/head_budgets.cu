// Stage 2 (head_budgets) kernels, v2 (one pass over the logits). Probe rows: the last
// R = min(S, Nq) query rows of head h (sequence-local [Nq - R, Nq)); row i sees keys
// t <= Nk - Nq + i when causal, all keys otherwise. Logits q.k (bf16/fp16 operands, exact
// products, fp32 accumulation on the tensor cores via mma.sync m16n8k16), weighted by exp2 of
// their product with scale*log2(e) (probe_tile, head_budgets_probe.cuh).
//   1. probe_kernel: grid (splits of kProbeSplitKeys keys, Hq, B), 8 warps x 16 rows; per
//      row an online (max, sum) over the split's keys whose max is shared by the row's four
//      lanes, so that the running sum of each key block (blocks never straddle a split nor
//      a 64-key tile) lives in the same frame: at the block's end its sum of
//      exp2((x - ref) * scale * log2(e)) and ref (the running max of the raw logits then) go
//      to the workspace; the split's (max, sum) too.
//      On sm_90, unless the caller asks for the portable kernel, probe_sm90_kernel
//      (head_budgets_sm90.cuh) does the same with the logits of 64 rows x 128 keys from one wgmma
//      per warpgroup; the per-row work of a 64-key tile is shared (head_budgets_probe.cuh).
//   2. finalize_kernel: one CTA per (b, h): merge the splits' (max, sum) per row (M, L),
//      mass[n] = sum over rows (ascending) of blocksum * exp2((ref - M) * scale * log2(e)) / L,
//      divided by R (ref and M raw logits);
//      w = mass / sum(mass) over [0, c_last), base = sum of w over the forced blocks
//      (ascending n), bitonic sort of the non-forced w descending, then one thread
//      accumulates base + w_0 + w_1 + ... in fp32 and stops at the first running sum >= gamma
//      (gamma rounded to fp32, as torch compares an fp32 tensor with a Python float).
// Deterministic. Tolerance vs the PyTorch reference: w differs from the reference's by fp32
// rounding (~1e-6 relative, different summation order and mma accumulation), so kstar is
// identical except for heads whose reference cumulative sum lands within ~1e-5 of gamma at
// the crossing (or whose sorted order swaps two w within that tolerance at the crossing).
#include "kernels/estimate/head_budgets.h"

#include <climits>

#include "kernels/common/bsa_launch.h"
#include "kernels/common/chained_launch.cuh"
#include "kernels/estimate/estimate_common.cuh"
#include "kernels/estimate/head_budgets_probe.cuh"
#include "kernels/estimate/head_budgets_sm90.cuh"

namespace proxyattn {
namespace {

using namespace budgets;

constexpr int kFinalizeThreads = 1024;

__device__ inline void ldmatrix_x4(uint32_t r[4], const uint16_t* smem) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

template <typename T, int D>
__global__ void __launch_bounds__(kProbeThreads, 2) probe_kernel(const HeadBudgetsParams p) {
  pdl_wait();  // chained_launch.cuh: before any global memory access
  pdl_launch_dependents();
  constexpr int kStride = D + 8;  // halves per smem key row (conflict-free ldmatrix)
  __shared__ alignas(16) uint16_t ks[2][kKeyTile * kStride];

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t4 = lane & 3;
  const BudgetWorkspace ws = budget_workspace(p, gridDim.x);
  const ProbeSplit ps = probe_split(p, warp, g);
  float2* partial = probe_partials(ws, ps);
  if (ps.empty) return;
  const bool warp_active = warp * 16 < ps.R;

  // Query fragments (A operand, row-major 16 x D per warp), straight from global memory.
  const T* qb = static_cast<const T*>(p.q) + blockIdx.z * p.q_batch_stride + blockIdx.y * p.q_head_stride;
  uint32_t qa[D / 16][4];
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int r = warp * 16 + g + 8 * e;
    const bool valid = r < ps.R;
    const T* qrow = qb + (ps.sb.q_start + (ps.sb.nq - ps.R + r)) * p.q_row_stride;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      qa[kk][e] = valid ? *reinterpret_cast<const uint32_t*>(qrow + kk * 16 + 2 * t4) : 0u;
      qa[kk][e + 2] = valid ? *reinterpret_cast<const uint32_t*>(qrow + kk * 16 + 8 + 2 * t4) : 0u;
    }
  }

  const float scale2 = p.softmax_scale * kLog2e;
  ProbeRowsState st;

  auto load_tile = [&](int tile, int buf) {
    constexpr int kChunks = kKeyTile * D / 8;  // 16-byte chunks
#pragma unroll
    for (int c = threadIdx.x; c < kChunks; c += kProbeThreads) {
      const int kr = c / (D / 8), kc = c % (D / 8);
      const int key = ps.k0 + tile * kKeyTile + kr;
      const bool ok = key < ps.k1;
      const T* src = ok ? probe_key_row<T>(p, ps, key) + kc * 8 : static_cast<const T*>(p.k);
      cp_async_16(&ks[buf][kr * kStride + kc * 8], src, ok ? 16 : 0);
    }
    cp_async_commit();
  };
  const int ld_off = ((lane >> 4) * 8 + (lane & 7)) * kStride + ((lane >> 3) & 1) * 8;

  const int ntiles = ceil_div32(ps.k1 - ps.k0, kKeyTile);
  load_tile(0, 0);
  for (int j = 0; j < ntiles; ++j) {
    if (j + 1 < ntiles) {
      load_tile(j + 1, (j + 1) & 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (warp_active) {
      float acc[kKeyTile / 8][4];
#pragma unroll
      for (int nt = 0; nt < kKeyTile / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
        for (int np = 0; np < kKeyTile / 16; ++np) {
          uint32_t bf[4];
          ldmatrix_x4(bf, &ks[j & 1][ld_off + np * 16 * kStride + kk * 16]);
          MmaTraits<T>::mma(acc[2 * np], qa[kk], &bf[0]);
          MmaTraits<T>::mma(acc[2 * np + 1], qa[kk], &bf[2]);
        }
      }
      const int tile0 = ps.k0 + j * kKeyTile;
      probe_tile([&](int e, int col) -> float& { return acc[col >> 1][2 * e + (col & 1)]; }, tile0, ps, scale2, t4,
                 st);
      if (probe_block_ends(ps, tile0) || j + 1 == ntiles)  // the key block of this tile ends here
        probe_block_end(ws, ps, tile0 >> ps.block_shift, warp, g, t4, scale2, st);
    }
    __syncthreads();  // the buffer read above is refilled next iteration
  }
  probe_finish(partial, warp, g, t4, scale2, st);
}

__global__ void __launch_bounds__(kFinalizeThreads) finalize_kernel(const HeadBudgetsParams p, int num_splits) {
  pdl_wait();  // chained_launch.cuh: before any global memory access
  pdl_launch_dependents();
  extern __shared__ float sorted[];  // [pow2 >= non-forced count]
  __shared__ float red[kFinalizeThreads / 32];
  __shared__ float s_m[kProbeRows], s_inv[kProbeRows];
  const int h = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
  const int64_t bh = static_cast<int64_t>(b) * p.num_heads + h;
  const BudgetWorkspace ws = budget_workspace(p, num_splits);
  float* mass = ws.mass + bh * p.nkb;
  const SeqBounds sb = load_seq_bounds(p.cu_seqlens_q, p.cu_seqlens_k, b, p.max_seqlen_q, p.max_seqlen_k,
                                       p.total_q, p.total_k);
  const int S = p.block_size;
  const int nqb_seq = ceil_div32(sb.nq, S);
  const int c_last = nqb_seq > 0 ? candidate_count(nqb_seq - 1, sb.nq, sb.nk, S, p.causal) : 0;
  if (c_last == 0) {
    if (tid == 0) p.kstar[bh] = 0;
    return;
  }
  const ForcedSplit fl =
      split_forced(nqb_seq - 1, sb.nq, sb.nk, S, c_last, p.sink_blocks, p.local_blocks, p.causal);
  const int R = min(S, sb.nq);
  const float scale2 = p.softmax_scale * kLog2e;  // the probe's maxima are raw logits

  // Row statistics: merge the splits (in split order).
  if (tid < kProbeRows) {
    float m = -INFINITY, l = 0.f;
    const float2* part = ws.partial + bh * num_splits * kProbeRows + tid;
    constexpr int kBatch = 8;  // loads in flight; the merges stay in split order
    for (int sp0 = 0; sp0 < num_splits; sp0 += kBatch) {
      float2 v[kBatch];
#pragma unroll
      for (int i = 0; i < kBatch; ++i)
        v[i] = sp0 + i < num_splits ? part[static_cast<int64_t>(sp0 + i) * kProbeRows] : make_float2(-INFINITY, 0.f);
#pragma unroll
      for (int i = 0; i < kBatch; ++i)
        if (sp0 + i < num_splits) merge_scaled(m, l, v[i].x, v[i].y, scale2);
    }
    const bool on = tid < R && m != -INFINITY && l > 0.f;
    s_m[tid] = on ? m : 0.f;
    s_inv[tid] = on ? 1.f / l : 0.f;
  }
  __syncthreads();
  // Block masses over [0, c_last): mean over the rows (ascending) of the row's probabilities.
  for (int n = tid; n < c_last; n += kFinalizeThreads) {
    float tot = 0.f;
#pragma unroll 8
    for (int r = 0; r < R; ++r) {
      const float inv = s_inv[r];
      const int64_t at = (bh * kProbeRows + r) * p.nkb + n;
      const float v = ws.bsum[at];
      if (inv > 0.f && v > 0.f) tot += v * exp2f((ws.bref[at] - s_m[r]) * scale2) * inv;
    }
    mass[n] = tot / static_cast<float>(R);
  }
  __syncthreads();  // mass (global) is read back by other threads of this CTA

  // Total mass: per-thread strided sums, then a fixed tree.
  float part = 0.f;
  for (int n = tid; n < c_last; n += kFinalizeThreads) part += mass[n];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
  if ((tid & 31) == 0) red[tid >> 5] = part;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kFinalizeThreads / 32; ++w) total += red[w];

  const int cnt = fl.free_hi - fl.free_lo;
  int pw = 1;
  while (pw < cnt) pw <<= 1;
  for (int i = tid; i < pw; i += kFinalizeThreads) sorted[i] = i < cnt ? mass[fl.free_lo + i] / total : -1.f;
  __syncthreads();
  for (int size = 2; size <= pw; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = tid; i < pw / 2; i += kFinalizeThreads) {
        const int lo = 2 * i - (i & (stride - 1));
        const int hi = lo + stride;
        const bool desc = (lo & size) == 0;
        const float a = sorted[lo], c = sorted[hi];
        if (desc ? (a < c) : (a > c)) {
          sorted[lo] = c;
          sorted[hi] = a;
        }
      }
      __syncthreads();
    }
  }
  if (tid == 0) {
    int kst = 0;
    if (total > 0.f) {
      float base = 0.f;
      for (int n = 0; n < fl.free_lo; ++n) base += mass[n] / total;  // the forced blocks, ascending
      for (int n = fl.free_hi; n < c_last; ++n) base += mass[n] / total;
      const float gamma = p.gamma;
      if (!(base >= gamma)) {
        // The same sums in the same order as one add per step; eight values read ahead at a time.
        kst = cnt;
        float cum = base;
        constexpr int kBatch = 8;
        for (int i0 = 0; i0 < cnt; i0 += kBatch) {
          float v[kBatch];
#pragma unroll
          for (int i = 0; i < kBatch; ++i) v[i] = i0 + i < cnt ? sorted[i0 + i] : 0.f;
          int hit = -1;
#pragma unroll
          for (int i = 0; i < kBatch; ++i) {
            if (hit < 0 && i0 + i < cnt) {
              cum += v[i];
              if (cum >= gamma) hit = i;
            }
          }
          if (hit >= 0) {
            kst = i0 + hit + 1;
            break;
          }
        }
      }
    }
    p.kstar[bh] = kst;
  }
}

// The Hopper probe where the build has sm_90a code, the device is sm_90, the caller did not ask
// for the portable kernel, and (contiguous keys) a tensor map can address k: at least one and
// fewer than 2^31 rows, strides as tma_stride_ok (bsa_launch.h) takes them. Otherwise the portable
// probe, which reads any strides.
bool use_hopper_probe(const HeadBudgetsParams& p) {
#ifdef PROXYATTN_HOPPER_KERNELS
  int dev = 0;
  if (p.portable || cudaGetDevice(&dev) != cudaSuccess || bsa_device_arch(dev) != 90) return false;
  if (p.pages.paged()) return true;  // paged keys by cp.async: no tensor map
  const int64_t batches = p.cu_seqlens_k != nullptr ? 1 : p.batch;
  return p.total_k >= 1 && p.total_k <= INT32_MAX && tma_stride_ok(p.total_k, p.k_row_stride) &&
         tma_stride_ok(p.num_kv_heads, p.k_head_stride) && tma_stride_ok(batches, p.k_batch_stride);
#else
  return false;
#endif
}

template <typename T, int D>
cudaError_t launch_probe(const HeadBudgetsParams& p, cudaStream_t stream, int num_splits) {
  const dim3 grid(num_splits, p.num_heads, p.batch);
  if (use_hopper_probe(p)) {
    using Tr = budgets_sm90::Traits<T, D>;
    constexpr int kSmem = Tr::kSmemBytes;
    // Contiguous keys by TMA: the tensor map (rows, D, Hkv, batch), total_k rows: one sequence's
    // (fixed length) or every one's (varlen: one batch). Paged keys by cp.async (no map).
    const bool paged = p.pages.paged();
    const int32_t rows = paged ? 0 : static_cast<int32_t>(p.total_k);
    const int32_t batches = p.cu_seqlens_k != nullptr ? 1 : p.batch;
    typename Tr::TmaK tma_k{};
    if (!paged) {
      using bsa_sm90::tma_stride;
      auto gK = cute::make_tensor(
          cute::make_gmem_ptr(static_cast<typename Tr::Elem const*>(p.k)),
          cute::make_shape(rows, cute::Int<D>{}, int32_t(p.num_kv_heads), batches),
          cute::make_stride(tma_stride(rows, p.k_row_stride, D), cute::_1{}, tma_stride(p.num_kv_heads, p.k_head_stride, D),
                            tma_stride(batches, p.k_batch_stride, D)));
      tma_k = cute::make_tma_copy(cute::SM90_TMA_LOAD{}, gK, cute::take<0, 2>(typename Tr::SmemLayoutK{}),
                                  cute::Shape<cute::Int<budgets_sm90::kKeys>, cute::Int<D>>{}, cute::_1{});
    }
    auto kernel = paged ? budgets_sm90::probe_sm90_kernel<T, D, false> : budgets_sm90::probe_sm90_kernel<T, D, true>;
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
    if (e != cudaSuccess) return e;
    return launch_chained(kernel, grid, budgets_sm90::kThreads, kSmem, stream, p, tma_k, rows, batches);
  }
  return launch_chained(probe_kernel<T, D>, grid, kProbeThreads, 0, stream, p);
}

}  // namespace

template <typename T>
cudaError_t run_head_budgets(const HeadBudgetsParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.num_heads == 0) return cudaSuccess;
  // A key block is whole 64-key tiles (a tile's sums belong to one block) within one split.
  if (p.nkb > kBudgetMaxBlocks || p.block_size <= 0 || p.block_size > kProbeRows || p.block_size % kKeyTile != 0 ||
      kProbeSplitKeys % p.block_size != 0)
    return cudaErrorInvalidValue;
  const int num_splits = head_budgets_num_splits(p.max_seqlen_k);
  cudaError_t e = p.head_dim == 64    ? launch_probe<T, 64>(p, stream, num_splits)
                  : p.head_dim == 128 ? launch_probe<T, 128>(p, stream, num_splits)
                                      : cudaErrorInvalidValue;
  if (e != cudaSuccess) return e;
  const size_t smem = head_budgets_finalize_smem_bytes(p.nkb);
  if (smem > 48 * 1024) {
    e = cudaFuncSetAttribute(finalize_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  return launch_chained(finalize_kernel, dim3(p.num_heads, p.batch), kFinalizeThreads, smem, stream, p, num_splits);
}

template cudaError_t run_head_budgets<half>(const HeadBudgetsParams&, cudaStream_t);
template cudaError_t run_head_budgets<__nv_bfloat16>(const HeadBudgetsParams&, cudaStream_t);

}  // namespace proxyattn
