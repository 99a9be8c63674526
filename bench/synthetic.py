"""Structured synthetic attention inputs (docs/design.md section 5): sinks, RoPE recency windows,
shared "hub" spans, per-head private spans, planted needles, per-head temperatures.

    from synthetic import make_structured_inputs   # with bench/ on sys.path
    q, k, v, meta = make_structured_inputs(1, 32768, 32, 8, 128, dtype=torch.bfloat16, device="cuda")

Layouts follow proxyattn: q [B, N, Hq, D], k/v [B, N, Hkv, D]. On a CUDA device the bulk random
draws (noise, value vectors, jitter) come from a torch.Generator on that device and all the
arithmetic runs there; the small draws (temperatures, span positions, content directions) come
from a CPU generator in both cases. The CPU path is the reference: deterministic in the seed and
bit-identical across runs; the CUDA path is deterministic in the seed on one GPU model and has the
same distribution, not the same numbers.
"""
from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = ["StructuredMeta", "make_structured_inputs", "apply_rope"]


@dataclasses.dataclass
class StructuredMeta:
    """What make_structured_inputs planted (positions are absolute token indices).

    needle_pos int64 [B, needles]: first key of each needle span (needle_len keys).
    needle_rows int64 [needles, rows_per_needle]: the query rows that retrieve each needle.
    needle_values fp32 [B, needles, Hkv, D]: the value signature written at the needle keys
    (on the inputs' device; proxyattn.metrics.needle_retrieval reads needle_rows and this).
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


def _rope_tables(pos: Tensor, d: int, base: float, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """cos, sin [P, 1, D] in `dtype` of the angles pos * theta (fp64), on pos's device."""
    ang = pos.to(torch.float64)[:, None] * _rope_freqs(d, base, pos.device)[None, :]  # [P, D/2]
    c, s = ang.cos(), ang.sin()
    return torch.cat([c, c], dim=-1).to(dtype)[:, None, :], torch.cat([s, s], dim=-1).to(dtype)[:, None, :]


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    d = x.shape[-1]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def apply_rope(x: Tensor, pos: Tensor, base: float = 10000.0) -> Tensor:
    """Rotary position embedding (rotate-half convention) of x [..., P, H, D] at positions
    pos [P] (any real values). Computed in fp64 for the angles, returned in x's dtype."""
    cos, sin = _rope_tables(pos.to(x.device), x.shape[-1], base, x.dtype)
    return _rotate(x, cos, sin)


def _band_dims(d: int, base: float, lo: float, hi: float) -> Tensor:
    """Bool [D] (CPU): dims whose RoPE frequency lies in [lo, hi)."""
    th = _rope_freqs(d, base, "cpu")
    pair = (th >= lo) & (th < hi)
    return torch.cat([pair, pair])


