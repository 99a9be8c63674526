"""CUDA estimation kernels (docs/design.md section 2, stages 1-3) against proxyattn.reference.

- select_blocks: counts and indices identical to the reference given the same scores and
  budgets (deliberate ties, random kstar, varlen, Nq < Nk, block 64/128, sink/local/min_budget).
- proxy_block_scores: within 1e-4 relative of the reference run in float64 on the same 16-bit
  pooled vectors (fp16, bf16 for a group that overflows fp16).
- head_budgets: identical to the reference except heads whose reference cumulative sum lands
  within NEAR_GAMMA of gamma (those are skipped, and must be rare).
- stages 1-3 end to end vs the reference: selections equal except rows whose reference scores
  tie within E2E_TIE_RTOL at the selection threshold.
- a 1M-token scale run (sanity + sampled score rows) and CUDA-graph capture.
"""
import math

import numpy as np
import pytest
import torch

import proxyattn  # noqa: F401  (loads the extension and registers torch.ops.proxyattn)
import selection_rules as rules
from proxyattn import reference as ref

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

OPS = torch.ops.proxyattn
NEAR_GAMMA = 1e-5      # |reference cumulative sum - gamma| below which a kstar may differ
E2E_TIE_RTOL = 1e-4    # relative score gap below which two blocks count as tied end to end
SCORE_RTOL = 1e-4


def _cdiv(a, b):
    return -(-a // b)


def _inputs(b, nq, nk, hq, hkv, d, dtype, varlen_lens=None, qscale=1.0):
    """Fixed length (varlen_lens None) or packed varlen inputs; returns q, k, cu_q, cu_k, max_q, max_k."""
    if varlen_lens is None:
        q = torch.randn(b, nq, hq, d, device="cuda", dtype=dtype) * qscale
        k = torch.randn(b, nk, hkv, d, device="cuda", dtype=dtype)
        return q, k, None, None, nq, nk
    lq = [a for a, _ in varlen_lens]
    lk = [c for _, c in varlen_lens]
    q = torch.randn(sum(lq), hq, d, device="cuda", dtype=dtype) * qscale
    k = torch.randn(sum(lk), hkv, d, device="cuda", dtype=dtype)
    cu_q = torch.tensor([0] + np.cumsum(lq).tolist(), device="cuda", dtype=torch.int32)
    cu_k = torch.tensor([0] + np.cumsum(lk).tolist(), device="cuda", dtype=torch.int32)
    return q, k, cu_q, cu_k, max(lq), max(lk)


SHAPES = [  # (batch, nq, nk, varlen lengths or None)
    (1, 1000, 1000, None),
    (2, 777, 2049, None),
    (1, 256, 1536, None),
    (6, None, None, [(0, 0), (300, 700), (1000, 1000), (0, 517), (17, 517), (0, 0)]),  # empty ones: no queries
]


# ---------------------------------------------------------------- stage 3


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}{'-varlen' if s[3] else ''}")
@pytest.mark.parametrize("S", [64, 128])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("sink,local,min_budget", [(1, 1, 0), (0, 0, 0), (2, 3, 512), (1, 1, 2048), (4, 0, 130)])
@pytest.mark.parametrize("levels", [3, 1000])
def test_select_blocks_matches_reference(shape, S, causal, sink, local, min_budget, levels):
    b, nq, nk, lens = shape
    hq, G = 8, 2
    if lens is not None:
        b, nq, nk = len(lens), max(a for a, _ in lens), max(c for _, c in lens)
        cu_q = torch.tensor([0] + np.cumsum([a for a, _ in lens]).tolist(), device="cuda", dtype=torch.int32)
        cu_k = torch.tensor([0] + np.cumsum([c for _, c in lens]).tolist(), device="cuda", dtype=torch.int32)
    else:
        cu_q = cu_k = None
    nqb, nkb = _cdiv(nq, S), _cdiv(nk, S)
    # Few distinct values (levels=3: heavy ties, zeros included) or nearly distinct ones.
    scores = torch.randint(0, levels, (b, G, nqb, nkb), device="cuda").float() / levels
    kstar = torch.randint(0, nkb + 2, (b, hq), device="cuda", dtype=torch.int32)
    counts, idx = OPS.select_blocks(scores, kstar, cu_q, cu_k, nq, nk, S, sink, local, min_budget, causal)
    r_counts, r_idx = ref.select_blocks(scores, kstar, cu_q, cu_k, nq, nk, S, sink, local, min_budget, causal)
    assert counts.shape == r_counts.shape and idx.shape == r_idx.shape
    assert torch.equal(counts, r_counts)
    assert torch.equal(idx, r_idx)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("levels", [3, 1000, 0])
