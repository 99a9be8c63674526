"""Quality harness (DESIGN.md section 5): structured synthetic attention, selection metrics and
baseline block estimators.

Layouts follow the package: q [B, N, Hq, D], k/v [B, N, Hkv, D] (Nq = Nk = N from the
generator; the metrics take any Nq <= Nk, causal aligned bottom-right). A selection is
counts int32 [B, Hq, nqb] and indices int16 or int32 [B, Hq, nqb, nkb] (ascending, -1 padded),
the format of proxyattn.select_blocks. No function here builds a token-level N x N tensor:
attention is evaluated one query block at a time, in head chunks bounded by _CHUNK_ELEMS.

Contents
- make_structured_inputs: sinks, RoPE recency windows, shared "hub" spans, per-head private
  spans (the `share` knob), planted needles, per-head temperatures. Returns q, k, v, meta.
- block_mass: true softmax mass per (query block, key block), summed over the block's rows.
- attention_recall, density, relative_output_error, needle_retrieval: the metrics.
- mean_pooling_select, antidiagonal_select, oracle_select: baseline estimators;
  proxyattn_select: the ProxyAttn stages 1-3 in the same format; sparse_output: stage 4.
  On CUDA without a compiled kernel the stages fall back to the reference on the GPU.
- evaluate_selection: all metrics of one selection.
"""
from __future__ import annotations

import dataclasses
import math
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops, reference
from .config import ProxyAttnConfig

_CHUNK_ELEMS = 1 << 25  # elements of one chunk's score matrix (fp32: 128 MiB)

__all__ = [
    "StructuredMeta",
    "make_structured_inputs",
    "apply_rope",
    "block_mass",
    "RecallResult",
    "attention_recall",
    "density",
    "relative_output_error",
    "NeedleResult",
    "needle_retrieval",
    "selection_from_mask",
    "selection_mask",
    "mean_pooling_select",
    "antidiagonal_select",
    "oracle_select",
    "proxy_scores",
    "proxyattn_select",
    "sparse_output",
    "dense_output",
    "evaluate_selection",
]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ================================================================ generator


@dataclasses.dataclass
class StructuredMeta:
    """What make_structured_inputs planted (positions are absolute token indices).

    needle_pos int64 [B, needles]: first key of each needle span (needle_len keys).
    needle_rows int64 [needles, rows_per_needle]: the query rows that retrieve each needle.
    needle_values fp32 [B, needles, Hkv, D]: the value signature written at the needle keys.
    hub_pos int64 [B, hubs]: first key of each shared hub span (hub_len[b, t] keys).
    private_pos int64 [B, Hq, private_hubs]: first key of each head's private spans.
    beta fp32 [Hq]: per-head temperature of the structured query component.
    """

    needle_pos: Tensor
    needle_len: int
    needle_rows: Tensor
    needle_values: Tensor
    hub_pos: Tensor
    hub_len: Tensor
    private_pos: Tensor
    private_len: Tensor
    sink_tokens: int
    beta: Tensor
    share: float
    rope_base: float


