// Stage 1 (proxy_block_scores) kernels: one pass over the logits, one 16-bit product per logit.
//   1. pool_kernel<T, D, is_query>: D/8 lanes per kept row j of one (b, group): the mean of the
//      group's heads (fp32 sum in head order, IEEE division by the head count), rounded to fp16
//      into the workspace [B, G, kept rows, D]; rows past the sequence's kept count are zero.
//      Kept query j sits at sequence-local row i0 + j*s with i0 = (-(Nk - Nq)) mod s; kept key j
//      at t = j*s. A finite mean that overflows fp16 marks its (b, group); fix_kernel<T, D> then
//      writes that (b, group)'s rows again as bf16 (docs/design.md section 2: fp16 where the values
//      fit, else a type with fp32's range). reference.group_pool is the same rounding. With G > Hkv
//      the keys are pooled once per KV head (key_sharing, proxy_pool.cuh): the other groups of the
//      head read its first group's rows unless one of the two went to bf16.
//   2. scores_kernel<D, kAligned>: persistent, 8 warps, one work unit at a time from an atomic
//      counter (heaviest causal units first). A unit is `bpc` consecutive query blocks of one
//      (b, group); each block's kept queries are split over `upb` warps of 32 rows, two m16 tiles
//      that share every key fragment (upb = ceil(ceil(S/s)/32), bpc = 8/upb). Kept keys stream
//      through shared memory in tiles of 64 (cp.async, double-buffered). Raw logits x = qbar.kbar
//      from one fp16 (or bf16) mma.sync m16n8k16 per 16x8x16 piece, fp32 accumulation: the
//      products of 16-bit values are exact, so x differs from an fp32 or fp64 evaluation of the
//      rounded vectors only by the order of the fp32 sum. Weights are exp2((x - max) * c) with c =
//      sm * log2(e). One pass: per row an online (max, sum) per thread (the sum rescaled only when
//      the max grows), and the max logit of the row over each key block, L[row][n], written to
//      this CTA's slot of a global scratch [nkb][256 rows]. At the end of the unit, with the rows'
//      final max M_r and sum l_r: A[m, n] = max over rows r of block m of
//      exp2((L[r][n] - M_r) * c) / l_r (monotonic, so this is the max of the row's probabilities
//      inside block n), taken as exp2 of max over r of (L[r][n] - M_r) * c - log2(l_r): one
//      exponential per element; every element of the unit's rows of A is written (0 where no kept pair).
//      kAligned (S % s == 0 and (S/s) % 8 == 0): an 8-key group never straddles key blocks, so
//      block maxima come from per-thread maxima + two quad shuffles. Otherwise each warp stages
//      its 32 x sub-tile logits in shared memory and lane r folds row r's columns into block runs.
//   3. scores_sm90_kernel<D, S/s> (proxy_scores_sm90.cuh), on sm_90 in place of 2 where S/s is a
//      power of two from 8 to 128 (the default geometry) unless the caller asks for the portable
//      kernel: the same per-row work (proxy_scores_rows.cuh) with the logits of 64 query rows x 128
//      keys from one wgmma per warpgroup, the tile's key blocks fixed at compile time; scratch
//      [nkb][128 rows].
// Scores are within ~1e-5 relative of an fp64 evaluation on the same rounded vectors.
#include "kernels/estimate/proxy_scores.h"

#include <algorithm>
#include <cfloat>
#include <climits>
#include <type_traits>

#include "kernels/common/bsa_launch.h"
#include "kernels/estimate/proxy_pool.cuh"
#include "kernels/estimate/proxy_scores_kernel.cuh"
#include "kernels/estimate/proxy_scores_sm90.cuh"

