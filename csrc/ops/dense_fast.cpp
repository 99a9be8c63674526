// proxy_attention's dense path in one C++ call. Whether a call is dense is decided in one place,
// ProxyAttnConfig.runs_dense (fewer keys than dense_below); proxyattn/attention.py asks it and hands
// this function only the calls it runs dense.
//
// A dense call is one SDPA kernel of tens of microseconds at such lengths, so the host
// time in front of it shows in the latency of an idle GPU. This entry point does the work of
// the Python path (validate, transpose to [B, H, N, D], SDPA with enable_gqa, transpose back)
// without the Python interpreter in between. It never raises for bad input: whenever anything
// is not the plain valid dense case (a non-tensor or tensor subclass, CPU tensors, a dtype,
// rank, shape, stride or alignment the Python validation would reject, causal with Nq != Nk,
// a torch function mode, an invalid proxy grouping) it returns None and the
// caller runs the Python path, which then raises the documented error or handles the case.
// So the rules below may be narrower than the Python ones, never wider.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cmath>
#include <cstdint>

namespace proxyattn {
namespace {

// 16-byte aligned rows: the data pointer on a 16-byte boundary, and the strides of dimensions
// longer than 1 (the last excepted, which must be 1) multiples of 8 elements (ops.check_aligned).
bool dense_fast_aligned(const at::Tensor& t) {
  if (t.stride(-1) != 1 || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int64_t i = 0; i + 1 < t.dim(); ++i)
    if (t.size(i) > 1 && t.stride(i) % 8 != 0) return false;
  return true;
}

// docs/design.md section 2: G divides Hkv, or Hkv divides G and G divides Hq (config.check_proxy_grouping).
bool dense_fast_grouping_ok(int64_t g, int64_t hq, int64_t hkv) {
  if (g < 1) return false;
  if (g <= hkv) return hkv % g == 0;
  return g % hkv == 0 && hq % g == 0;
}

}  // namespace

// Python: dense_fast(q, k, v, causal, num_proxy_heads, softmax_scale) -> Tensor or None.
// num_proxy_heads and softmax_scale may be None (the config's defaults).
PyObject* dense_fast(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 6) {
    PyErr_Format(PyExc_TypeError, "dense_fast expects 6 arguments, got %zd", nargs);
    return nullptr;
  }
  PyObject *pq = args[0], *pk = args[1], *pv = args[2], *pcausal = args[3], *pg = args[4], *pscale = args[5];
  if (!THPVariable_CheckExact(pq) || !THPVariable_CheckExact(pk) || !THPVariable_CheckExact(pv)) Py_RETURN_NONE;
  if (pcausal != Py_True && pcausal != Py_False) Py_RETURN_NONE;
  if (pg != Py_None && !PyLong_CheckExact(pg)) Py_RETURN_NONE;
  if (pscale != Py_None && !PyFloat_CheckExact(pscale) && !PyLong_CheckExact(pscale)) Py_RETURN_NONE;
  if (at::impl::torch_function_mode_enabled()) Py_RETURN_NONE;
  const bool causal = pcausal == Py_True;

  const at::Tensor& q = THPVariable_Unpack(pq);
  const at::Tensor& k = THPVariable_Unpack(pk);
  const at::Tensor& v = THPVariable_Unpack(pv);
  if (!q.defined() || !k.defined() || !v.defined() || !q.is_cuda()) Py_RETURN_NONE;
  if (k.device() != q.device() || v.device() != q.device()) Py_RETURN_NONE;
  const auto dt = q.scalar_type();
  if ((dt != at::kBFloat16 && dt != at::kHalf) || k.scalar_type() != dt || v.scalar_type() != dt) Py_RETURN_NONE;
  if (q.dim() != 4 || k.dim() != 4 || !k.sizes().equals(v.sizes())) Py_RETURN_NONE;
  const int64_t b = q.size(0), nq = q.size(1), hq = q.size(2), d = q.size(3);
  const int64_t nk = k.size(1), hkv = k.size(2);
  if ((d != 64 && d != 128) || k.size(3) != d || k.size(0) != b) Py_RETURN_NONE;
  if (hq == 0 || hkv == 0 || hq % hkv != 0 || b == 0 || nq == 0 || nk == 0) Py_RETURN_NONE;
  if (b > 65535 || hq > 65535) Py_RETURN_NONE;  // ops.MAX_BATCH, ops.MAX_HEADS: the Python path refuses
  if (!dense_fast_aligned(q) || !dense_fast_aligned(k) || !dense_fast_aligned(v)) Py_RETURN_NONE;
  if (causal && nq != nk) Py_RETURN_NONE;  // bottom-right mask: the Python path builds it
  if (pg != Py_None) {
    const long long g = PyLong_AsLongLong(pg);
    if (g == -1 && PyErr_Occurred()) {
      PyErr_Clear();
      Py_RETURN_NONE;
    }
    if (!dense_fast_grouping_ok(g, hq, hkv)) Py_RETURN_NONE;
  }
  double scale = 1.0 / std::sqrt(double(d));
  if (pscale != Py_None) {
    scale = PyFloat_AsDouble(pscale);
    if (PyErr_Occurred()) {
      PyErr_Clear();
      Py_RETURN_NONE;
    }
    if (!(scale > 0.0) || !std::isfinite(scale)) Py_RETURN_NONE;
  }

  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    out = at::scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           /*attn_mask=*/std::nullopt, /*dropout_p=*/0.0, /*is_causal=*/causal,
                                           /*scale=*/scale, /*enable_gqa=*/hq != hkv)
              .transpose(1, 2);
    if (!out.is_contiguous()) out = out.contiguous();
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

}  // namespace proxyattn
