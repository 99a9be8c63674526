"""Peer block estimators and the ProxyAttn selection in one format, for the quality benchmarks.

    from peers import mean_pooling_select, antidiagonal_select, oracle_select, proxyattn_select

Layouts follow proxyattn: q [B, Nq, Hq, D], k [B, Nk, Hkv, D], Nq <= Nk, causal aligned
bottom-right. Every estimator returns a selection in proxyattn.select_blocks' format: counts
int32 [B, Hq, nqb] and ascending, -1 padded indices [B, Hq, nqb, nkb] (int16 while block numbers
fit). The peers keep the same forced blocks as ProxyAttn (sink and local blocks,
proxyattn.reference.forced_rows) and differ only in how they rank and cut the others:
- mean_pooling_select: sequence mean pooling (MInference / FlexPrefill style);
- antidiagonal_select: XAttention-style antidiagonal scoring of stride x stride tiles;
- oracle_select: the true block masses (proxyattn.metrics.block_mass), the best any estimator
  can do at a density or mass target;
- proxy_scores, proxyattn_select: ProxyAttn stages 1-3 regardless of dense_below (the compiled
  kernels on CUDA where built, else the reference).
The metrics themselves are proxyattn.metrics.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from proxyattn import ops, reference
from proxyattn.config import ProxyAttnConfig
from proxyattn.metrics import block_mass, selection_from_mask

__all__ = ["mean_pooling_select", "antidiagonal_select", "oracle_select", "proxy_scores", "proxyattn_select"]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _math_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _forced_and_cands(nq: int, nk: int, S: int, sink: int, local: int, causal: bool, device
                      ) -> Tuple[Tensor, Tensor]:
    """Bool [nqb, nkb] candidates and forced blocks (docs/design.md section 2, stage 3)."""
    return reference.forced_rows(nq, nk, S, sink, local, causal, _cdiv(nk, S), device)


def _threshold_keep(P: Tensor, cand: Tensor, forced: Tensor, tau: float) -> Tensor:
    """Per row: forced blocks, then the fewest other candidates (descending P, ties to the
    lower index) whose mass added to the forced mass reaches tau (all of them if it never
    does). P [..., nqb, nkb] is a per-row distribution over the candidates."""
    P = torch.where(cand, P.double(), 0.0)
    base = torch.where(forced, P, 0.0).sum(dim=-1, keepdim=True)
    free = (cand & ~forced).expand(P.shape)
    key = torch.where(free, P, -1.0)
    srt, order = torch.sort(key, dim=-1, descending=True, stable=True)
    excl = base + torch.cumsum(srt.clamp(min=0.0), dim=-1) - srt.clamp(min=0.0)  # mass before each entry
    take_sorted = (srt >= 0) & (excl < tau)
    keep = torch.zeros_like(free)
    keep.scatter_(-1, order, take_sorted)
    return keep | (forced & cand)


def _check_q_k(q: Tensor, k: Tensor) -> Tuple[int, int, int, int, int]:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be [B, N, H, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    B, nq, hq, d = q.shape
    nk, hkv = k.shape[1], k.shape[2]
    if hq % hkv != 0:
        raise ValueError(f"Hq={hq} must be a multiple of Hkv={hkv}")
    return B, nq, nk, hq, hkv


def mean_pooling_select(q: Tensor, k: Tensor, block_size: int, tau: float, *, sink_blocks: int = 1,
                        local_blocks: int = 1, causal: bool = True, softmax_scale: Optional[float] = None
                        ) -> Tuple[Tensor, Tensor]:
    """Sequence mean-pooling estimator (MInference / FlexPrefill style): mean-pool q and k over
    each block, softmax of the pooled block logits over each query block's candidates, keep
    forced blocks then the fewest others reaching tau of the pooled mass. tau=1 keeps all."""
    B, nq, nk, hq, hkv = _check_q_k(q, k)
    S, d = block_size, q.shape[-1]
    scale = softmax_scale if softmax_scale is not None else d ** -0.5
    nqb, nkb = _cdiv(nq, S), _cdiv(nk, S)
    dt = _math_dtype(q)

    def pool(x: Tensor, nb: int) -> Tensor:  # [B, n, H, D] -> [B, H, nb, D], mean over present rows
        n = x.shape[1]
        xs = F.pad(x.to(dt), (0, 0, 0, 0, 0, nb * S - n)).view(B, nb, S, x.shape[2], d).sum(dim=2)
        cnt = torch.clamp(n - torch.arange(nb, device=x.device) * S, max=S).to(dt)
        return (xs / cnt[None, :, None, None]).transpose(1, 2)

    qp, kp = pool(q, nqb), pool(k, nkb)
    logits = torch.matmul(qp, kp.repeat_interleave(hq // hkv, dim=1).transpose(-1, -2)) * scale  # [B,Hq,nqb,nkb]
    cand, forced = _forced_and_cands(nq, nk, S, sink_blocks, local_blocks, causal, q.device)
    P = torch.softmax(logits.masked_fill(~cand, -math.inf), dim=-1)
    return selection_from_mask(_threshold_keep(P, cand, forced, tau))


def antidiagonal_select(q: Tensor, k: Tensor, block_size: int, tau: float, *, stride: int = 8,
                        sink_blocks: int = 1, local_blocks: int = 1, causal: bool = True,
                        softmax_scale: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """XAttention-style estimator: the tokens are cut into stride x stride tiles; a tile's
    score is the mean of its antidiagonal logits (query r0+s-1-t against key c0+t); softmax
    over the tiles each query tile row may see (tile-level causal: key tile start <= query
    tile start), summed into block pairs and averaged over the block's tile rows; then forced
    blocks plus the fewest others reaching tau. tau=1 keeps all."""
    B, nq, nk, hq, hkv = _check_q_k(q, k)
    S, s, d = block_size, stride, q.shape[-1]
    if S % s != 0:
        raise ValueError(f"stride {s} must divide block_size {S}")
    scale = softmax_scale if softmax_scale is not None else d ** -0.5
    nqb, nkb = _cdiv(nq, S), _cdiv(nk, S)
    dt = _math_dtype(q)
    off = nk - nq
    qpad = F.pad(q.to(dt), (0, 0, 0, 0, 0, nqb * S - nq))
    kpad = F.pad(k.to(dt), (0, 0, 0, 0, 0, nkb * S - nk))
    # qr[:, i'] = cat_t q[i's + s-1-t], kr[:, j'] = cat_t k[j's + t]: qr . kr = antidiagonal sum
    qr = torch.cat([qpad[:, s - 1 - t::s] for t in range(s)], dim=-1).transpose(1, 2)  # [B, Hq, nqt, sD]
    kr = torch.cat([kpad[:, t::s] for t in range(s)], dim=-1).transpose(1, 2)  # [B, Hkv, nkt, sD]
    kr = kr.repeat_interleave(hq // hkv, dim=1)
    tpb = S // s  # tiles per block side
    nkt = kr.shape[2]
    A = torch.zeros(B, hq, nqb, nkb, dtype=torch.float64, device=q.device)
    kt_start = torch.arange(nkt, device=q.device) * s
    for m in range(nqb):
        qt = qr[:, :, m * tpb:(m + 1) * tpb]  # [B, Hq, tpb, sD]
        qt_start = off + (m * tpb + torch.arange(tpb, device=q.device)) * s
        qt_valid = (m * tpb + torch.arange(tpb, device=q.device)) * s < nq
        logits = torch.matmul(qt, kr.transpose(-1, -2)) * (scale / s)  # [B, Hq, tpb, nkt]
        vis = (kt_start[None, :] < nk) & ((kt_start[None, :] <= qt_start[:, None]) if causal else True)
        vis = vis & qt_valid[:, None]
        p = torch.softmax(logits.masked_fill(~vis, -math.inf), dim=-1).nan_to_num(0.0)
        rows = qt_valid.sum().clamp(min=1)
        A[:, :, m] = p.view(B, hq, tpb, nkb, tpb).sum(dim=(2, 4)).double() / rows
    cand, forced = _forced_and_cands(nq, nk, S, sink_blocks, local_blocks, causal, q.device)
    return selection_from_mask(_threshold_keep(A, cand, forced, tau))


def oracle_select(q: Tensor, k: Tensor, block_size: int, *, target_density: Optional[float] = None,
                  target_mass: Optional[float] = None, sink_blocks: int = 1, local_blocks: int = 1,
                  causal: bool = True, softmax_scale: Optional[float] = None,
                  mass: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
    """Oracle from the true block masses (block_mass). target_density: forced blocks plus the
    non-forced block pairs of largest mass over all heads and query blocks of each batch item
    until density reaches the target (the best mean recall any selection of that density
    can have, up to the forced blocks). target_mass: per row, forced then the fewest blocks
    reaching that fraction of the row's true mass. Give exactly one."""
    if (target_density is None) == (target_mass is None):
        raise ValueError("oracle_select needs exactly one of target_density and target_mass")
    B, nq, nk, hq, hkv = _check_q_k(q, k)
    W, _ = mass if mass is not None else block_mass(q, k, block_size, causal=causal, softmax_scale=softmax_scale)
    cand, forced = _forced_and_cands(nq, nk, block_size, sink_blocks, local_blocks, causal, W.device)
    if target_mass is not None:
        P = W / W.sum(dim=-1, keepdim=True).clamp(min=1e-300)
        return selection_from_mask(_threshold_keep(P, cand, forced, float(target_mass)))
    keep = forced.expand(B, hq, -1, -1).clone()
    total = int(cand.sum()) * hq
    free = (cand & ~forced).expand(B, hq, -1, -1)
    for b in range(B):
        extra = max(0, min(int(free[b].sum()), round(float(target_density) * total) - int(keep[b].sum())))
        if extra == 0:
            continue
        key = torch.where(free[b], W[b], -1.0).flatten()
        top = torch.topk(key, extra).indices
        kb = keep[b].flatten()
        kb[top] = True
        keep[b] = kb.view(hq, *cand.shape)
    return selection_from_mask(keep)