def test_select_blocks_wide_rows(causal, levels):
    """Rows of up to 1100 candidates (a sort 2048 wide; the shapes above stay under 64 candidates);
    levels 0: scores with NaN, infinities and signed zeros mixed in."""
    S, hq, G = 64, 4, 2
    nq = nk = 1100 * S - 17
    nqb, nkb = _cdiv(nq, S), _cdiv(nk, S)
    gen = torch.Generator(device="cuda").manual_seed(levels)
    if levels:
        scores = torch.randint(0, levels, (1, G, nqb, nkb), device="cuda", generator=gen).float() / levels
    else:
        scores = torch.rand((1, G, nqb, nkb), device="cuda", generator=gen)
        special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0], device="cuda")
        pick = torch.randint(0, 8, scores.shape, device="cuda", generator=gen)
        scores = torch.where(pick < 5, special[pick.clamp_max(4)], scores)
    kstar = torch.randint(0, nkb + 2, (1, hq), device="cuda", dtype=torch.int32, generator=gen)
    got = OPS.select_blocks(scores, kstar, None, None, nq, nk, S, 1, 1, 0, causal)
    want = ref.select_blocks(scores, kstar, None, None, nq, nk, S, 1, 1, 0, causal)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("hq,G", [(32, 1), (40, 2)])
def test_select_blocks_many_heads_per_cta_long_rows(hq, G):
    """More heads per CTA than its 8 warps, so each warp selects for several heads in turn (32 at G=1,
    20 at Hq=40, G=2), on rows of more than 8192 key blocks (the selection's shared memory past 32 KiB,
    set per launch); heavy ties with NaN, infinities and signed zeros mixed in, causal and not."""
    S = 64
    nq, nk = 3 * S + 5, 9000 * S + 11
    nqb, nkb = _cdiv(nq, S), _cdiv(nk, S)
    gen = torch.Generator(device="cuda").manual_seed(hq)
    scores = torch.randint(0, 7, (1, G, nqb, nkb), device="cuda", generator=gen).float() / 7
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0], device="cuda")
    pick = torch.randint(0, 40, scores.shape, device="cuda", generator=gen)
    scores = torch.where(pick < 5, special[pick.clamp_max(4)], scores)
    kstar = torch.randint(0, nkb + 2, (1, hq), device="cuda", dtype=torch.int32, generator=gen)
    for causal in (True, False):
        got = OPS.select_blocks(scores, kstar, None, None, nq, nk, S, 1, 1, 0, causal)
        want = ref.select_blocks(scores, kstar, None, None, nq, nk, S, 1, 1, 0, causal)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("min_budget", [0, 640])
def test_select_blocks_heads_sharing_budgets(min_budget):
    """Heads of a group with equal budgets get equal rows, one written and the others copied from it
    (within chunks of 32 heads): 72 heads in one group (three chunks), budgets drawn from four
    values, so that equal ones fall inside a chunk and across chunks; rows of 1003 key blocks, so
    that half of them start off a 16-byte boundary; heavy ties."""
    S, hq, G = 64, 72, 1
    nq = nk = 1003 * S - 5
    nqb, nkb = _cdiv(nq, S), _cdiv(nk, S)
    gen = torch.Generator(device="cuda").manual_seed(min_budget)
    scores = torch.randint(0, 5, (1, G, nqb, nkb), device="cuda", generator=gen).float() / 5
    values = torch.tensor([0, 3, 40, nkb], device="cuda", dtype=torch.int32)
    kstar = values[torch.randint(0, 4, (1, hq), device="cuda", generator=gen)]
    for causal in (True, False):
        got = OPS.select_blocks(scores, kstar, None, None, nq, nk, S, 1, 2, min_budget, causal)
        want = ref.select_blocks(scores, kstar, None, None, nq, nk, S, 1, 2, min_budget, causal)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_select_blocks_all_equal_scores_and_large_kstar():
    S, nq, nk, hq, G = 128, 4000, 4000, 4, 1
    nqb, nkb = _cdiv(nq, S), _cdiv(nk, S)
    scores = torch.full((1, G, nqb, nkb), 0.25, device="cuda")
    for kval in (0, 1, 5, nkb, 10 * nkb):
        kstar = torch.full((1, hq), kval, device="cuda", dtype=torch.int32)
        got = OPS.select_blocks(scores, kstar, None, None, nq, nk, S, 1, 1, 0, True)
        want = ref.select_blocks(scores, kstar, None, None, nq, nk, S, 1, 1, 0, True)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("S,causal", [(64, True), (128, True), (64, False)])
def test_select_blocks_budget_seqlen_matches_reference(S, causal):
    """A chunk's rows with their budgets scaled by a longer sequence's last query block (the
    context-parallel form): chunks at the start, middle and end of it, kstar past the whole
    sequence's free blocks included, heavy ties."""
    hq, G, n = 8, 2, 40 * S + 64
    gen = torch.Generator(device="cuda").manual_seed(S)
    for s, e in ((0, 7 * S), (7 * S, 20 * S), (20 * S, n)):
        nqb, nkb = _cdiv(e - s, S), _cdiv(e, S)
        scores = torch.randint(0, 4, (2, G, nqb, nkb), device="cuda", generator=gen).float() / 4
        kstar = torch.randint(0, _cdiv(n, S) + 2, (2, hq), device="cuda", dtype=torch.int32, generator=gen)
        got = OPS.select_blocks(scores, kstar, None, None, e - s, e, S, 1, 2, 256, causal, n)
        want = ref.select_blocks(scores, kstar, None, None, e - s, e, S, 1, 2, 256, causal, n)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for bad in (7, 32768 * S + 1):
        with pytest.raises(RuntimeError, match=r"budget_seqlen must be 0, or .* \[" + f"{e}, {32768 * S}\\], got {bad}"):
            OPS.select_blocks(scores, kstar, None, None, e - s, e, S, 1, 2, 256, causal, bad)
    cu_q = torch.tensor([0, e - s], device="cuda", dtype=torch.int32)
    cu_k = torch.tensor([0, e], device="cuda", dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"with cu_seqlens \(varlen\)"):
        OPS.select_blocks(scores[:1], kstar[:1], cu_q, cu_k, e - s, e, S, 1, 2, 256, causal, n)


