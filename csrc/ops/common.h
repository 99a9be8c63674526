// Shared torch glue for the CUDA ops: input checks, stream, launch checks.
// Kernels under csrc/kernels/ never include this (they see no torch).
#pragma once

// c10's stream and guard headers, not ATen/cuda/CUDAContext.h: that one pulls in cuBLAS and
// cuSPARSE headers, which a bare CUDA toolkit (CI, the development machines) may lack.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>

#include "kernels/common/bsa_launch.h"
#include "kernels/common/kernel_image.h"
#include "kernels/common/kv_pages.h"

#define PROXYATTN_CHECK(cond, ...) TORCH_CHECK(cond, "proxyattn: ", __VA_ARGS__)

// Raise a c10::Error naming the CUDA error, e.g. after a launch.
#define PROXYATTN_CUDA_CHECK(expr)                                                           \
  do {                                                                                       \
    cudaError_t err_ = (expr);                                                               \
    TORCH_CHECK(err_ == cudaSuccess, "proxyattn: CUDA error ", cudaGetErrorString(err_),     \
                " at ", __FILE__, ":", __LINE__);                                            \
  } while (0)

#define PROXYATTN_LAUNCH_CHECK() PROXYATTN_CUDA_CHECK(cudaGetLastError())

namespace proxyattn {

// The device guard of an op's launches, made once its inputs are checked: it makes `device` current
// and refuses a device this build has no kernels for, naming it and the way out, before anything
// is allocated or launched.
struct OpDevice {
  c10::cuda::CUDAGuard guard;
  OpDevice(const at::Device& device, const char* op) : guard(device) {
    const cudaError_t e = kernel_image_status();
    if (e == cudaSuccess) return;
    PROXYATTN_CHECK(kernel_image_answer(e), op, ": could not ask the CUDA runtime whether this build has kernels for ",
                    device, ": ", cudaGetErrorString(e));
    cudaDeviceProp prop{};
    const bool named = cudaGetDeviceProperties(&prop, device.index()) == cudaSuccess;
    if (!named) (void)cudaGetLastError();
    PROXYATTN_CHECK(false, op, ": this build has no kernels for ", named ? prop.name : "the device", " (", device,
                    named ? ", compute capability " + std::to_string(prop.major) + "." + std::to_string(prop.minor)
                          : std::string(),
                    ": ", cudaGetErrorString(e), "). It was built for the targets in PROXYATTN_ARCHS (default "
                    "80;90a: A100, Ada and Hopper GPUs); rebuild with PROXYATTN_ARCHS naming this GPU's target "
                    "if it is one of 80, 86, 89, 90, 90a. Other GPUs (Blackwell) are not supported");
  }
};

inline void check_cuda(const at::Tensor& t, const char* name) {
  PROXYATTN_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
}

inline void check_last_dim_contiguous(const at::Tensor& t, const char* name) {
  PROXYATTN_CHECK(t.stride(-1) == 1, name, " must have a contiguous last dimension (stride 1), got stride ",
                  t.stride(-1), "; call .contiguous()");
}

// The kernels move 16 bytes at a time: the data pointer and the strides of dimensions longer than
// 1 (the last excepted) must be multiples of 16 bytes (8 elements). The pointer is tested, not the
// storage offset: a tensor from from_dlpack or from_numpy can sit off a boundary at offset 0.
inline void check_aligned(const at::Tensor& t, const char* name) {
  const auto off = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16;
  PROXYATTN_CHECK(off == 0, name, " must start on a 16-byte boundary, got a data pointer ", off,
                  " bytes past one; pass a fresh copy (.clone(memory_format=torch.contiguous_format)): "
                  ".contiguous() keeps the pointer of an already contiguous view");
  for (int64_t d = 0; d + 1 < t.dim(); ++d)
    PROXYATTN_CHECK(t.size(d) <= 1 || t.stride(d) % 8 == 0, name,
                    " strides must be multiples of 8 elements (except the last), got ", t.strides(),
                    "; call .contiguous()");
}

// softmax_scale finite and > 0 (proxyattn/config.py states the same rule; the attention kernels
// also refuse a scale above kMaxSoftmaxScale, kernels/common/bsa_launch.h).
inline void check_softmax_scale(double scale) {
  PROXYATTN_CHECK(std::isfinite(scale) && scale > 0.0, "softmax_scale must be finite and > 0, got ", scale);
}

// A kernel that keeps a row of nkb key blocks in shared memory (`bytes` of it) must fit the opt-in
// shared memory per block of the device; `what` names the kernel. One attribute query, no sync.
inline void check_key_blocks_fit(size_t bytes, int nkb, const at::Device& device, const char* what) {
  int limit = 0;
  PROXYATTN_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device.index()));
  PROXYATTN_CHECK(bytes <= static_cast<size_t>(limit), what, " keeps a row of key blocks in shared memory: ", nkb,
                  " key blocks need ", bytes, " bytes, more than the ", limit,
                  " bytes per block of this GPU; use shorter sequences or a larger block_size");
}

inline void check_half(const at::Tensor& t, const char* name) {
  PROXYATTN_CHECK(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, name,
                  " must be float16 or bfloat16 on CUDA, got ", t.scalar_type());
}

