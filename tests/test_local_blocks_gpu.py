"""The local-block rule on the GPU: select_blocks' and head_budgets' kernels equal the reference
(proxyattn.reference on CPU copies) for every offset residue (Nk - Nq) mod S at S = 64 and a spread
of them at S = 128, local_blocks 0/1/2, sink_blocks 0/1, fixed length and varlen batches whose
sequences have mixed offsets; NaN and infinite scores; and the public API behind an unaligned
prefix."""
import numpy as np
import pytest
import torch

import proxyattn as pa
import selection_rules as rules
import test_estimate_gpu as est
from proxyattn import reference as ref

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

OPS = torch.ops.proxyattn
COMBOS = [(0, 0), (0, 1), (1, 1), (0, 2), (1, 2), (1, 0)]  # (sink_blocks, local_blocks)
RESIDUES = {64: list(range(64)), 128: [0, 1, 2, 31, 63, 64, 65, 96, 126, 127]}


def _varlen_lengths(S, residues, gen):
    """One sequence per residue: Nq of 1-4 blocks plus a random remainder, Nk = Nq + a whole number
    of blocks + the residue."""
    lens = []
    for r in residues:
        nq = int(torch.randint(1, 4 * S, (1,), generator=gen))
        nk = nq + S * int(torch.randint(0, 4, (1,), generator=gen)) + r
        lens.append((nq, nk))
    return lens


def _cu(lens):
    return torch.tensor([0] + np.cumsum(lens).tolist(), dtype=torch.int32)


def _select_both(scores, kstar, cu_q, cu_k, mq, mk, S, sink, local, min_budget):
    got = OPS.select_blocks(scores.cuda(), kstar.cuda(), None if cu_q is None else cu_q.cuda(),
                            None if cu_k is None else cu_k.cuda(), mq, mk, S, sink, local, min_budget, True)
    want = ref.select_blocks(scores, kstar, cu_q, cu_k, mq, mk, S, sink, local, min_budget, True)
    return [t.cpu() for t in got], want


@pytest.mark.parametrize("S", [64, 128])
@pytest.mark.parametrize("sink,local", COMBOS)
def test_select_blocks_every_offset_varlen(S, sink, local):
    gen = torch.Generator().manual_seed(S * 10 + sink * 3 + local)
    lens = _varlen_lengths(S, RESIDUES[S], gen)
    mq, mk = max(a for a, _ in lens), max(b for _, b in lens)
    B, G, hq = len(lens), 2, 4
    nqb, nkb = rules.cdiv(mq, S), rules.cdiv(mk, S)
    scores = torch.rand(B, G, nqb, nkb, generator=gen)
    scores[..., 1::4] = scores[..., :1]  # ties
    kstar = torch.randint(-1, nkb + 2, (B, hq), dtype=torch.int32, generator=gen)
    for min_budget in (0, 3 * S):
        (counts, idx), (r_counts, r_idx) = _select_both(scores, kstar, _cu([a for a, _ in lens]),
                                                        _cu([b for _, b in lens]), mq, mk, S, sink, local,
                                                        min_budget)
        assert torch.equal(counts, r_counts) and torch.equal(idx, r_idx)
        for b, (nq, nk) in enumerate(lens):  # and the reference keeps the rule's forced blocks
            for m in range(rules.cdiv(nq, S)):
                sel = set(idx[b, 0, m, : int(counts[b, 0, m])].tolist())
                assert rules.forced(m, nq, nk, S, sink, local) <= sel, (b, nq, nk, m)


@pytest.mark.parametrize("S", [64, 128])
@pytest.mark.parametrize("sink,local", COMBOS)
def test_select_blocks_every_offset_fixed(S, sink, local):
    gen = torch.Generator().manual_seed(S + 7 * sink + local)
    nq = 2 * S + 19
    for r in RESIDUES[S][:: 3 if S == 64 else 1]:
        nk = nq + S + r
        nqb, nkb = rules.cdiv(nq, S), rules.cdiv(nk, S)
        scores = torch.rand(2, 1, nqb, nkb, generator=gen)
        kstar = torch.randint(0, nkb, (2, 3), dtype=torch.int32, generator=gen)
        (counts, idx), (r_counts, r_idx) = _select_both(scores, kstar, None, None, nq, nk, S, sink, local, S)
        assert torch.equal(counts, r_counts) and torch.equal(idx, r_idx), r