# ---------------------------------------------------------------- stage 1


def _check_scores(got, want):
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.isfinite(got).all()
    want = want.to(device=got.device, dtype=torch.float64)
    err = (got.double() - want).abs()
    tol = SCORE_RTOL * want.abs() + 1e-12
    bad = err > tol
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} elements off; worst rel {float((err / want.abs().clamp_min(1e-30)).max()):.3g}"
    assert torch.equal(got == 0, want == 0)  # zeros exactly where there is no kept pair


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("G", [1, 2, 4, 8])  # Hq = 8, Hkv = 4: 1, 2 (< Hkv), Hkv, Hq
@pytest.mark.parametrize("stride", [1, 2, 3, 4, 7, 8, 16])
def test_proxy_block_scores_fp64(dtype, d, G, stride):
    q, k, cu_q, cu_k, mq, mk = _inputs(1, 1100, 1100, 8, 4, d, dtype)
    scale = d ** -0.5
    got = OPS.proxy_block_scores(q, k, cu_q, cu_k, mq, mk, 128, G, stride, scale, True)
    want = ref.proxy_block_scores(q.double(), k.double(), cu_q, cu_k, mq, mk, 128, G, stride, scale, True)
    _check_scores(got, want)


@pytest.mark.parametrize("G", [1, 2])
def test_proxy_block_scores_seven_heads_per_group(G):
    """Hq = 14 (a head count that is not a power of two per group): the kernels' IEEE division of the
    head sum rounds to the same fp16 vectors as the reference, on the GPU as on the CPU."""
    q, k, cu_q, cu_k, mq, mk = _inputs(1, 900, 900, 14, 2, 128, torch.bfloat16, qscale=30.0)
    got = OPS.proxy_block_scores(q, k, cu_q, cu_k, mq, mk, 128, G, 4, 128 ** -0.5, True)
    want = ref.proxy_block_scores(q, k, cu_q, cu_k, mq, mk, 128, G, 4, 128 ** -0.5, True)
    _check_scores(got, want.double())
    gpu, cpu = ref.group_pool(q[0], k[0], G, 4), ref.group_pool(q[0].cpu(), k[0].cpu(), G, 4)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(gpu, cpu))  # the rounded vectors, bit for bit


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}{'-varlen' if s[3] else ''}")
@pytest.mark.parametrize("S", [64, 128])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("stride", [1, 4, 5])
def test_proxy_block_scores_shapes(shape, S, causal, stride):
    b, nq, nk, lens = shape
    q, k, cu_q, cu_k, mq, mk = _inputs(b, nq, nk, 8, 2, 128, torch.bfloat16, lens)
    scale = 0.1
    got = OPS.proxy_block_scores(q, k, cu_q, cu_k, mq, mk, S, 2, stride, scale, causal)
    want = ref.proxy_block_scores(q.double(), k.double(), cu_q, cu_k, mq, mk, S, 2, stride, scale, causal)
    _check_scores(got, want)


@pytest.mark.parametrize("stride", [300, 2**31 - 1, 2**40])
def test_proxy_block_scores_huge_stride(stride):
    """A direct op call with a stride past every sequence's span keeps position 0 alone, like the
    reference, without overflowing the kernels' int32 row arithmetic."""
    q, k, cu_q, cu_k, mq, mk = _inputs(3, None, None, 4, 2, 64, torch.float16, [(300, 700), (100, 100), (17, 517)])
    got = OPS.proxy_block_scores(q, k, cu_q, cu_k, mq, mk, 128, 2, stride, 0.125, True)
    want = ref.proxy_block_scores(q.double(), k.double(), cu_q, cu_k, mq, mk, 128, 2, stride, 0.125, True)
    _check_scores(got, want)


def test_proxy_block_scores_refuses_a_nonpositive_scale():
    """The weights are max-relative (exp2((x - max) * c)), a softmax only for c > 0 (at c = 0 every
    weight is 1 and the scores say nothing): a direct op call with a scale of 0 or below gets an error
    naming it, as the other ops and the Python API do (csrc/ops/common.h check_softmax_scale)."""
    q, k, _, _, _, _ = _inputs(1, 300, 300, 4, 2, 64, torch.float16)
    for bad in (-0.1, 0.0):
        with pytest.raises(RuntimeError, match=rf"softmax_scale must be finite and > 0, got {bad:g}"):
            OPS.proxy_block_scores(q, k, None, None, 300, 300, 128, 2, 4, bad, True)
    ok = OPS.proxy_block_scores(q, k, None, None, 300, 300, 128, 2, 4, 0.125, True)
    _check_scores(ok, ref.proxy_block_scores(q.double(), k.double(), None, None, 300, 300, 128, 2, 4, 0.125, True))


