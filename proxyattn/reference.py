"""Plain-PyTorch ProxyAttn (docs/design.md section 2): the oracle the kernels are tested against.

Functions mirror the op schemas positionally, so they double as the CPU kernels of
torch.ops.proxyattn.*. They run on CPU or CUDA tensors, compute in fp32 (fp64 for
fp64 inputs), and never build a token-level N x N tensor: attention is evaluated in
chunks of query rows whose size is bounded by `_CHUNK_ELEMS` elements.

Layouts: fixed length q [B, Nq, Hq, D], k/v [B, Nk, Hkv, D]; varlen q [total_q, Hq, D],
k/v [total_k, Hkv, D] with int32 cu_seqlens_q/k [B + 1]; paged (stages 1, 2 and 4, a page_table
int32 [B, max_pages]): varlen q, k/v caches [num_pages, page_size, Hkv, D], cu_seqlens_k the prefix
sums of the key lengths. Scores fp32 [B, G, nqb, nkb];
kstar int32 [B, Hq]; counts int32 [B, Hq, nqb]; indices [B, Hq, nqb, nkb] (ascending, -1 padded;
int16 from select_blocks, int16 or int32 into block_sparse_attention); lse fp32 [B, Hq, Nq]
(varlen [Hq, total_q]).

The host reads cu_seqlens here (the reference is not the fast path).
"""
from __future__ import annotations

import math
from typing import Iterator, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

# Upper bound on the elements of one chunk's score matrix (fp32: 128 MiB).
_CHUNK_ELEMS = 1 << 25


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _math_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _sequences(q: Tensor, k: Tensor, v: Optional[Tensor], cu_q: Optional[Tensor], cu_k: Optional[Tensor]
               ) -> Iterator[Tuple[int, slice, Tensor, Tensor, Optional[Tensor]]]:
    """Yield (b, query rows slice into q's token dim, q_b [Nq,Hq,D], k_b [Nk,Hkv,D], v_b)."""
    if cu_q is None:
        for b in range(q.shape[0]):
            yield b, slice(0, q.shape[1]), q[b], k[b], (None if v is None else v[b])
        return
    cq = cu_q.tolist()
    ck = cu_k.tolist()
    for b in range(len(cq) - 1):
        sq = slice(cq[b], cq[b + 1])
        sk = slice(ck[b], ck[b + 1])
        yield b, sq, q[sq], k[sk], (None if v is None else v[sk])


def _batch(q: Tensor, cu_q: Optional[Tensor]) -> int:
    return q.shape[0] if cu_q is None else cu_q.shape[0] - 1


def gather_pages(cache: Tensor, page_table: Tensor, cu: Tensor, rows: int) -> Tensor:
    """The keys of a paged cache [num_pages, page_size, Hkv, D], packed by sequence into [rows, Hkv, D]:
    row r < cu[-1] is key t = r - cu[b] of the sequence b whose span [cu[b], cu[b+1]) holds it, read
    from page page_table[b, t // page_size] (clamped into the cache), slot t % page_size; rows past
    cu[-1] repeat the last key. cu: int prefix sums [B + 1] (monotone). Plain torch ops on the
    cache's device with no host read, so `rows` comes from the caller (a bound on CUDA)."""
    size, dev = cache.shape[1], cache.device
    cu = cu.to(device=dev, dtype=torch.int64)
    r = torch.minimum(torch.arange(rows, device=dev), (cu[-1] - 1).clamp(min=0))
    seq = torch.searchsorted(cu[1:], r, right=True).clamp_(max=page_table.shape[0] - 1)
    pos = r - cu[seq]
    table = page_table.to(device=dev, dtype=torch.int64)
    page = table[seq, torch.div(pos, size, rounding_mode="floor")].clamp_(0, cache.shape[0] - 1)
    return cache[page, pos % size]


def unpage(cache: Tensor, page_table: Optional[Tensor], cu_seqlens_k: Optional[Tensor]) -> Tensor:
    """Packed keys [cu_seqlens_k[-1], Hkv, D] of a paged cache read through page_table (gather_pages;
    the ops' CPU kernels take paged K/V this way); the cache itself without a page table."""
    if page_table is None:
        return cache
    if cu_seqlens_k is None:
        raise ValueError("a page_table needs cu_seqlens_k (the prefix sums of the key lengths)")
    return gather_pages(cache, page_table, cu_seqlens_k, max(0, int(cu_seqlens_k[-1])))


