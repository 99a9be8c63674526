// Torch glue of the estimation ops (docs/design.md section 2, stages 1-3) on CUDA:
//   proxy_block_scores -> fp32 [B, G, nqb, nkb]     (csrc/kernels/estimate/proxy_scores.cu)
//   head_budgets       -> int32 [B, Hq]             (csrc/kernels/estimate/head_budgets.cu)
//   select_blocks      -> (int32 [B, Hq, nqb], int16 [B, Hq, nqb, nkb])  (csrc/kernels/estimate/select_blocks.cu)
// Fixed length: q [B, Nq, Hq, D], k [B, Nk, Hkv, D]; varlen: q [total_q, Hq, D],
// k [total_k, Hkv, D] with cu_seqlens_q/k int32 [B + 1]; paged (stages 1 and 2): varlen q, k the
// cache [num_pages, page_size, Hkv, D] read through page_table int32 [B, max_pages], cu_seqlens_k
// the prefix sums of the key lengths. Checks name expected vs got; outputs
// and workspaces come from at::empty (kernels write every output element); no host sync.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <ATen/ATen.h>

#include <algorithm>
#include <cfloat>
#include <cmath>

#include "kernels/estimate/head_budgets.h"
#include "kernels/estimate/proxy_scores.h"
#include "kernels/estimate/select_blocks.h"
#include "ops/common.h"

