// Host entry points of the block-sparse attention forward: the per-instantiation launchers
// (bsa_fwd_sm80.cuh, portable; bsa_fwd_sm90.cuh, Hopper sm_90a; explicitly instantiated in
// csrc/instantiations/) and a small dispatcher over path, dtype and head dim.
//
// Path choice (environment read on every call, so tests can switch paths in one process):
//   PROXYATTN_BSA_FORCE_SM80=1   always the sm80 path.
//   PROXYATTN_BSA_SM90=1         the sm90 path on sm_90 devices when it supports the parameters
//                                (block_size 128, TMA-expressible strides), else sm80.
//   PROXYATTN_BSA_SM90=require   the sm90 path or an error (tests use it to be sure it ran).
//   unset                        kBsaSm90Default: the sm90 path where it applies (all GPU tests
//                                passed on it on an H200; measured faster than sm80, bench/NOTES.md).
//   PROXYATTN_BSA_SM90=0         the sm80 path.
//   PROXYATTN_BSA_ORDER          CTA work order, see bsa_kv_section (both paths).
//   PROXYATTN_BSA_SORT=1         launch the work items of each section by descending
//                                selected-block count (bsa_sort_tiles, kernels/bsa_order.cu; both
//                                paths); otherwise (default) in bsa_tile's order.
//   PROXYATTN_BSA_SM90_OVERLAP=0 the serial sm90 variant instead of the overlapped ones, which
//                                overlap the softmax with the P V product.
//   PROXYATTN_BSA_SM90_PINGPONG=1 the overlapped sm90 variant (one CTA per work item) with the two
//                                consumer warpgroups taking turns at issuing their wgmmas (ignored
//                                with OVERLAP=0).
//   PROXYATTN_BSA_SM90_STAGES=3  the overlapped variant with one CTA per work item and a 3-stage
//                                K/V ring (ignored with OVERLAP=0 or PINGPONG=1).
//   PROXYATTN_BSA_SM90_PERSISTENT=0 the overlapped variant with one CTA per work item instead of
//                                the default persistent one (one CTA per SM taking work items from
//                                a counter, BsaParams::tile_counter; the key blocks of consecutive
//                                items run as one pipeline). Unset or 1: persistent unless one of
//                                OVERLAP=0, PINGPONG=1, STAGES=3 is set.
//   PROXYATTN_BSA_SM90_LAZY=<t>  0 < t <= 8: lazy rescaling in every sm90 variant. A row's
//                                reference max moves only when its running max exceeds it by more
//                                than t (log2 units of the scaled scores), so P reaches up to 2^t
//                                and a dominant key's P is rounded to 16 bits like any other
//                                (measured: up to 1.8x the max error against fp64 on peaked rows
//                                at t = 8; 0.4-2.4% faster at density 0.1, bench/NOTES.md). -1: O
//                                rescaled on every key block (for comparison; same output as 0).
//                                Unset, empty or 0: the exact running max; O is still rescaled only
//                                on the key blocks where a row of the warp raised its max (corr 1
//                                otherwise). Any other value is refused (bsa_sm90_lazy_error).
// Torch-free and CuTe-free, so the torch glue and the C++ benchmark can include it with a host
// compiler.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "kernels/bsa_params.h"