def _unit_dirs(n: int, band: Tensor, gen: torch.Generator) -> Tensor:
    """n unit vectors [n, D] (CPU, fp64) supported on `band` (orthonormal when n <= band dims)."""
    d = band.numel()
    nb = int(band.sum())
    x = torch.randn(max(n, nb), nb, generator=gen, dtype=torch.float64)
    if n <= nb:
        x = torch.linalg.qr(x.T)[0].T[:n]
    else:
        x = x[:n] / x[:n].norm(dim=-1, keepdim=True)
    out = torch.zeros(n, d, dtype=torch.float64)
    out[:, band] = x
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
                           sink_tokens: int = 4, jitter: float = 0.5, needle_rows_before: int = 0
                           ) -> Tuple[Tensor, Tensor, Tensor, StructuredMeta]:
    """Synthetic q [B, N, Hq, D], k, v [B, N, Hkv, D] (`dtype`, on `device`) with the structure of
    long-context attention, and a StructuredMeta of what was planted. Deterministic in `seed`
    (per device kind: see the module docstring).

    RoPE (base `rope_base`, rotate-half pairs) is applied to q and k. The dims are split by
    RoPE frequency theta: high (theta >= 0.1) carry i.i.d. noise (about unit logit noise: the
    diffuse background); mid (3.6e-3 <= theta < 0.1) carry a recency vector c_g per KV head,
    in its keys and in its query heads' queries, which RoPE turns into a logit bonus
    a * mean_pairs cos(theta (i - j)): a local window of tens to hundreds of tokens; low
    (theta < 3.6e-3) carry content. Content is position-free: every key of a span (sink, hub,
    needle) holds the same post-RoPE vector kappa sqrt(D) u (its pre-RoPE form is u counter-rotated
    by the key's position), the u orthonormal per KV head while they fit the band, so content
    matching is exact and free of crosstalk. A query that targets span t adds b u_t.

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
    needles * rows_per_needle rows that end `needle_rows_before` rows before the end. With the
    default 0 they are the last rows, inside stage 2's probe (the last block of rows), where the
    budget is measured rather than scaled: a favourable place for retrieval; a value of at least
    the block size puts them outside it. At lengths below about 2k the spans may overlap (a span
    that finds no free place in 1000 tries keeps its last one).
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
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(int(seed))  # small draws; on CPU also the bulk ones
    bulk = gen if dev.type == "cpu" else torch.Generator(device=dev).manual_seed(int(seed))
    f64 = torch.float64
    th_lo = 10000.0 ** (-2 * 0.3125)  # theta < 3.6e-3: a 64-token span turns < 0.25 rad
    high = _band_dims(D, rope_base, 0.1, 10.0)
    mid = _band_dims(D, rope_base, th_lo, 0.1)
    low = _band_dims(D, rope_base, 0.0, th_lo)
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
    R = needles * rows_per_needle
    if not 0 <= needle_rows_before <= N - R:
        raise ValueError(f"needle_rows_before must be in [0, {N - R}] for {R} needle rows, got {needle_rows_before}")
    needle_rows = (N - needle_rows_before - R + torch.arange(R)).view(needles, rows_per_needle)
    row_active = torch.ones(N, n_t, dtype=torch.bool)  # needle targets: only their designated rows
    row_active[:, n_t - needles:] = False
    for j in range(needles):
        row_active[needle_rows[j], n_t - needles + j] = True
    row_active = row_active.to(dev)

    # recency vector c_g of each KV head: equal weight on every mid-band pair, random phases, unit norm
    mid_idx = torch.nonzero(mid[: D // 2]).flatten()
    phase = torch.rand(Hkv, mid_idx.numel(), generator=gen, dtype=f64) * 2 * math.pi
    c = torch.zeros(Hkv, D, dtype=f64)
    c[:, mid_idx] = phase.cos() / math.sqrt(mid_idx.numel())
    c[:, mid_idx + D // 2] = phase.sin() / math.sqrt(mid_idx.numel())
    c = c.to(dev)
    # key noise is small outside the high band: the queries' large recency and content
    # coefficients would turn it into logit noise
    noise_sd_k = torch.where(high, 1.0, torch.where(mid, 0.03, 0.1)).to(dev, f64)
    noise_sd_q = torch.where(high, 2.0, 0.1).to(dev, f64)
    pos = torch.arange(N, dtype=f64, device=dev)
    cos_k, sin_k = _rope_tables(pos, D, rope_base, f64)

    q = torch.empty(B, N, Hq, D, dtype=torch.float32, device=dev)  # built per head in fp64, stored in fp32
    k = torch.empty(B, N, Hkv, D, dtype=torch.float32, device=dev)
    v = torch.randn(B, N, Hkv, D, generator=bulk, dtype=torch.float32, device=dev)
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
        kb = _rotate(torch.randn(N, Hkv, D, generator=bulk, dtype=f64, device=dev) * noise_sd_k + c, cos_k, sin_k)
        for g in range(Hkv):
            heads = range(g * rep, (g + 1) * rep)
            # content directions of this KV head: sink, shared hubs, needles, private hubs of its query heads
            dirs = _unit_dirs(1 + hubs + needles + rep * P, low, gen)
            spans = [(0, sink_tokens)] + [(h_pos[t], int(hub_len[b, t])) for t in range(hubs)]
            spans += [(p, needle_len) for p in n_pos]
            spans += [(int(priv_pos[b, h, t]), int(priv_len[b, h, t])) for h in heads for t in range(P)]
            dirs_dev = dirs.to(dev)
            for (s0, ln), u in zip(spans, dirs_dev):
                kb[s0:s0 + ln, g] += (kappa * math.sqrt(D)) * u
            sig = torch.randn(needles, D, generator=gen, dtype=f64)
            sig *= 2.0 * math.sqrt(D) / sig.norm(dim=-1, keepdim=True)
            needle_values[b, :, g] = sig.float()
            sig_dev = sig.float().to(dev)
            for j, p in enumerate(n_pos):
                v[b, p:p + needle_len, g] = sig_dev[j]
            for r, h in enumerate(heads):
                sel = list(range(1 + hubs)) + list(range(1 + hubs + needles + r * P, 1 + hubs + needles + (r + 1) * P))
                sel += list(range(1 + hubs, 1 + hubs + needles))
                t_dirs = dirs_dev[sel]  # [n_t, D] in target order: sink, hubs, private, needles
                lens = torch.tensor([spans[i][1] for i in sel], dtype=f64)
                exc = torch.cat([torch.tensor([c_sink], dtype=f64), hub_c, priv_c[h],
                                 torch.full((needles,), c_needle, dtype=f64)])
                base_l = ((lnN - lens.log()) + beta[h] * exc + logw).to(dev)  # [n_t]
                z = torch.randn(N, n_t, generator=bulk, dtype=f64, device=dev)
                coef = torch.where(torch.isfinite(base_l)[None, :] & row_active,
                                   (base_l[None, :] + jitter * z) / kappa, 0.0)  # [N, n_t]
                a_rec = (lnN - math.log(win) + beta[h] * c_rec) / sm  # recency logit at distance 0
                q_pre = torch.randn(N, D, generator=bulk, dtype=f64, device=dev) * noise_sd_q + a_rec * c[g]
                q[b, :, h] = (_rotate(q_pre[:, None, :], cos_k, sin_k)[:, 0] + coef @ t_dirs).float()
        k[b] = kb.float()
        del kb
    meta = StructuredMeta(needle_pos=needle_pos, needle_len=needle_len, needle_rows=needle_rows,
                          needle_values=needle_values.to(dev), hub_pos=hub_pos, hub_len=hub_len,
                          private_pos=priv_pos, private_len=priv_len, sink_tokens=sink_tokens,
                          beta=beta.float(), share=float(share), rope_base=rope_base)
    return q.to(dtype), k.to(dtype), v.to(dtype), meta