@pytest.mark.parametrize("backend", ["auto", "portable"])
def test_huge_softmax_scale_is_the_argmax_limit_gpu(backend, monkeypatch):
    """Scales past the FFMA frames' bound (|max * scale * log2(e)| >= 2^29 on these logits of up to ~300:
    2e6 switches warps to the exact form mid-unit, 1e8 at their first tile) and one whose products with
    q.k overflow fp32 (3.2e37) give the argmax limit in stages 1 and 2, as the reference does
    (tests/test_reference.py checks it there): the scores of a scale of 1e6, already that limit on
    these inputs, and the reference's budgets (5 of 8 blocks at gamma 0.9: the masses are multiples of
    1/64 whose running sums straddle it); not NaN, not rows dropped."""
    from test_bsa_gpu import BACKEND_ENV
    monkeypatch.setenv(BACKEND_ENV, backend)
    g = torch.Generator().manual_seed(5)
    n, S, G, stride = 512, 64, 2, 1
    q = (torch.randn(1, n, 4, 64, generator=g) * 3).to("cuda", torch.float16)
    k = (torch.randn(1, n, 2, 64, generator=g) * 3).to("cuda", torch.float16)
    limit = OPS.proxy_block_scores(q, k, None, None, n, n, S, G, stride, 1e6, True)
    for scale in (2e6, 1e8, 3.2e37):
        sc = OPS.proxy_block_scores(q, k, None, None, n, n, S, G, stride, scale, True)
        assert torch.isfinite(sc).all() and torch.allclose(sc, limit, atol=1e-6), scale
    for scale in (1e6, 2e6, 1e8, 3.2e37):
        got = OPS.head_budgets(q, k, None, None, n, n, S, 0.9, 1, 1, scale, True)
        want = ref.head_budgets(q.double(), k.double(), None, None, n, n, S, 0.9, 1, 1, scale, True)
        assert torch.equal(got.cpu(), want.cpu()), (scale, got, want)


@pytest.mark.parametrize("S,stride", [(128, 1), (128, 4), (128, 16), (64, 2), (64, 8), (128, 3)])
@pytest.mark.parametrize("d,dtype", [(128, torch.bfloat16), (64, torch.bfloat16), (64, torch.float16)])
def test_stage1_hopper_and_portable_kernels(S, stride, d, dtype, monkeypatch):
    """Stage 1 has two kernels: on an sm_90 device the geometries with S/stride a power of two from 8 to 128
    run on wgmma (scores_sm90_kernel), PROXYATTN_BSA_BACKEND=portable and every other case on mma.sync
    (scores_kernel); which one ran is read from the profiler where it records kernels. Both meet the
    fp64 reference's tolerance, and they agree within 1e-5 relative (the same exact 16-bit products,
    summed in another order), varlen with a prefix and a bf16-fallback group included."""
    _both_stage1_kernels(S, stride, d, dtype, [(300, 700), (1000, 1000), (17, 517)], monkeypatch)


def test_stage1_kernels_many_key_tiles(monkeypatch):
    """The same on one sequence of 4173 kept keys (33 key tiles of the Hopper kernel, the last one
    partial) beside sequences whose last tile holds 77, 1 and 127 kept keys (one with fewer queries
    than keys), so that many units of one CTA run 1, 2, 3 and 33 tiles."""
    _both_stage1_kernels(128, 1, 128, torch.bfloat16, [(4173, 4173), (77, 77), (129, 129), (255, 383)], monkeypatch)


def _both_stage1_kernels(S, stride, d, dtype, seqs, monkeypatch):
    from test_bsa_gpu import BACKEND_ENV, is_hopper, kernel_names
    q, k, cu_q, cu_k, mq, mk = _inputs(3, None, None, 8, 4, d, dtype, seqs)
    if dtype == torch.bfloat16:
        k[stride * 40, 3, :4] = 3e5  # a kept key of sequence 0 whose group-3 mean overflows fp16
    scale = d ** -0.5

    def run():
        return OPS.proxy_block_scores(q, k, cu_q, cu_k, mq, mk, S, 4, stride, scale, True)

    want = ref.proxy_block_scores(q.double(), k.double(), cu_q, cu_k, mq, mk, S, 4, stride, scale, True)
    got = {}
    for value in ("portable", "auto"):
        monkeypatch.setenv(BACKEND_ENV, value)
        got[value] = run()
        _check_scores(got[value], want)
        names = kernel_names(run)
        if names is not None:
            hopper = any("scores_sm90_kernel" in n for n in names)
            portable = any("scores_kernel" in n and "scores_sm90_kernel" not in n for n in names)
            per_block = S // stride if S % stride == 0 else 0
            expect = value == "auto" and is_hopper() and per_block in (8, 16, 32, 64, 128)
            assert (hopper, portable) == (expect, not expect), (value, names)
    a, b = got["auto"].double(), got["portable"].double()
    assert torch.equal(a == 0, b == 0)
    assert float(((a - b).abs() / b.abs().clamp_min(1e-30)).max()) <= 1e-5


