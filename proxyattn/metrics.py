"""Quality metrics of a block selection (docs/design.md section 5): block mass, attention recall,
density, relative output error, needle retrieval.

Layouts follow the package: q [B, Nq, Hq, D], k/v [B, Nk, Hkv, D], any Nq <= Nk, causal aligned
bottom-right. A selection is counts int32 [B, Hq, nqb] and indices int16 or int32
[B, Hq, nqb, K] (ascending, -1 padded), the format of proxyattn.select_blocks. No function here
builds a token-level N x N tensor: attention is evaluated one query block at a time, in head
chunks bounded by _CHUNK_ELEMS. Synthetic inputs and peer estimators live in the source
checkout's bench/ (synthetic.py, peers.py).
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops, reference

_CHUNK_ELEMS = 1 << 25  # elements of one chunk's score matrix (fp32: 128 MiB)

__all__ = ["block_mass", "selection_mask", "selection_from_mask", "RecallResult", "attention_recall", "density",
           "relative_output_error", "NeedleResult", "needle_retrieval", "evaluate_selection"]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _candidates(nq: int, nk: int, S: int, causal: bool) -> List[int]:
    return [reference.candidate_count(m, nq, nk, S, causal) for m in range(_cdiv(nq, S))]


def block_mass(q: Tensor, k: Tensor, block_size: int, *, causal: bool = True,
               softmax_scale: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """True attention mass per block pair, summed over each query block's rows.

    Returns W fp64 [B, Hq, nqb, nkb] (W[b,h,m,n] = sum over rows i of block m of the dense
    softmax mass row i puts on key block n) and rows fp64 [nqb]: the rows of each query block
    that see at least one key (the recall denominator)."""
    B, nq, hq, d = q.shape
    nk, hkv = k.shape[1], k.shape[2]
    S = block_size
    nqb, nkb = _cdiv(nq, S), _cdiv(nk, S)
    scale = softmax_scale if softmax_scale is not None else d ** -0.5
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    rep = hq // hkv
    off = nk - nq
    dev = q.device
    W = torch.zeros(B, hq, nqb, nkb, dtype=torch.float64, device=dev)
    rows = torch.zeros(nqb, dtype=torch.float64)
    keys = torch.arange(nk, device=dev)
    for b in range(B):
        kT = k[b].to(dt).permute(1, 2, 0)  # [Hkv, D, Nk], converted once per sequence
        for m in range(nqb):
            r0, r1 = m * S, min(nq, (m + 1) * S)
            pos = off + torch.arange(r0, r1, device=dev)
            kend = min(nk, off + r1) if causal else nk
            rows[m] = float(((pos >= 0).sum() if causal else r1 - r0)) if kend > 0 else 0.0
            if kend <= 0:
                continue
            nb = _cdiv(kend, S)
            per = max(1, min(rep, _CHUNK_ELEMS // ((r1 - r0) * kend)))  # query heads of one KV head per matmul
            for g in range(hkv):
                for h0 in range(g * rep, (g + 1) * rep, per):
                    h1 = min((g + 1) * rep, h0 + per)
                    qc = q[b, r0:r1, h0:h1].to(dt).transpose(0, 1)  # [h, R, D]
                    logits = torch.matmul(qc, kT[g, :, :kend]) * scale  # [h, R, L]
                    if causal:
                        logits.masked_fill_(keys[None, None, :kend] > pos[None, :, None], -math.inf)
                    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
                    p = torch.exp(logits - torch.where(torch.isinf(lse), 0.0, lse))
                    p = F.pad(p, (0, nb * S - kend))
                    W[b, h0:h1, m, :nb] = p.view(h1 - h0, r1 - r0, nb, S).sum(dim=(1, 3)).double()
    return W, rows


def selection_mask(counts: Tensor, indices: Tensor, nkb: int) -> Tensor:
    """Bool [B, Hq, nqb, nkb] from a selection; entries past counts and -1 are ignored."""
    idx = indices.long()
    valid = (torch.arange(idx.shape[-1], device=idx.device) < counts[..., None].long()) & (idx >= 0) & (idx < nkb)
    mask = torch.zeros(*idx.shape[:-1], nkb + 1, dtype=torch.bool, device=idx.device)
    mask.scatter_(-1, torch.where(valid, idx, nkb), True)
    return mask[..., :nkb]


def selection_from_mask(keep: Tensor) -> Tuple[Tensor, Tensor]:
    """counts int32 [..., nqb] and ascending, -1 padded indices [..., nqb, nkb] of a bool mask
    (int16 as select_blocks writes them while block numbers fit, else int32)."""
    nkb = keep.shape[-1]
    n = torch.arange(nkb, device=keep.device)
    idx = torch.sort(torch.where(keep, n, nkb), dim=-1).values
    return keep.sum(dim=-1).to(torch.int32), torch.where(idx < nkb, idx, -1).to(ops.index_dtype(nkb))


class RecallResult(NamedTuple):
    mean: float  # mean over (b, h, rows that see a key) of the dense mass inside the selection
    per_head: Tensor  # fp64 [B, Hq]: the same mean per (b, h)


def attention_recall(q: Tensor, k: Tensor, counts: Tensor, indices: Tensor, block_size: int, causal: bool = True,
                     *, softmax_scale: Optional[float] = None,
                     mass: Optional[Tuple[Tensor, Tensor]] = None) -> RecallResult:
    """Mean true softmax mass inside the selected blocks. `mass` = block_mass(...) reuses a
    precomputed block-mass matrix (recall is linear in it)."""
    W, rows = mass if mass is not None else block_mass(q, k, block_size, causal=causal, softmax_scale=softmax_scale)
    sel = selection_mask(counts.to(W.device), indices.to(W.device), W.shape[-1])
    per = (W * sel).sum(dim=(2, 3)) / rows.sum().clamp(min=1).to(W.device)
    return RecallResult(float(per.mean()), per.cpu())


def _seq_lens(seq_lens, B: int) -> List[Tuple[int, int]]:
    if isinstance(seq_lens, int):
        return [(seq_lens, seq_lens)] * B
    if isinstance(seq_lens, tuple) and len(seq_lens) == 2 and all(isinstance(x, int) for x in seq_lens):
        return [seq_lens] * B
    vals = seq_lens.tolist() if isinstance(seq_lens, Tensor) else list(seq_lens)
    if len(vals) != B:
        raise ValueError(f"seq_lens must give one length per batch item ({B}), got {len(vals)}")
    return [(int(x), int(x)) if not isinstance(x, (tuple, list)) else (int(x[0]), int(x[1])) for x in vals]


def density(counts: Tensor, seq_lens, block_size: int, causal: bool = True, *, per_head: bool = False
            ) -> Union[float, Tensor]:
    """Computed block pairs over causal block pairs (sum over b, h, rows of counts, over
    Hq * sum_b sum_m c_m). seq_lens: N (Nq = Nk), (Nq, Nk), or one N / (Nq, Nk) per batch item.
    per_head=True returns fp64 [B, Hq]. Counts as select_blocks writes them (distinct candidates
    only); for a hand-made selection, whose indices stage 4 reads as a set, count the blocks of
    selection_mask instead."""
    B, hq, _ = counts.shape
    num = torch.zeros(B, hq, dtype=torch.float64)
    den = torch.zeros(B, 1, dtype=torch.float64)
    cnt = counts.detach().to("cpu", torch.int64)
    for b, (nq, nk) in enumerate(_seq_lens(seq_lens, B)):
        c = _candidates(nq, nk, block_size, causal)
        num[b] = cnt[b, :, : len(c)].sum(dim=-1).double()
        den[b] = float(sum(c))
    if per_head:
        return num / den
    return float(num.sum() / (den.sum() * hq))


def relative_output_error(out: Tensor, dense_out: Tensor) -> float:
    """||out - dense|| / ||dense|| (Frobenius, fp64)."""
    a, b = out.double(), dense_out.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-300))


class NeedleResult(NamedTuple):
    retrieval: float  # fraction of needles retrieved by every head (the rule of needle_retrieval)
    per_needle: Tensor  # bool [B, needles]
    head_fraction: float  # fraction of (b, needle, head) retrieved
    cos: Tensor  # fp64 [B, needles, Hq]: mean cosine of out at the needle rows to the signature
    dense_cos: Optional[Tensor]  # the same for dense_out (None if not given)


def needle_retrieval(out: Tensor, needles, dense_out: Optional[Tensor] = None, *,
                     threshold: float = 0.5, tol: float = 0.05) -> NeedleResult:
    """Needle retrieval of an output [B, N, Hq, D]. `needles` is any object with the attributes
    needle_rows (int64 [needles, rows]: the query rows that retrieve each needle) and
    needle_values ([B, needles, Hkv, D]: the value signature written at the needle's keys, per
    KV head), such as the meta of the source checkout's bench/synthetic.make_structured_inputs.

    Needle j is retrieved by head h when the mean cosine similarity between out[b, row, h]
    and the needle's signature (of h's KV head), over the needle's rows, is >= `threshold`.
    With dense_out the bar is dense attention's: the cosine must also be >= the dense output's
    own cosine - `tol`, and where dense attention itself stays below `threshold` (a
    low-temperature head can spread its needle rows over other keys) matching it within `tol`
    is enough, since no selection can do better than dense attention. A needle counts as
    retrieved when every query head retrieves it."""
    hq = out.shape[2]
    values = needles.needle_values.to(out.device).double()  # [B, J, Hkv, D]
    rows = needles.needle_rows.to(out.device)  # [J, R]
    sig = values[:, :, torch.arange(hq, device=out.device) // (hq // values.shape[2])]  # [B, J, Hq, D]

    def cos_of(o: Tensor) -> Tensor:
        x = o.double()[:, rows]  # [B, J, R, Hq, D]
        return F.cosine_similarity(x, sig[:, :, None], dim=-1).mean(dim=2).cpu()  # [B, J, Hq]

    cs = cos_of(out)
    ok = cs >= threshold
    dcs = None
    if dense_out is not None:
        dcs = cos_of(dense_out)
        ok = (ok | (dcs < threshold)) & (cs >= dcs - tol)
    per_needle = ok.all(dim=-1)
    return NeedleResult(float(per_needle.double().mean()), per_needle, float(ok.double().mean()), cs, dcs)


def evaluate_selection(q: Tensor, k: Tensor, v: Tensor, counts: Tensor, indices: Tensor, block_size: int, *,
                       mass: Optional[Tuple[Tensor, Tensor]] = None, dense_out: Optional[Tensor] = None,
                       needles=None, causal: bool = True, softmax_scale: Optional[float] = None) -> dict:
    """density, recall (mean and per head), relative output error and, with `needles` (see
    needle_retrieval), needle retrieval of one selection. The sparse output comes from
    proxyattn.block_sparse_attention; `mass` (block_mass) and `dense_out`
    (proxyattn.attention.dense_attention) are computed when not given; pass them to reuse them
    across selections."""
    from .attention import dense_attention

    out = ops.block_sparse_attention(q, k, v, counts, indices, block_size=block_size, softmax_scale=softmax_scale,
                                     causal=causal)[0]
    if dense_out is None:
        dense_out = dense_attention(q, k, v, causal=causal, softmax_scale=softmax_scale)
    rec = attention_recall(q, k, counts, indices, block_size, causal, softmax_scale=softmax_scale, mass=mass)
    res = {
        "density": density(counts, (q.shape[1], k.shape[1]), block_size, causal),
        "recall": rec.mean,
        "recall_min_head": float(rec.per_head.min()),
        "recall_per_head": [round(float(x), 5) for x in rec.per_head.mean(dim=0)],
        "rel_error": relative_output_error(out, dense_out),
    }
    if needles is not None:
        nr = needle_retrieval(out, needles, dense_out)
        res["needle_retrieval"] = nr.retrieval
        res["needle_head_fraction"] = nr.head_fraction
    return res
