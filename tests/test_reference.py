"""CPU tests of the reference pipeline (docs/design.md section 2) and of the public API on CPU.

Independent oracles here (per-row Python loops) check the vectorised reference."""
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import proxyattn as pa
import selection_rules as rules
from proxyattn import reference as ref


def _rand(B, nq, nk, hq, hkv, d, dtype=torch.float32):
    q = torch.randn(B, nq, hq, d, dtype=dtype)
    k = torch.randn(B, nk, hkv, d, dtype=dtype)
    v = torch.randn(B, nk, hkv, d, dtype=dtype)
    return q, k, v


def _sdpa64(q, k, v, causal, scale=None):
    """Dense attention in fp64 through torch SDPA, bottom-right causal."""
    hq, hkv = q.shape[2], k.shape[2]
    qt = q.double().transpose(1, 2)
    kt = k.double().repeat_interleave(hq // hkv, dim=2).transpose(1, 2)
    vt = v.double().repeat_interleave(hq // hkv, dim=2).transpose(1, 2)
    nq, nk = q.shape[1], k.shape[1]
    mask = None
    if causal:
        mask = torch.ones(nq, nk, dtype=torch.bool).tril(diagonal=nk - nq)
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale).transpose(1, 2)


DENSE_CFG = dict(gamma=1.0, min_budget=10**9, dense_below=0)


@pytest.mark.parametrize("B,nq,nk,hq,hkv", [
    (1, 200, 200, 4, 4),    # MHA, not a multiple of the block
    (2, 257, 257, 8, 2),    # GQA 4, B > 1
    (2, 100, 300, 4, 1),    # Nq < Nk: bottom-right causal, MQA
    (1, 64, 64, 2, 2),      # exactly one block
])
@pytest.mark.parametrize("block", [64, 128])
def test_full_budget_equals_dense(B, nq, nk, hq, hkv, block):
    q, k, v = _rand(B, nq, nk, hq, hkv, 64)
    cfg = pa.ProxyAttnConfig(block_size=block, **DENSE_CFG)
    out, sel = pa.proxy_attention(q, k, v, cfg, return_selection=True)
    want = _sdpa64(q, k, v, causal=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-4)
    assert not sel.dense
    assert torch.all(sel.density == 1.0)


def test_non_causal_full_budget_equals_dense():
    q, k, v = _rand(2, 150, 330, 4, 2, 128)
    cfg = pa.ProxyAttnConfig(block_size=64, **DENSE_CFG)
    out = pa.proxy_attention(q, k, v, cfg, causal=False)
    torch.testing.assert_close(out.double(), _sdpa64(q, k, v, causal=False), atol=2e-5, rtol=1e-4)


def test_dense_below_path_equals_dense():
    q, k, v = _rand(1, 190, 190, 4, 2, 64)
    out, sel = pa.proxy_attention(q, k, v, pa.ProxyAttnConfig(dense_below=10**6), return_selection=True)
    torch.testing.assert_close(out.double(), _sdpa64(q, k, v, True), atol=2e-5, rtol=1e-4)
    assert sel.dense and torch.all(sel.density == 1.0)


def test_sparse_output_matches_masked_dense():
    """With a real budget, the output equals dense attention under the expanded block mask."""
    B, n, hq, hkv, S = 1, 700, 4, 2, 64
    q, k, v = _rand(B, n, n, hq, hkv, 64)
    cfg = pa.ProxyAttnConfig(block_size=S, gamma=0.6, min_budget=S, dense_below=0)
    out, sel = pa.proxy_attention(q, k, v, cfg, return_selection=True)
    assert torch.all(sel.density < 1.0), "test needs a sparse selection"
    nqb, nkb = sel.counts.shape[2], sel.indices.shape[3]
    blockmask = torch.zeros(B, hq, nqb, nkb + 1, dtype=torch.bool)
    blockmask.scatter_(3, torch.where(sel.indices >= 0, sel.indices, nkb).long(), True)
    tok = blockmask[..., :nkb].repeat_interleave(S, 2).repeat_interleave(S, 3)[:, :, :n, :n]
    tok &= torch.ones(n, n, dtype=torch.bool).tril()
    qt, kt, vt = (t.double().repeat_interleave(hq // t.shape[2], 2).transpose(1, 2) for t in (q, k, v))
    want = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=tok).transpose(1, 2)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------ selection invariants


def _candidates(m, nq, nk, S, causal):
    nkb = -(-nk // S)
    if not causal:
        return nkb
    last = min((m + 1) * S, nq) - 1
    return (nk - nq + last) // S + 1


@pytest.mark.parametrize("nq,nk,S,sink,local,min_budget,causal", [
    (1000, 1000, 64, 1, 1, 128, True),
    (300, 1100, 128, 2, 2, 0, True),
    (777, 777, 64, 0, 3, 64, True),
    (500, 900, 64, 1, 1, 256, False),
])
def test_selection_invariants(nq, nk, S, sink, local, min_budget, causal):
    hq, hkv = 4, 2
    q, k, _ = _rand(2, nq, nk, hq, hkv, 64)
    kw = dict(block_size=S, causal=causal)
    scores = pa.proxy_block_scores(q, k, num_proxy_heads=2, stride=3, **kw)
    kstar = pa.head_budgets(q, k, gamma=0.8, sink_blocks=sink, local_blocks=local, **kw)
    counts, idx = pa.select_blocks(scores, kstar, seqlen_q=nq, seqlen_k=nk, sink_blocks=sink, local_blocks=local,
                                   min_budget=min_budget, **kw)
    nqb, nkb = -(-nq // S), -(-nk // S)
    assert counts.shape == (2, hq, nqb) and idx.shape == (2, hq, nqb, nkb)
    assert counts.dtype == torch.int32 and idx.dtype == torch.int16
    for b in range(2):
        for h in range(hq):
            for m in range(nqb):
                c = _candidates(m, nq, nk, S, causal)
                row = idx[b, h, m].tolist()
                cnt = int(counts[b, h, m])
                sel = row[:cnt]
                assert all(x == -1 for x in row[cnt:]), "padding must be -1"
                assert sel == sorted(sel) and len(set(sel)) == cnt, "ascending, distinct"
                assert all(0 <= x < c for x in sel), "only candidates"
                assert rules.forced(m, nq, nk, S, sink, local, causal) <= set(sel), "forced blocks kept"
                assert cnt == rules.budget(m, nqb - 1, nq, nk, S, sink, local, int(kstar[b, h]), min_budget, causal)


def _naive_select(scores_row, m, nq, nk, S, sink, local, k_m):
    c = rules.candidates(m, nq, nk, S)
    forced = rules.forced(m, nq, nk, S, sink, local)
    rest = sorted((n for n in range(c) if n not in forced), key=lambda n: (-scores_row[n], n))
    return sorted(forced | set(rest[: k_m - len(forced)]))


def test_select_blocks_matches_naive_with_ties():
    B, G, hq, nq, nk, S = 2, 2, 4, 900, 1300, 64
    nqb, nkb = -(-nq // S), -(-nk // S)
    scores = torch.randint(0, 4, (B, G, nqb, nkb)).float() / 4  # many ties
    kstar = torch.randint(0, nkb, (B, hq), dtype=torch.int32)
    counts, idx = pa.select_blocks(scores, kstar, seqlen_q=nq, seqlen_k=nk, block_size=S, min_budget=0)
    for b in range(B):
        for h in range(hq):
            for m in range(nqb):
                cnt = rules.budget(m, nqb - 1, nq, nk, S, 1, 1, int(kstar[b, h]), 0)  # the rule, not the output
                assert int(counts[b, h, m]) == cnt
                want = _naive_select(scores[b, h // (hq // G), m].tolist(), m, nq, nk, S, 1, 1, cnt)
                assert idx[b, h, m, :cnt].tolist() == want


@pytest.mark.parametrize("S,sink,local,min_budget", [(64, 1, 1, 0), (128, 2, 3, 256), (64, 0, 0, 64)])
def test_select_blocks_on_a_chunk_equals_the_whole_sequences_rows(S, sink, local, min_budget):
    """A chunk [s, e) of a causal sequence of n tokens, selected as a prefill chunk (e - s queries,
    e keys) with budget_seqlen n, gets the whole sequence's rows s / S .. e / S exactly; without
    budget_seqlen its budgets scale with its own last block and differ."""
    B, G, hq, n = 2, 2, 4, 24 * S
    nb = n // S
    scores = torch.randint(0, 5, (B, G, nb, nb)).float() / 5  # many ties
    kstar = torch.randint(0, nb, (B, hq), dtype=torch.int32)
    kw = dict(block_size=S, sink_blocks=sink, local_blocks=local, min_budget=min_budget)
    counts, idx = pa.select_blocks(scores, kstar, seqlen_q=n, seqlen_k=n, **kw)
    differs = False
    for s, e in ((0, 6 * S), (6 * S, 13 * S), (13 * S, n)):
        a, b = s // S, e // S
        chunk = scores[:, :, a:b, :b].contiguous()
        c_counts, c_idx = pa.select_blocks(chunk, kstar, seqlen_q=e - s, seqlen_k=e, budget_seqlen=n, **kw)
        assert torch.equal(c_counts, counts[:, :, a:b])
        assert torch.equal(c_idx, idx[:, :, a:b, :b]) and bool((idx[:, :, a:b, b:] == -1).all())
        own = pa.select_blocks(chunk, kstar, seqlen_q=e - s, seqlen_k=e, **kw)[0]
        differs |= not torch.equal(own, c_counts)
    assert differs, "the test needs a chunk whose own last block scales its budgets differently"


def test_select_blocks_budget_seqlen_refusals():
    scores, kstar = torch.zeros(1, 1, 2, 4), torch.zeros(1, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"budget_seqlen must be in \[256, 2097152\], got 255"):
        pa.select_blocks(scores, kstar, seqlen_q=128, seqlen_k=256, block_size=64, budget_seqlen=255)
    # Past 32768 key blocks the whole sequence is one no call takes (its budgets would not fit int32).
    with pytest.raises(ValueError, match=r"budget_seqlen must be in \[256, 2097152\], got 2097153"):
        pa.select_blocks(scores, kstar, seqlen_q=128, seqlen_k=256, block_size=64, budget_seqlen=2097153)
    pa.select_blocks(scores, kstar, seqlen_q=128, seqlen_k=256, block_size=64, budget_seqlen=2097152)
    cu = torch.tensor([0, 128], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"budget_seqlen takes the chunk of one fixed-length sequence"):
        pa.select_blocks(scores, kstar, seqlen_q=128, seqlen_k=256, block_size=64, cu_seqlens_q=cu,
                         cu_seqlens_k=cu * 2, budget_seqlen=512)
    for bad in (255, 2097153):  # the op itself, on the CPU
        with pytest.raises(ValueError, match=r"in \[max_seqlen_k, 32768 \* block_size\] = \[256, 2097152\], got "
                           + str(bad)):
            pa.ops.call("select_blocks", scores, kstar, None, None, 128, 256, 64, 1, 1, 0, True, bad)


def test_select_blocks_names_the_missing_cu_seqlens_first():
    scores, kstar = torch.zeros(1, 1, 4, 2), torch.zeros(1, 2, dtype=torch.int32)
    cu = torch.tensor([0, 128], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"varlen selection needs both cu_seqlens_q and cu_seqlens_k"):
        pa.select_blocks(scores, kstar, seqlen_q=256, seqlen_k=128, block_size=64, cu_seqlens_k=cu)


def test_budgets_monotone_in_gamma():
    q, k, _ = _rand(2, 640, 640, 4, 2, 64)
    q = q * 3  # sharper attention, budgets spread out
    prev = None
    for gamma in (0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.99, 1.0):
        ks = pa.head_budgets(q, k, block_size=64, gamma=gamma)
        if prev is not None:
            assert torch.all(ks >= prev), f"budget shrank at gamma={gamma}"
        prev = ks
    nkb = 10
    assert torch.all(prev == nkb - 2), "gamma = 1 needs every non-forced block"


def _naive_kstar(q, k, S, gamma, sink, local, scale):
    """Per head, per row loops in fp64 except the fp32 accumulation the design fixes."""
    nq, hq, d = q.shape
    nk, hkv, _ = k.shape
    rows = range(nq - min(S, nq), nq)
    nkb = -(-nk // S)
    out = []
    for h in range(hq):
        w = np.zeros(nkb)
        for i in rows:
            pos = nk - nq + i
            lg = np.array([scale * float(q[i, h].double() @ k[t, h // (hq // hkv)].double()) for t in range(pos + 1)])
            a = np.exp(lg - lg.max())
            a /= a.sum()
            for t in range(pos + 1):
                w[t // S] += a[t]
        w = (w / len(rows)).astype(np.float32)
        w = w / w.sum()
        forced = rules.forced(-(-nq // S) - 1, nq, nk, S, sink, local)
        base = np.float32(sum(np.float32(w[n]) for n in sorted(forced)))
        if base >= np.float32(gamma):
            out.append(0)
            continue
        rest = sorted((w[n] for n in range(nkb) if n not in forced), reverse=True)
        run, cnt = np.float32(base), len(rest)
        for j, x in enumerate(rest):
            run = np.float32(run + np.float32(x))
            if run >= np.float32(gamma):
                cnt = j + 1
                break
        out.append(cnt)
    return out


def test_head_budgets_match_naive():
    nq, nk, S = 150, 520, 64
    q = torch.randn(1, nq, 2, 64) * 2
    k = torch.randn(1, nk, 1, 64)
    for gamma in (0.5, 0.8):
        got = pa.head_budgets(q, k, block_size=S, gamma=gamma)[0].tolist()
        assert got == _naive_kstar(q[0], k[0], S, gamma, 1, 1, 64 ** -0.5)


@pytest.mark.parametrize("G", [1, 2, 4, 8])
@pytest.mark.parametrize("nq,nk,stride", [(150, 150, 3), (70, 200, 4), (130, 130, 1)])
def test_proxy_pooling_matches_hand_computation(G, nq, nk, stride):
    hq, hkv, S, d = 8, 4, 64, 64
    q, k, _ = _rand(1, nq, nk, hq, hkv, d)
    got = pa.proxy_block_scores(q, k, block_size=S, num_proxy_heads=G, stride=stride)
    scale = d ** -0.5
    nqb, nkb = -(-nq // S), -(-nk // S)
    want = torch.zeros(G, nqb, nkb, dtype=torch.float64)
    for g in range(G):
        qheads = list(range(g * hq // G, (g + 1) * hq // G))
        kheads = sorted({h // (hq // hkv) for h in qheads})
        # fp32 means in head order, rounded to fp16 (the values fit): docs/design.md section 2.
        qbar = (sum(q[0, :, h].float() for h in qheads) / len(qheads)).half().double()
        kbar = (sum(k[0, :, h].float() for h in kheads) / len(kheads)).half().double()
        for i in range(nq):
            pos = nk - nq + i
            if pos % stride:
                continue
            keys = [t for t in range(0, pos + 1) if t % stride == 0]
            lg = torch.stack([scale * qbar[i] @ kbar[t] for t in keys])
            p = torch.softmax(lg, 0)
            for t, pt in zip(keys, p):
                want[g, i // S, t // S] = max(want[g, i // S, t // S], pt)
    torch.testing.assert_close(got[0].double(), want, atol=1e-6, rtol=1e-5)


def test_varlen_equals_per_sequence():
    lens_q, lens_k = [70, 300, 129], [200, 300, 400]
    hq, hkv, d = 4, 2, 64
    cfg = pa.ProxyAttnConfig(block_size=64, gamma=0.7, min_budget=64, dense_below=0, num_proxy_heads=2)
    qs = [torch.randn(n, hq, d) for n in lens_q]
    ks = [torch.randn(n, hkv, d) for n in lens_k]
    vs = [torch.randn(n, hkv, d) for n in lens_k]
    cu_q = torch.tensor([0] + np.cumsum(lens_q).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + np.cumsum(lens_k).tolist(), dtype=torch.int32)
    out, sel = pa.proxy_attention_varlen(torch.cat(qs), torch.cat(ks), torch.cat(vs), cu_q, cu_k, max(lens_q),
                                         max(lens_k), cfg, return_selection=True)
    for b in range(3):
        o_b, s_b = pa.proxy_attention(qs[b][None], ks[b][None], vs[b][None], cfg, return_selection=True)
        assert torch.equal(out[cu_q[b]: cu_q[b + 1]], o_b[0])
        nqb, nkb = s_b.counts.shape[2], s_b.indices.shape[3]
        assert torch.equal(sel.counts[b, :, :nqb], s_b.counts[0])
        assert torch.all(sel.counts[b, :, nqb:] == 0)
        assert torch.equal(sel.indices[b, :, :nqb, :nkb], s_b.indices[0])
        assert torch.all(sel.indices[b, :, :, nkb:] == -1)
        assert torch.equal(sel.kstar[b], s_b.kstar[0])
        torch.testing.assert_close(sel.density[b], s_b.density[0])


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_varlen_rows_outside_every_sequence_see_no_key(device):
    """Packed varlen rows past cu_seqlens_q[B] read as rows that see no key, out 0 and lse -inf, on
    the CPU as on CUDA (so no element of either output is left unwritten); the rows inside the
    sequence are those of the sequence alone."""
    if device == "cuda" and not (torch.cuda.is_available() and pa.HAS_EXTENSION):
        pytest.skip("needs a CUDA device and proxyattn._C")
    g = torch.Generator().manual_seed(3)
    dt = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v = (torch.randn(300, h, 64, generator=g).to(device, dt) for h in (4, 2, 2))
    cu = torch.tensor([0, 200], dtype=torch.int32, device=device)
    counts = torch.full((1, 4, 4), 4, dtype=torch.int32, device=device)
    idx = torch.arange(4, dtype=torch.int16, device=device).expand(1, 4, 4, 4)
    # The op itself: the wrappers refuse CPU cu_seqlens that end before the packed rows.
    op = torch.ops.proxyattn.block_sparse_attention if pa.HAS_EXTENSION else ref.block_sparse_attention
    out, lse = op(q, k, v, counts, idx, cu, cu, 200, 200, 64, 0.125, True)
    assert (out[200:] == 0).all() and (lse[:, 200:] == -math.inf).all()
    alone, lse_alone = op(q[None, :200], k[None, :200], v[None, :200], counts, idx, None, None, 200, 200, 64, 0.125,
                          True)
    assert torch.equal(out[:200], alone[0]) and torch.equal(lse[:, :200], lse_alone[0])


def test_varlen_sequence_below_dense_below_runs_as_alone():
    """A varlen call decides dense or sparse per sequence, on the device: next to a long sequence,
    one with fewer than dense_below keys attends to all its keys (every candidate block, kstar 0,
    density 1), as it does alone, while the long one gets its own sparse selection."""
    torch.manual_seed(11)
    lens = [600, 1200]
    hq, hkv, d = 4, 2, 64
    cfg = pa.ProxyAttnConfig(block_size=64, gamma=0.6, min_budget=64, dense_below=1000, num_proxy_heads=2)
    qs = [torch.randn(n, hq, d) * 2 for n in lens]
    ks = [torch.randn(n, hkv, d) for n in lens]
    vs = [torch.randn(n, hkv, d) for n in lens]
    cu = torch.tensor([0] + np.cumsum(lens).tolist(), dtype=torch.int32)
    out, sel = pa.proxy_attention_varlen(torch.cat(qs), torch.cat(ks), torch.cat(vs), cu, cu, max(lens), max(lens),
                                         cfg, return_selection=True)
    alone = [pa.proxy_attention(qs[b][None], ks[b][None], vs[b][None], cfg, return_selection=True) for b in range(2)]
    assert alone[0][1].dense and not alone[1][1].dense and float(alone[1][1].density.max()) < 0.95
    # The short sequence: dense alone (the reference's dense attention), every block here.
    torch.testing.assert_close(out[:600], alone[0][0][0], atol=1e-5, rtol=1e-5)
    nqb = -(-600 // 64)
    assert torch.equal(sel.counts[0, :, :nqb], alone[0][1].counts[0])
    assert torch.equal(sel.indices[0, :, :nqb, :nqb], alone[0][1].indices[0])
    assert (sel.kstar[0] == 0).all() and (sel.density[0] == 1).all()
    # The long one: its sparse selection, bit for bit.
    assert torch.equal(out[600:], alone[1][0][0])
    assert torch.equal(sel.counts[1], alone[1][1].counts[0]) and torch.equal(sel.indices[1], alone[1][1].indices[0])
    assert torch.equal(sel.kstar[1], alone[1][1].kstar[0])


def test_fewer_queries_than_a_block_run_dense():
    """A chunk of fewer queries than one block behind a long prefix (a speculative verification
    step, an engine's decode row in a mixed batch) runs dense attention, alone and inside a varlen
    batch beside a long chunk that runs sparse; dense_below=0 still forces the sparse path."""
    torch.manual_seed(12)
    hq, hkv, d, nk = 4, 2, 64, 1200
    cfg = pa.ProxyAttnConfig(block_size=64, gamma=0.6, min_budget=64, dense_below=1000, num_proxy_heads=2)
    q, k, v = _rand(1, 50, nk, hq, hkv, d)
    q = q * 2
    out, sel = pa.proxy_attention(q, k, v, cfg, return_selection=True)
    want = ref.dense_attention(q, k, v, None, None, d ** -0.5, True)[0]
    assert sel.dense and torch.allclose(out, want, atol=1e-5)
    assert not pa.proxy_attention(q, k, v, dataclasses.replace(cfg, dense_below=0), return_selection=True)[1].dense
    # Varlen: one query row behind 1200 keys next to 1200 rows on their own 1200 keys.
    q2, k2, v2 = _rand(1, nk, nk, hq, hkv, d)
    q2 = q2 * 2
    cu_q = torch.tensor([0, 1, 1 + nk], dtype=torch.int32)
    cu_k = torch.tensor([0, nk, 2 * nk], dtype=torch.int32)
    outv, selv = pa.proxy_attention_varlen(torch.cat([q[0, -1:], q2[0]]), torch.cat([k[0], k2[0]]),
                                           torch.cat([v[0], v2[0]]), cu_q, cu_k, nk, nk, cfg, return_selection=True)
    one = ref.dense_attention(q[:, -1:], k, v, None, None, d ** -0.5, True)[0]
    assert torch.allclose(outv[:1], one[0], atol=1e-5)
    assert (selv.density[0] == 1).all() and (selv.kstar[0] == 0).all()
    alone = pa.proxy_attention(q2, k2, v2, cfg, return_selection=True)
    assert not alone[1].dense and float(alone[1].density.max()) < 0.95
    assert torch.equal(outv[1:], alone[0][0]) and torch.equal(selv.counts[1], alone[1].counts[0])


def test_block_sparse_attention_lse_and_empty_rows():
    q, k, v = _rand(1, 130, 130, 2, 1, 64)
    nqb, nkb = 3, 3
    counts = torch.tensor([[[1, 1, 0], [0, 2, 1]]], dtype=torch.int32)
    idx = torch.full((1, 2, nqb, nkb), -1, dtype=torch.int32)
    idx[0, 0, 0, 0] = 0
    idx[0, 0, 1, 0] = 0
    idx[0, 1, 1, :2] = torch.tensor([0, 1])
    idx[0, 1, 2, 0] = 1  # rows of block 2 see keys 128..129 only through block 2: not selected
    out, lse = pa.block_sparse_attention(q, k, v, counts, idx, block_size=64)
    assert lse.shape == (1, 2, 130) and lse.dtype == torch.float32
    assert torch.all(out[0, 128:, 0] == 0) and torch.all(lse[0, 0, 128:] == -math.inf)  # count 0
    assert torch.all(out[0, :64, 1] == 0) and torch.all(lse[0, 1, :64] == -math.inf)
    # head 1, block 2: rows 128, 129 see keys 64..127 of block 1
    kk = k[0, 64:128, 0].double()
    lg = q[0, 128, 1].double() @ kk.T * 64 ** -0.5
    torch.testing.assert_close(lse[0, 1, 128].double(), torch.logsumexp(lg, 0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0, 128, 1].double(), torch.softmax(lg, 0) @ v[0, 64:128, 0].double(),
                               atol=1e-5, rtol=1e-5)


def test_reference_is_chunked(monkeypatch):
    """No tensor of N x N elements: with a small chunk bound every intermediate stays small."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class MaxNumel(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            res = func(*args, **(kwargs or {}))
            for t in (res if isinstance(res, (tuple, list)) else [res]):
                if isinstance(t, torch.Tensor):
                    MaxNumel.biggest = max(MaxNumel.biggest, t.numel())
            return res

    monkeypatch.setattr(ref, "_CHUNK_ELEMS", 1 << 16)
    n, hq, hkv, d = 2048, 2, 1, 64
    q, k, v = _rand(1, n, n, hq, hkv, d)
    cfg = pa.ProxyAttnConfig(block_size=64, gamma=0.9, min_budget=64, dense_below=0)
    with MaxNumel():
        pa.proxy_attention(q, k, v, cfg)
    bound = 8 * (1 << 16) + n * hq * d
    assert MaxNumel.biggest <= bound < n * n, (MaxNumel.biggest, bound)


# ------------------------------------------------------------------ torch.library


def _op_samples():
    q, k, v = _rand(2, 200, 200, 4, 2, 64)
    cu = torch.tensor([0, 90, 200], dtype=torch.int32)
    qv, kv, vv = q[0], k[0], v[0]
    s = 64 ** -0.5
    scores = torch.rand(2, 2, 4, 4)
    kstar = torch.randint(0, 3, (2, 4), dtype=torch.int32)
    counts, idx = ref.select_blocks(scores, kstar, None, None, 200, 200, 64, 1, 1, 0, True)
    counts_v, idx_v = ref.select_blocks(scores, kstar, cu, cu, 110, 110, 64, 1, 1, 0, True)
    return [
        ("proxy_block_scores", (q, k, None, None, 200, 200, 64, 2, 4, s, True)),
        ("proxy_block_scores", (qv, kv, cu, cu, 110, 110, 64, 1, 3, s, True)),
        ("head_budgets", (q, k, None, None, 200, 200, 64, 0.9, 1, 1, s, True)),
        ("head_budgets", (qv, kv, cu, cu, 110, 110, 64, 0.9, 1, 1, s, False)),
        ("select_blocks", (scores, kstar, None, None, 200, 200, 64, 1, 1, 128, True)),
        ("block_sparse_attention", (q, k, v, counts, idx, None, None, 200, 200, 64, s, True)),
        ("block_sparse_attention", (qv, kv, vv, counts_v[:, :, :2], idx_v[:, :, :2, :2], cu, cu, 110, 110, 64, s,
                                    True)),
    ]


@pytest.mark.skipif(not pa.HAS_EXTENSION, reason=f"proxyattn._C not built: {pa.EXTENSION_ERROR}")
@pytest.mark.parametrize("i", range(7))
def test_opcheck_cpu(i):
    name, args = _op_samples()[i]
    torch.library.opcheck(getattr(torch.ops.proxyattn, name), args)


@pytest.mark.skipif(not pa.HAS_EXTENSION, reason=f"proxyattn._C not built: {pa.EXTENSION_ERROR}")
def test_compile_fullgraph_cpu():
    q, k, v = _rand(1, 300, 300, 4, 2, 64)
    cfg = pa.ProxyAttnConfig(block_size=64, gamma=0.8, min_budget=64, dense_below=0)
    want = pa.proxy_attention(q, k, v, cfg)
    got = torch.compile(lambda a, b, c: pa.proxy_attention(a, b, c, cfg), fullgraph=True)(q, k, v)
    assert torch.equal(got, want)


@pytest.mark.skipif(not pa.HAS_EXTENSION, reason=f"proxyattn._C not built: {pa.EXTENSION_ERROR}")
def test_compile_fullgraph_dense_path():
    """The dense path traces into one graph too: on the CPU (the default config below dense_below)
    and on fake CUDA tensors for a causal chunk behind a prefix (Nq < Nk, a bottom-right mask), both
    through stage 4 on every candidate block; the CPU result equals the eager dense attention."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = _rand(1, 100, 300, 4, 2, 64)
    cfg = pa.ProxyAttnConfig(block_size=64)
    assert cfg.runs_dense(300)
    want = pa.proxy_attention(q, k, v, cfg)
    torch._dynamo.reset()
    got = torch.compile(lambda a, b, c: pa.proxy_attention(a, b, c, cfg), fullgraph=True)(q, k, v)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(" ".join(str(n.target) for n in gm.graph.nodes if n.op == "call_function"))
        return gm.forward

    torch._dynamo.reset()
    with FakeTensorMode():
        qf = torch.empty(1, 100, 4, 64, dtype=torch.bfloat16, device="cuda")
        kf = torch.empty(1, 300, 2, 64, dtype=torch.bfloat16, device="cuda")
        out = torch.compile(lambda a, b, c: pa.proxy_attention(a, b, c, cfg), backend=backend, fullgraph=True)(
            qf, kf, kf.clone())
    torch._dynamo.reset()
    assert out.shape == qf.shape and len(graphs) == 1 and "block_sparse_attention" in graphs[0], graphs


def test_huge_softmax_scale_is_the_argmax_limit():
    """A softmax_scale whose product with q.k overflows fp32 (found by the argument fuzzing) gives the
    limit of a huge scale, all weight on each row's largest logit, in all three stages, not NaN: the
    same scores, budgets and outputs as a scale of 1e6, which is already that limit on these inputs."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 130, 4, 64, generator=g) * 3  # q.k up to ~200: times 3.2e37 overflows fp32
    k = torch.randn(1, 130, 2, 64, generator=g) * 3
    v = torch.randn(1, 130, 2, 64, generator=g)
    huge, limit = 3.2e37, 1e6
    assert torch.isinf(torch.einsum("nd,md->nm", q[0, :, 0], k[0, :, 0]).max() * huge)  # it does overflow
    sc_h = pa.proxy_block_scores(q, k, softmax_scale=huge)
    sc_l = pa.proxy_block_scores(q, k, softmax_scale=limit)
    assert torch.isfinite(sc_h).all() and torch.allclose(sc_h, sc_l, atol=1e-6)
    assert torch.equal(pa.head_budgets(q, k, softmax_scale=huge), pa.head_budgets(q, k, softmax_scale=limit))
    out_h, lse_h = ref.dense_attention(q, k, v, None, None, huge, True)
    out_l, lse_l = ref.dense_attention(q, k, v, None, None, limit, True)
    assert torch.isfinite(out_h).all() and torch.allclose(out_h, out_l, atol=1e-5)
    assert not torch.isnan(lse_h).any() and torch.isposinf(lse_h).any()  # beyond fp32: +inf, not NaN
    # A scale above the largest fp32 value (inf in fp32 math) is the same limit.
    top = 3.4028235677973366e+38
    assert torch.allclose(pa.proxy_block_scores(q, k, softmax_scale=top), sc_l, atol=1e-6)
    assert torch.allclose(ref.dense_attention(q, k, v, None, None, top, True)[0], out_l, atol=1e-5)
    # A scale that is 0 in fp32 gives uniform weights over the visible keys (masked keys stay out).
    sc_0 = pa.proxy_block_scores(q, k, softmax_scale=1.5e-185)
    assert torch.isfinite(sc_0).all() and (sc_0 > 0).sum() > 0
    out_0, _ = ref.dense_attention(q, k, v, None, None, 1.5e-185, True)
    assert torch.allclose(out_0[0, 2, 0], v[0, :3, 0].mean(0), atol=1e-6)
    # An ordinary scale takes the plain product, as softmax(scale * q.k) does.
    out_1, _ = ref.dense_attention(q[:, :5], k[:, :5], v[:, :5], None, None, 0.125, True)
    logits = torch.einsum("nd,md->nm", q[0, :5, 0], k[0, :5, 0]) * 0.125
    logits.masked_fill_(torch.ones(5, 5, dtype=torch.bool).triu(1), -math.inf)
    want = torch.softmax(logits, -1) @ v[0, :5, 0]
    assert torch.allclose(out_1[0, :, 0], want, atol=1e-6)


# ---------------------------------------------------------------- stage 1's 16-bit pooled vectors


def test_pooled_vectors_round_to_fp16_or_bf16_per_group():
    """docs/design.md section 2: fp32 means rounded to fp16; a group with a kept row whose mean
    overflows fp16 rounds to bf16 instead (only that group; rows the stride drops do not count)."""
    g = torch.Generator().manual_seed(3)
    nq = nk = 64
    q = torch.randn(nq, 4, 32, generator=g)
    k = torch.randn(nk, 2, 32, generator=g)

    def kind(x):
        return "bf16" if torch.equal(x, x.bfloat16().float()) else "fp16" if torch.equal(x, x.half().float()) else "?"

    qbar, kbar = ref.group_pool(q, k, 2, 4)
    assert [kind(qbar[:, j]) for j in range(2)] == ["fp16", "fp16"]
    assert torch.equal(qbar, (q.view(nq, 2, 2, 32).sum(2) / 2).half().float())
    # Seven heads per group: the sum in head order, then a correctly rounded fp32 division.
    q7 = torch.randn(nq, 7, 32, generator=g) * 1000
    want = q7[:, 0].numpy().copy()
    for j in range(1, 7):
        want = want + q7[:, j].numpy()
    want = torch.from_numpy(want / np.float32(7)).half().float()
    assert torch.equal(ref.group_pool(q7, k, 1, 4)[0][:, 0], want)
    k[9, 1, 0] = 1e6  # row 9: dropped by stride 4
    qbar, kbar = ref.group_pool(q, k, 2, 4)
    assert [kind(qbar[:, j]) for j in range(2)] == ["fp16", "fp16"]
    assert torch.isinf(kbar[9, 1, 0])  # the dropped row is not read by stage 1
    k[8, 1, 0] = 1e6  # row 8: kept
    qbar, kbar = ref.group_pool(q, k, 2, 4)
    assert [kind(qbar[:, j]) for j in range(2)] == ["fp16", "bf16"]
    assert float(kbar[8, 1, 0]) == 999424.0  # 1e6 in bf16
    # Queries count from the first kept row: position Nk - Nq + i a multiple of the stride.
    q2 = q[:60].clone()
    q2[2, 0, 0] = 2e5  # mean 1e5 at position 64 - 60 + 2 = 6: kept at stride 3, dropped at stride 4
    assert kind(ref.group_pool(q2, k, 2, 3)[0][:, 0]) == "bf16"
    assert kind(ref.group_pool(q2, k, 2, 4)[0][:, 0]) == "fp16"


def test_rounded_pooling_keeps_the_selection():
    """The 16-bit pooled vectors against fp32 ones on structured inputs at the default config: scores
    within 2e-3 relative, selections equal except between blocks whose scores tie within that, and
    attention recall within 0.002."""
    import chunked
    from proxyattn import metrics

    n, hq, hkv, d = 8192, 8, 2, 128
    q, k, v, _ = chunked.synthetic.make_structured_inputs(1, n, hq, hkv, d, seed=1, dtype=torch.bfloat16)
    cfg = pa.ProxyAttnConfig(dense_below=0)
    G = cfg.proxy_heads(hq, hkv)
    assert G > hkv  # fp32_pool's key branch

    def fp32_pool(q_b, k_b, groups, stride):  # group_pool without the rounding (G > Hkv here)
        return ref._head_mean(q_b, groups), k_b.float()[:, torch.arange(groups) // (groups // k_b.shape[1])]

    def run():
        sc = pa.proxy_block_scores(q, k, num_proxy_heads=G)
        counts, idx = pa.select_blocks(sc, pa.head_budgets(q, k), seqlen_q=n, seqlen_k=n)
        return sc, counts, idx

    sc, counts, idx = run()
    orig = ref.group_pool
    ref.group_pool = fp32_pool
    try:
        sc32, counts32, idx32 = run()
    finally:
        ref.group_pool = orig
    assert not torch.equal(sc, sc32)  # the rounding is there
    rel = ((sc - sc32).abs() / sc32.abs().clamp_min(1e-6)).max()
    assert rel < 2e-3, float(rel)
    assert torch.equal(counts, counts32)
    for b, h, m in (idx != idx32).any(-1).nonzero().tolist():
        a, r = set(idx[b, h, m].tolist()) - {-1}, set(idx32[b, h, m].tolist()) - {-1}
        row = sc32[b, h // (hq // G), m]
        assert float(row[sorted(a - r)].min()) >= float(row[sorted(r - a)].max()) * (1 - 2e-3)
    r16 = metrics.attention_recall(q, k, counts, idx, cfg.block_size).mean
    r32 = metrics.attention_recall(q, k, counts32, idx32, cfg.block_size).mean
    assert abs(r16 - r32) <= 0.002, (r16, r32)
