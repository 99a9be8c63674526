// Torch glue of torch.ops.proxyattn.block_sparse_attention (docs/design.md section 2, stage 4) on CUDA:
// checks, the choice of kernel, allocation of out (contiguous, like q) and lse (fp32: fixed length
// [B, Hq, Nq], varlen [Hq, total_q]), the params struct, and the launch on the current stream.
// Selection: counts int32, indices int16 (as select_blocks writes them) or int32. Layouts (fixed
// length, varlen, paged K/V with page_table): see csrc/kernels/common/bsa_params.h. No host synchronisation (cu_seqlens are never read here).
//
// Kernel choice: PROXYATTN_BSA_BACKEND, read once per call before anything else (ops/common.h).
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <tuple>

#include "kernels/common/bsa_launch.h"
#include "kernels/common/bsa_params.h"
#include "ops/common.h"

namespace proxyattn {
namespace {

constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();

}  // namespace

std::tuple<at::Tensor, at::Tensor> block_sparse_attention_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& counts,
    const at::Tensor& indices, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    int64_t block_size, double softmax_scale, bool causal, const std::optional<at::Tensor>& page_table) {
  const BsaBackend backend = backend_from_env();
  check_cuda(q, "q");
  check_cuda(k, "k");
  check_cuda(v, "v");
  check_half(q, "q");
  PROXYATTN_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                  "q, k, v must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
                  v.scalar_type());
  PROXYATTN_CHECK(k.device() == q.device() && v.device() == q.device() && counts.device() == q.device() &&
                      indices.device() == q.device(),
                  "q, k, v, counts, indices must be on one device, got ", q.device(), ", ", k.device(), ", ",
                  v.device(), ", ", counts.device(), ", ", indices.device());
  PROXYATTN_CHECK(cu_seqlens_q.has_value() == cu_seqlens_k.has_value(),
                  "cu_seqlens_q and cu_seqlens_k must be given together (varlen) or both be None");
  const bool varlen = cu_seqlens_q.has_value();
  check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q);
  check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", q);

  const bool paged = paged_call(page_table, varlen);
  const int64_t rank = varlen ? 3 : 4;
  PROXYATTN_CHECK(q.dim() == rank, "q must be ", rank, "-D (", varlen ? "[total_q, Hq, D]" : "[B, Nq, Hq, D]",
                  "), got shape ", q.sizes());
  if (!paged) {
    PROXYATTN_CHECK(k.dim() == rank, "k must be ", rank, "-D (", varlen ? "[total_k, Hkv, D]" : "[B, Nk, Hkv, D]",
                    "), got shape ", k.sizes());
  } else {  // the cache's other rules are check_kv_pages' (below); its rank is read first
    check_paged_k_rank(k);
  }
  PROXYATTN_CHECK(v.sizes() == k.sizes(), "v must have the shape of k ", k.sizes(), ", got ", v.sizes());
  check_last_dim_contiguous(q, "q");
  check_last_dim_contiguous(k, "k");
  check_last_dim_contiguous(v, "v");

  const int64_t head_dim = q.size(-1);
  const int64_t hq = q.size(-2);
  const int64_t hkv = k.size(-2);
  PROXYATTN_CHECK(head_dim == 64 || head_dim == 128, "head dim must be 64 or 128, got ", head_dim);
  PROXYATTN_CHECK(k.size(-1) == head_dim, "k head dim must equal q head dim ", head_dim, ", got ", k.size(-1));
  PROXYATTN_CHECK(hq >= 1 && hkv >= 1 && hq % hkv == 0, "q heads (", hq, ") must be a positive multiple of kv heads (",
                  hkv, ")");
  PROXYATTN_CHECK(block_size == 64 || block_size == 128, "block_size must be 64 or 128, got ", block_size);
  check_softmax_scale(softmax_scale);

  int64_t batch, nq, nk;
  if (varlen) {
    batch = cu_seqlens_q->size(0) - 1;
    PROXYATTN_CHECK(cu_seqlens_k->size(0) == batch + 1, "cu_seqlens_k must have length ", batch + 1,
                    " like cu_seqlens_q, got ", cu_seqlens_k->size(0));
    nq = max_seqlen_q;
    nk = max_seqlen_k;
    PROXYATTN_CHECK(nq >= 0 && nk >= 0, "max_seqlen_q/k must be >= 0, got ", nq, ", ", nk);
  } else {
    batch = q.size(0);
    nq = q.size(1);
    nk = k.size(1);
    PROXYATTN_CHECK(k.size(0) == batch, "k batch must equal q batch ", batch, ", got ", k.size(0));
    PROXYATTN_CHECK(max_seqlen_q == nq && max_seqlen_k == nk, "fixed length needs max_seqlen_q == Nq (", nq,
                    ") and max_seqlen_k == Nk (", nk, "), got ", max_seqlen_q, ", ", max_seqlen_k);
    PROXYATTN_CHECK(!causal || nq <= nk, "causal attention needs Nq <= Nk, got Nq ", nq, ", Nk ", nk);
  }
  PROXYATTN_CHECK(nq <= kIntMax && nk <= kIntMax, "sequence lengths must fit in int32, got ", nq, ", ", nk);
  const KvPages pages = check_kv_pages(page_table, k, &v, batch, nk);
  const int64_t nqb = ceil_div(nq, block_size);

  PROXYATTN_CHECK(counts.scalar_type() == at::kInt, "counts must be int32, got ", counts.scalar_type());
  PROXYATTN_CHECK(indices.scalar_type() == at::kShort || indices.scalar_type() == at::kInt,
                  "indices must be int16 or int32, got ", indices.scalar_type());
  PROXYATTN_CHECK(counts.dim() == 3 && counts.size(0) == batch && counts.size(1) == hq && counts.size(2) == nqb,
                  "counts must have shape [B, Hq, nqb] = [", batch, ", ", hq, ", ", nqb, "], got ", counts.sizes());
  PROXYATTN_CHECK(indices.dim() == 4 && indices.size(0) == batch && indices.size(1) == hq && indices.size(2) == nqb &&
                      indices.size(3) >= 1,
                  "indices must have shape [B, Hq, nqb, K] = [", batch, ", ", hq, ", ", nqb, ", K >= 1], got ",
                  indices.sizes());
  PROXYATTN_CHECK(indices.size(3) <= kIntMax, "index rows too long: ", indices.size(3));
  check_aligned(q, "q");
  check_aligned(k, "k");
  check_aligned(v, "v");

  const OpDevice guard(q.device(), "block_sparse_attention");
  BsaParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  const int r = varlen ? 0 : 1;       // dim of rows
  const int rk = paged ? 1 : r;       // of key rows (paged: the slot dim of the caches)
  p.q_batch_stride = varlen ? 0 : q.stride(0);
  p.k_batch_stride = varlen ? 0 : k.stride(0);
  p.v_batch_stride = varlen ? 0 : v.stride(0);
  p.q_row_stride = q.stride(r);
  p.k_row_stride = k.stride(rk);
  p.v_row_stride = v.stride(rk);
  p.q_head_stride = q.stride(r + 1);
  p.k_head_stride = k.stride(rk + 1);
  p.v_head_stride = v.stride(rk + 1);
  p.pages = pages;
  if (varlen) {
    p.cu_seqlens_q = cu_seqlens_q->data_ptr<int>();
    p.cu_seqlens_k = cu_seqlens_k->data_ptr<int>();
  }
  p.total_q = q.size(0);
  p.total_k = paged ? kPagedTotalK : k.size(0);
  p.counts = counts.data_ptr<int>();
  p.counts_batch_stride = counts.stride(0);
  p.counts_head_stride = counts.stride(1);
  p.counts_block_stride = counts.stride(2);
  // int16 (select_blocks' output) or int32 (hand-made); exactly one pointer is set.
  if (indices.scalar_type() == at::kShort) {
    p.indices16 = indices.data_ptr<int16_t>();
  } else {
    p.indices = indices.data_ptr<int>();
  }
  p.indices_batch_stride = indices.stride(0);
  p.indices_head_stride = indices.stride(1);
  p.indices_block_stride = indices.stride(2);
  p.indices_entry_stride = indices.stride(3);
  p.batch = static_cast<int>(batch);
  p.q_heads = static_cast<int>(hq);
  p.kv_heads = static_cast<int>(hkv);
  p.head_dim = static_cast<int>(head_dim);
  p.seqlen_q = static_cast<int>(nq);
  p.seqlen_k = static_cast<int>(nk);
  p.block_size = static_cast<int>(block_size);
  p.num_q_blocks = static_cast<int>(nqb);
  p.num_k_blocks = static_cast<int>(indices.size(3));
  // A scale below FLT_MIN is raised to it (as stage 2 clamps its own, estimate_ops.cpp): the kernels'
  // fast math flushes a subnormal exp2 factor to 0, and a masked -inf times 0 is NaN; at that floor
  // every logit is within a rounding of 0 either way. Above kMaxSoftmaxScale bsa_plan refuses.
  const double scale = std::max(softmax_scale, static_cast<double>(FLT_MIN));
  p.softmax_scale = static_cast<float>(scale);
  p.softmax_scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.causal = causal;

  // The kernel for this call, decided once (device arch, supported shapes, work order).
  const BsaPlan plan = bsa_plan(p, backend);
  PROXYATTN_CHECK(!plan.refused, "block_sparse_attention: PROXYATTN_BSA_BACKEND=hopper, but ", plan.error);
  PROXYATTN_CHECK(plan.error.empty(), "block_sparse_attention: ", plan.error);

  // Fixed length: the kernel writes every element. Varlen: packed rows outside every sequence
  // (cu_seqlens_q[B] < total_q, or a sequence longer than max_seqlen_q) read as out 0, lse -inf.
  at::Tensor out = varlen ? at::zeros(q.sizes(), q.options()) : at::empty(q.sizes(), q.options());
  at::Tensor lse = varlen ? at::full({hq, q.size(0)}, -std::numeric_limits<float>::infinity(),
                                     q.options().dtype(at::kFloat))
                          : at::empty({batch, hq, nq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0 || nqb == 0 || batch == 0) return {out, lse};
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.out_batch_stride = varlen ? 0 : out.stride(0);
  p.out_row_stride = out.stride(r);
  p.out_head_stride = out.stride(r + 1);
  p.lse_batch_stride = varlen ? 0 : lse.stride(0);
  p.lse_head_stride = varlen ? lse.stride(0) : lse.stride(1);
  // The Hopper kernel's work counter, zero at launch (4 bytes).
  at::Tensor tile_counter;
  if (plan.path == BsaPath::kHopper) {
    tile_counter = at::zeros({1}, q.options().dtype(at::kInt));
    p.tile_counter = tile_counter.data_ptr<int>();
  }
  PROXYATTN_CUDA_CHECK(run_bsa_fwd(p, q.scalar_type() == at::kBFloat16, plan, current_stream()));
  PROXYATTN_LAUNCH_CHECK();
  return {out, lse};
}

TORCH_LIBRARY_IMPL(proxyattn, CUDA, m) { m.impl("block_sparse_attention", &block_sparse_attention_cuda); }

}  // namespace proxyattn