namespace proxyattn {
namespace {

// Shapes and strides of q and k, validated once for stages 1 and 2.
struct QkLayout {
  bool varlen;
  int batch, num_heads, num_kv_heads, head_dim;
  int64_t total_q, total_k;
  int64_t q_strides[3], k_strides[3];  // batch (0 when varlen), row, head; in elements
  const int* cu_q;
  const int* cu_k;
  KvPages pages;  // paged keys (k the cache), else page_table nullptr
};

QkLayout check_qk(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& cu_q,
                  const std::optional<at::Tensor>& cu_k, int64_t max_q, int64_t max_k, int64_t block_size,
                  bool causal, const std::optional<at::Tensor>& page_table) {
  check_cuda(q, "q");
  check_cuda(k, "k");
  PROXYATTN_CHECK(k.device() == q.device(), "k must be on ", q.device(), ", got ", k.device());
  check_half(q, "q");
  PROXYATTN_CHECK(k.scalar_type() == q.scalar_type(), "k must have the dtype of q (", q.scalar_type(), "), got ",
                  k.scalar_type());
  check_last_dim_contiguous(q, "q");
  check_last_dim_contiguous(k, "k");
  check_aligned(q, "q");
  check_aligned(k, "k");
  PROXYATTN_CHECK(cu_q.has_value() == cu_k.has_value(),
                  "cu_seqlens_q and cu_seqlens_k must both be given (varlen) or both be None (fixed length)");
  PROXYATTN_CHECK(block_size == 64 || block_size == 128, "block_size must be 64 or 128, got ", block_size);
  PROXYATTN_CHECK(max_q >= 0 && max_k >= 0 && max_q <= INT32_MAX && max_k <= INT32_MAX,
                  "max_seqlen_q/k must be in [0, 2^31), got ", max_q, " and ", max_k);
  QkLayout L{};
  L.varlen = cu_q.has_value();
  int64_t batch = 0;
  const bool paged = paged_call(page_table, L.varlen);
  if (L.varlen) {
    PROXYATTN_CHECK(q.dim() == 3, "varlen q must be [total_q, Hq, D], got shape ", q.sizes());
    if (paged) {
      check_paged_k_rank(k);
    } else {
      PROXYATTN_CHECK(k.dim() == 3, "varlen k must be [total_k, Hkv, D], got shape ", k.sizes());
    }
    check_cu_seqlens(cu_q, "cu_seqlens_q", q);
    check_cu_seqlens(cu_k, "cu_seqlens_k", q);
    PROXYATTN_CHECK(cu_k->size(0) == cu_q->size(0), "cu_seqlens_k must have the length of cu_seqlens_q (",
                    cu_q->size(0), "), got ", cu_k->size(0));
    batch = cu_q->size(0) - 1;
    L.total_q = q.size(0);
    L.total_k = paged ? kPagedTotalK : k.size(0);
    L.q_strides[0] = 0;
    L.k_strides[0] = 0;
    for (int d = 0; d < 2; ++d) {
      L.q_strides[d + 1] = q.stride(d);
      L.k_strides[d + 1] = k.stride(d + (paged ? 1 : 0));  // paged: slot and head strides
    }
    L.cu_q = cu_q->data_ptr<int>();
    L.cu_k = cu_k->data_ptr<int>();
  } else {
    PROXYATTN_CHECK(q.dim() == 4, "q must be [B, Nq, Hq, D] (or [total_q, Hq, D] with cu_seqlens), got shape ",
                    q.sizes());
    PROXYATTN_CHECK(k.dim() == 4, "k must be [B, Nk, Hkv, D] (or [total_k, Hkv, D] with cu_seqlens), got shape ",
                    k.sizes());
    PROXYATTN_CHECK(k.size(0) == q.size(0), "k must have the batch size of q (", q.size(0), "), got ", k.size(0));
    PROXYATTN_CHECK(max_q == q.size(1), "max_seqlen_q must equal Nq = q.size(1) = ", q.size(1), " for fixed length, got ",
                    max_q);
    PROXYATTN_CHECK(max_k == k.size(1), "max_seqlen_k must equal Nk = k.size(1) = ", k.size(1), " for fixed length, got ",
                    max_k);
    PROXYATTN_CHECK(!causal || max_q <= max_k, "causal attention needs Nq <= Nk (bottom-right aligned), got Nq ",
                    max_q, " > Nk ", max_k);
    batch = q.size(0);
    L.total_q = max_q;
    L.total_k = max_k;
    for (int d = 0; d < 3; ++d) {
      L.q_strides[d] = q.stride(d);
      L.k_strides[d] = k.stride(d);
    }
    L.cu_q = nullptr;
    L.cu_k = nullptr;
  }
  PROXYATTN_CHECK(batch <= 65535, "batch must be at most 65535, got ", batch);
  L.batch = static_cast<int>(batch);
  L.pages = check_kv_pages(page_table, k, nullptr, batch, max_k);
  const int64_t hq = q.size(-2), hkv = k.size(-2), head_dim = q.size(-1);
  PROXYATTN_CHECK(k.size(-1) == head_dim, "k head dim must equal q head dim (", head_dim, "), got ", k.size(-1));
  PROXYATTN_CHECK(head_dim == 64 || head_dim == 128, "head dim must be 64 or 128, got ", head_dim);
  PROXYATTN_CHECK(hq >= 1 && hkv >= 1 && hq % hkv == 0, "Hq must be a positive multiple of Hkv, got Hq = ", hq,
                  ", Hkv = ", hkv);
  PROXYATTN_CHECK(hq <= 65535, "Hq must be at most 65535, got ", hq);
  L.num_heads = static_cast<int>(hq);
  L.num_kv_heads = static_cast<int>(hkv);
  L.head_dim = static_cast<int>(head_dim);
  return L;
}

// The inputs both stages' params share, from check_qk's layout.
EstimateInputs estimate_inputs(const at::Tensor& q, const at::Tensor& k, const QkLayout& L, int64_t max_q,
                               int64_t max_k) {
  EstimateInputs in{};
  in.q = q.data_ptr();
  in.k = k.data_ptr();
  in.q_batch_stride = L.q_strides[0];
  in.q_row_stride = L.q_strides[1];
  in.q_head_stride = L.q_strides[2];
  in.k_batch_stride = L.k_strides[0];
  in.k_row_stride = L.k_strides[1];
  in.k_head_stride = L.k_strides[2];
  in.cu_seqlens_q = L.cu_q;
  in.cu_seqlens_k = L.cu_k;
  in.total_q = L.total_q;
  in.total_k = L.total_k;
  in.pages = L.pages;
  in.batch = L.batch;
  in.num_heads = L.num_heads;
  in.num_kv_heads = L.num_kv_heads;
  in.head_dim = L.head_dim;
  in.max_seqlen_q = static_cast<int>(max_q);
  in.max_seqlen_k = static_cast<int>(max_k);
  return in;
}

at::Tensor proxy_block_scores(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& cu_q,
                              const std::optional<at::Tensor>& cu_k, int64_t max_q, int64_t max_k, int64_t block_size,
                              int64_t num_proxy_heads, int64_t stride, double softmax_scale, bool causal,
                              const std::optional<at::Tensor>& page_table) {
  const BsaBackend backend = backend_from_env();
  const QkLayout L = check_qk(q, k, cu_q, cu_k, max_q, max_k, block_size, causal, page_table);
  const int64_t G = num_proxy_heads;
  PROXYATTN_CHECK(G >= 1, "num_proxy_heads must be >= 1, got ", G);
  if (G <= L.num_kv_heads) {
    PROXYATTN_CHECK(L.num_kv_heads % G == 0, "num_proxy_heads <= Hkv must divide Hkv = ", L.num_kv_heads, ", got ", G);
  } else {
    PROXYATTN_CHECK(G % L.num_kv_heads == 0 && L.num_heads % G == 0,
                    "num_proxy_heads > Hkv must be a multiple of Hkv = ", L.num_kv_heads, " and divide Hq = ",
                    L.num_heads, ", got ", G);
  }
  PROXYATTN_CHECK(stride >= 1, "stride must be >= 1, got ", stride);
  check_softmax_scale(softmax_scale);
  const int nqb = ceil_div(max_q, block_size), nkb = ceil_div(max_k, block_size);
  const OpDevice guard(q.device(), "proxy_block_scores");
  at::Tensor scores = at::empty({L.batch, G, nqb, nkb}, q.options().dtype(at::kFloat));
  ProxyScoresParams p{};
  static_cast<EstimateInputs&>(p) = estimate_inputs(q, k, L, max_q, max_k);
  p.num_groups = static_cast<int>(G);
  p.nqb = nqb;
  p.nkb = nkb;
  p.block_size = static_cast<int>(block_size);
  // A stride of at least every sequence's span keeps the same tokens (position 0 alone), so clamping
  // it there changes nothing and keeps the kernels' kept-row arithmetic inside int32.
  p.stride = static_cast<int>(std::min<int64_t>(stride, std::max<int64_t>({max_q, max_k, 1})));
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.causal = causal;
  p.portable = backend == BsaBackend::kPortable;
  p.scores = scores.data_ptr<float>();
  const int64_t ws_bytes = proxy_scores_workspace_bytes(p);
  PROXYATTN_CHECK(ws_bytes >= 0, "proxy_block_scores: could not query the device for the scores kernel's occupancy");
  at::Tensor ws = at::empty({std::max<int64_t>(ws_bytes, 16)}, q.options().dtype(at::kByte));
  p.workspace = ws.data_ptr();
  const cudaStream_t stream = current_stream();
  if (q.scalar_type() == at::kHalf) {
    PROXYATTN_CUDA_CHECK(run_proxy_scores<half>(p, stream));
  } else {
    PROXYATTN_CUDA_CHECK(run_proxy_scores<__nv_bfloat16>(p, stream));
  }
  PROXYATTN_LAUNCH_CHECK();
  return scores;
}

at::Tensor head_budgets(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& cu_q,
                        const std::optional<at::Tensor>& cu_k, int64_t max_q, int64_t max_k, int64_t block_size,
                        double gamma, int64_t sink_blocks, int64_t local_blocks, double softmax_scale, bool causal,
                        const std::optional<at::Tensor>& page_table) {
  const BsaBackend backend = backend_from_env();
  const QkLayout L = check_qk(q, k, cu_q, cu_k, max_q, max_k, block_size, causal, page_table);
  PROXYATTN_CHECK(gamma > 0.0 && gamma <= 1.0, "gamma must be in (0, 1], got ", gamma);
  PROXYATTN_CHECK(sink_blocks >= 0 && local_blocks >= 0, "sink_blocks and local_blocks must be >= 0, got ",
                  sink_blocks, " and ", local_blocks);
  check_softmax_scale(softmax_scale);
  const int nkb = ceil_div(max_k, block_size);
  PROXYATTN_CHECK(nkb <= kBudgetMaxBlocks, "at most ", kBudgetMaxBlocks, " key blocks are supported, got ", nkb);
  const OpDevice guard(q.device(), "head_budgets");
  check_key_blocks_fit(head_budgets_finalize_smem_bytes(nkb), nkb, q.device(), "head_budgets");
  at::Tensor kstar = at::empty({L.batch, L.num_heads}, q.options().dtype(at::kInt));
  const int64_t ws_floats = head_budgets_workspace_floats(L.batch, L.num_heads, static_cast<int>(max_k), nkb);
  at::Tensor ws = at::empty({std::max<int64_t>(ws_floats, 4)}, q.options().dtype(at::kFloat));

  HeadBudgetsParams p{};
  static_cast<EstimateInputs&>(p) = estimate_inputs(q, k, L, max_q, max_k);
  p.nkb = nkb;
  p.block_size = static_cast<int>(block_size);
  p.gamma = static_cast<float>(gamma);
  p.sink_blocks = static_cast<int>(std::min<int64_t>(sink_blocks, INT32_MAX));
  p.local_blocks = static_cast<int>(std::min<int64_t>(local_blocks, INT32_MAX));
  // Into [FLT_MIN, kMaxSoftmaxScale], where scale * log2(e), which the kernel forms in float, is finite
  // and > 0 (a masked -inf times 0 would be NaN); beyond either end each row's weights are in effect
  // its argmax or uniform, so both limits keep their meaning.
  p.softmax_scale = static_cast<float>(std::clamp(softmax_scale, static_cast<double>(FLT_MIN), kMaxSoftmaxScale));
  p.causal = causal;
  p.portable = backend == BsaBackend::kPortable;
  p.kstar = kstar.data_ptr<int>();
  p.workspace = ws.data_ptr<float>();
  const cudaStream_t stream = current_stream();
  if (q.scalar_type() == at::kHalf) {
    PROXYATTN_CUDA_CHECK(run_head_budgets<half>(p, stream));
  } else {
    PROXYATTN_CUDA_CHECK(run_head_budgets<__nv_bfloat16>(p, stream));
  }
  PROXYATTN_LAUNCH_CHECK();
  return kstar;
}

std::tuple<at::Tensor, at::Tensor> select_blocks(const at::Tensor& scores_in, const at::Tensor& kstar_in,
                                                 const std::optional<at::Tensor>& cu_q,
                                                 const std::optional<at::Tensor>& cu_k, int64_t max_q, int64_t max_k,
                                                 int64_t block_size, int64_t sink_blocks, int64_t local_blocks,
                                                 int64_t min_budget, bool causal, int64_t budget_seqlen) {
  check_cuda(scores_in, "scores");
  check_cuda(kstar_in, "kstar");
  PROXYATTN_CHECK(kstar_in.device() == scores_in.device(), "kstar must be on ", scores_in.device(), ", got ",
                  kstar_in.device());
  PROXYATTN_CHECK(scores_in.scalar_type() == at::kFloat, "scores must be float32, got ", scores_in.scalar_type());
  PROXYATTN_CHECK(kstar_in.scalar_type() == at::kInt, "kstar must be int32, got ", kstar_in.scalar_type());
  PROXYATTN_CHECK(scores_in.dim() == 4, "scores must be [B, G, nqb, nkb], got shape ", scores_in.sizes());
  PROXYATTN_CHECK(kstar_in.dim() == 2, "kstar must be [B, Hq], got shape ", kstar_in.sizes());
  PROXYATTN_CHECK(cu_q.has_value() == cu_k.has_value(),
                  "cu_seqlens_q and cu_seqlens_k must both be given (varlen) or both be None (fixed length)");
  PROXYATTN_CHECK(block_size == 64 || block_size == 128, "block_size must be 64 or 128, got ", block_size);
  PROXYATTN_CHECK(max_q >= 0 && max_k >= 0 && max_q <= INT32_MAX && max_k <= INT32_MAX,
                  "max_seqlen_q/k must be in [0, 2^31), got ", max_q, " and ", max_k);
  PROXYATTN_CHECK(sink_blocks >= 0 && local_blocks >= 0 && min_budget >= 0,
                  "sink_blocks, local_blocks and min_budget must be >= 0, got ", sink_blocks, ", ", local_blocks,
                  " and ", min_budget);
  // A whole sequence of at most kSelectMaxBlocks key blocks, so that the kernel's budget products fit int32.
  const int64_t most_budget_seqlen = int64_t(kSelectMaxBlocks) * block_size;
  const bool budget_ok = !cu_q.has_value() && budget_seqlen >= max_k && budget_seqlen <= most_budget_seqlen;
  PROXYATTN_CHECK(budget_seqlen == 0 || budget_ok,
                  "budget_seqlen must be 0, or (fixed length) the length of the sequence whose chunk the rows are, "
                  "in [max_seqlen_k, ", kSelectMaxBlocks, " * block_size] = [", max_k, ", ", most_budget_seqlen,
                  "], got ", budget_seqlen, cu_q.has_value() ? " with cu_seqlens (varlen)" : "");
  int64_t batch = scores_in.size(0);
  if (cu_q.has_value()) {
    check_cu_seqlens(cu_q, "cu_seqlens_q", scores_in);
    check_cu_seqlens(cu_k, "cu_seqlens_k", scores_in);
    PROXYATTN_CHECK(cu_k->size(0) == cu_q->size(0), "cu_seqlens_k must have the length of cu_seqlens_q (",
                    cu_q->size(0), "), got ", cu_k->size(0));
    batch = cu_q->size(0) - 1;
  } else {
    PROXYATTN_CHECK(!causal || max_q <= max_k, "causal selection needs Nq <= Nk (bottom-right aligned), got Nq ",
                    max_q, " > Nk ", max_k);
  }
  const int64_t G = scores_in.size(1), Hq = kstar_in.size(1);
  const int nqb = ceil_div(max_q, block_size), nkb = ceil_div(max_k, block_size);
  PROXYATTN_CHECK(scores_in.size(0) == batch && scores_in.size(2) == nqb && scores_in.size(3) == nkb,
                  "scores must be [B, G, nqb, nkb] = [", batch, ", G, ", nqb, ", ", nkb, "], got ", scores_in.sizes());
  PROXYATTN_CHECK(kstar_in.size(0) == batch, "kstar must be [B, Hq] with B = ", batch, ", got ", kstar_in.sizes());
  PROXYATTN_CHECK(G >= 1 && Hq >= G && Hq % G == 0, "the proxy groups G = scores.size(1) = ", G,
                  " must divide Hq = kstar.size(1) = ", Hq);
  PROXYATTN_CHECK(batch <= 65535 && Hq <= 65535, "batch and Hq must be at most 65535, got ", batch, " and ", Hq);
  PROXYATTN_CHECK(nkb <= kSelectMaxBlocks, "at most ", kSelectMaxBlocks, " key blocks are supported, got ", nkb);
  const OpDevice guard(scores_in.device(), "select_blocks");
  check_key_blocks_fit(select_blocks_smem_bytes(nkb), nkb, scores_in.device(), "select_blocks");
  const at::Tensor scores = scores_in.contiguous();
  const at::Tensor kstar = kstar_in.contiguous();
  at::Tensor counts = at::empty({batch, Hq, nqb}, kstar.options());
  at::Tensor indices = at::empty({batch, Hq, nqb, nkb}, kstar.options().dtype(at::kShort));

  SelectBlocksParams p{};
  p.scores = scores.data_ptr<float>();
  p.kstar = kstar.data_ptr<int>();
  p.counts = counts.data_ptr<int>();
  p.indices = indices.data_ptr<int16_t>();
  p.cu_seqlens_q = cu_q.has_value() ? cu_q->data_ptr<int>() : nullptr;
  p.cu_seqlens_k = cu_k.has_value() ? cu_k->data_ptr<int>() : nullptr;
  // Varlen totals are unknown here without a sync; select_blocks reads no q/k rows, so the
  // lengths are only clamped into [0, max_seqlen].
  p.total_q = INT64_MAX / 4;
  p.total_k = INT64_MAX / 4;
  p.batch = static_cast<int>(batch);
  p.num_heads = static_cast<int>(Hq);
  p.num_groups = static_cast<int>(G);
  p.max_seqlen_q = static_cast<int>(max_q);
  p.max_seqlen_k = static_cast<int>(max_k);
  p.nqb = nqb;
  p.nkb = nkb;
  p.block_size = static_cast<int>(block_size);
  p.sink_blocks = static_cast<int>(std::min<int64_t>(sink_blocks, INT32_MAX));
  p.local_blocks = static_cast<int>(std::min<int64_t>(local_blocks, INT32_MAX));
  p.min_budget = static_cast<int>(std::min<int64_t>(min_budget, INT32_MAX));
  p.budget_seqlen = static_cast<int>(budget_seqlen);
  p.causal = causal;
  PROXYATTN_CUDA_CHECK(run_select_blocks(p, current_stream()));
  PROXYATTN_LAUNCH_CHECK();
  return {counts, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(proxyattn, CUDA, m) {
  m.impl("proxy_block_scores", &proxy_block_scores);
  m.impl("head_budgets", &head_budgets);
  m.impl("select_blocks", &select_blocks);
}

}  // namespace proxyattn