namespace proxyattn {

// Elem: __half or __nv_bfloat16. kHeadDim: 64 or 128. Dispatches on params.block_size (64/128).
// Returns the error of the launch (cudaErrorInvalidValue for unsupported parameters).
template <typename Elem, int kHeadDim>
cudaError_t run_bsa_fwd_sm80(const BsaParams& params, cudaStream_t stream);

// Defined once each in csrc/instantiations/bsa_fwd_sm80_<dtype>_hdim<D>.cu; declared extern so
// no other translation unit compiles a kernel body.
extern template cudaError_t run_bsa_fwd_sm80<__half, 64>(const BsaParams&, cudaStream_t);
extern template cudaError_t run_bsa_fwd_sm80<__half, 128>(const BsaParams&, cudaStream_t);
extern template cudaError_t run_bsa_fwd_sm80<__nv_bfloat16, 64>(const BsaParams&, cudaStream_t);
extern template cudaError_t run_bsa_fwd_sm80<__nv_bfloat16, 128>(const BsaParams&, cudaStream_t);

// Hopper path (sm_90a only; returns cudaErrorNoKernelImageForDevice on other devices).
template <typename Elem, int kHeadDim>
cudaError_t run_bsa_fwd_sm90(const BsaParams& params, cudaStream_t stream);
extern template cudaError_t run_bsa_fwd_sm90<__half, 64>(const BsaParams&, cudaStream_t);
extern template cudaError_t run_bsa_fwd_sm90<__half, 128>(const BsaParams&, cudaStream_t);
extern template cudaError_t run_bsa_fwd_sm90<__nv_bfloat16, 64>(const BsaParams&, cudaStream_t);
extern template cudaError_t run_bsa_fwd_sm90<__nv_bfloat16, 128>(const BsaParams&, cudaStream_t);

// Whether the sm90 path is taken when PROXYATTN_BSA_SM90 is unset.
inline constexpr bool kBsaSm90Default = true;

// Which sm90 kernel variant runs (read per call): 0 serial (PROXYATTN_BSA_SM90_OVERLAP=0), 1
// overlapped, one CTA per work item (PROXYATTN_BSA_SM90_PERSISTENT=0, or STAGES=3), 2 overlapped
// with pingpong (PROXYATTN_BSA_SM90_PINGPONG=1), 3 persistent and overlapped (the default; needs
// BsaParams::tile_counter).
inline int bsa_sm90_variant() {
  auto is = [](const char* name, const char* value) {
    const char* env = std::getenv(name);
    return env != nullptr && std::strcmp(env, value) == 0;
  };
  if (is("PROXYATTN_BSA_SM90_OVERLAP", "0")) return 0;
  if (is("PROXYATTN_BSA_SM90_PINGPONG", "1")) return 2;
  if (is("PROXYATTN_BSA_SM90_STAGES", "3") || is("PROXYATTN_BSA_SM90_PERSISTENT", "0")) return 1;
  return 3;
}

// Depth of the sm90 K/V ring of variant 1 (overlapped without pingpong; read per call): 2 (default)
// or 3 (PROXYATTN_BSA_SM90_STAGES=3; loads issued one key block further ahead of the wgmmas).
// The serial and pingpong variants always use 2.
inline int bsa_sm90_stages() {
  const char* env = std::getenv("PROXYATTN_BSA_SM90_STAGES");
  return env != nullptr && std::strcmp(env, "3") == 0 ? 3 : 2;
}

// The lazy-rescaling threshold t of the sm90 kernels, log2 units (read per call; see the list at
// the top): PROXYATTN_BSA_SM90_LAZY, a number with 0 <= t <= 8, or -1; unset or empty: 0. False
// (t left as it was) for any other value.
inline bool bsa_sm90_lazy_parse(float* t) {
  const char* env = std::getenv("PROXYATTN_BSA_SM90_LAZY");
  if (env == nullptr || *env == 0) {
    *t = 0.f;
    return true;
  }
  char* end = nullptr;
  const float v = std::strtof(env, &end);
  if (*end != 0 || !(v == -1.f || (v >= 0.f && v <= 8.f))) return false;  // NaN fails both
  *t = v;
  return true;
}
inline float bsa_sm90_lazy_log2() {
  float t = 0.f;
  return bsa_sm90_lazy_parse(&t) ? t : 0.f;
}
// Empty when PROXYATTN_BSA_SM90_LAZY is valid, else what was expected and what it holds.
inline std::string bsa_sm90_lazy_error() {
  float t = 0.f;
  if (bsa_sm90_lazy_parse(&t)) return {};
  return std::string("PROXYATTN_BSA_SM90_LAZY must be a number t with 0 <= t <= 8, or -1 (unset: 0), got '") +
         std::getenv("PROXYATTN_BSA_SM90_LAZY") + "'";
}

// The CTA work order (BsaParams::kv_section) for these parameters. PROXYATTN_BSA_ORDER=heads gives
// the head-fastest order (0); kv:<n> sections of n KV heads (tests); otherwise (default) sections
// of as many KV heads as keep their K and V within kL2Budget bytes, at least one.
inline int bsa_kv_section(const BsaParams& p) {
  const char* env = std::getenv("PROXYATTN_BSA_ORDER");
  if (env != nullptr && std::strcmp(env, "heads") == 0) return 0;
  if (env != nullptr && std::strncmp(env, "kv:", 3) == 0) {
    const long n = std::strtol(env + 3, nullptr, 10);
    return n < 1 ? 1 : (n > p.kv_heads ? p.kv_heads : int(n));
  }
  constexpr int64_t kL2Budget = int64_t(24) << 20;
  const int64_t per_kv_head = int64_t(2) * 2 * int64_t(p.seqlen_k) * p.head_dim;  // K and V, 16-bit
  int64_t n = per_kv_head > 0 ? kL2Budget / per_kv_head : p.kv_heads;
  if (n < 1) n = 1;
  if (n > p.kv_heads) n = p.kv_heads;
  return int(n);
}

// Work items of one call (CTAs of the attention kernel), the int32 elements BsaParams::tile_order
// must hold.
inline int64_t bsa_tile_order_size(const BsaParams& p) {
  return p.batch > 0 && p.q_heads > 0 && p.num_q_blocks > 0 ? int64_t(p.batch) * p.q_heads * p.num_q_blocks : 0;
}

// Whether run_bsa_fwd sorts the work items (given a tile_order workspace; read per call): only with
// PROXYATTN_BSA_SORT=1. Measured on an H200 at 128k, D=128 (bench/NOTES.md, "CTA order by
// selected-block count"): under a sustained load at the power limit the sorted order is 2.2-2.4%
// faster at density 0.1 (a third fewer DRAM reads, a higher clock), but with a cold L2 before each
// call, the benchmark's method, between 3.5% slower and 1.4% faster, and 3.5-4.4% slower at 32k, so
// it is not the default.
inline bool bsa_sort_tiles(const BsaParams&) {
  const char* env = std::getenv("PROXYATTN_BSA_SORT");
  return env != nullptr && std::strcmp(env, "1") == 0;
}

// Writes the sorted work order of p (p.kv_section as the launchers set it) into order
// (bsa_tile_order_size(p) int32 on the device); kernels/bsa_order.cu.
cudaError_t run_bsa_tile_order(const BsaParams& p, int* order, cudaStream_t stream);

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

// Empty when the sm80 kernel supports these parameters, else what is wrong, naming the value.
inline std::string bsa_unsupported_reason(const BsaParams& p) {
  if (p.head_dim != 64 && p.head_dim != 128)
    return "head_dim must be 64 or 128, got " + std::to_string(p.head_dim);
  if (p.block_size != 64 && p.block_size != 128)
    return "block_size must be 64 or 128, got " + std::to_string(p.block_size);
  if (p.kv_heads <= 0 || p.q_heads <= 0 || p.q_heads % p.kv_heads != 0)
    return "q_heads (" + std::to_string(p.q_heads) + ") must be a positive multiple of kv_heads (" +
           std::to_string(p.kv_heads) + ")";
  if (!(p.softmax_scale > 0.f) || p.softmax_scale > 3.0e38f)
    return "softmax_scale must be positive and finite, got " + std::to_string(p.softmax_scale);
  if (p.num_k_blocks < 1) return "index rows must hold at least one entry, got " + std::to_string(p.num_k_blocks);
  if (p.batch < 0 || p.seqlen_q < 0 || p.seqlen_k < 0) return "negative batch or sequence length";
  return {};
}

// Empty when the sm90 kernel takes these (already sm80-valid) parameters, else why not: block size
// 128 only; q/k/v strides of dimensions longer than 1 positive, 16-byte multiples, below 2^40
// bytes (TMA); row counts within int32 (TMA coordinates).
inline std::string bsa_sm90_unsupported_reason(const BsaParams& p) {
  if (p.block_size != 128) return "the sm90 path needs block_size 128, got " + std::to_string(p.block_size);
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int64_t rows_q = varlen ? p.total_q : p.seqlen_q, rows_k = varlen ? p.total_k : p.seqlen_k;
  if (rows_q > INT32_MAX || rows_k > INT32_MAX) return "the sm90 path needs row counts below 2^31";
  auto bad = [](int64_t size, int64_t stride) {
    return size > 1 && (stride <= 0 || stride % 8 != 0 || stride >= (int64_t(1) << 39));
  };
  const int64_t nb = varlen ? 1 : p.batch;
  if (bad(rows_q, p.q_row_stride) || bad(p.q_heads, p.q_head_stride) || bad(nb, p.q_batch_stride) ||
      bad(rows_k, p.k_row_stride) || bad(p.kv_heads, p.k_head_stride) || bad(nb, p.k_batch_stride) ||
      bad(rows_k, p.v_row_stride) || bad(p.kv_heads, p.v_head_stride) || bad(nb, p.v_batch_stride))
    return "the sm90 path needs positive q/k/v strides that are multiples of 8 elements (TMA)";
  auto misaligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 != 0; };
  if (misaligned(p.q) || misaligned(p.k) || misaligned(p.v)) return "the sm90 path needs 16-byte aligned q/k/v";
  return {};
}

