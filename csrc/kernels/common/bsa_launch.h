// Host entry point of the block-sparse attention forward: the choice of kernel for one call and
// the dispatch over kernel, dtype and head dim to the per-instantiation launchers
// (kernels/bsa_sm80/launch.cuh, portable; kernels/bsa_sm90/launch.cuh, Hopper sm_90a; explicitly
// instantiated in csrc/instantiations/).
//
// One call:
//   const BsaPlan plan = bsa_plan(params, backend);   // once: arch, supported shapes, work order
//   if (!plan.error.empty()) ...                        // refuse, naming the value
//   if (plan.path == BsaPath::kHopper) params.tile_counter = <zeroed device int32>;
//   run_bsa_fwd(params, is_bf16, plan, stream);
// The backend comes from the caller (the op glue reads PROXYATTN_BSA_BACKEND, the C++ benchmark
// its --backend option): kAuto takes the Hopper kernel where the device is sm_90 and it supports
// the parameters, else the portable one; kPortable always the portable (sm80) kernel; kHopper the
// Hopper kernel or an error saying why not.
//
// Paged K/V (params.pages.paged(); layout in kernels/common/bsa_params.h): both kernels read pages
// of every supported size (16 to 256 tokens): the portable one with a table lookup per key row of
// a tile, the Hopper one with TMA boxes (one per key block for pages of 128 or more, else 16-slot
// boxes, each from its page).
//
// Torch-free and CuTe-free, so the torch glue and the C++ benchmark can include it with a host
// compiler.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <climits>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#include "kernels/common/bsa_params.h"

namespace proxyattn {

// Elem: __half or __nv_bfloat16. kHeadDim: 64 or 128. Called by run_bsa_fwd with parameters its
// plan accepted (and params.kv_section set); they re-check only what keeps the launch itself sound.
// Defined once each in csrc/instantiations/bsa_fwd_<arch>_<dtype>_hdim<D>.cu; declared extern so no
// other translation unit compiles a kernel body.
template <typename Elem, int kHeadDim>
cudaError_t run_bsa_fwd_sm80(const BsaParams& params, cudaStream_t stream);  // block_size 64 or 128
extern template cudaError_t run_bsa_fwd_sm80<__half, 64>(const BsaParams&, cudaStream_t);
extern template cudaError_t run_bsa_fwd_sm80<__half, 128>(const BsaParams&, cudaStream_t);
extern template cudaError_t run_bsa_fwd_sm80<__nv_bfloat16, 64>(const BsaParams&, cudaStream_t);
extern template cudaError_t run_bsa_fwd_sm80<__nv_bfloat16, 128>(const BsaParams&, cudaStream_t);

template <typename Elem, int kHeadDim>
cudaError_t run_bsa_fwd_sm90(const BsaParams& params, cudaStream_t stream);  // block_size 128, sm_90a
extern template cudaError_t run_bsa_fwd_sm90<__half, 64>(const BsaParams&, cudaStream_t);
extern template cudaError_t run_bsa_fwd_sm90<__half, 128>(const BsaParams&, cudaStream_t);
extern template cudaError_t run_bsa_fwd_sm90<__nv_bfloat16, 64>(const BsaParams&, cudaStream_t);
extern template cudaError_t run_bsa_fwd_sm90<__nv_bfloat16, 128>(const BsaParams&, cudaStream_t);

// The largest softmax_scale the attention kernels take: their exp2 factor scale * log2(e) must be a
// finite float (a round bound below FLT_MAX / log2(e) = 2.36e38). The estimation stages take any
// finite positive scale (stage 1 clamps its factor; stage 2's scale is clamped to this bound), and
// give the argmax limit where logit * scale overflows (the rounded frame of estimate_common.cuh).
inline constexpr double kMaxSoftmaxScale = 2.3e38;

enum class BsaBackend { kAuto, kPortable, kHopper };
enum class BsaPath { kPortable, kHopper };

inline constexpr const char* kBsaBackendNames = "auto, portable, hopper";

// The backend named by `name` ("auto", "portable", "hopper"; nullptr or "" is "auto"). False, with
// *backend untouched, for any other name.
inline bool bsa_backend_parse(const char* name, BsaBackend* backend) {
  if (name == nullptr || *name == 0 || std::strcmp(name, "auto") == 0) {
    *backend = BsaBackend::kAuto;
  } else if (std::strcmp(name, "portable") == 0) {
    *backend = BsaBackend::kPortable;
  } else if (std::strcmp(name, "hopper") == 0) {
    *backend = BsaBackend::kHopper;
  } else {
    return false;
  }
  return true;
}

// Whether a tensor map can step over a dimension of `size` 16-bit elements `stride` elements apart:
// a size-1 dimension's stride is never used; any other needs a positive multiple of 8 elements (16
// bytes) below 2^39 elements (2^40 bytes). The attention kernel's and stage 2's maps over the
// caller's tensors both hold to it.
inline bool tma_stride_ok(int64_t size, int64_t stride) {
  return size <= 1 || (stride > 0 && stride % 8 == 0 && stride < (int64_t(1) << 39));
}

// Compute capability of device `dev` as major * 10 + minor, queried once per device (no sync).
inline int bsa_device_arch(int dev) {
  static std::atomic<int> cache[64] = {};
  if (dev >= 0 && dev < 64) {
    const int v = cache[dev].load(std::memory_order_relaxed);
    if (v != 0) return v;
  }
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return -1;
  }
  const int v = major * 10 + minor;
  if (dev >= 0 && dev < 64) cache[dev].store(v, std::memory_order_relaxed);
  return v;
}

