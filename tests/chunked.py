"""Chunked prefill as serving engines run it: the queries of a sequence arrive in chunks of any
length, each attending to the keys of everything before it and itself (a growing prefix, so
Nk - Nq is whatever the previous chunks add up to). Shared by the CPU and GPU tests."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import synthetic  # noqa: E402,F401  (re-exported for the tests)
import proxyattn as pa  # noqa: E402
from proxyattn import metrics  # noqa: E402
from proxyattn.attention import dense_attention  # noqa: E402


def random_chunks(n: int, lo: int, hi: int, block: int, gen: torch.Generator):
    """Chunk lengths in [lo, hi] (the last one shorter if need be) that are not multiples of block."""
    out, pos = [], 0
    while pos < n:
        ln = int(torch.randint(lo, hi + 1, (1,), generator=gen))
        if ln % block == 0:
            ln += 1
        ln = min(ln, n - pos)
        out.append(ln)
        pos += ln
    return out


def run_chunks(q, k, v, lengths, cfg):
    """proxy_attention chunk by chunk against the growing prefix. Returns the outputs [B, N, Hq, D]
    (concatenated), the mean attention recall over every (head, row) of the chunks (true softmax mass
    inside the selected blocks), and the smallest lse any row got from block_sparse_attention on its
    selection (-inf: some row saw no key)."""
    outs, mass, rows, worst = [], 0.0, 0.0, float("inf")
    S, pos = cfg.block_size, 0
    for ln in lengths:
        qc, kp, vp = q[:, pos:pos + ln], k[:, :pos + ln], v[:, :pos + ln]
        out, sel = pa.proxy_attention(qc, kp, vp, cfg, return_selection=True)
        outs.append(out)
        W, r = metrics.block_mass(qc, kp, S)
        m = metrics.selection_mask(sel.counts, sel.indices, W.shape[-1])
        mass += float((W * m.to(W.device)).sum())
        rows += float(r.sum()) * q.shape[0] * q.shape[2]  # (rows that see a key) x batch x heads
        _, lse = pa.block_sparse_attention(qc, kp, vp, sel.counts, sel.indices, block_size=S)
        worst = min(worst, float(lse.min()))
        pos += ln
    return torch.cat(outs, dim=1), mass / rows, worst


def dense_chunks(q, k, v, lengths):
    outs, pos = [], 0
    for ln in lengths:
        outs.append(dense_attention(q[:, pos:pos + ln], k[:, :pos + ln], v[:, :pos + ln]))
        pos += ln
    return torch.cat(outs, dim=1)