enum class BsaPath { kSm80, kSm90, kRefused };

// Which path the current device and environment choose for `params`; `why` says why sm90 was
// refused when PROXYATTN_BSA_SM90=require.
inline BsaPath bsa_choose_path(const BsaParams& params, std::string* why = nullptr) {
  const char* force80 = std::getenv("PROXYATTN_BSA_FORCE_SM80");
  if (force80 != nullptr && std::strcmp(force80, "1") == 0) return BsaPath::kSm80;
  const char* env = std::getenv("PROXYATTN_BSA_SM90");
  const bool require = env != nullptr && std::strcmp(env, "require") == 0;
  const bool want = require || (env != nullptr ? std::strcmp(env, "1") == 0 : kBsaSm90Default);
  if (!want) return BsaPath::kSm80;
  int dev = 0;
  std::string reason;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    (void)cudaGetLastError();
    reason = "cudaGetDevice failed";
  } else if (bsa_device_arch(dev) != 90) {
    reason = "the sm90 path needs a compute capability 9.0 device, got " + std::to_string(bsa_device_arch(dev));
  } else {
    reason = bsa_sm90_unsupported_reason(params);
  }
  if (reason.empty()) return BsaPath::kSm90;
  if (why != nullptr) *why = reason;
  return require ? BsaPath::kRefused : BsaPath::kSm80;
}