namespace proxyattn {
namespace {

using namespace scores;

// The scores kernel of one call: the Hopper one (scores_sm90_kernel) where the build has sm_90a code,
// the device is sm_90, the geometry is aligned and the caller did not ask for the portable kernel;
// else scores_kernel. slots: its resident CTAs, cta_rows: scratch rows per CTA and key block.
struct ScorePlan {
  bool hopper;
  int slots, cta_rows;
};

bool use_hopper_scores(const ProxyScoresParams& p) {
#ifdef PROXYATTN_HOPPER_KERNELS
  int dev = 0;
  if (p.portable || cudaGetDevice(&dev) != cudaSuccess) return false;
  // Its rows: S/s per query block, a power of two up to the CTA's 128 (8-key groups never straddle
  // key blocks; the block of kept key t is t >> log2(S/s)).
  const int per_block = p.block_size % p.stride == 0 ? p.block_size / p.stride : 0;
  const bool rows_fit = per_block >= 8 && per_block <= scores_sm90::kRows && (per_block & (per_block - 1)) == 0;
  // Its keys by TMA: every (b, group)'s pooled rows in one tensor map, whose coordinates are int32.
  const int64_t key_rows = static_cast<int64_t>(p.batch) * p.num_groups * proxy_scores_kept_rows(p.max_seqlen_k, p.stride);
  return bsa_device_arch(dev) == 90 && rows_fit && key_rows <= INT32_MAX && (p.head_dim == 64 || p.head_dim == 128);
#else
  return false;
#endif
}

// f(std::integral_constant<int, S/s>) for the Hopper scores kernel's key-block widths (8 .. 128,
// use_hopper_scores checked them).
template <class F>
decltype(auto) with_block_keys(const ProxyScoresParams& p, F&& f) {
  switch (p.block_size / p.stride) {
    case 8: return f(std::integral_constant<int, 8>{});
    case 16: return f(std::integral_constant<int, 16>{});
    case 32: return f(std::integral_constant<int, 32>{});
    case 64: return f(std::integral_constant<int, 64>{});
    default: return f(std::integral_constant<int, 128>{});
  }
}

// Resident CTAs of `kernel` (threads, dynamic shared memory smem), at most `units`.
template <class Kernel>
cudaError_t resident_slots(int* slots, Kernel kernel, int threads, int smem, int64_t units) {
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (e != cudaSuccess) return e;
  int dev = 0, sms = 0, occ = 0;
  if ((e = cudaGetDevice(&dev)) != cudaSuccess) return e;
  if ((e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev)) != cudaSuccess) return e;
  if ((e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kernel, threads, smem)) != cudaSuccess) return e;
  *slots = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(units, static_cast<int64_t>(sms) * std::max(occ, 1))));
  return cudaSuccess;
}

template <int D>
cudaError_t plan_for(ScorePlan* plan, const ProxyScoresParams& p) {
  const int64_t bg = static_cast<int64_t>(p.batch) * p.num_groups;
  plan->hopper = use_hopper_scores(p);
  if (plan->hopper) {
    plan->cta_rows = scores_sm90::kRows;
    const int64_t units = bg * scores_sm90::geometry(p.block_size, p.stride, p.nqb).nmb;
    return with_block_keys(p, [&](auto kb) {
      return resident_slots(&plan->slots, scores_sm90::scores_sm90_kernel<D, decltype(kb)::value>,
                            scores_sm90::kThreads, scores_sm90::Traits<D>::kSmemBytes, units);
    });
  }
  plan->cta_rows = kCtaRows;
  const ScoreGeometry geo = score_geometry(p.block_size, p.stride, p.nqb);
  const int64_t units = bg * geo.nmb;
  if (geo.aligned) return resident_slots(&plan->slots, scores_kernel<D, true>, kScoreThreads, score_smem_bytes<D, true>(), units);
  return resident_slots(&plan->slots, scores_kernel<D, false>, kScoreThreads, score_smem_bytes<D, false>(), units);
}

cudaError_t score_plan(ScorePlan* plan, const ProxyScoresParams& p) {
  if (p.head_dim == 64) return plan_for<64>(plan, p);
  if (p.head_dim == 128) return plan_for<128>(plan, p);
  return cudaErrorInvalidValue;
}

// The weights' scale c = sm * log2(e) in [FLT_MIN, FLT_MAX]: 0 would make masked logits NaN (-inf * 0)
// and an infinite c the row maximum NaN (0 * inf); both limits keep their meaning clamped.
inline float weight_scale(float softmax_scale) {
  const float c = static_cast<float>(static_cast<double>(softmax_scale) * 1.4426950408889634);
  return std::min(std::max(c, FLT_MIN), FLT_MAX);
}

template <int D>
cudaError_t launch_scores_kernel(const ProxyScoresParams& p, const ScoreWorkspace& w, const ScorePlan& plan,
                                 cudaStream_t stream) {
  char* ws = static_cast<char*>(p.workspace);
  const float c = weight_scale(p.softmax_scale);
  const auto* q16 = reinterpret_cast<const uint16_t*>(ws + w.q16);
  const auto* k16 = reinterpret_cast<const uint16_t*>(ws + w.k16);
  const auto* flags = reinterpret_cast<const int*>(ws + w.flags);
  auto* counter = reinterpret_cast<unsigned long long*>(ws + w.counter);
  auto* scratch = reinterpret_cast<float*>(ws + w.scratch);
  if (plan.hopper) {
    // The tensor map over every (b, group)'s pooled keys (rows of D 16-bit values; the copy moves bits).
    using Tr = scores_sm90::Traits<D>;
    const int32_t rows = static_cast<int32_t>(static_cast<int64_t>(p.batch) * p.num_groups * w.rows_k);
    auto gK = cute::make_tensor(cute::make_gmem_ptr(reinterpret_cast<const cutlass::half_t*>(k16)),
                                cute::make_shape(rows, cute::Int<D>{}), cute::make_stride(int64_t(D), cute::_1{}));
    const typename Tr::TmaK tma_k = cute::make_tma_copy(cute::SM90_TMA_LOAD{}, gK, cute::take<0, 2>(typename Tr::SmemLayoutK{}),
                                                        cute::Shape<cute::Int<scores_sm90::kKeys>, cute::Int<D>>{}, cute::_1{});
    return with_block_keys(p, [&](auto kb) {
      return launch_chained(scores_sm90::scores_sm90_kernel<D, decltype(kb)::value>, plan.slots, scores_sm90::kThreads,
                            Tr::kSmemBytes, stream, p, c, w.rows_q, w.rows_k, q16, tma_k, rows, flags, counter, scratch);
    });
  }
  if (score_geometry(p.block_size, p.stride, p.nqb).aligned)
    return launch_chained(scores_kernel<D, true>, plan.slots, kScoreThreads, score_smem_bytes<D, true>(), stream, p, c,
                          w.rows_q, w.rows_k, q16, k16, flags, counter, scratch);
  return launch_chained(scores_kernel<D, false>, plan.slots, kScoreThreads, score_smem_bytes<D, false>(), stream, p, c,
                        w.rows_q, w.rows_k, q16, k16, flags, counter, scratch);
}