def _rope_freqs(d: int, base: float, device) -> Tensor:
    """theta_i = base^(-2i/d), i < d/2 (rotate-half convention: dim i pairs with i + d/2)."""
    return base ** (-torch.arange(0, d // 2, device=device, dtype=torch.float64) * 2.0 / d)


def apply_rope(x: Tensor, pos: Tensor, base: float = 10000.0) -> Tensor:
    """Rotary position embedding (rotate-half convention) of x [..., P, H, D] at positions
    pos [P] (any real values). Computed in fp64 for the angles, returned in x's dtype."""
    d = x.shape[-1]
    ang = pos.to(torch.float64)[:, None] * _rope_freqs(d, base, x.device)[None, :]  # [P, D/2]
    cos = torch.cat([ang.cos(), ang.cos()], dim=-1).to(x.dtype)[:, None, :]  # [P, 1, D]
    sin = torch.cat([ang.sin(), ang.sin()], dim=-1).to(x.dtype)[:, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def _band_dims(d: int, base: float, lo: float, hi: float, device) -> Tensor:
    """Bool [D]: dims whose RoPE frequency lies in [lo, hi)."""
    th = _rope_freqs(d, base, device)
    pair = (th >= lo) & (th < hi)
    return torch.cat([pair, pair])


def _unit_dirs(n: int, band: Tensor, gen: torch.Generator) -> Tensor:
    """n unit vectors [n, D] supported on `band` (orthonormal when n <= band dims)."""
    d = band.numel()
    nb = int(band.sum())
    x = torch.randn(max(n, nb), nb, generator=gen, dtype=torch.float64)
    if n <= nb:
        x = torch.linalg.qr(x.T)[0].T[:n]
    else:
        x = x[:n] / x[:n].norm(dim=-1, keepdim=True)
    out = torch.zeros(n, d, dtype=torch.float64)
    out[:, band.cpu()] = x
    return out


def _place_spans(n: int, lengths: Sequence[int], lo: int, hi: int, taken: List[Tuple[int, int]],
                 gen: torch.Generator) -> List[int]:
    """Start positions of n non-overlapping spans in [lo, hi) avoiding `taken` (appended to)."""
    starts = []
    for j in range(n):
        ln = int(lengths[j])
        for _ in range(1000):
            s = int(torch.randint(lo, max(lo + 1, hi - ln), (1,), generator=gen))
            if all(s + ln + 4 <= a or s >= b + 4 for a, b in taken):
                break
        taken.append((s, s + ln))
        starts.append(s)
    return starts


def make_structured_inputs(batch: int, seq_len: int, q_heads: int, kv_heads: int, head_dim: int, *,
                           share: float = 0.8, needles: int = 4, hubs: int = 8, private_hubs: Optional[int] = None,
                           seed: int = 0, dtype: torch.dtype = torch.float32,
                           device: Union[str, torch.device] = "cpu", beta_range: Tuple[float, float] = (0.5, 1.6),
                           rope_base: float = 10000.0, needle_len: int = 16, rows_per_needle: int = 8,
                           sink_tokens: int = 4, jitter: float = 0.5
                           ) -> Tuple[Tensor, Tensor, Tensor, StructuredMeta]:
    """Synthetic q [B, N, Hq, D], k, v [B, N, Hkv, D] with the structure of long-context
    attention, and a StructuredMeta of what was planted. Deterministic in `seed`.

    RoPE (base `rope_base`, rotate-half pairs) is applied to q and k. The dims are split by
    RoPE frequency theta: high (theta >= 0.1) carry i.i.d. noise (about unit logit noise: the
    diffuse background); mid (3.6e-3 <= theta < 0.1) carry a recency vector c_g per KV head,
    in its keys and in its query heads' queries, which RoPE turns into a logit bonus a * mean_pairs cos(theta (i - j)): a
    local window of tens to hundreds of tokens; low (theta < 3.6e-3) carry content. Content is
    position-free: every key of a span (sink, hub, needle) holds the same post-RoPE vector
    kappa sqrt(D) u (its pre-RoPE form is u counter-rotated by the key's position), the u
    orthonormal per KV head while they fit the band, so content matching is exact and free of
    crosstalk. A query that targets span t adds b u_t.

    Logit excess of target t for query head h at row i (before the causal mask):
        ln(N / len_t) + beta_h * c_t + ln(weight_t) + jitter * z[i, h, t]
    so a span's total weight is ~N e^{beta c}: comparable with the background (N keys of
    unit-variance logit noise) at every N. beta_h, log-uniform in beta_range, is each head's
    temperature of the shared structure: low beta heads spread their mass, high beta focus.
    Targets: the sink (first `sink_tokens` keys, c = 2.5), `hubs` shared spans (16-64 keys,
    c in [1, 3], weight `share`) that every head attends, `private_hubs` (default hubs // 2)
    spans per query head (c in [1, 3], weight 1 - share, scaled by hubs / private_hubs):
    share = 0 makes the heads' focus independent, share = 1 identical up to temperature; the
    recency window (c = 2, nominal width 64). Needles: `needles` spans of `needle_len` keys in
    [5%, 80%) of the sequence whose values hold a signature (norm 2 sqrt(D), per KV head);
    needle j is targeted (c = 8) by its `rows_per_needle` query rows only, which lie in the
    last needles * rows_per_needle rows.
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1], got {share}")
    if q_heads % kv_heads != 0:
        raise ValueError(f"q_heads={q_heads} must be a multiple of kv_heads={kv_heads}")
    if head_dim % 2 != 0 or head_dim < 16:
        raise ValueError(f"head_dim must be even and >= 16, got {head_dim}")
    if seq_len < 256 or needles * rows_per_needle > seq_len // 4:
        raise ValueError(f"seq_len={seq_len} too short for {needles} needles x {rows_per_needle} rows")
    B, N, Hq, Hkv, D = batch, seq_len, q_heads, kv_heads, head_dim
    P = hubs // 2 if private_hubs is None else private_hubs
    rep = Hq // Hkv
    gen = torch.Generator().manual_seed(int(seed))
    f64 = torch.float64
    th_lo = 10000.0 ** (-2 * 0.3125)  # theta < 3.6e-3: a 64-token span turns < 0.25 rad
    high = _band_dims(D, rope_base, 0.1, 10.0, "cpu")
    mid = _band_dims(D, rope_base, th_lo, 0.1, "cpu")
    low = _band_dims(D, rope_base, 0.0, th_lo, "cpu")
    if int(mid.sum()) < 4 or int(low.sum()) < 4:
        raise ValueError(f"head_dim={head_dim} leaves too few RoPE dims for recency and content")
    sm = D ** -0.5
    kappa = 2.0  # content keys have norm kappa sqrt(D): a query coefficient b gives logit b kappa
    lnN = math.log(N)
    c_sink, c_rec, c_needle, win = 2.5, 2.0, 8.0, 64.0

    beta = torch.empty(Hq, dtype=f64).uniform_(math.log(beta_range[0]), math.log(beta_range[1]), generator=gen).exp()
    hub_c = torch.empty(hubs, dtype=f64).uniform_(1.0, 3.0, generator=gen)
    priv_c = torch.empty(Hq, P, dtype=f64).uniform_(1.0, 3.0, generator=gen)
    n_t = 1 + hubs + P + needles  # targets of one head: sink, shared hubs, its private hubs, needles
    logw = torch.cat([torch.zeros(1, dtype=f64),
                      torch.full((hubs,), math.log(share) if share > 0 else -math.inf, dtype=f64),
                      torch.full((P,), math.log((1 - share) * hubs / max(P, 1)) if share < 1 else -math.inf,
                                 dtype=f64),
                      torch.zeros(needles, dtype=f64)])
    needle_rows = (N - needles * rows_per_needle + torch.arange(needles * rows_per_needle)).view(needles, rows_per_needle)
    row_active = torch.ones(N, n_t, dtype=torch.bool)  # needle targets: only their designated rows
    row_active[:, n_t - needles:] = False
    for j in range(needles):
        row_active[needle_rows[j], n_t - needles + j] = True

    # recency vector c_g of each KV head: equal weight on every mid-band pair, random phases, unit norm
    mid_idx = torch.nonzero(mid[: D // 2]).flatten()
    phase = torch.rand(Hkv, mid_idx.numel(), generator=gen, dtype=f64) * 2 * math.pi
    c = torch.zeros(Hkv, D, dtype=f64)
    c[:, mid_idx] = phase.cos() / math.sqrt(mid_idx.numel())
    c[:, mid_idx + D // 2] = phase.sin() / math.sqrt(mid_idx.numel())
    # key noise is small outside the high band: the queries' large recency and content
    # coefficients would turn it into logit noise
    noise_sd_k = torch.where(high, 1.0, torch.where(mid, 0.03, 0.1)).to(f64)
    noise_sd_q = torch.where(high, 2.0, 0.1).to(f64)
    pos = torch.arange(N, dtype=f64)

    q = torch.empty(B, N, Hq, D, dtype=torch.float32)  # built per head in fp64, stored in fp32
    k = torch.empty(B, N, Hkv, D, dtype=torch.float32)
    v = torch.randn(B, N, Hkv, D, generator=gen, dtype=torch.float32)
    needle_pos = torch.empty(B, needles, dtype=torch.int64)
    hub_pos = torch.empty(B, hubs, dtype=torch.int64)
    hub_len = torch.randint(16, 65, (B, hubs), generator=gen)
    priv_pos = torch.empty(B, Hq, P, dtype=torch.int64)
    priv_len = torch.randint(16, 65, (B, Hq, P), generator=gen)
    needle_values = torch.empty(B, needles, Hkv, D, dtype=torch.float32)
    for b in range(B):
        taken: List[Tuple[int, int]] = [(0, sink_tokens)]
        n_pos = _place_spans(needles, [needle_len] * needles, int(0.05 * N), int(0.8 * N), taken, gen)
        h_pos = _place_spans(hubs, hub_len[b].tolist(), int(0.03 * N), int(0.9 * N), taken, gen)
        needle_pos[b] = torch.tensor(n_pos, dtype=torch.int64)
        hub_pos[b] = torch.tensor(h_pos, dtype=torch.int64)
        for h in range(Hq):  # private spans avoid the shared ones (not each other)
            priv_pos[b, h] = torch.tensor(_place_spans(P, priv_len[b, h].tolist(), int(0.03 * N), int(0.9 * N),
                                                       list(taken), gen), dtype=torch.int64)
        kb = apply_rope(torch.randn(N, Hkv, D, generator=gen, dtype=f64) * noise_sd_k + c, pos)
        for g in range(Hkv):
            heads = range(g * rep, (g + 1) * rep)
            # content directions of this KV head: sink, shared hubs, needles, private hubs of its query heads
            dirs = _unit_dirs(1 + hubs + needles + rep * P, low, gen)
            spans = [(0, sink_tokens)] + [(h_pos[t], int(hub_len[b, t])) for t in range(hubs)]
            spans += [(p, needle_len) for p in n_pos]
            spans += [(int(priv_pos[b, h, t]), int(priv_len[b, h, t])) for h in heads for t in range(P)]
            for (s0, ln), u in zip(spans, dirs):
                kb[s0:s0 + ln, g] += (kappa * math.sqrt(D)) * u
            sig = torch.randn(needles, D, generator=gen, dtype=f64)
            sig *= 2.0 * math.sqrt(D) / sig.norm(dim=-1, keepdim=True)
            needle_values[b, :, g] = sig.float()
            for j, p in enumerate(n_pos):
                v[b, p:p + needle_len, g] = sig[j].float()
            for r, h in enumerate(heads):
                sel = list(range(1 + hubs)) + list(range(1 + hubs + needles + r * P, 1 + hubs + needles + (r + 1) * P))
                sel += list(range(1 + hubs, 1 + hubs + needles))
                t_dirs = dirs[sel]  # [n_t, D] in target order: sink, hubs, private, needles
                lens = torch.tensor([spans[i][1] for i in sel], dtype=f64)
                exc = torch.cat([torch.tensor([c_sink], dtype=f64), hub_c, priv_c[h],
                                 torch.full((needles,), c_needle, dtype=f64)])
                base_l = (lnN - lens.log()) + beta[h] * exc + logw  # [n_t]
                z = torch.randn(N, n_t, generator=gen, dtype=f64)
                coef = torch.where(torch.isfinite(base_l)[None, :] & row_active,
                                   (base_l[None, :] + jitter * z) / kappa, 0.0)  # [N, n_t]
                a_rec = (lnN - math.log(win) + beta[h] * c_rec) / sm  # recency logit at distance 0
                q_pre = torch.randn(N, D, generator=gen, dtype=f64) * noise_sd_q + a_rec * c[g]
                q[b, :, h] = (apply_rope(q_pre[:, None, :], pos)[:, 0] + coef @ t_dirs).float()
        k[b] = kb.float()
    meta = StructuredMeta(needle_pos=needle_pos, needle_len=needle_len, needle_rows=needle_rows,
                          needle_values=needle_values.to(device), hub_pos=hub_pos, hub_len=hub_len,
                          private_pos=priv_pos, private_len=priv_len, sink_tokens=sink_tokens,
                          beta=beta.float(), share=float(share), rope_base=rope_base)
    cast = dict(dtype=dtype, device=device)
    return q.to(**cast), k.to(**cast), v.to(**cast), meta


# ================================================================ metrics


def _math_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


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
    dt = _math_dtype(q)
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
    per_head=True returns fp64 [B, Hq]."""
    B, hq, _ = counts.shape
    lens = _seq_lens(seq_lens, B)
    num = torch.zeros(B, hq, dtype=torch.float64)
    den = torch.zeros(B, 1, dtype=torch.float64)
    cnt = counts.detach().to("cpu", torch.int64)
    for b, (nq, nk) in enumerate(lens):
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
    retrieval: float  # fraction of needles retrieved by every head (the crisp rule below)
    per_needle: Tensor  # bool [B, needles]
    head_fraction: float  # fraction of (b, needle, head) retrieved
    cos: Tensor  # fp64 [B, needles, Hq]: mean cosine of out at the needle rows to the signature
    dense_cos: Optional[Tensor]  # the same for dense_out (None if not given)


def needle_retrieval(out: Tensor, meta: StructuredMeta, dense_out: Optional[Tensor] = None, *,
                     threshold: float = 0.5, tol: float = 0.05) -> NeedleResult:
    """Needle j is retrieved by head h when the mean cosine similarity between out[b, row, h]
    and the needle's value signature (of h's KV head), over the needle's designated query
    rows, is >= `threshold`. With dense_out the bar is dense attention's: the cosine must also
    be >= the dense output's own cosine - `tol`, and where dense attention itself stays below
    `threshold` (a low-temperature head can spread its needle rows over other keys) matching it
    within `tol` is enough, since no selection can do better than dense attention. A needle
    counts as retrieved when every query head retrieves it."""
    B, _, hq, d = out.shape
    hkv = meta.needle_values.shape[2]
    rows = meta.needle_rows.to(out.device)  # [J, R]
    sig = meta.needle_values.to(out.device).double()[:, :, torch.arange(hq, device=out.device) // (hq // hkv)]  # [B,J,Hq,D]

    def cos_of(o: Tensor) -> Tensor:
        x = o.double()[:, rows]  # [B, J, R, Hq, D]
        cs = F.cosine_similarity(x, sig[:, :, None], dim=-1)  # [B, J, R, Hq]
        return cs.mean(dim=2).cpu()

    cs = cos_of(out)
    ok = cs >= threshold
    dcs = None
    if dense_out is not None:
        dcs = cos_of(dense_out)
        ok = (ok | (dcs < threshold)) & (cs >= dcs - tol)
    per_needle = ok.all(dim=-1)
    return NeedleResult(float(per_needle.double().mean()), per_needle, float(ok.double().mean()), cs, dcs)


# ================================================================ estimators


def _forced_and_cands(nq: int, nk: int, S: int, sink: int, local: int, causal: bool, device
                      ) -> Tuple[Tensor, Tensor]:
    """Bool [nqb, nkb] candidates and forced blocks (sink + last `local` candidates)."""
    c = torch.tensor(_candidates(nq, nk, S, causal), device=device)
    n = torch.arange(_cdiv(nk, S), device=device)
    cand = n[None, :] < c[:, None]
    forced = cand & ((n[None, :] < sink) | (n[None, :] >= (c - local)[:, None]))
    return cand, forced


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


def _check_q_k(q: Tensor, k: Tensor, S: int) -> Tuple[int, int, int, int, int]:
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
    B, nq, nk, hq, hkv = _check_q_k(q, k, block_size)
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
    B, nq, nk, hq, hkv = _check_q_k(q, k, block_size)
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
    B, nq, nk, hq, hkv = _check_q_k(q, k, block_size)
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


def _use_reference(name: str, t: Tensor) -> bool:
    """CUDA tensors without a compiled kernel run the reference on the GPU (slow but exact)."""
    return t.is_cuda and not ops.cuda_kernel_available(name)


def proxy_scores(q: Tensor, k: Tensor, config: ProxyAttnConfig, *, causal: bool = True) -> Tensor:
    """Stage 1 of ProxyAttn (it depends on neither gamma nor min_budget)."""
    S, scale = config.block_size, config.scale(q.shape[-1])
    G = config.proxy_heads(q.shape[-2], k.shape[-2])
    if _use_reference("proxy_block_scores", q):
        return reference.proxy_block_scores(q, k, None, None, q.shape[1], k.shape[1], S, G, config.stride, scale,
                                            causal)
    return ops.proxy_block_scores(q, k, block_size=S, num_proxy_heads=G, stride=config.stride, softmax_scale=scale,
                                  causal=causal)


def proxyattn_select(q: Tensor, k: Tensor, config: Optional[ProxyAttnConfig] = None, *, causal: bool = True,
                     scores: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """ProxyAttn stages 1-3 (compiled kernels on CUDA where built, else the reference)
    regardless of dense_below. Returns counts, indices, kstar. `scores` (proxy_scores) reuses
    stage 1 across gamma / min_budget values."""
    cfg = config or ProxyAttnConfig()
    cfg.check_heads(q.shape[2], k.shape[2])
    S = cfg.block_size
    scale = cfg.scale(q.shape[-1])
    nq, nk = q.shape[1], k.shape[1]
    if scores is None:
        scores = proxy_scores(q, k, cfg, causal=causal)
    if _use_reference("head_budgets", q):
        kstar = reference.head_budgets(q, k, None, None, nq, nk, S, float(cfg.gamma), cfg.sink_blocks,
                                       cfg.local_blocks, scale, causal)
    else:
        kstar = ops.head_budgets(q, k, block_size=S, gamma=cfg.gamma, sink_blocks=cfg.sink_blocks,
                                 local_blocks=cfg.local_blocks, softmax_scale=scale, causal=causal)
    if _use_reference("select_blocks", q):
        counts, indices = reference.select_blocks(scores, kstar, None, None, nq, nk, S, cfg.sink_blocks,
                                                  cfg.local_blocks, cfg.min_budget, causal)
    else:
        counts, indices = ops.select_blocks(scores, kstar, seqlen_q=nq, seqlen_k=nk, block_size=S,
                                            sink_blocks=cfg.sink_blocks, local_blocks=cfg.local_blocks,
                                            min_budget=cfg.min_budget, causal=causal)
    return counts, indices, kstar


def sparse_output(q: Tensor, k: Tensor, v: Tensor, counts: Tensor, indices: Tensor, block_size: int, *,
                  causal: bool = True, softmax_scale: Optional[float] = None) -> Tensor:
    """Stage 4 on a selection (the compiled kernel where built, else the reference)."""
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    if _use_reference("block_sparse_attention", q):
        return reference.block_sparse_attention(q, k, v, counts, indices, None, None, q.shape[1], k.shape[1],
                                                block_size, scale, causal)[0]
    return ops.block_sparse_attention(q, k, v, counts, indices, block_size=block_size, softmax_scale=scale,
                                      causal=causal)[0]


def dense_output(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True,
                 softmax_scale: Optional[float] = None) -> Tensor:
    """Dense attention [B, Nq, Hq, D]: SDPA on CUDA, the chunked reference on CPU."""
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    if q.device.type != "cuda":
        return reference.dense_attention(q, k, v, None, None, scale, causal)[0]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    nq, nk = q.shape[1], k.shape[1]
    mask, is_causal = None, causal and nq == nk
    if causal and nq != nk:
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(nq, nk)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, is_causal=is_causal, scale=scale,
                                         enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2).contiguous()


def evaluate_selection(q: Tensor, k: Tensor, v: Tensor, counts: Tensor, indices: Tensor, block_size: int, *,
                       mass: Tuple[Tensor, Tensor], dense_out: Tensor, meta: Optional[StructuredMeta] = None,
                       causal: bool = True, softmax_scale: Optional[float] = None) -> dict:
    """density, recall (mean and per head), relative output error and needle retrieval of one
    selection; the sparse output comes from proxyattn.block_sparse_attention."""
    out = sparse_output(q, k, v, counts, indices, block_size, causal=causal, softmax_scale=softmax_scale)
    rec = attention_recall(q, k, counts, indices, block_size, causal, mass=mass)
    res = {
        "density": density(counts, (q.shape[1], k.shape[1]), block_size, causal),
        "recall": rec.mean,
        "recall_min_head": float(rec.per_head.min()),
        "recall_per_head": [round(float(x), 5) for x in rec.per_head.mean(dim=0)],
        "rel_error": relative_output_error(out, dense_out),
    }
    if meta is not None:
        nr = needle_retrieval(out, meta, dense_out)
        res["needle_retrieval"] = nr.retrieval
        res["needle_head_fraction"] = nr.head_fraction
    return res