// Whether run_bsa_fwd needs BsaParams::tile_counter (a device int32, zero when it is called) for
// these parameters: the persistent sm90 variant on the sm90 path.
inline bool bsa_needs_tile_counter(const BsaParams& params) {
  return bsa_sm90_variant() == 3 && bsa_choose_path(params) == BsaPath::kSm90;
}

// Runs the forward on `stream`: dispatches on path (bsa_choose_path), dtype and head dim. The
// default case returns cudaErrorInvalidValue; bsa_unsupported_reason() names the offending value
// (bsa_sm90_lazy_error() an invalid PROXYATTN_BSA_SM90_LAZY, also refused on every path).
// PROXYATTN_BSA_SM90=require on parameters the sm90 path cannot take returns cudaErrorNotSupported.
// With params.tile_order set and bsa_sort_tiles, the sort (run_bsa_tile_order) runs first on the
// same stream; otherwise the kernel runs the natural order.
inline cudaError_t run_bsa_fwd(const BsaParams& given, bool is_bf16, cudaStream_t stream) {
  if (!bsa_unsupported_reason(given).empty() || !bsa_sm90_lazy_error().empty()) return cudaErrorInvalidValue;
  const BsaPath path = bsa_choose_path(given);
  if (path == BsaPath::kRefused) return cudaErrorNotSupported;
  BsaParams params = given;
  params.kv_section = bsa_kv_section(given);  // what the launchers set; the sort needs the same
  if (params.tile_order != nullptr && bsa_sort_tiles(params)) {
    const cudaError_t err = run_bsa_tile_order(params, params.tile_order, stream);
    if (err != cudaSuccess) return err;
  } else {
    params.tile_order = nullptr;
  }
  if (path == BsaPath::kSm90) {
    switch (params.head_dim) {
      case 64:
        return is_bf16 ? run_bsa_fwd_sm90<__nv_bfloat16, 64>(params, stream)
                       : run_bsa_fwd_sm90<__half, 64>(params, stream);
      case 128:
        return is_bf16 ? run_bsa_fwd_sm90<__nv_bfloat16, 128>(params, stream)
                       : run_bsa_fwd_sm90<__half, 128>(params, stream);
      default:
        return cudaErrorInvalidValue;
    }
  }
  switch (params.head_dim) {
    case 64:
      return is_bf16 ? run_bsa_fwd_sm80<__nv_bfloat16, 64>(params, stream)
                     : run_bsa_fwd_sm80<__half, 64>(params, stream);
    case 128:
      return is_bf16 ? run_bsa_fwd_sm80<__nv_bfloat16, 128>(params, stream)
                     : run_bsa_fwd_sm80<__half, 128>(params, stream);
    default:
      return cudaErrorInvalidValue;  // unreachable: bsa_unsupported_reason names head_dim
  }
}

}  // namespace proxyattn
