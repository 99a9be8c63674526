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

#include <optional>

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

inline void check_cuda(const at::Tensor& t, const char* name) {
  PROXYATTN_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
}

inline void check_last_dim_contiguous(const at::Tensor& t, const char* name) {
  PROXYATTN_CHECK(t.stride(-1) == 1, name, " must have a contiguous last dimension (stride 1), got stride ",
                  t.stride(-1), "; call .contiguous()");
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

// The current stream of the current device (the caller holds a device guard).
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

}  // namespace proxyattn