def candidate_count(m: int, nq: int, nk: int, block: int, causal: bool) -> int:
    """c_m: key blocks [0, c_m) hold a key some query of block m may see."""
    nkb = _cdiv(nk, block)
    if not causal:
        return nkb
    last_row = min((m + 1) * block, nq) - 1
    return max(0, min(nkb, (nk - nq + last_row) // block + 1))


def local_start(m, nq, nk, block: int, local_blocks: int, causal: bool, c):
    """First local block of query block m with c candidates (docs/design.md section 2): the key blocks
    that hold some row's own position, plus local_blocks - 1 before the earliest. Causal: from
    floor(a_m / S) - local_blocks + 1 (a_m = m*S + Nk - Nq, the block's first row's position) to the
    last candidate; when Nk - Nq is a multiple of S that is the last local_blocks candidates.
    Non-causal: the last local_blocks candidates. No local blocks (local_blocks 0): c.
    m, nq, nk, c: ints, or integer tensors that broadcast (telemetry on the device, no host read)."""
    if local_blocks <= 0:
        return c
    start = (m * block + nk - nq) // block - local_blocks + 1 if causal else c - local_blocks
    if isinstance(start, Tensor):
        return torch.minimum(torch.clamp(start, min=0), c)
    return min(max(start, 0), c)


def forced_range(m: int, nq: int, nk: int, block: int, sink_blocks: int, local_blocks: int, causal: bool
                 ) -> Tuple[int, int, int]:
    """(c, free_lo, free_hi) of query block m: c candidates; the forced blocks are [0, free_lo)
    (the sink) and [free_hi, c) (the local blocks), the others [free_lo, free_hi)."""
    c = candidate_count(m, nq, nk, block, causal)
    lo = min(sink_blocks, c)
    return c, lo, max(lo, local_start(m, nq, nk, block, local_blocks, causal, c))


def forced_rows(nq: int, nk: int, block: int, sink_blocks: int, local_blocks: int, causal: bool, width: int,
                device=None) -> Tuple[Tensor, Tensor]:
    """Bool [nqb, width] candidates and forced blocks of every query block of one sequence."""
    rows = [forced_range(m, nq, nk, block, sink_blocks, local_blocks, causal) for m in range(_cdiv(nq, block))]
    c, lo, hi = (torch.tensor([r[i] for r in rows], device=device).view(-1, 1) for i in range(3))
    n = torch.arange(width, device=device).view(1, -1)
    cand = n < c
    return cand, cand & ((n < lo) | (n >= hi))


def _head_mean(x: Tensor, groups: int) -> Tensor:
    """[N, H, D] -> [N, G, D] fp32: each group's heads summed in fp32 in head order, divided by
    their count (the kernels' order of operations, so the 16-bit rounding below matches)."""
    n, h, d = x.shape
    xs = x.float().reshape(n, groups, h // groups, d)
    acc = xs[:, :, 0]
    for j in range(1, h // groups):
        acc = acc + xs[:, :, j]
    # Correctly rounded fp32 quotient (the kernels' IEEE division): fp64 holds it exactly enough for
    # one rounding to fp32, where torch's fp32 division by a number may multiply by its reciprocal.
    return (acc.double() / (h // groups)).float()


def group_pool(q_b: Tensor, k_b: Tensor, groups: int, stride: int) -> Tuple[Tensor, Tensor]:
    """Stage 1's pooled proxies, rounded as docs/design.md section 2 allows: qbar [Nq, G, D] (mean of
    each group's query heads) and kbar [Nk, G, D] (mean of each group's distinct KV heads), computed
    in fp32 and rounded to fp16, or, for a group where a finite mean of a kept row (query rows at
    positions Nk - Nq + i and keys t that are multiples of the stride) overflows fp16, to bf16
    (fp32's range); returned in math precision. The dot products of the rounded vectors are then
    exact in fp32 up to the order of the sum, on every implementation."""
    dt = _math_dtype(q_b)
    nq, hq, d = q_b.shape
    nk, hkv, _ = k_b.shape
    qbar = _head_mean(q_b, groups)
    if groups <= hkv:
        kbar = _head_mean(k_b, groups)
    else:
        kbar = k_b.float()[:, torch.arange(groups, device=k_b.device) // (groups // hkv)]
    first_q = (-(nk - nq)) % stride
    over = torch.zeros(groups, dtype=torch.bool, device=q_b.device)
    for x in (qbar[first_q::stride], kbar[::stride]):
        over |= (torch.isinf(x.half()) & torch.isfinite(x)).any(dim=2).any(dim=0)

    def rounded(x: Tensor) -> Tensor:
        return torch.where(over[None, :, None], x.bfloat16().to(dt), x.half().to(dt))

    return rounded(qbar), rounded(kbar)


def _scale_rows(raw: Tensor, scale: float):
    """(raw * scale, shift) for a softmax or logsumexp over the last dim; masked entries are -inf in
    raw. Where the product overflows (+inf from a finite raw value: a huge softmax_scale), each row is
    shifted by its largest entry first and shift = that entry * scale is returned per row (add it back
    to a logsumexp); softmax is shift-invariant, so the row keeps its distribution, the limit of a huge
    scale, instead of inf - inf = NaN. Without overflow the product is returned unchanged with shift 0,
    so ordinary scales round exactly as the plain product does."""
    masked = torch.isneginf(raw)  # stays -inf also where scale is 0 in fp32 (-inf * 0 would be NaN)
    logits = (raw * scale).masked_fill_(masked, -math.inf)
    if not bool((torch.isposinf(logits) & torch.isfinite(raw)).any()):
        return logits, 0.0
    mx = raw.amax(dim=-1, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))  # rows that see nothing stay -inf
    shifted = raw - mx
    # The row's largest entries get logit 0 exactly, also when scale itself exceeds the largest fp32
    # value (it is inf in this math and 0 * inf would be NaN).
    logits = torch.where(shifted == 0, torch.zeros_like(shifted), shifted * scale).masked_fill_(masked, -math.inf)
    return logits, (mx * scale).squeeze(-1)


# ---------------------------------------------------------------- stage 1


def proxy_block_scores(q: Tensor, k: Tensor, cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
                       max_seqlen_q: int, max_seqlen_k: int, block_size: int, num_proxy_heads: int,
                       stride: int, softmax_scale: float, causal: bool, page_table: Optional[Tensor] = None
                       ) -> Tensor:
    k = unpage(k, page_table, cu_seqlens_k)
    S, G, s = block_size, num_proxy_heads, stride
    nqb, nkb = _cdiv(max_seqlen_q, S), _cdiv(max_seqlen_k, S)
    out = torch.zeros(_batch(q, cu_seqlens_q), G, nqb, nkb, dtype=torch.float32, device=q.device)
    for b, _, q_b, k_b, _ in _sequences(q, k, None, cu_seqlens_q, cu_seqlens_k):
        out[b, :, : _cdiv(q_b.shape[0], S), : _cdiv(k_b.shape[0], S)] = _scores_one(
            q_b, k_b, S, G, s, softmax_scale, causal)
    return out


def _scores_one(q_b: Tensor, k_b: Tensor, S: int, G: int, s: int, scale: float, causal: bool) -> Tensor:
    nq, nk = q_b.shape[0], k_b.shape[0]
    nqb, nkb = _cdiv(nq, S), _cdiv(nk, S)
    dev = q_b.device
    qbar, kbar = group_pool(q_b, k_b, G, s)
    off = nk - nq
    kept_k = torch.arange(0, nk, s, device=dev)
    kk = kbar[kept_k].permute(1, 2, 0)  # [G, D, T]
    # slot[n, j]: position in kept_k of the j-th kept key of key block n, or -1.
    per_block = _cdiv(S, s) + 1
    first = torch.div(torch.arange(nkb, device=dev) * S + s - 1, s, rounding_mode="floor")
    slot = first[:, None] + torch.arange(per_block, device=dev)[None, :]
    slot = torch.where((slot * s < (torch.arange(nkb, device=dev)[:, None] + 1) * S) & (slot < kept_k.numel()), slot, -1)
    res = torch.zeros(G, nqb, nkb, dtype=qbar.dtype, device=dev)
    gchunk = max(1, _CHUNK_ELEMS // max(1, S * kept_k.numel()))
    for m in range(nqb):
        r = torch.arange(m * S, min(nq, (m + 1) * S), device=dev)
        qi = r[(off + r) % s == 0]
        if qi.numel() == 0:
            continue  # no kept query: the row stays 0
        t_vis = (off + int(qi[-1])) // s + 1 if causal else kept_k.numel()  # kept keys any row may see
        if t_vis <= 0:
            continue  # no row of the block sees a kept key (a sequence with fewer keys than queries)
        for g0 in range(0, G, gchunk):
            g1 = min(G, g0 + gchunk)
            raw = torch.matmul(qbar[qi, g0:g1].transpose(0, 1), kk[g0:g1, :, :t_vis])  # [g, R, T]
            if causal:
                raw.masked_fill_(kept_k[None, None, :t_vis] > (off + qi)[None, :, None], float("-inf"))
            logits, _ = _scale_rows(raw, scale)
            p = torch.softmax(logits, dim=-1)
            p = torch.where(torch.isneginf(raw).all(dim=-1, keepdim=True), 0.0, p)  # rows that see no key
            pm = p.amax(dim=1)  # [g, T]: max over the block's kept queries
            pm = torch.cat([pm, pm.new_zeros(g1 - g0, 1)], dim=1)
            sl = torch.where((slot >= 0) & (slot < t_vis), slot, t_vis)  # -> the zero column
            res[g0:g1, m] = pm[:, sl].amax(dim=-1)
    return res.float()


# ---------------------------------------------------------------- stage 2


def head_budgets(q: Tensor, k: Tensor, cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
                 max_seqlen_q: int, max_seqlen_k: int, block_size: int, gamma: float, sink_blocks: int,
                 local_blocks: int, softmax_scale: float, causal: bool, page_table: Optional[Tensor] = None
                 ) -> Tensor:
    k = unpage(k, page_table, cu_seqlens_k)
    hq = q.shape[-2]
    out = torch.zeros(_batch(q, cu_seqlens_q), hq, dtype=torch.int32, device=q.device)
    for b, _, q_b, k_b, _ in _sequences(q, k, None, cu_seqlens_q, cu_seqlens_k):
        nq, nk = q_b.shape[0], k_b.shape[0]
        if nq == 0 or candidate_count(_cdiv(nq, block_size) - 1, nq, nk, block_size, causal) == 0:
            continue  # no query, or no key its last query block may see: k* 0, as the kernel's finalize gives
        w = last_block_mass(q_b, k_b, block_size, softmax_scale, causal)
        out[b] = torch.from_numpy(_kstar_from_mass(w, nq, nk, block_size, gamma, sink_blocks, local_blocks,
                                                   causal)).to(q.device)
    return out


def last_block_mass(q_b: Tensor, k_b: Tensor, S: int, scale: float, causal: bool) -> Tensor:
    """w [Hq, c_last] fp32: mean block mass of each head's last S query rows, normalised to sum 1."""
    nq, hq, d = q_b.shape
    nk, hkv, _ = k_b.shape
    dt = _math_dtype(q_b)
    nkb = _cdiv(nk, S)
    rows = min(S, nq)
    off = nk - nq
    pos = off + torch.arange(nq - rows, nq, device=q_b.device)
    keys = torch.arange(nk, device=q_b.device)
    qr = q_b[nq - rows:].to(dt).transpose(0, 1)  # [Hq, R, D]
    kh = k_b.to(dt).permute(1, 2, 0)  # [Hkv, D, Nk]
    rep = hq // hkv
    w = torch.empty(hq, nkb, dtype=dt, device=q_b.device)
    per = max(1, _CHUNK_ELEMS // (rows * nk))
    for h0 in range(0, hq, per):
        hs = torch.arange(h0, min(hq, h0 + per), device=q_b.device)
        raw = torch.matmul(qr[hs], kh[hs // rep])  # [h, R, Nk]
        if causal:
            raw.masked_fill_(keys[None, None, :] > pos[None, :, None], float("-inf"))
        logits, _ = _scale_rows(raw, scale)
        a = torch.softmax(logits, dim=-1)
        a = torch.nn.functional.pad(a, (0, nkb * S - nk))
        w[hs] = a.view(len(hs), rows, nkb, S).sum(dim=-1).mean(dim=1)
    c_last = candidate_count(_cdiv(nq, S) - 1, nq, nk, S, causal)
    w = w[:, :c_last].float()
    return w / w.sum(dim=-1, keepdim=True)


def _kstar_from_mass(w: Tensor, nq: int, nk: int, S: int, gamma: float, sink: int, local: int,
                     causal: bool) -> np.ndarray:
    """k* per head: base (forced mass) first, then sorted masses added one at a time in fp32. A head
    whose masses are not numbers (NaN inputs, or no mass at all) gets 0: its forced blocks only."""
    c_last, lo, hi = forced_range(_cdiv(nq, S) - 1, nq, nk, S, sink, local, causal)
    assert c_last == w.shape[-1]
    n = np.arange(c_last)
    forced = (n < lo) | (n >= hi)
    wn = w.detach().cpu().numpy().astype(np.float32)
    g = np.float32(gamma)
    out = np.zeros(wn.shape[0], dtype=np.int32)
    for h in range(wn.shape[0]):
        if np.isnan(wn[h]).any():
            continue
        base = np.float32(0.0)
        for x in wn[h][forced]:  # ascending block order, fp32
            base = np.float32(base + x)
        if base >= g:
            continue
        rest = -np.sort(-wn[h][~forced], kind="stable")
        run = np.add.accumulate(np.concatenate([[base], rest]).astype(np.float32), dtype=np.float32)[1:]
        hit = np.nonzero(run >= g)[0]
        out[h] = hit[0] + 1 if hit.size else rest.size
    return out


# ---------------------------------------------------------------- stage 3


def select_blocks(scores: Tensor, kstar: Tensor, cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
                  max_seqlen_q: int, max_seqlen_k: int, block_size: int, sink_blocks: int, local_blocks: int,
                  min_budget: int, causal: bool, budget_seqlen: int = 0) -> Tuple[Tensor, Tensor]:
    B, G, nqb, nkb = scores.shape
    if nkb > torch.iinfo(torch.int16).max + 1:  # as the CUDA op refuses: no index may wrap
        raise ValueError(f"select_blocks writes int16 block indices, so at most 32768 key blocks, got {nkb}")
    most = (torch.iinfo(torch.int16).max + 1) * block_size  # a whole sequence of at most 32768 key blocks
    if budget_seqlen and (cu_seqlens_q is not None or not max_seqlen_k <= budget_seqlen <= most):  # as the op refuses
        raise ValueError(f"budget_seqlen must be 0, or (fixed length) the length of the sequence whose chunk the "
                         f"rows are, in [max_seqlen_k, 32768 * block_size] = [{max_seqlen_k}, {most}], "
                         f"got {budget_seqlen}"
                         + (" with cu_seqlens (varlen)" if cu_seqlens_q is not None else ""))
    hq = kstar.shape[1]
    S = block_size
    dev = scores.device
    counts = torch.zeros(B, hq, nqb, dtype=torch.int32, device=dev)
    indices = torch.full((B, hq, nqb, nkb), -1, dtype=torch.int16, device=dev)
    if cu_seqlens_q is None:
        lens = [(max_seqlen_q, max_seqlen_k)] * B
    else:
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        lens = [(cq[b + 1] - cq[b], ck[b + 1] - ck[b]) for b in range(B)]
    ks = kstar.detach().to("cpu", torch.int64)
    per_group = hq // G
    min_blocks = _cdiv(min_budget, S)
    n = torch.arange(nkb, device=dev)
    for b, (nq, nk) in enumerate(lens):
        nqb_b = _cdiv(nq, S)
        if nqb_b == 0:
            continue  # no query (an empty sequence): every row counts 0 and holds -1, as the kernel writes them
        rows = [forced_range(m, nq, nk, S, sink_blocks, local_blocks, causal) for m in range(nqb_b)]
        c = [r[0] for r in rows]
        f = [r[0] - (r[2] - r[1]) for r in rows]
        # The budgets' scale: this sequence's last query block, or that of the whole sequence.
        last = rows[-1] if not budget_seqlen else forced_range(_cdiv(budget_seqlen, S) - 1, budget_seqlen,
                                                               budget_seqlen, S, sink_blocks, local_blocks, causal)
        c_last, f_last = last[0], last[0] - (last[2] - last[1])
        cand, forced = forced_rows(nq, nk, S, sink_blocks, local_blocks, causal, nkb, dev)
        # Rank classes: forced first, then candidates with a score (any number, infinities
        # included), then candidates whose score is NaN, then the rest (docs/design.md section 2).
        rank = torch.where(forced, 3, torch.where(cand, 2, 0))
        for h in range(hq):
            kh = min(max(int(ks[b, h]), 0), c_last - f_last)  # budgets are clamped to what exists
            km = []
            for cm, fm in zip(c, f):
                extra = _cdiv(kh * (cm - fm), c_last - f_last) if c_last > f_last else 0
                km.append(min(cm, max(fm + extra, min_blocks)))
            sc = scores[b, h // per_group, :nqb_b].to(torch.float32)
            nan = torch.isnan(sc)
            cls = torch.where(nan & (rank == 2), 1, rank)
            # Descending score, ties to the lower block (stable), then the class as primary key.
            order = torch.sort(torch.where(nan, -torch.inf, sc), dim=-1, descending=True, stable=True).indices
            order = torch.gather(order, 1, torch.sort(torch.gather(cls, 1, order), dim=-1, descending=True,
                                                      stable=True).indices)
            km_t = torch.tensor(km, device=dev)
            take = n[None, :] < km_t[:, None]
            chosen = torch.where(take, order, nkb)  # nkb sorts after every real block
            chosen = torch.sort(chosen, dim=-1).values
            indices[b, h, :nqb_b] = torch.where(chosen < nkb, chosen, -1).to(torch.int16)
            counts[b, h, :nqb_b] = km_t.to(torch.int32)
    return counts, indices


# ---------------------------------------------------------------- stage 4


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, counts: Tensor, indices: Tensor,
                           cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], max_seqlen_q: int,
                           max_seqlen_k: int, block_size: int, softmax_scale: float, causal: bool,
                           page_table: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Softmax over the selected key blocks that each row may see. Indices past counts, and
    indices outside the sequence's key blocks, are ignored. With a page_table, k and v are caches
    [num_pages, page_size, Hkv, D] read through it (unpage)."""
    k, v = unpage(k, page_table, cu_seqlens_k), unpage(v, page_table, cu_seqlens_k)
    hq = q.shape[-2]

    def block_mask(b: int, nq: int, nk: int) -> Tensor:
        nqb, nkb = _cdiv(nq, block_size), _cdiv(nk, block_size)
        idx = indices[b, :, :nqb].long()
        valid = (torch.arange(idx.shape[-1], device=q.device) < counts[b, :, :nqb, None]) & (idx >= 0) & (idx < nkb)
        mask = torch.zeros(hq, nqb, nkb + 1, dtype=torch.bool, device=q.device)
        mask.scatter_(2, torch.where(valid, idx, nkb), True)
        return mask[..., :nkb]

    return _attend(q, k, v, cu_seqlens_q, cu_seqlens_k, block_mask, block_size, softmax_scale, causal)


def _attend(q: Tensor, k: Tensor, v: Tensor, cu_q: Optional[Tensor], cu_k: Optional[Tensor], block_mask,
            S: int, scale: float, causal: bool) -> Tuple[Tensor, Tensor]:
    """Per sequence attention_with_block_mask, assembled into out (like q) and lse fp32
    ([B, Hq, Nq]; varlen [Hq, total_q]). block_mask(b, nq, nk) gives the mask or None (dense).
    Varlen rows outside every sequence read as rows that see no key: out 0, lse -inf (as the
    CUDA op writes them)."""
    varlen = cu_q is not None
    hq = q.shape[-2]
    if varlen:
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.full((hq, q.shape[0]), -math.inf, dtype=torch.float32, device=q.device)
    else:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty((q.shape[0], hq, q.shape[1]), dtype=torch.float32, device=q.device)
    for b, rows, q_b, k_b, v_b in _sequences(q, k, v, cu_q, cu_k):
        o_b, l_b = attention_with_block_mask(q_b, k_b, v_b, block_mask(b, q_b.shape[0], k_b.shape[0]), S, scale,
                                             causal)
        if varlen:
            out[rows], lse[:, rows] = o_b, l_b
        else:
            out[b], lse[b] = o_b, l_b
    return out, lse


def attention_with_block_mask(q_b: Tensor, k_b: Tensor, v_b: Tensor, block_mask: Optional[Tensor], S: int,
                              scale: float, causal: bool) -> Tuple[Tensor, Tensor]:
    """One sequence: q_b [Nq, Hq, D], k_b/v_b [Nk, Hkv, D], block_mask bool [Hq, nqb, nkb] or None
    (dense). Returns out [Nq, Hq, D] (q's dtype) and lse fp32 [Hq, Nq]."""
    nq, hq, d = q_b.shape
    nk, hkv, _ = k_b.shape
    dt = _math_dtype(q_b)
    rep = hq // hkv
    off = nk - nq
    dev = q_b.device
    out = torch.empty(nq, hq, d, dtype=q_b.dtype, device=dev)
    lse = torch.empty(hq, nq, dtype=torch.float32, device=dev)
    keys = torch.arange(nk, device=dev)
    for r0 in range(0, nq, S):
        r1 = min(nq, r0 + S)
        pos = off + torch.arange(r0, r1, device=dev)
        kend = min(nk, off + r1) if causal else nk  # keys past kend are invisible to the whole chunk
        if kend <= 0:
            out[r0:r1] = 0
            lse[:, r0:r1] = -math.inf
            continue
        per = max(1, _CHUNK_ELEMS // ((r1 - r0) * kend))
        for h0 in range(0, hq, per):
            hs = torch.arange(h0, min(hq, h0 + per), device=dev)
            qc = q_b[r0:r1, hs].to(dt).transpose(0, 1)  # [h, R, D]
            kc = k_b[:kend].to(dt)[:, hs // rep].permute(1, 2, 0)  # [h, D, L]
            vc = v_b[:kend].to(dt)[:, hs // rep].transpose(0, 1)  # [h, L, D]
            raw = torch.matmul(qc, kc)
            allowed = torch.ones_like(raw, dtype=torch.bool)
            if causal:
                allowed &= keys[None, None, :kend] <= pos[None, :, None]
            if block_mask is not None:
                bm = block_mask[hs, r0 // S][:, keys[:kend] // S]  # [h, L]
                allowed &= bm[:, None, :]
            raw.masked_fill_(~allowed, -math.inf)
            logits, shift = _scale_rows(raw, scale)
            l = torch.logsumexp(logits, dim=-1)  # -inf for rows that see nothing
            p = torch.exp(logits - torch.where(torch.isinf(l), 0.0, l)[..., None])
            o = torch.matmul(p, vc)  # rows that see nothing: p == 0 -> o == 0
            out[r0:r1, hs] = o.transpose(0, 1).to(q_b.dtype)
            lse[hs, r0:r1] = (l + shift).float()
    return out, lse


def dense_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
                    softmax_scale: float, causal: bool) -> Tuple[Tensor, Tensor]:
    """Dense attention (bottom-right causal) in the same layouts, chunked."""
    return _attend(q, k, v, cu_seqlens_q, cu_seqlens_k, lambda b, nq, nk: None, 128, softmax_scale, causal)


# ---------------------------------------------------------------- composite


def proxy_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
                    max_seqlen_q: int, max_seqlen_k: int, block_size: int, num_proxy_heads: int, stride: int,
                    gamma: float, min_budget: int, sink_blocks: int, local_blocks: int, softmax_scale: float,
                    causal: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Stages 1-4. Returns out, lse, kstar, counts, indices."""
    scores = proxy_block_scores(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_size,
                                num_proxy_heads, stride, softmax_scale, causal)
    kstar = head_budgets(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_size, gamma,
                         sink_blocks, local_blocks, softmax_scale, causal)
    counts, indices = select_blocks(scores, kstar, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    block_size, sink_blocks, local_blocks, min_budget, causal)
    out, lse = block_sparse_attention(q, k, v, counts, indices, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                      max_seqlen_k, block_size, softmax_scale, causal)
    return out, lse, kstar, counts, indices