def proxy_scores(q: Tensor, k: Tensor, config: ProxyAttnConfig, *, causal: bool = True) -> Tensor:
    """Stage 1 of ProxyAttn (it depends on neither gamma nor min_budget)."""
    return ops.proxy_block_scores(q, k, block_size=config.block_size,
                                  num_proxy_heads=config.proxy_heads(q.shape[2], k.shape[2]), stride=config.stride,
                                  softmax_scale=config.scale(q.shape[-1]), causal=causal)


def proxyattn_select(q: Tensor, k: Tensor, config: Optional[ProxyAttnConfig] = None, *, causal: bool = True,
                     scores: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """ProxyAttn stages 1-3 regardless of dense_below. Returns counts, indices, kstar.
    `scores` (proxy_scores) reuses stage 1 across gamma / min_budget values."""
    cfg = config or ProxyAttnConfig()
    cfg.check_heads(q.shape[2], k.shape[2])
    S, scale = cfg.block_size, cfg.scale(q.shape[-1])
    if scores is None:
        scores = proxy_scores(q, k, cfg, causal=causal)
    kstar = ops.head_budgets(q, k, block_size=S, gamma=cfg.gamma, sink_blocks=cfg.sink_blocks,
                             local_blocks=cfg.local_blocks, softmax_scale=scale, causal=causal)
    counts, indices = ops.select_blocks(scores, kstar, seqlen_q=q.shape[1], seqlen_k=k.shape[1], block_size=S,
                                        sink_blocks=cfg.sink_blocks, local_blocks=cfg.local_blocks,
                                        min_budget=cfg.min_budget, causal=causal)
    return counts, indices, kstar