def test_proxy_block_scores_strided_views():
    qkv = torch.randn(1, 900, 8 + 2 * 2, 128, device="cuda", dtype=torch.bfloat16)
    q, k = qkv[:, :, :8], qkv[:, :, 8:10]
    got = OPS.proxy_block_scores(q, k, None, None, 900, 900, 128, 1, 4, 0.09, True)
    want = ref.proxy_block_scores(q.double(), k.double(), None, None, 900, 900, 128, 1, 4, 0.09, True)
    _check_scores(got, want)


# ---------------------------------------------------------------- stage 2


def _reference_runs(q, k, cu_q, cu_k, S, gamma, sink, local, scale, causal):
    """Per (b, h): the reference's fp32 sequence [base, base + w_0, ...] (for the near-gamma test)."""
    out = {}
    seqs = ref._sequences(q, k, None, cu_q, cu_k)
    for b, _, q_b, k_b, _ in seqs:
        if q_b.shape[0] == 0:
            continue  # an empty sequence: k* 0 on both sides, no sum to be near gamma
        w = ref.last_block_mass(q_b, k_b, S, scale, causal)
        nq_b, nk_b = q_b.shape[0], k_b.shape[0]
        last = rules.forced(_cdiv(nq_b, S) - 1, nq_b, nk_b, S, sink, local, causal)
        forced = np.array([n in last for n in range(w.shape[-1])])
        wn = w.cpu().numpy().astype(np.float32)
        for h in range(wn.shape[0]):
            base = np.float32(0.0)
            for x in wn[h][forced]:
                base = np.float32(base + x)
            rest = -np.sort(-wn[h][~forced], kind="stable")
            out[b, h] = np.add.accumulate(np.concatenate([[base], rest]).astype(np.float32), dtype=np.float32)
    return out


def _near_gamma(runs, gamma):
    g = np.float32(gamma)
    return {bh for bh, run in runs.items() if np.any(np.abs(run - g) < NEAR_GAMMA)}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}{'-varlen' if s[3] else ''}")