template <typename T, int D>
cudaError_t launch_scores(const ProxyScoresParams& p, cudaStream_t stream) {
  ScorePlan plan{};
  cudaError_t e = score_plan(&plan, p);
  if (e != cudaSuccess) return e;
  const ScoreWorkspace w = score_workspace(p, plan.slots, plan.cta_rows);
  char* ws = static_cast<char*>(p.workspace);
  // The Hopper kernel's tensor map needs 16-byte aligned rows (the offsets inside are 256-aligned).
  if (plan.hopper && reinterpret_cast<uintptr_t>(ws) % 16 != 0) return cudaErrorMisalignedAddress;
  if ((e = cudaMemsetAsync(ws + w.flags, 0, static_cast<size_t>(w.counter + 8 - w.flags), stream)) != cudaSuccess)
    return e;
  uint16_t* q16 = reinterpret_cast<uint16_t*>(ws + w.q16);
  uint16_t* k16 = reinterpret_cast<uint16_t*>(ws + w.k16);
  int* flags = reinterpret_cast<int*>(ws + w.flags);
  constexpr int kPoolRows = kPoolWarps * pool_rows_per_warp<D>();  // kept rows per pool CTA
  const dim3 pool_q((w.rows_q + kPoolRows - 1) / kPoolRows, p.num_groups, p.batch);
  const dim3 pool_k((w.rows_k + kPoolRows - 1) / kPoolRows, p.num_groups / key_sharing(p), p.batch);
  if (w.rows_q > 0) {
    e = launch_chained(pool_kernel<T, D, true>, pool_q, kPoolWarps * 32, 0, stream, p, w.rows_q, q16, flags);
    if (e != cudaSuccess) return e;
  }
  if (w.rows_k > 0) {
    e = launch_chained(pool_kernel<T, D, false>, pool_k, kPoolWarps * 32, 0, stream, p, w.rows_k, k16, flags);
    if (e != cudaSuccess) return e;
  }
  // fp16 inputs never overflow fp16 (a mean is within its inputs' range).
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    const int64_t rows = std::max(w.rows_q, w.rows_k);
    const dim3 fix(static_cast<unsigned>(std::min<int64_t>(16, (rows + kPoolRows - 1) / kPoolRows)), p.num_groups,
                   p.batch);
    if (rows > 0) {
      e = launch_chained(fix_kernel<T, D>, fix, kPoolWarps * 32, 0, stream, p, w.rows_q, w.rows_k, q16, k16, flags);
      if (e != cudaSuccess) return e;
    }
  }
  return launch_scores_kernel<D>(p, w, plan, stream);
}

}  // namespace

int64_t proxy_scores_workspace_bytes(const ProxyScoresParams& p) {
  ScorePlan plan{false, 1, kCtaRows};
  if (p.batch > 0 && p.num_groups > 0 && p.nqb > 0 && p.nkb > 0 && p.stride >= 1 && score_plan(&plan, p) != cudaSuccess)
    return -1;
  return score_workspace(p, plan.slots, plan.cta_rows).total;
}

template <typename T>
cudaError_t run_proxy_scores(const ProxyScoresParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.num_groups == 0 || p.nqb == 0 || p.nkb == 0) return cudaSuccess;
  if (p.stride < 1) return cudaErrorInvalidValue;
  if (p.head_dim == 64) return launch_scores<T, 64>(p, stream);
  if (p.head_dim == 128) return launch_scores<T, 128>(p, stream);
  return cudaErrorInvalidValue;
}

template cudaError_t run_proxy_scores<half>(const ProxyScoresParams&, cudaStream_t);
template cudaError_t run_proxy_scores<__nv_bfloat16>(const ProxyScoresParams&, cudaStream_t);

}  // namespace proxyattn