@pytest.mark.parametrize("S", [64, 128])
@pytest.mark.parametrize("sink,local", [(1, 1), (0, 2), (0, 1)])
def test_head_budgets_every_offset_varlen(S, sink, local):
    """head_budgets counts the last query block's local blocks (both diagonal blocks when the
    offset is unaligned) as forced; kernel equals the reference except heads whose reference
    cumulative sum lands within est.NEAR_GAMMA of gamma."""
    gen = torch.Generator().manual_seed(S + sink + 5 * local)
    residues = RESIDUES[S][::4] if S == 64 else RESIDUES[S]
    lens = _varlen_lengths(S, residues, gen)
    hq, hkv, d, gamma = 4, 2, 64, 0.9
    q = torch.randn(sum(a for a, _ in lens), hq, d, generator=gen).to(torch.bfloat16) * 2
    k = torch.randn(sum(b for _, b in lens), hkv, d, generator=gen).to(torch.bfloat16)
    cu_q, cu_k = _cu([a for a, _ in lens]), _cu([b for _, b in lens])
    mq, mk = max(a for a, _ in lens), max(b for _, b in lens)
    scale = d ** -0.5
    got = OPS.head_budgets(q.cuda(), k.cuda(), cu_q.cuda(), cu_k.cuda(), mq, mk, S, gamma, sink, local, scale,
                           True).cpu()
    want = ref.head_budgets(q, k, cu_q, cu_k, mq, mk, S, gamma, sink, local, scale, True)
    skip = est._near_gamma(est._reference_runs(q, k, cu_q, cu_k, S, gamma, sink, local, scale, True), gamma)
    bad = [(b, h) for b in range(len(lens)) for h in range(hq) if int(got[b, h]) != int(want[b, h]) and (b, h) not in skip]
    assert not bad, bad
    assert len(skip) <= max(1, got.numel() // 8)


def test_nan_and_inf_scores_kernel_equals_reference():
    """NaN ranks below every number and never displaces a forced block, in the kernel as in the
    reference; a NaN in one proxy group's scores leaves the other group's heads unchanged."""
    S, nq, nk = 64, 6 * 64 + 5, 9 * 64 + 40
    nqb, nkb = rules.cdiv(nq, S), rules.cdiv(nk, S)
    gen = torch.Generator().manual_seed(3)
    clean = torch.rand(1, 2, nqb, nkb, generator=gen)
    scores = clean.clone()
    scores[0, 0, :, 0] = float("nan")
    scores[0, 0, :, -1] = float("nan")
    scores[0, 0, :, 1] = float("inf")
    scores[0, 0, :, 2] = float("-inf")
    scores[0, 0, :, 3::5] = float("nan")
    scores[0, 0, 2:, 4] = -float("nan")
    scores[0, 0, 3, :] = float("nan")  # a whole row
    kstar = torch.tensor([[1, 4, 2, 9]], dtype=torch.int32)
    for sink, local in COMBOS:
        for min_budget in (0, 4 * S):
            (counts, idx), (r_counts, r_idx) = _select_both(scores, kstar, None, None, nq, nk, S, sink, local,
                                                            min_budget)
            assert torch.equal(counts, r_counts) and torch.equal(idx, r_idx), (sink, local, min_budget)
            (c2, i2), _ = _select_both(clean, kstar, None, None, nq, nk, S, sink, local, min_budget)
            assert torch.equal(counts[:, 2:], c2[:, 2:]) and torch.equal(idx[:, 2:], i2[:, 2:])
            for h in range(2):
                for m in range(nqb):
                    sel = set(idx[0, h, m, : int(counts[0, h, m])].tolist())
                    assert rules.forced(m, nq, nk, S, sink, local) <= sel


@pytest.mark.parametrize("S", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunk_behind_unaligned_prefix_gpu(S, dtype):
    """The public API on CUDA: a chunk behind a prefix whose length is not a multiple of S, no
    sink, no budget floor, tiny gamma: every row still sees its own key block (no zero rows, finite
    lse), and the result equals the reference's on the same selection."""
    nq, prefix = 3 * S, S + 37
    q = torch.randn(1, nq, 4, 128, device="cuda", dtype=dtype)
    k = torch.randn(1, nq + prefix, 2, 128, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    cfg = pa.ProxyAttnConfig(block_size=S, sink_blocks=0, min_budget=0, gamma=1e-6, dense_below=0)
    out, sel = pa.proxy_attention(q, k, v, cfg, return_selection=True)
    assert int((out.float().abs().sum(-1) == 0).sum()) == 0
    _, lse = pa.block_sparse_attention(q, k, v, sel.counts, sel.indices, block_size=S)
    assert torch.isfinite(lse).all()
    want, _ = ref.block_sparse_attention(q.cpu().float(), k.cpu().float(), v.cpu().float(), sel.counts.cpu(),
                                         sel.indices.cpu(), None, None, nq, nq + prefix, S, 128 ** -0.5, True)
    assert (out.cpu().float() - want).abs().max() < 2e-2