// Empty when the kernels support these parameters, else what is wrong, naming the value. Paged K/V
// needs varlen q and key lengths (cu_seqlens_q/k), page sizes 16 to 256 (page_shift 4 to 8) and at
// least one page; the kernel addresses the cache in int64 (page * page_stride + slot * row_stride),
// so its extent num_pages * page_stride has no int32 limit, and page numbers are clamped into
// [0, num_pages). Alignment (16-byte pointers, strides in multiples of 8 elements) is the caller's.
inline std::string bsa_unsupported_reason(const BsaParams& p) {
  if (p.head_dim != 64 && p.head_dim != 128)
    return "head_dim must be 64 or 128, got " + std::to_string(p.head_dim);
  if (p.block_size != 64 && p.block_size != 128)
    return "block_size must be 64 or 128, got " + std::to_string(p.block_size);
  if (p.kv_heads <= 0 || p.q_heads <= 0 || p.q_heads % p.kv_heads != 0)
    return "q_heads (" + std::to_string(p.q_heads) + ") must be a positive multiple of kv_heads (" +
           std::to_string(p.kv_heads) + ")";
  if (!(p.softmax_scale > 0.f) || double(p.softmax_scale) > kMaxSoftmaxScale)
    return "softmax_scale must be a positive float32 of at most 2.3e38 (its product with log2(e) finite), got " +
           std::to_string(p.softmax_scale);
  if (p.num_k_blocks < 1) return "index rows must hold at least one entry, got " + std::to_string(p.num_k_blocks);
  if (p.batch < 0 || p.seqlen_q < 0 || p.seqlen_k < 0) return "negative batch or sequence length";
  if (int64_t(p.batch) * p.q_heads * p.num_q_blocks > int64_t(INT32_MAX))
    return "too many work items (batch * q_heads * query blocks must be below 2^31)";
  if (p.pages.paged()) {
    if (p.cu_seqlens_q == nullptr || p.cu_seqlens_k == nullptr)
      return "paged K/V needs cu_seqlens_q and cu_seqlens_k (varlen q, key lengths)";
    if (p.pages.page_shift < 4 || p.pages.page_shift > 8)
      return "page size must be a power of two from 16 to 256, got page_shift " + std::to_string(p.pages.page_shift);
    if (p.pages.num_pages < 1) return "paged K/V needs at least one page, got " + std::to_string(p.pages.num_pages);
  }
  return {};
}

// Empty when the Hopper kernel takes these (already supported) parameters on the current device,
// else why not: a build with sm_90a code (PROXYATTN_HOPPER_KERNELS, set by
// setup.py and CMake when PROXYATTN_ARCHS holds 90a); a compute capability 9.0 device; block size 128;
// q/k/v strides of dimensions longer than 1 positive, 16-byte multiples, below 2^40 bytes, 16-byte
// aligned pointers (TMA); row counts below 2^31 (TMA coordinates), at least one key row.
inline std::string bsa_hopper_unsupported_reason(const BsaParams& p) {
#if !defined(PROXYATTN_HOPPER_KERNELS)
  // Built without sm_90a code (PROXYATTN_ARCHS lacks 90a): the kernel's body is empty for every
  // target, so taking this path would launch a kernel that writes nothing.
  (void)p;
  return "this build has no sm_90a code (PROXYATTN_ARCHS lacks 90a)";
#else
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return "cudaGetDevice failed";
  }
  const int arch = bsa_device_arch(dev);
  if (arch != 90) return "it needs a compute capability 9.0 device, got " + std::to_string(arch);
  if (p.block_size != 128) return "it needs block_size 128, got " + std::to_string(p.block_size);
  const bool varlen = p.cu_seqlens_q != nullptr, paged = p.pages.paged();
  // Paged: the tensor maps see the caches as (slot, D, head, page).
  const int64_t rows_q = varlen ? p.total_q : p.seqlen_q;
  const int64_t rows_k = paged ? p.pages.page_size() : varlen ? p.total_k : p.seqlen_k;
  if (rows_q > INT32_MAX || rows_k > INT32_MAX) return "it needs row counts below 2^31";
  if (rows_k < 1) return "it needs at least one key row (TMA)";
  auto bad = [](int64_t size, int64_t stride) { return !tma_stride_ok(size, stride); };
  const int64_t nb = varlen ? 1 : p.batch, nbk = paged ? p.pages.num_pages : nb;
  const int64_t kbs = paged ? p.pages.k_page_stride : p.k_batch_stride;
  const int64_t vbs = paged ? p.pages.v_page_stride : p.v_batch_stride;
  if (bad(rows_q, p.q_row_stride) || bad(p.q_heads, p.q_head_stride) || bad(nb, p.q_batch_stride) ||
      bad(rows_k, p.k_row_stride) || bad(p.kv_heads, p.k_head_stride) || bad(nbk, kbs) ||
      bad(rows_k, p.v_row_stride) || bad(p.kv_heads, p.v_head_stride) || bad(nbk, vbs))
    return "it needs positive q/k/v strides that are multiples of 8 elements (TMA)";
  auto misaligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 != 0; };
  if (misaligned(p.q) || misaligned(p.k) || misaligned(p.v)) return "it needs 16-byte aligned q/k/v";
  return {};
