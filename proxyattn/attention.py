"""proxy_attention: stages 1-4 chained on the current stream, with no host synchronisation.

Fixed length: q [B, Nq, Hq, D], k/v [B, Nk, Hkv, D]. Varlen: q [total_q, Hq, D], k/v
[total_k, Hkv, D] with int32 cu_seqlens_q/k [B + 1]. Causal attention is aligned bottom-right.
Below `config.dense_below` keys the call runs dense attention instead.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops, reference
from .config import ProxyAttnConfig

_DEFAULT_CONFIG = ProxyAttnConfig()  # frozen: shared by calls without a config

# csrc/ops/dense_fast.cpp: the dense path in one C++ call (None without the extension).
_dense_fast = getattr(ops._C, "dense_fast", None) if ops.HAS_EXTENSION else None


class ProxyAttnSelection(NamedTuple):
    """Telemetry of one call, all tensors on the inputs' device (no host sync).

    counts int32 [B, Hq, nqb], indices int16 [B, Hq, nqb, nkb] (ascending, -1 padded), kstar [B, Hq],
    density [B, Hq] (selected / causal candidate block pairs; 0 for a sequence without any, such as an
    empty one), budget_ratio [B, Hq] (kstar / non-forced candidates of the last query block; 0 when
    none are left).
    `dense` is True when the call ran dense attention (below dense_below).
    """

    counts: Tensor
    indices: Tensor
    kstar: Tensor
    density: Tensor
    budget_ratio: Tensor
    dense: bool


def _lengths(lay: ops.Layout, cu_q: Optional[Tensor], cu_k: Optional[Tensor], device) -> Tuple[Tensor, Tensor]:
    if not lay.varlen:
        nq = torch.full((lay.batch,), lay.max_seqlen_q, dtype=torch.int64, device=device)
        nk = torch.full((lay.batch,), lay.max_seqlen_k, dtype=torch.int64, device=device)
        return nq, nk
    # Device-resident cu_seqlens are not validated (that would synchronise): clamp the lengths the
    # way the kernels do, so telemetry never indexes past the selection.
    return (torch.diff(cu_q.to(device)).long().clamp(0, lay.max_seqlen_q),
            torch.diff(cu_k.to(device)).long().clamp(0, lay.max_seqlen_k))


def candidate_counts(nq: Tensor, nk: Tensor, nqb: int, block: int, causal: bool) -> Tensor:
    """c_m int64 [B, nqb] from per-sequence lengths (device tensors); 0 past a sequence's blocks."""
    m = torch.arange(nqb, device=nq.device)[None, :]
    nkb = (nk[:, None] + block - 1) // block
    live = m * block < nq[:, None]
    if causal:
        last_row = torch.minimum((m + 1) * block, nq[:, None]) - 1
        c = ((nk[:, None] - nq[:, None] + last_row) // block + 1).clamp(min=0)  # 0: rows that see no key
    else:
        c = nkb.expand(-1, nqb)
    return torch.where(live, c, 0)


def _forced_last(c_last: Tensor, nq: Tensor, nk: Tensor, cfg: ProxyAttnConfig, causal: bool) -> Tensor:
    """f_last [B, 1]: the forced blocks of each sequence's last query block (reference.forced_range's
    rule, on device tensors)."""
    S = cfg.block_size
    m = torch.clamp((nq + S - 1) // S - 1, min=0)[:, None]
    start = reference.local_start(m, nq[:, None], nk[:, None], S, cfg.local_blocks, causal, c_last)
    sink = torch.clamp(c_last, max=cfg.sink_blocks)
    return sink + c_last - torch.maximum(start, sink)


def full_selection(nq: Tensor, nk: Tensor, nqb: int, nkb: int, hq: int, block: int, causal: bool
                   ) -> Tuple[Tensor, Tensor]:
    """Every candidate block of every row: counts int32 [B, Hq, nqb], indices [B, Hq, nqb, nkb]
    (int16 like select_blocks' while the block numbers fit, else int32), as views that repeat one
    row per head (the kernels read a selection through its strides; telemetry copies them)."""
    c = candidate_counts(nq, nk, nqb, block, causal)  # [B, nqb]
    n = torch.arange(nkb, device=nq.device)
    idx = torch.where(n[None, None, :] < c[:, :, None], n, -1).to(ops.index_dtype(nkb))
    b = c.shape[0]
    return c.to(torch.int32)[:, None, :].expand(b, hq, nqb), idx[:, None].expand(b, hq, nqb, nkb)


def _telemetry(counts: Tensor, indices: Tensor, kstar: Tensor, nq: Tensor, nk: Tensor, cfg: ProxyAttnConfig,
               causal: bool, dense: bool) -> ProxyAttnSelection:
    nqb = counts.shape[2]
    c = candidate_counts(nq, nk, nqb, cfg.block_size, causal)  # [B, nqb]
    pairs = c.sum(dim=1, keepdim=True)
    density = torch.where(pairs > 0, counts.sum(dim=2).double() / pairs.clamp(min=1).double(), 0.0)
    last = torch.clamp((nq + cfg.block_size - 1) // cfg.block_size - 1, min=0)
    c_last = torch.gather(c, 1, last[:, None])  # [B, 1]
    free = c_last - _forced_last(c_last, nq, nk, cfg, causal)
    ratio = torch.where(free > 0, kstar.double() / free.clamp(min=1).double(), 0.0)
    return ProxyAttnSelection(counts, indices, kstar, density.float(), ratio.float(), dense)


def sdpa_bottom_right(qt: Tensor, kt: Tensor, vt: Tensor, scale: Optional[float], causal: bool,
                      dropout_p: float = 0.0) -> Tensor:
    """torch SDPA on heads-first tensors [B, H, N, D]: causal aligned bottom-right (torch's
    lower-right bias when Nq != Nk, no mask materialised), GQA without repeating K/V;
    differentiable. The one such call of the library (proxy_attention's dense path, the
    transformers integration's fallback)."""
    nq, nk = qt.shape[2], kt.shape[2]
    mask = None
    if causal and nq != nk:
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(nq, nk)
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, dropout_p=dropout_p,
                                          is_causal=causal and nq == nk, scale=scale,
                                          enable_gqa=qt.shape[1] != kt.shape[1])


def _sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> Tensor:
    """sdpa_bottom_right on fixed-length tensors [B, N, H, D]; out [B, N, H, D] contiguous."""
    out = sdpa_bottom_right(*(t.transpose(1, 2) for t in (q, k, v)), scale, causal)
    return out.transpose(1, 2).contiguous()


def dense_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, softmax_scale: Optional[float] = None
                    ) -> Tensor:
    """Dense attention in proxy_attention's fixed-length layout (q [B, Nq, Hq, D], k/v [B, Nk, Hkv, D];
    causal aligned bottom-right): torch SDPA on CUDA, the reference on CPU. The library's one dense
    helper (proxy_attention's dense path, and the baseline of proxyattn.metrics)."""
    lay = ops.check_qkv(q, k, v, None, None, None, None, causal)
    scale = ops.resolve_scale(softmax_scale, lay.head_dim)
    if q.is_cuda:
        return _sdpa(q, k, v, scale, causal)
    return reference.dense_attention(q, k, v, None, None, scale, causal)[0]


def _stage4(q, k, v, counts, indices, cu_q, cu_k, lay, block, scale, causal, page_table=None) -> Tensor:
    return ops.call("block_sparse_attention", q, k, v, counts, indices, cu_q, cu_k, lay.max_seqlen_q,
                    lay.max_seqlen_k, block, scale, causal, page_table)[0]


def _run(q, k, v, lay: ops.Layout, cu_q, cu_k, cfg: Optional[ProxyAttnConfig], causal: bool,
         return_selection: bool, page_table: Optional[Tensor] = None
         ) -> Union[Tensor, Tuple[Tensor, ProxyAttnSelection]]:
    """The composite. page_table (CUDA, varlen): k and v are paged caches that the kernels read
    through it, and cu_k holds the prefix sums of the key lengths (proxyattn.paged)."""
    if cfg is None:
        cfg = _DEFAULT_CONFIG
    if not isinstance(cfg, ProxyAttnConfig):
        raise TypeError(f"config must be a ProxyAttnConfig or None, got {type(cfg).__name__}")
    G = cfg.proxy_heads(lay.q_heads, lay.kv_heads)
    S = cfg.block_size
    scale = cfg.scale(lay.head_dim)
    dense = cfg.runs_dense(lay.max_seqlen_k, lay.max_seqlen_q)
    # A dense call runs stage 4 on every candidate block when varlen on CUDA, and under
    # torch.compile where torch math would not trace (a bottom-right causal mask, Nq < Nk, on CUDA;
    # the reference on the CPU). Otherwise SDPA (CUDA) or the reference (CPU), both differentiable.
    staged = dense and ((lay.varlen and q.is_cuda) or (torch.compiler.is_compiling() and (
        not q.is_cuda or (causal and lay.max_seqlen_q != lay.max_seqlen_k))))
    if not dense or staged:
        # These paths run proxyattn's ops, which have no backward; the dense ones below (SDPA, and
        # the reference on CPU) are torch math and keep their gradients.
        ops.check_no_grad("proxy_attention" + ("" if dense else "'s sparse path"), [("q", q), ("k", k), ("v", v)])
    if dense:
        full = None
        if return_selection or staged:
            nq, nk = _lengths(lay, cu_q, cu_k, q.device)
            nqb, nkb = -(-lay.max_seqlen_q // S), -(-lay.max_seqlen_k // S)
            full = full_selection(nq, nk, nqb, nkb, lay.q_heads, S, causal)
        if staged:
            out = _stage4(q, k, v, *full, cu_q, cu_k, lay, S, scale, causal, page_table)
        elif not q.is_cuda:
            out = reference.dense_attention(q, k, v, cu_q, cu_k, scale, causal)[0]
        else:
            out = _sdpa(q, k, v, scale, causal)
        if not return_selection:
            return out
        kstar = torch.zeros(lay.batch, lay.q_heads, dtype=torch.int32, device=q.device)
        return out, _telemetry(*(t.contiguous() for t in full), kstar, nq, nk, cfg, causal, dense=True)
    mq, mk = lay.max_seqlen_q, lay.max_seqlen_k
    ops.check_key_blocks(mk, S)  # before any kernel runs
    # Stage 2 before stage 1 (they are independent): its op refuses a row of key blocks that does
    # not fit the device's shared memory before any kernel of the call has run. On the GPUs built
    # for, stage 3's row fits wherever stage 2's does (csrc/kernels/estimate/head_budgets.h and
    # select_blocks.h: only an opt-in limit in [131072, 139264) bytes would fit one and not the other).
    kstar = ops.call("head_budgets", q, k, cu_q, cu_k, mq, mk, S, float(cfg.gamma), cfg.sink_blocks,
                     cfg.local_blocks, scale, causal, page_table)
    scores = ops.call("proxy_block_scores", q, k, cu_q, cu_k, mq, mk, S, G, cfg.stride, scale, causal, page_table)
    budget = kstar
    if lay.varlen:
        # Each sequence as if alone: one that would run dense (runs_dense) gets every candidate
        # block (a budget of nkb makes select_blocks' k_m = c_m in every row), decided on the
        # device, and reports kstar 0 like the dense path.
        nq, nk = _lengths(lay, cu_q, cu_k, q.device)
        short = cfg.runs_dense(nk, nq)[:, None]
        budget = torch.where(short, -(-mk // S), kstar)
        kstar = torch.where(short, 0, kstar)
    counts, indices = ops.call("select_blocks", scores, budget, cu_q, cu_k, mq, mk, S, cfg.sink_blocks,
                               cfg.local_blocks, cfg.min_budget, causal)
    out = _stage4(q, k, v, counts, indices, cu_q, cu_k, lay, S, scale, causal, page_table)
    if not return_selection:
        return out
    if not lay.varlen:
        nq, nk = _lengths(lay, cu_q, cu_k, q.device)
    return out, _telemetry(counts, indices, kstar, nq, nk, cfg, causal, dense=False)


def proxy_attention(q: Tensor, k: Tensor, v: Tensor, config: Optional[ProxyAttnConfig] = None, *,
                    causal: bool = True, return_selection: bool = False
                    ) -> Union[Tensor, Tuple[Tensor, ProxyAttnSelection]]:
    """ProxyAttn over q [B, Nq, Hq, D], k/v [B, Nk, Hkv, D] (bf16/fp16 on CUDA; fp32 too on CPU).

    Returns out [B, Nq, Hq, D] (contiguous), and a ProxyAttnSelection if return_selection.
    Inference only: with grad mode on and an input that requires grad, the sparse path raises
    RuntimeError; the dense path (fewer keys than dense_below; torch SDPA on CUDA, the reference
    on the CPU) stays differentiable, except where a traced torch.compile graph runs it as stage 4
    (the CPU, and causal Nq != Nk on CUDA; docs/design.md), which raises the same error."""
    if _dense_fast is not None and not return_selection and not torch.compiler.is_compiling():
        # A dense call is one SDPA kernel; the C++ entry point runs it without the interpreter's
        # host time in front, or returns None for anything but the plain valid case.
        cfg = _DEFAULT_CONFIG if config is None else config
        if (type(cfg) is ProxyAttnConfig and type(k) is Tensor and k.dim() == 4 and type(q) is Tensor and q.dim() == 4
                and cfg.runs_dense(k.shape[1], q.shape[1])):
            out = _dense_fast(q, k, v, causal, cfg.num_proxy_heads, cfg.softmax_scale)
            if out is not None:
                return out
    lay = ops.check_qkv(q, k, v, None, None, None, None, causal)
    return _run(q, k, v, lay, None, None, config, causal, return_selection)


def proxy_attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, config: Optional[ProxyAttnConfig] = None, *,
                           causal: bool = True, return_selection: bool = False
                           ) -> Union[Tensor, Tuple[Tensor, ProxyAttnSelection]]:
    """ProxyAttn over packed sequences: q [total_q, Hq, D], k/v [total_k, Hkv, D], int32
    cu_seqlens_q/k [B + 1]. Each sequence behaves exactly as if it ran alone: one that would run
    dense (fewer than dense_below keys, or fewer queries than block_size) attends to every key, the
    others run sparse (the whole call runs dense when every sequence would). A sequence may be empty
    (equal neighbouring entries of cu_seqlens_q, and of cu_seqlens_k or not), on the CPU as on CUDA:
    it has no rows and selects no block, and the others are unaffected (docs/design.md); a call
    whose q or k holds no row at all is refused. Every row of k and v must be finite, rows past
    cu_seqlens_k[B] included (the Hopper kernel loads whole key blocks; docs/design.md).
    max_seqlen_q/k must bound every sequence's length: CPU cu_seqlens are checked against them, CUDA
    ones are not read on the host (that would synchronise), and the kernels cut a longer sequence to
    its first max_seqlen_q queries and max_seqlen_k keys. Memory follows B * max_seqlen, not the
    total (README, Memory): batch one long sequence apart from many short. Inference only on CUDA,
    where every path runs proxyattn's ops (no backward); on the CPU a call below dense_below runs the
    reference's dense attention, which keeps its gradients, as proxy_attention's dense path does
    (except where a traced torch.compile graph runs it as stage 4, which raises the inference-only
    error)."""
    if cu_seqlens_q is None or cu_seqlens_k is None:
        raise ValueError("proxy_attention_varlen needs cu_seqlens_q and cu_seqlens_k")
    lay = ops.check_qkv(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal)
    return _run(q, k, v, lay, cu_seqlens_q, cu_seqlens_k, config, causal, return_selection)
