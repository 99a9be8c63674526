// Operator schemas of the proxyattn library, and the Python module proxyattn._C.
//
// Every op takes fixed-length tensors (q [B, Nq, Hq, D], k/v [B, Nk, Hkv, D])
// or packed variable-length ones (q [total_q, Hq, D], k/v [total_k, Hkv, D])
// with cu_seqlens_q/k int32 [B + 1]; stages 1, 2 and 4 also take K/V from a
// paged cache (page_table int32 [B, max_pages]: k/v are the caches
// [num_pages, page_size, Hkv, D], q is packed, cu_seqlens_k holds the prefix
// sums of the key lengths). max_seqlen_q/k are Nq/Nk for fixed
// length and the longest sequence for varlen; output shapes depend only on
// input shapes and these ints. docs/design.md section 2 defines what each computes.
// Implementations: csrc/ops/*.cpp (CUDA), proxyattn/reference.py (CPU). Inference only: every op's
// Autograd kernel (below) refuses inputs that require grad while grad mode is on.
#include <Python.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

TORCH_LIBRARY(proxyattn, m) {
  // Stage 1: fp32 [B, G, nqb, nkb] max-pooled softmax of the pooled proxy heads.
  m.def(
      "proxy_block_scores(Tensor q, Tensor k, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, int block_size, int num_proxy_heads, int stride, "
      "float softmax_scale, bool causal, Tensor? page_table=None) -> Tensor");
  // Stage 2: int32 [B, Hq] number of non-forced blocks each head needs to reach gamma.
  m.def(
      "head_budgets(Tensor q, Tensor k, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, int block_size, float gamma, int sink_blocks, "
      "int local_blocks, float softmax_scale, bool causal, Tensor? page_table=None) -> Tensor");
  // Stage 3: counts int32 [B, Hq, nqb] and ascending indices int16 [B, Hq, nqb, nkb], -1 padded;
  // budget_seqlen > 0: the rows are a chunk of a sequence that long, whose last query block sets
  // the budgets' scale.
  m.def(
      "select_blocks(Tensor scores, Tensor kstar, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, int block_size, int sink_blocks, int local_blocks, "
      "int min_budget, bool causal, int budget_seqlen=0) -> (Tensor, Tensor)");
  // Stage 4: out like q, lse fp32 [B, Hq, Nq] (varlen: [Hq, total_q]), natural log.
  m.def(
      "block_sparse_attention(Tensor q, Tensor k, Tensor v, Tensor counts, Tensor indices, "
      "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, "
      "int block_size, float softmax_scale, bool causal, Tensor? page_table=None) -> (Tensor, Tensor)");
}

namespace proxyattn {
namespace {

// The ops have no backward (docs/design.md section 2: inference only). A call with grad mode on and
// an input that requires grad raises here, before any kernel, rather than return an output without
// the gradient asked for; otherwise the call goes on below autograd (CPU, CUDA or fake kernels).
// The Python wrappers raise the same error first (proxyattn/ops.py, check_no_grad); this covers
// direct torch.ops.proxyattn calls.
void refuse_grad(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  if (c10::GradMode::is_enabled()) {
    const auto& args = op.schema().arguments();
    const size_t first = stack->size() - args.size();
    for (size_t i = 0; i < args.size(); ++i) {
      const c10::IValue& a = (*stack)[first + i];
      TORCH_CHECK(!(a.isTensor() && a.toTensor().defined() && a.toTensor().requires_grad()),
                  op.schema().name(), " is inference-only (it has no backward), but ",
                  args[i].name(), " requires grad while grad mode is on; run it under torch.no_grad() or "
                  "torch.inference_mode(), or pass ", args[i].name(), ".detach()");
    }
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
}

}  // namespace
}  // namespace proxyattn

TORCH_LIBRARY_IMPL(proxyattn, Autograd, m) {
  for (const char* name : {"proxy_block_scores", "head_budgets", "select_blocks", "block_sparse_attention"})
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&proxyattn::refuse_grad>());
}

namespace proxyattn {
// csrc/ops/dense_fast.cpp: proxy_attention's dense path in one call (None when it does not apply).
PyObject* dense_fast(PyObject* self, PyObject* const* args, Py_ssize_t nargs);
}  // namespace proxyattn

// Importing proxyattn._C loads the library above and every TORCH_LIBRARY_IMPL linked into
// it. The module's one function serves proxy_attention's dense path (proxyattn/attention.py).
extern "C" PyObject* PyInit__C(void) {
  static PyMethodDef methods[] = {
      {"dense_fast", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&proxyattn::dense_fast)),
       METH_FASTCALL,
       "dense_fast(q, k, v, causal, num_proxy_heads, softmax_scale) -> Tensor or None: "
       "SDPA for proxy_attention's plain dense case, None when the Python path must decide"},
      {nullptr, nullptr, 0, nullptr}};
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