#endif
}

// The work order (BsaParams::kv_section): sections of as many KV heads as keep their K and V within
// kL2Budget bytes, at least one. Measured against the head-fastest order on an H200: 19-22% faster
// at densities 0.1-0.3 (bench/NOTES.md).
inline int bsa_kv_section(const BsaParams& p) {
  constexpr int64_t kL2Budget = int64_t(24) << 20;
  const int64_t per_kv_head = int64_t(2) * 2 * int64_t(p.seqlen_k) * p.head_dim;  // K and V, 16-bit
  int64_t n = per_kv_head > 0 ? kL2Budget / per_kv_head : p.kv_heads;
  if (n < 1) n = 1;
  if (n > p.kv_heads) n = p.kv_heads;
  return int(n);
}

// What one call runs, decided once per call by bsa_plan.
struct BsaPlan {
  BsaPath path = BsaPath::kPortable;
  int kv_section = 1;     // BsaParams::kv_section for the launch
  std::string error;      // non-empty: nothing may run; says why, naming the value
  bool refused = false;   // the error is the Hopper kernel's refusal of backend kHopper
};

inline BsaPlan bsa_plan(const BsaParams& p, BsaBackend backend) {
  BsaPlan plan;
  plan.error = bsa_unsupported_reason(p);
  if (!plan.error.empty()) return plan;
  plan.kv_section = bsa_kv_section(p);
  if (backend == BsaBackend::kPortable) return plan;
  const std::string why = bsa_hopper_unsupported_reason(p);
  if (why.empty()) {
    plan.path = BsaPath::kHopper;
  } else if (backend == BsaBackend::kHopper) {
    plan.error = "the Hopper kernel cannot run this call: " + why;
    plan.refused = true;
  }
  return plan;
}

// Runs the forward on `stream` as `plan` (bsa_plan of the same params) says: cudaErrorInvalidValue
// when the plan holds an error, or the Hopper path has no params.tile_counter (a device int32,
// zero when this is called).
inline cudaError_t run_bsa_fwd(const BsaParams& given, bool is_bf16, const BsaPlan& plan, cudaStream_t stream) {
  if (!plan.error.empty() || plan.kv_section < 1) return cudaErrorInvalidValue;
  BsaParams params = given;
  params.kv_section = plan.kv_section;
  const bool hopper = plan.path == BsaPath::kHopper;
  if (hopper && params.tile_counter == nullptr) return cudaErrorInvalidValue;
  // One instantiation per (dtype, head dim); head_dim is one of these (bsa_unsupported_reason).
  auto run = [&](auto elem, auto head_dim) {
    using Elem = decltype(elem);
    constexpr int kD = decltype(head_dim)::value;
    return hopper ? run_bsa_fwd_sm90<Elem, kD>(params, stream) : run_bsa_fwd_sm80<Elem, kD>(params, stream);
  };
  using D64 = std::integral_constant<int, 64>;
  using D128 = std::integral_constant<int, 128>;
  if (params.head_dim == 64) return is_bf16 ? run(__nv_bfloat16{}, D64{}) : run(__half{}, D64{});
  if (params.head_dim == 128) return is_bf16 ? run(__nv_bfloat16{}, D128{}) : run(__half{}, D128{});
  return cudaErrorInvalidValue;
}

}  // namespace proxyattn