@pytest.mark.parametrize("S", [64, 128])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("gamma,sink,local", [(0.9, 1, 1), (0.5, 0, 0), (0.95, 2, 2), (0.99, 1, 1)])
@pytest.mark.parametrize("dtype,d", [(torch.bfloat16, 128), (torch.float16, 64)])
def test_head_budgets_matches_reference(shape, S, causal, gamma, sink, local, dtype, d):
    b, nq, nk, lens = shape
    hq, hkv = 8, 2
    q, k, cu_q, cu_k, mq, mk = _inputs(b, nq, nk, hq, hkv, d, dtype, lens)
    # Heads of different temperature: budgets from a handful of blocks to nearly all.
    temps = torch.linspace(0.5, 6.0, hq, device="cuda", dtype=torch.float32)
    q = (q.float() * temps[:, None]).to(dtype)
    scale = d ** -0.5
    got = OPS.head_budgets(q, k, cu_q, cu_k, mq, mk, S, gamma, sink, local, scale, causal)
    want = ref.head_budgets(q, k, cu_q, cu_k, mq, mk, S, gamma, sink, local, scale, causal)
    assert got.shape == want.shape and got.dtype == torch.int32
    skip = _near_gamma(_reference_runs(q, k, cu_q, cu_k, S, gamma, sink, local, scale, causal), gamma)
    mism = [(bb, h) for bb in range(got.shape[0]) for h in range(hq)
            if int(got[bb, h]) != int(want[bb, h]) and (bb, h) not in skip]
    assert not mism, f"kstar differs at {mism}: got {got.tolist()} want {want.tolist()}"
    assert len(skip) <= max(1, got.numel() // 8), f"too many near-gamma heads: {len(skip)} of {got.numel()}"


@pytest.mark.parametrize("S,causal", [(128, True), (64, True), (128, False)])
@pytest.mark.parametrize("dtype,d", [(torch.bfloat16, 128), (torch.float16, 64)])
def test_stage2_hopper_and_portable_probes(S, causal, dtype, d, monkeypatch):
    """Stage 2's probe has two kernels: on an sm_90 device it runs on wgmma (probe_sm90_kernel),
    with PROXYATTN_BSA_BACKEND=portable or elsewhere on mma.sync (probe_kernel); which one ran is read
    from the profiler where it records kernels. Both meet the reference (except heads whose
    cumulative mass lands within NEAR_GAMMA of gamma), varlen sequences of fewer than S queries and
    keys past one split (2048) included."""
    from test_bsa_gpu import BACKEND_ENV, is_hopper, kernel_names
    hq, hkv, gamma, sink, local = 8, 2, 0.9, 1, 1
    q, k, cu_q, cu_k, mq, mk = _inputs(3, None, None, hq, hkv, d, dtype, [(100, 2100), (1000, 5000), (17, 517)])
    temps = torch.linspace(0.5, 6.0, hq, device="cuda", dtype=torch.float32)
    q = (q.float() * temps[:, None]).to(dtype)
    scale = d ** -0.5

    def run():
        return OPS.head_budgets(q, k, cu_q, cu_k, mq, mk, S, gamma, sink, local, scale, causal)

    want = ref.head_budgets(q, k, cu_q, cu_k, mq, mk, S, gamma, sink, local, scale, causal)
    skip = _near_gamma(_reference_runs(q, k, cu_q, cu_k, S, gamma, sink, local, scale, causal), gamma)
    assert len(skip) <= max(1, want.numel() // 8), f"too many near-gamma heads: {len(skip)} of {want.numel()}"
    for value in ("portable", "auto"):
        monkeypatch.setenv(BACKEND_ENV, value)
        got = run()
        mism = [(b, h) for b in range(got.shape[0]) for h in range(hq)
                if int(got[b, h]) != int(want[b, h]) and (b, h) not in skip]
        assert not mism, f"{value}: kstar differs at {mism}: got {got.tolist()} want {want.tolist()}"
        names = kernel_names(run)
        if names is not None:
            hopper = any("probe_sm90_kernel" in n for n in names)
            portable = any("probe_kernel" in n and "probe_sm90_kernel" not in n for n in names)
            expect = value == "auto" and is_hopper()
            assert (hopper, portable) == (expect, not expect), (value, names)


def test_head_budgets_on_broadcast_keys():
    """k expanded along batch and heads (strides 0, which no tensor map takes: bsa_launch.h
    tma_stride_ok): stage 2 runs the portable probe on it and meets the reference, as on a
    contiguous copy of the same keys."""
    from test_bsa_gpu import kernel_names
    hq, hkv, n, d, S, gamma, sink, local = 8, 2, 1500, 128, 128, 0.9, 1, 1
    q = torch.randn(2, n, hq, d, device="cuda", dtype=torch.bfloat16)
    q = (q.float() * torch.linspace(0.5, 6.0, hq, device="cuda")[:, None]).to(torch.bfloat16)
    k = torch.randn(1, n, 1, d, device="cuda", dtype=torch.bfloat16).expand(2, n, hkv, d)
    assert k.stride(0) == 0 and k.stride(2) == 0
    scale = d ** -0.5
    want = ref.head_budgets(q, k, None, None, n, n, S, gamma, sink, local, scale, True)
    skip = _near_gamma(_reference_runs(q, k, None, None, S, gamma, sink, local, scale, True), gamma)
    assert len(skip) <= max(1, want.numel() // 8), f"too many near-gamma heads: {len(skip)} of {want.numel()}"
    for keys in (k, k.contiguous()):
        def run():
            return OPS.head_budgets(q, keys, None, None, n, n, S, gamma, sink, local, scale, True)

        got = run()
        mism = [(b, h) for b in range(2) for h in range(hq) if int(got[b, h]) != int(want[b, h]) and (b, h) not in skip]
        assert not mism, f"strides {keys.stride()}: kstar differs at {mism}: got {got.tolist()} want {want.tolist()}"
        names = kernel_names(run)
        if names is not None and keys is k:
            assert not any("probe_sm90_kernel" in name for name in names), names


# ---------------------------------------------------------------- stages 1-3 end to end


def _check_selection_near_ties(idx, r_idx, r_scores, hq, G, tol):
    """Rows where idx != r_idx must swap only blocks whose reference scores tie within tol."""
    diff = (idx != r_idx).any(dim=-1)
    rows = diff.nonzero().tolist()
    for b, h, m in rows:
        a = set(idx[b, h, m][idx[b, h, m] >= 0].tolist())
        r = set(r_idx[b, h, m][r_idx[b, h, m] >= 0].tolist())
        assert len(a) == len(r), (b, h, m)
        sc = r_scores[b, h // (hq // G), m]
        ours = sc[sorted(a - r)]
        theirs = sc[sorted(r - a)]
        assert float(ours.min()) >= float(theirs.max()) * (1 - tol) - 1e-12, (b, h, m, ours, theirs)
    return len(rows) / max(1, diff.numel())


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}{'-varlen' if s[3] else ''}")
@pytest.mark.parametrize("G", [1, 2])
def test_stages_end_to_end(shape, G):
    b, nq, nk, lens = shape
    hq, hkv, d, S, s = 8, 2, 128, 128, 4
    gamma, sink, local, min_budget = 0.9, 1, 1, 256
    q, k, cu_q, cu_k, mq, mk = _inputs(b, nq, nk, hq, hkv, d, torch.bfloat16, lens, qscale=2.0)
    scale = d ** -0.5
    sc = OPS.proxy_block_scores(q, k, cu_q, cu_k, mq, mk, S, G, s, scale, True)
    ks = OPS.head_budgets(q, k, cu_q, cu_k, mq, mk, S, gamma, sink, local, scale, True)
    counts, idx = OPS.select_blocks(sc, ks, cu_q, cu_k, mq, mk, S, sink, local, min_budget, True)
    r_sc = ref.proxy_block_scores(q, k, cu_q, cu_k, mq, mk, S, G, s, scale, True)
    r_ks = ref.head_budgets(q, k, cu_q, cu_k, mq, mk, S, gamma, sink, local, scale, True)
    r_counts, r_idx = ref.select_blocks(r_sc, r_ks, cu_q, cu_k, mq, mk, S, sink, local, min_budget, True)
    skip = _near_gamma(_reference_runs(q, k, cu_q, cu_k, S, gamma, sink, local, scale, True), gamma)
    keep = torch.ones_like(ks, dtype=torch.bool)
    for bb, h in skip:
        keep[bb, h] = False
    assert torch.equal(ks[keep], r_ks[keep])
    assert torch.equal(counts[keep], r_counts[keep])
    idx, r_idx = idx.clone(), r_idx.clone()
    idx[~keep] = -1
    r_idx[~keep] = -1
    frac = _check_selection_near_ties(idx, r_idx, r_sc, hq, G, E2E_TIE_RTOL)
    assert frac < 0.01, frac


def test_stages_end_to_end_structured_default_config():
    """Structured 16k-token inputs at the default config (G = Hq/2): the kernels' selections equal the
    reference's except between blocks whose reference scores tie within E2E_TIE_RTOL (both round the
    pooled vectors to fp16 the same way; what is left is the fp32 summation order)."""
    import chunked

    n, hq, hkv, d = 16384, 8, 2, 128
    q, k, _, _ = chunked.synthetic.make_structured_inputs(1, n, hq, hkv, d, seed=2, dtype=torch.bfloat16,
                                                        device="cuda")
    cfg = proxyattn.ProxyAttnConfig()
    G, S, scale = cfg.proxy_heads(hq, hkv), cfg.block_size, d ** -0.5
    args = (None, None, n, n)
    sc = OPS.proxy_block_scores(q, k, *args, S, G, cfg.stride, scale, True)
    r_sc = ref.proxy_block_scores(q, k, *args, S, G, cfg.stride, scale, True)
    _check_scores(sc, r_sc.double())
    ks = ref.head_budgets(q, k, *args, S, cfg.gamma, cfg.sink_blocks, cfg.local_blocks, scale, True)
    sel = (cfg.sink_blocks, cfg.local_blocks, cfg.min_budget, True)
    counts, idx = OPS.select_blocks(sc, ks, *args, S, *sel)
    r_counts, r_idx = ref.select_blocks(r_sc, ks, *args, S, *sel)
    assert torch.equal(counts, r_counts)
    frac = _check_selection_near_ties(idx, r_idx, r_sc, hq, G, E2E_TIE_RTOL)
    assert frac < 0.01, frac


@pytest.mark.parametrize("where", ["kept", "dropped"])
def test_proxy_block_scores_bf16_fallback(where):
    """A bf16 key whose pooled value overflows fp16 in a kept row (t % stride == 0) makes its group
    round to bf16, in the kernel as in the reference; the same value in a row the stride drops changes
    nothing. Other groups keep fp16 either way."""
    nq = nk = 700
    hq, hkv, d, G, s = 8, 4, 128, 4, 4
    q, k, _, _, _, _ = _inputs(1, nq, nk, hq, hkv, d, torch.bfloat16)
    row = 300 if where == "kept" else 301
    k[0, row, 1, :8] = 3e5  # group 1 (KV head 1) only
    got = OPS.proxy_block_scores(q, k, None, None, nq, nk, 128, G, s, d ** -0.5, True)
    want = ref.proxy_block_scores(q.double(), k.double(), None, None, nq, nk, 128, G, s, d ** -0.5, True)
    _check_scores(got, want)
    # The means of two bf16 query heads have 9 significant bits: fp16 keeps them, bf16 does not.
    qbar, _ = ref.group_pool(q[0], k[0], G, s)
    def is_bf16(x):
        return torch.equal(x, x.bfloat16().float())
    assert is_bf16(qbar[:, 1]) == (where == "kept")
    assert not is_bf16(qbar[:, 0])  # group 0 stays fp16


@pytest.mark.parametrize("where", ["first-query", "second-query", "key"])
def test_proxy_block_scores_bf16_fallback_shared_keys(where, monkeypatch):
    """With G > Hkv the two groups inside a KV head share its keys, which the kernels pool once: a
    group whose query mean overflows fp16 rounds to bf16 while the other group of the head keeps
    fp16, whichever of the two overflows; a key that overflows makes both bf16. Both stage 1 kernels
    (portable and auto) against the reference."""
    from test_bsa_gpu import BACKEND_ENV
    nq = nk = 700
    hq, hkv, d, G, s = 8, 2, 128, 4, 4  # groups 0, 1 in KV head 0 (query heads 0-1 and 2-3)
    q, k, _, _, _, _ = _inputs(1, nq, nk, hq, hkv, d, torch.bfloat16)
    row = 300  # a kept row (t % s == 0) for queries and keys alike (nq == nk)
    if where == "key":
        k[0, row, 0, :8] = 3e5
    else:
        q[0, row, 0 if where == "first-query" else 2, :8] = 3e5
    want = ref.proxy_block_scores(q.double(), k.double(), None, None, nq, nk, 128, G, s, d ** -0.5, True)
    for value in ("portable", "auto"):
        monkeypatch.setenv(BACKEND_ENV, value)
        _check_scores(OPS.proxy_block_scores(q, k, None, None, nq, nk, 128, G, s, d ** -0.5, True), want)
    qbar, _ = ref.group_pool(q[0], k[0], G, s)
    def is_bf16(x):
        return torch.equal(x, x.bfloat16().float())
    bf16 = [is_bf16(qbar[:, g]) for g in range(G)]
    assert bf16 == {"first-query": [True, False, False, False], "second-query": [False, True, False, False],
                    "key": [True, True, False, False]}[where]


# ---------------------------------------------------------------- scale and graphs


def _check_selection_sane(counts, idx, nq, nk, S, sink, local, causal):
    nqb = _cdiv(nq, S)
    c = torch.tensor([rules.candidates(m, nq, nk, S, causal) for m in range(nqb)], device=counts.device)
    f = torch.tensor([len(rules.forced(m, nq, nk, S, sink, local, causal)) for m in range(nqb)], device=counts.device)
    assert (counts >= f).all() and (counts <= c).all()
    pos = torch.arange(idx.shape[-1], device=idx.device)
    valid = pos < counts[..., None]
    assert (idx[~valid] == -1).all()
    assert ((idx >= 0) == valid).all()
    assert (idx < c[None, None, :, None]).all()
    v = torch.where(valid, idx.long(), torch.iinfo(torch.int32).max)
    assert (v[..., 1:] > v[..., :-1])[valid[..., 1:]].all()  # strictly ascending
    # Forced blocks present: sink block 0 and the diagonal block c_m - 1.
    if sink > 0:
        assert (idx[..., 0] == 0).all()
    if local > 0:
        last = idx.gather(-1, (counts.long() - 1).clamp_min(0)[..., None])[..., 0]
        assert (last == (c - 1)[None, None, :]).all()


def _scores_row_fp64(q, k, m, S, G, s, scale, g=0):
    """Reference A[0, g, m, :] for a fixed-length causal input, in fp64, for one query block, on the
    pooled vectors rounded to fp16 as stage 1 rounds them (reference.group_pool; these inputs never
    need the bf16 fallback, which the assert checks)."""
    nq, hq, d = q.shape[1:]
    nk, hkv = k.shape[1:3]
    qb = q[0, m * S: min(nq, (m + 1) * S)].double()
    off = nk - nq
    rows = torch.arange(m * S, m * S + qb.shape[0], device=q.device)
    keep = (off + rows) % s == 0
    t_max = off + int(rows[keep][-1])
    kept = torch.arange(0, t_max + 1, s, device=q.device)
    qbar = ref._head_mean(q[0, m * S: min(nq, (m + 1) * S)][keep], G)[:, g].half()
    if G <= hkv:
        kbar = ref._head_mean(k[0, kept], G)[:, g].half()
    else:
        kbar = k[0, kept, g // (G // hkv)].float().half()
    assert torch.isfinite(qbar).all() and torch.isfinite(kbar).all()
    qbar, kbar = qbar.double(), kbar.double()
    logits = (qbar @ kbar.T) * scale
    logits.masked_fill_(kept[None, :] > (off + rows[keep])[:, None], float("-inf"))
    p = torch.softmax(logits, -1).amax(0)
    nkb = _cdiv(nk, S)
    out = torch.zeros(nkb, dtype=torch.float64, device=q.device)
    out.scatter_reduce_(0, kept // S, p, reduce="amax")
    return out


def test_scale_one_million_tokens():
    n, hq, hkv, d, S, s, G = 1 << 20, 8, 2, 128, 128, 4, 1
    gamma, sink, local, min_budget = 0.95, 1, 1, 2048
    q = torch.randn(1, n, hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, n, hkv, d, device="cuda", dtype=torch.bfloat16)
    scale = d ** -0.5
    sc = OPS.proxy_block_scores(q, k, None, None, n, n, S, G, s, scale, True)
    ks = OPS.head_budgets(q, k, None, None, n, n, S, gamma, sink, local, scale, True)
    counts, idx = OPS.select_blocks(sc, ks, None, None, n, n, S, sink, local, min_budget, True)
    torch.cuda.synchronize()
    nqb = n // S
    assert torch.isfinite(sc).all() and (sc >= 0).all() and (sc <= 1).all()
    assert ((ks >= 0) & (ks <= nqb)).all()
    _check_selection_sane(counts, idx, n, n, S, sink, local, True)
    for m in (0, 1, 777, nqb // 2, nqb - 1):
        want = _scores_row_fp64(q, k, m, S, G, s, scale)
        got = sc[0, 0, m].double()
        assert ((got - want).abs() <= SCORE_RTOL * want.abs() + 1e-12).all(), m


def test_cuda_graph_capture():
    nq = nk = 3000
    hq, hkv, d, S = 8, 2, 128, 128
    args = dict(G=2, s=4, gamma=0.9, sink=1, local=1, min_budget=512)
    q = torch.randn(1, nq, hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, nk, hkv, d, device="cuda", dtype=torch.bfloat16)
    scale = d ** -0.5

    def run(q, k):
        sc = OPS.proxy_block_scores(q, k, None, None, nq, nk, S, args["G"], args["s"], scale, True)
        ks = OPS.head_budgets(q, k, None, None, nq, nk, S, args["gamma"], args["sink"], args["local"], scale, True)
        counts, idx = OPS.select_blocks(sc, ks, None, None, nq, nk, S, args["sink"], args["local"],
                                        args["min_budget"], True)
        return sc, ks, counts, idx

    run(q, k)  # warm-up (allocator, function attributes)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = run(q, k)
    for _ in range(2):
        q.copy_(torch.randn_like(q))
        k.copy_(torch.randn_like(k))
        g.replay()
        torch.cuda.synchronize()
        want = run(q, k)
        for a, b in zip(outs, want):
            assert torch.equal(a, b)