// cu_seqlens: int32, 1-D, [batch + 1], on the device of `like`. Values are not read
// on the host (that would synchronise); kernels clamp lengths into [0, max_seqlen].
inline void check_cu_seqlens(const std::optional<at::Tensor>& cu, const char* name, const at::Tensor& like) {
  if (!cu.has_value()) return;
  PROXYATTN_CHECK(cu->scalar_type() == at::kInt, name, " must be int32, got ", cu->scalar_type());
  PROXYATTN_CHECK(cu->dim() == 1 && cu->size(0) >= 2, name, " must be 1-D of length batch + 1 >= 2, got shape ",
                  cu->sizes());
  PROXYATTN_CHECK(cu->device() == like.device(), name, " must be on ", like.device(), ", got ", cu->device());
  PROXYATTN_CHECK(cu->is_contiguous(), name, " must be contiguous");
}

// Whether a call reads paged K/V (a page_table came), checked first of all: pages need packed queries.
inline bool paged_call(const std::optional<at::Tensor>& page_table, bool varlen) {
  PROXYATTN_CHECK(!page_table.has_value() || varlen, "page_table needs packed queries: cu_seqlens_q, and cu_seqlens_k "
                  "holding the prefix sums of the key lengths");
  return page_table.has_value();
}

// Paged K/V (kernels/common/kv_pages.h). Without page_table: no pages (returned with page_table
// nullptr). With it: k (and v) are the caches [num_pages, page_size, Hkv, D] of a varlen call whose
// cu_seqlens_k holds the prefix sums of the key lengths; page sizes are powers of two in
// [16, 256] (paged_call has checked that the call is varlen). Only what a direct torch.ops call could
// get wrong is checked; table values are not read (the kernels clamp page numbers into the cache).
inline void check_paged_k_rank(const at::Tensor& k) {
  PROXYATTN_CHECK(k.dim() == 4, "with a page_table, k must be the cache [num_pages, page_size, Hkv, D], got shape ",
                  k.sizes());
}

inline KvPages check_kv_pages(const std::optional<at::Tensor>& page_table, const at::Tensor& k, const at::Tensor* v,
                              int64_t batch, int64_t max_seqlen_k) {
  KvPages pg;
  if (!page_table.has_value()) return pg;
  const at::Tensor& t = *page_table;
  PROXYATTN_CHECK(t.scalar_type() == at::kInt, "page_table must be int32, got ", t.scalar_type());
  PROXYATTN_CHECK(t.device() == k.device(), "page_table must be on ", k.device(), ", got ", t.device());
  PROXYATTN_CHECK(t.dim() == 2 && t.size(0) == batch && t.size(1) >= 1, "page_table must be [B, max_pages] = [",
                  batch, ", max_pages >= 1], got shape ", t.sizes());
  PROXYATTN_CHECK(t.size(1) == 1 || t.stride(1) == 1, "page_table rows must be contiguous, got strides ", t.strides());
  check_paged_k_rank(k);
  if (v != nullptr)
    PROXYATTN_CHECK(v->sizes() == k.sizes(), "v cache must have the shape of the k cache ", k.sizes(), ", got ",
                    v->sizes());
  const int64_t P = k.size(1);
  PROXYATTN_CHECK(P >= 16 && P <= 256 && (P & (P - 1)) == 0,
                  "the page size k.size(1) must be a power of two from 16 to 256, got ", P);
  PROXYATTN_CHECK(k.size(0) >= 1 && k.size(0) <= std::numeric_limits<int32_t>::max(),
                  "the k cache must hold 1 to 2^31 - 1 pages, got ", k.size(0));
  PROXYATTN_CHECK(t.size(1) * P >= max_seqlen_k, "page_table has room for ", t.size(1), " pages of ", P,
                  " keys per sequence, fewer than max_seqlen_k = ", max_seqlen_k);
  pg.page_table = t.data_ptr<int>();
  pg.table_stride = t.stride(0);
  pg.num_pages = static_cast<int>(k.size(0));
  while ((int64_t{1} << pg.page_shift) < P) ++pg.page_shift;
  pg.k_page_stride = k.stride(0);
  pg.v_page_stride = v != nullptr ? v->stride(0) : 0;
  return pg;
}

// The packed key count kernels clamp varlen key starts into; paged keys have no packed rows.
constexpr int64_t kPagedTotalK = std::numeric_limits<int64_t>::max() / 4;

// The current stream of the current device (the caller holds a device guard).
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// The kernel override, read once per call before anything else: PROXYATTN_BSA_BACKEND = auto (also
// unset or empty: the Hopper kernels where the device is sm_90 and the parameters suit them, else the
// portable ones), portable (the sm80 kernels: attention and stages 1 and 2), hopper (the Hopper
// attention kernel, or an error saying why not; stages 1 and 2 as auto). Any other value is an
// error naming it.
inline BsaBackend backend_from_env() {
  const char* env = std::getenv("PROXYATTN_BSA_BACKEND");
  BsaBackend backend = BsaBackend::kAuto;
  PROXYATTN_CHECK(bsa_backend_parse(env, &backend), "PROXYATTN_BSA_BACKEND must be one of ", kBsaBackendNames,
                  " (unset or empty: auto), got '", env, "'");
  return backend;
}

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

}  // namespace proxyattn
