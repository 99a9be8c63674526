"""Paged KV cache input: proxy_attention_paged, and gather_paged_kv for the stage functions.

Serving engines keep K and V in pages: k_cache, v_cache [num_pages, page_size, Hkv, D] (any page,
token and head strides, last dim contiguous), and per sequence a row of page_table int32
[B, max_pages] naming its pages in order; the keys of sequence b are its first seqlens_k[b] slots
through those pages. A paged call computes exactly what proxy_attention_varlen computes on the same
keys. On CUDA, where the build has the kernels, stages 1, 2 and 4 read K/V through the page table
(no copy: TMA boxes of the pages in the Hopper attention kernel, row gathers in the portable one);
elsewhere (the CPU, or a build without kernels) the keys are gathered into packed K/V first.

Memory: a gather holds B * max_seqlen_k rows of K and V on CUDA (a fixed size, so a call can be
captured in a CUDA graph; rows past cu_seqlens_k[-1] are padding, copies of the last key that no op
reads), exactly cu_seqlens_k[-1] rows on the CPU, where the seqlens are host values.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import attention, ops, reference
from .attention import ProxyAttnSelection, proxy_attention_varlen
from .config import ProxyAttnConfig
from .ops import PAGE_SIZES  # noqa: F401  (re-exported: the page sizes proxy_attention_paged takes)

_DEFAULT_CONFIG = ProxyAttnConfig()
_PAGED_OPS = ("proxy_block_scores", "head_budgets", "block_sparse_attention")  # read K/V through pages on CUDA


class PagedKV(NamedTuple):
    """Keys and values gathered from a paged cache, packed for the varlen stage calls.

    k, v: [rows, Hkv, D] contiguous (v is None when no v_cache was given); sequence b holds rows
    cu_seqlens_k[b] .. cu_seqlens_k[b + 1]. rows = B * max_seqlen_k on CUDA (rows past
    cu_seqlens_k[-1] are unused padding), cu_seqlens_k[-1] on the CPU.
    cu_seqlens_k: int32 [B + 1] on the cache's device. max_seqlen_k: the int that was passed.
    """

    k: Tensor
    v: Optional[Tensor]
    cu_seqlens_k: Tensor
    max_seqlen_k: int


# ------------------------------------------------------------------ validation


def _standins(q: Tensor, k_cache: Tensor, v_cache: Tensor, seqlens_k: Tensor, cu_seqlens_q: Tensor,
              max_seqlen_k: int) -> Tuple[Tensor, Tensor, Tensor]:
    """k, v and cu_seqlens_k as check_qkv should see them, built without running anything on the
    device: views of the caches' first slot expanded to the gathered row count (dtype, device,
    head and last-dim strides of the caches), and the cumulated seqlens where they are on the CPU
    (so check_qkv checks the per-sequence causal lengths too). On CUDA check_qkv reads no
    cu_seqlens values, so cu_seqlens_q (validated, B + 1 entries) stands in for cu_seqlens_k."""
    if seqlens_k.device.type == "cpu" and cu_seqlens_q.device.type == "cpu":
        cu_k = F.pad(torch.cumsum(seqlens_k, 0, dtype=torch.int32), (1, 0))
        rows = int(cu_k[-1])
    else:
        cu_k, rows = cu_seqlens_q, cu_seqlens_q.shape[0] * max_seqlen_k
    return (k_cache[0, :1].expand(rows, -1, -1), v_cache[0, :1].expand(rows, -1, -1), cu_k)


def check_paged(q: Tensor, k_cache: Tensor, v_cache: Tensor, page_table: Tensor, seqlens_k: Tensor,
                cu_seqlens_q: Tensor, max_seqlen_q: int, max_seqlen_k: int, config: Optional[ProxyAttnConfig],
                causal: bool) -> ops.Layout:
    """Validate the arguments of proxy_attention_paged; return the layout of the gathered call.
    Raises TypeError/ValueError (RuntimeError where a gradient would be needed) before anything
    runs on the device. The rules on q, K/V and cu_seqlens_q are ops.check_qkv's, applied to the
    keys the call will gather; those of the config are the ones proxy_attention_varlen applies."""
    ops._require_tensor("q", q)
    ops._require_tensor("v_cache", v_cache)
    batch = ops._check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q)
    ops.check_paged_cache(k_cache, v_cache, page_table, seqlens_k, max_seqlen_k, batch)
    ops.check_no_grad("proxy_attention_paged", [("q", q), ("k_cache", k_cache), ("v_cache", v_cache)])
    ops.check_aligned([("k_cache", k_cache), ("v_cache", v_cache)])
    k, v, cu_k = _standins(q, k_cache, v_cache, seqlens_k, cu_seqlens_q, max_seqlen_k)
    try:
        lay = ops.check_qkv(q, k, v, cu_seqlens_q, cu_k, max_seqlen_q, max_seqlen_k, causal)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{exc} (proxy_attention_paged: k and v are the keys and values it gathers from k_cache "
                        f"and v_cache through page_table, cu_seqlens_k the prefix sums of seqlens_k)") from None
    # What proxy_attention_varlen checks of the config once the keys are gathered, checked here first.
    if config is not None and not isinstance(config, ProxyAttnConfig):
        raise TypeError(f"config must be a ProxyAttnConfig or None, got {type(config).__name__}")
    cfg = _DEFAULT_CONFIG if config is None else config
    cfg.proxy_heads(lay.q_heads, lay.kv_heads)
    if not cfg.runs_dense(lay.max_seqlen_k, lay.max_seqlen_q):
        ops.check_key_blocks(lay.max_seqlen_k, cfg.block_size)
    return lay


# ------------------------------------------------------------------ gather


def _gather(k_cache: Tensor, v_cache: Optional[Tensor], page_table: Tensor, seqlens_k: Tensor,
            max_seqlen_k: int) -> PagedKV:
    """The gather itself, on validated arguments; plain torch ops, no host sync on CUDA. Device
    values are clamped, so bad ones cannot read outside the cache: lengths into
    [0, max_seqlen_k], page numbers into [0, num_pages)."""
    lens = seqlens_k.to(torch.int64).clamp(0, max_seqlen_k)
    cu = F.pad(torch.cumsum(lens, 0), (1, 0))  # int64 [B + 1]
    rows = int(cu[-1]) if k_cache.device.type == "cpu" else page_table.shape[0] * max_seqlen_k
    # Padding rows (past the last key) repeat the last key: a kernel tile that runs past a
    # sequence's end reads keys (and masks them), never a slot that holds none.
    k = reference.gather_pages(k_cache, page_table, cu, rows)
    v = None if v_cache is None else reference.gather_pages(v_cache, page_table, cu, rows)
    return PagedKV(k, v, cu.to(torch.int32), max_seqlen_k)


def gather_paged_kv(k_cache: Tensor, v_cache: Optional[Tensor], page_table: Tensor, seqlens_k: Tensor,
                    max_seqlen_k: int) -> PagedKV:
    """Gather the keys (and values) of a paged cache into packed K/V for the varlen stage calls.

    k_cache, v_cache [num_pages, page_size, Hkv, D] (any strides; v_cache may be None, stages 1-3
    need only keys), page_table int32 [B, max_pages], seqlens_k int32 [B] on the cache's device,
    max_seqlen_k >= every seqlens_k. Page sizes: PAGE_SIZES (16 to 256, powers of two).
    Returns PagedKV(k, v, cu_seqlens_k, max_seqlen_k); on CUDA k and v have B * max_seqlen_k rows
    (fixed size: no host sync, graph-capturable; rows past cu_seqlens_k[-1] are padding), on the
    CPU exactly the keys. The stage functions then take them as varlen keys, for example
    proxy_block_scores(q, kv.k, cu_seqlens_q=cu_q, cu_seqlens_k=kv.cu_seqlens_k,
    max_seqlen_q=max_q, max_seqlen_k=kv.max_seqlen_k). Costs a copy of the keys: O(B *
    max_seqlen_k) memory (proxy_attention_paged itself reads pages without it on CUDA)."""
    ops.check_paged_cache(k_cache, v_cache, page_table, seqlens_k, max_seqlen_k, None)
    return _gather(k_cache, v_cache, page_table, seqlens_k, max_seqlen_k)


# ------------------------------------------------------------------ entry point


def proxy_attention_paged(q: Tensor, k_cache: Tensor, v_cache: Tensor, page_table: Tensor, seqlens_k: Tensor,
                          cu_seqlens_q: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                          config: Optional[ProxyAttnConfig] = None, *, causal: bool = True,
                          return_selection: bool = False
                          ) -> Union[Tensor, Tuple[Tensor, ProxyAttnSelection]]:
    """ProxyAttn over packed queries and a paged KV cache, as serving engines hold it.

    q [total_q, Hq, D] packed like proxy_attention_varlen's, cu_seqlens_q int32 [B + 1];
    k_cache, v_cache [num_pages, page_size, Hkv, D] (any page, token and head strides, last dim
    contiguous, 16-byte aligned rows on CUDA; vLLM's views with head stride 2D are fine);
    page_table int32 [B, max_pages], the pages of each sequence in order (entries past a
    sequence's last page are never read); seqlens_k int32 [B], the keys of sequence b being the
    first seqlens_k[b] slots through its pages, the chunk's own keys already written (a prefill
    chunk of Nq rows behind a cached prefix has seqlens_k = prefix + Nq). max_seqlen_q and
    max_seqlen_k bound the lengths; max_pages * page_size must reach max_seqlen_k.

    Computes exactly proxy_attention_varlen on the gathered keys: causal attention aligned
    bottom-right in each sequence, the local-block rule for prefixes of any length, dense
    attention below config.dense_below. Returns out [total_q, Hq, D], and a ProxyAttnSelection if
    return_selection.

    Page sizes: 16, 32, 64, 128 or 256 tokens (PAGE_SIZES); others are refused because the
    Hopper kernel loads pages with TMA boxes and a key block must be a whole number of
    pages or lie inside one; pages under 16 tokens would split a block into more than 8 loads
    (SGLang's default page size 1 must be raised with --page-size); larger pages are unmeasured.

    On CUDA (with the kernels in the build) stages 1, 2 and 4 read K/V through the page table:
    no copy, no host sync, graph-capturable. Elsewhere the keys are gathered first
    (gather_paged_kv: 2 * B * max_seqlen_k * Hkv * D elements on CUDA).

    The slots past a sequence's last key in its last page must hold finite values (zero-initialised
    or stale keys, as engines' caches do): the Hopper kernel loads whole boxes of slots and masks
    the keys past the sequence, and a masked NaN value still turns P V into NaN.

    Validation runs before anything on the device: every argument's dtype, device, shape and
    strides; on the CPU also the values (seqlens_k in [0, max_seqlen_k], the page numbers a
    sequence reads in [0, num_pages), cu_seqlens_q). Device values are not read (that would
    synchronise); the gather clamps them. Inference only."""
    lay = check_paged(q, k_cache, v_cache, page_table, seqlens_k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, config,
                      causal)
    if q.is_cuda and all(ops.cuda_kernel_available(n) for n in _PAGED_OPS):
        # int32 prefix sums cannot wrap: check_paged bounds B * max_seqlen_k. The kernels read the
        # table's rows contiguously (a no-op for a contiguous table, else one small device copy).
        cu_k = F.pad(torch.cumsum(seqlens_k.clamp(0, max_seqlen_k), 0, dtype=torch.int32), (1, 0))
        return attention._run(q, k_cache, v_cache, lay, cu_seqlens_q, cu_k, config, causal, return_selection,
                              page_table.contiguous())
    kv = _gather(k_cache, v_cache, page_table, seqlens_k, max_seqlen_k)
    return proxy_attention_varlen(q, kv.k, kv.v, cu_seqlens_q, kv.cu_seqlens_k, max_seqlen_q, kv.max_seqlen_k,
                                  config, causal=causal, return_selection=return_selection)
