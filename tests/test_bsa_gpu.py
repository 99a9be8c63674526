"""GPU tests of torch.ops.proxyattn.block_sparse_attention (docs/design.md section 2, stage 4).

The tests of this file run the portable kernel (PROXYATTN_BSA_BACKEND=portable, set per test; it
runs on every GPU, block sizes 64 and 128); tests/test_bsa_sm90_gpu.py runs the same grid on the
Hopper kernel. The backend override itself is tested here too (test_backend_*).

The kernel is compared with an fp64 ground truth built from the expanded token mask (chunked over
query rows, never a full N x N tensor), and with ``proxyattn.reference.block_sparse_attention``.
Tolerance: the kernel's max-abs error vs the truth is at most 2x the error of the same math done
in PyTorch at the input precision (fp32 scores, P rounded to the input dtype, P @ V in the input
dtype, then / rowsum) plus a small absolute slack. lse (fp32, natural log) within 2e-3 of the
truth, -inf exactly where a row sees no key (those rows must output exactly 0).

Run on a GPU machine: python3 -m pytest -q -m gpu tests/test_bsa_gpu.py
"""
import itertools
import math
import re

import pytest
import torch

import proxyattn  # noqa: F401  (loads the extension and registers the ops)
from proxyattn import reference as ref

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DTYPES = [torch.bfloat16, torch.float16]
BACKEND_ENV = "PROXYATTN_BSA_BACKEND"
SLACK = {torch.bfloat16: 1e-3, torch.float16: 2e-4}
LSE_ATOL = 2e-3


# ----------------------------------------------------------------------------------------------
# Selections
# ----------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def portable_backend(monkeypatch):
    """Every test of this file runs the portable kernel unless it sets the backend itself."""
    monkeypatch.setenv(BACKEND_ENV, "portable")


def is_hopper():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def num_candidates(m, nq, nk, s, causal):
    """c_m: key blocks [0, c_m) hold a key some row of query block m may see (conventions.md)."""
    nkb = (nk + s - 1) // s
    if not causal:
        return nkb
    return (nk - nq + min((m + 1) * s, nq) - 1) // s + 1


def random_selection(b, hq, nq, nk, s, causal, density, gen, garbage_tail=False):
    """Sorted random subsets of each row's candidates, block 0 and the diagonal block always kept,
    per-row random density around `density`; -1 padding (or valid-looking garbage) past counts."""
    nqb, nkb = (nq + s - 1) // s, (nk + s - 1) // s
    dev = "cuda"
    c = torch.tensor([max(0, num_candidates(m, nq, nk, s, causal)) for m in range(nqb)], device=dev)
    n = torch.arange(nkb, device=dev)
    cand = n.view(1, 1, 1, nkb) < c.view(1, 1, nqb, 1)
    row_density = (density * (0.5 + torch.rand(b, hq, nqb, 1, generator=gen, device=dev))).clamp(max=1.0)
    if density >= 1.0:
        row_density.fill_(1.0)
    keep = torch.rand(b, hq, nqb, nkb, generator=gen, device=dev) < row_density
    forced = (n.view(1, 1, 1, nkb) == 0) | (n.view(1, 1, 1, nkb) == (c - 1).view(1, 1, nqb, 1))
    keep = (keep | forced) & cand
    counts = keep.sum(-1).to(torch.int32)
    key = torch.where(keep, n.view(1, 1, 1, nkb), n.view(1, 1, 1, nkb) + nkb)
    idx = key.sort(-1).values
    pos = torch.arange(nkb, device=dev).view(1, 1, 1, nkb)
    pad = torch.randint(0, nkb, idx.shape, generator=gen, device=dev) if garbage_tail else torch.full_like(idx, -1)
    indices = torch.where(pos < counts.unsqueeze(-1), idx, pad).to(torch.int32)
    return counts.contiguous(), indices.contiguous()


def block_mask(counts, indices, nkb):
    """bool [B, H, nqb, nkb]: the valid selected blocks (ordinal < count, 0 <= index < nkb)."""
    k = indices.shape[-1]
    pos = torch.arange(k, device=indices.device)
    valid = (pos < counts.unsqueeze(-1).long()) & (indices >= 0) & (indices < nkb)
    sel = torch.zeros(*indices.shape[:3], nkb + 1, dtype=torch.bool, device=indices.device)
    sel.scatter_(-1, torch.where(valid, indices.long(), nkb), True)
    return sel[..., :nkb]


# ----------------------------------------------------------------------------------------------
# Ground truth (fp64) and the same math at the input precision, fixed length, chunked over rows
# ----------------------------------------------------------------------------------------------
def masked_attention(q, k, v, counts, indices, s, scale, causal, mode):
    """q [B, Nq, Hq, D], k/v [B, Nk, Hkv, D]. mode 'truth': fp64. mode 'lowp': fp32 scores and
    softmax, P rounded to q.dtype, P @ V in q.dtype, divided by the fp32 row sum.
    Returns out fp32/fp64 [B, Nq, Hq, D], lse [B, Hq, Nq], seen bool [B, Hq, Nq]."""
    b, nq, hq, d = q.shape
    nk, hkv = k.shape[1], k.shape[2]
    nkb = (nk + s - 1) // s
    sel = block_mask(counts, indices, nkb)  # [B, H, nqb, nkb]
    rep = hq // hkv
    cdt = torch.float64 if mode == "truth" else torch.float32
    qh = q.transpose(1, 2).to(cdt)  # [B, H, Nq, D]
    kh = k.transpose(1, 2).repeat_interleave(rep, 1)
    vh = v.transpose(1, 2).repeat_interleave(rep, 1)
    kc = kh.to(cdt)
    out = torch.zeros(b, hq, nq, d, dtype=cdt, device=q.device)
    lse = torch.full((b, hq, nq), -math.inf, dtype=cdt, device=q.device)
    seen = torch.zeros(b, hq, nq, dtype=torch.bool, device=q.device)
    chunk = max(s, (2**26 // max(1, b * hq * max(nk, 1))) // s * s)
    keys = torch.arange(nk, device=q.device)
    for r0 in range(0, nq, chunk):
        r1 = min(nq, r0 + chunk)
        rows = torch.arange(r0, r1, device=q.device)
        m = sel[:, :, rows // s][..., keys // s] if nk > 0 else torch.zeros(b, hq, r1 - r0, 0, dtype=torch.bool,
                                                                               device=q.device)
        if causal:
            m = m & (keys.view(1, -1) <= (nk - nq + rows).view(-1, 1))
        sc = (qh[:, :, r0:r1] @ kc.transpose(-1, -2)) * scale
        sc = sc.masked_fill(~m, -math.inf)
        mx = sc.amax(-1, keepdim=True)
        anyk = m.any(-1)
        mx = torch.where(anyk.unsqueeze(-1), mx, torch.zeros_like(mx))
        p = torch.exp(sc - mx)
        l = p.sum(-1, keepdim=True)
        if mode == "truth":
            o = (p @ vh.to(cdt)) / l.clamp(min=1e-300)
        else:
            o = (p.to(q.dtype) @ vh).to(cdt) / l.clamp(min=1e-30)
        o = torch.where(anyk.unsqueeze(-1), o, torch.zeros_like(o))
        out[:, :, r0:r1] = o
        lse[:, :, r0:r1] = torch.where(anyk, (mx.squeeze(-1) + torch.log(l.squeeze(-1))), lse[:, :, r0:r1])
        seen[:, :, r0:r1] = anyk
    if mode == "lowp":
        out = out.to(q.dtype).to(cdt)
    return out.transpose(1, 2), lse, seen


def check_against_truth(out, lse, q, k, v, counts, indices, s, scale, causal, what=""):
    truth, lse_t, seen = masked_attention(q, k, v, counts, indices, s, scale, causal, "truth")
    base, _, _ = masked_attention(q, k, v, counts, indices, s, scale, causal, "lowp")
    o = out.to(torch.float64)
    assert torch.isfinite(o).all(), f"{what}: non-finite output"
    err_k = (o - truth).abs().max().item() if o.numel() else 0.0
    err_b = (base - truth).abs().max().item() if o.numel() else 0.0
    rel_k = ((o - truth).norm() / truth.norm().clamp(min=1e-30)).item() if o.numel() else 0.0
    rel_b = ((base - truth).norm() / truth.norm().clamp(min=1e-30)).item() if o.numel() else 0.0
    slack = SLACK[q.dtype]
    assert err_k <= 2 * err_b + slack, f"{what}: max-abs err {err_k:.3e} > 2 x torch {err_b:.3e} + {slack}"
    assert rel_k <= 2 * rel_b + slack, f"{what}: rel err {rel_k:.3e} > 2 x torch {rel_b:.3e} + {slack}"
    # rows that see no key: exactly 0 and lse -inf
    unseen = ~seen.transpose(1, 2)  # [B, Nq, H]
    assert (out[unseen] == 0).all(), f"{what}: rows without keys must be 0"
    assert torch.equal(torch.isinf(lse) & (lse < 0), ~seen), f"{what}: lse -inf pattern differs"
    assert not torch.isnan(lse).any() and not (torch.isinf(lse) & (lse > 0)).any(), f"{what}: bad lse"
    if seen.any():
        lerr = (lse.double()[seen] - lse_t[seen]).abs().max().item()
        assert lerr <= LSE_ATOL, f"{what}: lse err {lerr:.3e}"
    return err_b


def rand_qkv(b, nq, nk, hq, hkv, d, dtype, gen):
    q = torch.randn(b, nq, hq, d, generator=gen, device="cuda").to(dtype)
    k = torch.randn(b, nk, hkv, d, generator=gen, device="cuda").to(dtype)
    v = torch.randn(b, nk, hkv, d, generator=gen, device="cuda").to(dtype)
    return q, k, v


def pack_varlen(qs, ks, vs, lens_q, lens_k):
    """Per-sequence q, k, v [N, H, D] packed for a varlen call: (q, k, v, cu_seqlens_q, cu_seqlens_k)."""
    def cu(lens):
        return torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32, device="cuda")
    return torch.cat(qs), torch.cat(ks), torch.cat(vs), cu(lens_q), cu(lens_k)


def run_op(q, k, v, counts, indices, cu_q, cu_k, max_q, max_k, s, scale, causal):
    return torch.ops.proxyattn.block_sparse_attention(q, k, v, counts, indices, cu_q, cu_k, max_q, max_k, s, scale,
                                                      causal)


# (B, Nq, Nk, Hq, Hkv, D, S, causal, density)
CASES = [
    (2, 1, 1, 4, 4, 64, 128, True, 1.0),
    (1, 127, 127, 8, 2, 128, 128, True, 0.5),
    (2, 128, 128, 4, 1, 64, 64, True, 0.3),
    (1, 129, 129, 8, 1, 128, 128, False, 0.5),
    (1, 129, 129, 8, 8, 64, 64, True, 1.0),
    (2, 1000, 1000, 8, 2, 128, 128, True, 0.3),
    (1, 1000, 1000, 4, 4, 64, 64, False, 0.2),
    (1, 1000, 300, 4, 2, 64, 128, False, 0.5),
    (1, 4096, 4096, 8, 1, 128, 128, True, 0.1),
    (1, 4096, 4096, 8, 8, 64, 64, True, 0.05),
    (1, 4096, 4096, 4, 1, 128, 128, False, 1.0),
    (1, 4096, 4096, 8, 2, 128, 64, True, 1.0),
    # prefill chunks: Nq < Nk
    (1, 300, 1000, 8, 2, 128, 128, True, 0.5),
    (2, 129, 4096, 4, 4, 64, 64, True, 0.3),
    (1, 1, 1000, 8, 8, 128, 128, True, 1.0),
    (1, 128, 129, 8, 1, 64, 128, True, 0.7),
    (1, 1000, 4096, 8, 1, 128, 128, True, 0.2),
    (1, 16384, 16384, 8, 1, 128, 128, True, 0.1),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_q{}_k{}_h{}-{}_d{}_s{}_{}_{}".format(
    *c[:7], "causal" if c[7] else "full", c[8]))
def test_fixed_length(case, dtype):
    b, nq, nk, hq, hkv, d, s, causal, density = case
    gen = torch.Generator(device="cuda").manual_seed(hash(case) % (2**31))
    q, k, v = rand_qkv(b, nq, nk, hq, hkv, d, dtype, gen)
    counts, indices = random_selection(b, hq, nq, nk, s, causal, density, gen)
    scale = d ** -0.5
    out, lse = run_op(q, k, v, counts, indices, None, None, nq, nk, s, scale, causal)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert lse.shape == (b, hq, nq) and lse.dtype == torch.float32
    err_b = check_against_truth(out, lse, q, k, v, counts, indices, s, scale, causal, str(case))
    if nq * nk <= 4096 * 4096:
        out_r, lse_r = ref.block_sparse_attention(q, k, v, counts, indices, None, None, nq, nk, s, scale, causal)
        d_ref = (out.double() - out_r.double()).abs().max().item()
        assert d_ref <= 3 * err_b + SLACK[dtype], f"kernel vs reference: {d_ref:.3e} (torch err {err_b:.3e})"
        both = torch.isfinite(lse_r)
        assert torch.equal(both, torch.isfinite(lse)), "lse -inf pattern differs from the reference"
        if both.any():
            assert (lse[both] - lse_r[both]).abs().max().item() <= LSE_ATOL


@pytest.mark.parametrize("backend", ["portable", "auto"])
def test_subnormal_scale_is_the_uniform_limit(backend, monkeypatch):
    """A scale below FLT_MIN (a subnormal float32, or a double under it) gives what the reference
    gives: every logit within a rounding of 0, so each row is the mean of the values it may see.
    The kernels' fast math would flush such an exp2 factor to 0 and a masked -inf times 0 is NaN;
    the op raises the scale to FLT_MIN, as stage 2 does (csrc/ops/bsa_op.cpp)."""
    monkeypatch.setenv(BACKEND_ENV, backend)
    b, n, hq, hkv, d, s = 1, 700, 4, 2, 128, 128
    gen = torch.Generator(device="cuda").manual_seed(11)
    q, k, v = rand_qkv(b, n, n, hq, hkv, d, torch.bfloat16, gen)
    counts, indices = random_selection(b, hq, n, n, s, True, 0.5, gen)
    for scale in (1e-40, 1e-300):
        out, lse = run_op(q, k, v, counts, indices, None, None, n, n, s, scale, True)
        assert torch.isfinite(out).all() and torch.isfinite(lse).all(), scale
        out_r, lse_r = ref.block_sparse_attention(q, k, v, counts, indices, None, None, n, n, s, scale, True)
        assert (out.double() - out_r.double()).abs().max().item() <= 1e-2, scale
        assert (lse - lse_r).abs().max().item() <= LSE_ATOL, scale


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_garbage_past_counts_and_strides(dtype):
    """Entries past counts are ignored; q/k/v as strided views of packed tensors."""
    b, n, hq, hkv, d, s = 2, 700, 8, 2, 128, 128
    gen = torch.Generator(device="cuda").manual_seed(7)
    qkv = torch.randn(b, n, hq + 2 * hkv, d, generator=gen, device="cuda").to(dtype)
    q, k, v = qkv[:, :, :hq], qkv[:, :, hq:hq + hkv], qkv[:, :, hq + hkv:]
    counts, indices = random_selection(b, hq, n, n, s, True, 0.4, gen, garbage_tail=True)
    out, lse = run_op(q, k, v, counts, indices, None, None, n, n, s, d ** -0.5, True)
    check_against_truth(out, lse, q, k, v, counts, indices, s, d ** -0.5, True, "strided")


@pytest.mark.parametrize("s", [64, 128])
def test_rows_without_keys(s):
    """Hand-made selections: count 0, only causally invisible blocks, out-of-range and -1 entries."""
    dtype, b, nq, nk, hq, hkv, d = torch.bfloat16, 1, 100, 150, 6, 3, 64
    gen = torch.Generator(device="cuda").manual_seed(11)
    q, k, v = rand_qkv(b, nq, nk, hq, hkv, d, dtype, gen)
    nqb, nkb = (nq + s - 1) // s, (nk + s - 1) // s
    counts = torch.zeros(b, hq, nqb, dtype=torch.int32, device="cuda")
    indices = torch.full((b, hq, nqb, nkb + 2), -1, dtype=torch.int32, device="cuda")
    last = nkb - 1
    # head 0: only the last key block -> the early rows of the first query block see nothing
    counts[0, 0] = 1
    indices[0, 0, :, 0] = last
    # head 1: count 0 everywhere -> all rows empty
    # head 2: everything
    counts[0, 2] = nkb
    indices[0, 2, :, :nkb] = torch.arange(nkb, dtype=torch.int32, device="cuda")
    # head 3: -1 and an out-of-range index inside counts (skipped), then the last block
    counts[0, 3] = 3
    indices[0, 3, :, 0] = -1
    indices[0, 3, :, 1] = last
    indices[0, 3, :, 2] = nkb + 5
    # head 4: a block past the causal limit of every row of query block 0 (if any), else block 0
    counts[0, 4] = 1
    indices[0, 4, :, 0] = last
    # head 5: count larger than the row (clamped)
    counts[0, 5] = 10**6
    indices[0, 5, :, 0] = 0
    out, lse = run_op(q, k, v, counts, indices, None, None, nq, nk, s, d ** -0.5, True)
    check_against_truth(out, lse, q, k, v, counts, indices, s, d ** -0.5, True, f"empty rows s={s}")
    assert torch.isinf(lse[0, 1]).all() and (out[0, :, 1] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("d,s,causal", [(128, 128, True), (64, 64, True), (128, 64, False)])
def test_varlen(dtype, d, s, causal):
    """A packed batch of 3 sequences equals running each sequence alone."""
    lens_q, lens_k = [1000, 1, 300], [1000, 129, 700]
    hq, hkv = 8, 2
    gen = torch.Generator(device="cuda").manual_seed(3 + d + s)
    max_q, max_k = max(lens_q), max(lens_k)
    nqb, nkb = (max_q + s - 1) // s, (max_k + s - 1) // s
    qs, ks, vs, cs, ids = [], [], [], [], []
    counts = torch.zeros(3, hq, nqb, dtype=torch.int32, device="cuda")
    indices = torch.full((3, hq, nqb, nkb), -1, dtype=torch.int32, device="cuda")
    for i, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        q, k, v = rand_qkv(1, lq, lk, hq, hkv, d, dtype, gen)
        c, ix = random_selection(1, hq, lq, lk, s, causal, 0.4, gen)
        counts[i, :, :c.shape[2]] = c[0]
        indices[i, :, :ix.shape[2], :ix.shape[3]] = ix[0]
        qs.append(q[0]), ks.append(k[0]), vs.append(v[0]), cs.append(c), ids.append(ix)
    qp, kp, vp, cu_q, cu_k = pack_varlen(qs, ks, vs, lens_q, lens_k)
    scale = d ** -0.5
    out, lse = run_op(qp, kp, vp, counts, indices, cu_q, cu_k, max_q, max_k, s, scale, causal)
    assert out.shape == qp.shape and lse.shape == (hq, sum(lens_q))
    errs = []
    for i in range(3):
        a, e = int(cu_q[i]), int(cu_q[i + 1])
        errs.append(check_against_truth(out[a:e].unsqueeze(0), lse[:, a:e].unsqueeze(0), qs[i].unsqueeze(0),
                                        ks[i].unsqueeze(0), vs[i].unsqueeze(0), cs[i], ids[i], s, scale, causal,
                                        f"varlen seq {i}"))
    out_r, lse_r = ref.block_sparse_attention(qp, kp, vp, counts, indices, cu_q, cu_k, max_q, max_k, s, scale, causal)
    d_ref = (out.double() - out_r.double()).abs().max().item()
    assert d_ref <= 3 * max(errs) + SLACK[dtype], f"varlen kernel vs reference: {d_ref:.3e}"


def test_cuda_graph_replay():
    """Capture the op on static inputs, replay with new data copied in, compare with eager."""
    dtype, b, n, hq, hkv, d, s = torch.bfloat16, 1, 1000, 8, 2, 128, 128
    gen = torch.Generator(device="cuda").manual_seed(5)
    q, k, v = rand_qkv(b, n, n, hq, hkv, d, dtype, gen)
    counts, indices = random_selection(b, hq, n, n, s, True, 0.5, gen)
    scale = d ** -0.5
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run_op(q, k, v, counts, indices, None, None, n, n, s, scale, True)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_g, lse_g = run_op(q, k, v, counts, indices, None, None, n, n, s, scale, True)
    for seed in (1, 2):
        g2 = torch.Generator(device="cuda").manual_seed(100 + seed)
        q2, k2, v2 = rand_qkv(b, n, n, hq, hkv, d, dtype, g2)
        c2, i2 = random_selection(b, hq, n, n, s, True, 0.3, g2)
        q.copy_(q2), k.copy_(k2), v.copy_(v2), counts.copy_(c2), indices.copy_(i2)
        graph.replay()
        torch.cuda.synchronize()
        out_e, lse_e = run_op(q2, k2, v2, c2, i2, None, None, n, n, s, scale, True)
        assert torch.equal(out_g, out_e) and torch.equal(lse_g, lse_e)
        check_against_truth(out_g, lse_g, q2, k2, v2, c2, i2, s, scale, True, "graph replay")


def test_rejects_bad_inputs():
    q = torch.randn(1, 128, 4, 96, device="cuda", dtype=torch.bfloat16)
    counts = torch.ones(1, 4, 1, dtype=torch.int32, device="cuda")
    indices = torch.zeros(1, 4, 1, 1, dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="head dim"):
        run_op(q, q, q, counts, indices, None, None, 128, 128, 128, 0.1, True)
    q = torch.randn(1, 128, 4, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="block_size"):
        run_op(q, q, q, counts, indices, None, None, 128, 128, 32, 0.1, True)
    with pytest.raises(RuntimeError, match="counts must be int32"):
        run_op(q, q, q, counts.long(), indices, None, None, 128, 128, 128, 0.1, True)
    k = torch.randn(1, 64, 4, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="Nq <= Nk"):
        run_op(q, k, k, counts, indices, None, None, 128, 64, 128, 0.1, True)


def test_work_order_with_a_smaller_last_section():
    """Nk = 16384 at D = 128 puts 3 KV heads in a section of the work order (24 MiB of K/V,
    kernels/common/bsa_launch.h bsa_kv_section), so 4 KV heads make sections of 3 and 1: every
    (batch, head, query block) is still computed exactly once (poisoned outputs, against the truth)."""
    b, nq, nk, hq, hkv, d, s = 2, 300, 16384, 8, 4, 128, 128
    gen = torch.Generator(device="cuda").manual_seed(23)
    q, k, v = rand_qkv(b, nq, nk, hq, hkv, d, torch.bfloat16, gen)
    counts, indices = random_selection(b, hq, nq, nk, s, True, 0.1, gen)
    out, lse = run_op(q, k, v, counts, indices, None, None, nq, nk, s, d ** -0.5, True)
    check_against_truth(out, lse, q, k, v, counts, indices, s, d ** -0.5, True, "sections of 3 and 1 KV heads")


# ----------------------------------------------------------------------------------------------
# The backend override (PROXYATTN_BSA_BACKEND, read by the op glue csrc/ops/bsa_op.cpp per call)
# ----------------------------------------------------------------------------------------------
def kernel_names(fn):
    """Names of the CUDA kernels fn launches, from the torch profiler. Where the profiler records
    no kernels: None off Hopper (then the callers check outputs only); on an sm_90 device, where the
    callers' dispatch checks matter most, a failure saying so."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        names = [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]
    except Exception as e:  # no CUPTI: nothing to read
        names, why = [], f"{type(e).__name__}: {e}"
    else:
        why = "no CUDA events"
    assert names or not is_hopper(), f"the profiler recorded no kernels on this sm_90 device ({why})"
    return names or None


def backend_case(s=128):
    b, n, hq, hkv, d = 1, 1000, 8, 2, 128
    gen = torch.Generator(device="cuda").manual_seed(31 + s)
    q, k, v = rand_qkv(b, n, n, hq, hkv, d, torch.bfloat16, gen)
    counts, indices = random_selection(b, hq, n, n, s, True, 0.4, gen)
    return q, k, v, counts, indices, n, s, d ** -0.5


def test_backend_override_selects_the_kernel(monkeypatch):
    """Unset, empty and auto run one kernel (bitwise the same output): the Hopper kernel on an sm_90
    device, else the portable one; portable and hopper run the kernel they name (checked by kernel
    name where the profiler records kernels), each within the tolerance of the truth; hopper on a
    device that is not sm_90 is refused, naming why."""
    q, k, v, counts, indices, n, s, scale = backend_case()
    results, names = {}, {}
    for value in (None, "", "auto", "portable", "hopper"):
        if value is None:
            monkeypatch.delenv(BACKEND_ENV, raising=False)
        else:
            monkeypatch.setenv(BACKEND_ENV, value)
        if value == "hopper" and not is_hopper():
            with pytest.raises(RuntimeError, match="PROXYATTN_BSA_BACKEND=hopper, but .*compute capability 9.0"):
                run_op(q, k, v, counts, indices, None, None, n, n, s, scale, True)
            continue
        results[value] = run_op(q, k, v, counts, indices, None, None, n, n, s, scale, True)
        names[value] = kernel_names(lambda: run_op(q, k, v, counts, indices, None, None, n, n, s, scale, True))
    for value in ("", "auto"):
        assert torch.equal(results[value][0], results[None][0]) and torch.equal(results[value][1], results[None][1])
    default = "hopper" if is_hopper() else "portable"
    assert torch.equal(results[default][0], results[None][0]) and torch.equal(results[default][1], results[None][1])
    for value, (out, lse) in results.items():
        check_against_truth(out, lse, q, k, v, counts, indices, s, scale, True, f"{BACKEND_ENV}={value}")
    expect = {None: default, "": default, "auto": default, "portable": "portable", "hopper": "hopper"}
    pattern = {"portable": "bsa_fwd_sm80_kernel", "hopper": "bsa_fwd_sm90_persistent_kernel"}
    for value, got in names.items():
        if got is not None:
            want = pattern[expect[value]]
            assert any(want in name for name in got), f"{BACKEND_ENV}={value}: expected {want}, ran {got}"
            other = pattern["hopper" if expect[value] == "portable" else "portable"]
            assert not any(other in name for name in got), f"{BACKEND_ENV}={value}: ran {got}"


@pytest.mark.parametrize("value", ["junk", "HOPPER", "sm90", " auto", "portable ", "1"])
def test_backend_invalid_value_is_refused_before_any_kernel(monkeypatch, value):
    """Any other value raises an error naming it and the accepted ones, before the op allocates
    (so before any kernel, its output fills included, runs) and before it looks at the inputs."""
    monkeypatch.setenv(BACKEND_ENV, value)
    lens = [300, 129]
    cu = torch.tensor([0, 300, 429], dtype=torch.int32, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(5)
    q, k, v = rand_qkv(1, 429, 429, 4, 2, 64, torch.bfloat16, gen)
    counts, indices = random_selection(2, 4, 300, 300, 128, True, 0.5, gen)
    message = re.escape(f"PROXYATTN_BSA_BACKEND must be one of auto, portable, hopper (unset or empty: auto), "
                        f"got '{value}'")
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_stats().get("allocation.all.allocated", 0)
    with pytest.raises(RuntimeError, match=message):  # varlen: the op would allocate out with zeros
        run_op(q[0], k[0], v[0], counts, indices, cu, cu, max(lens), max(lens), 128, 0.125, True)
    assert torch.cuda.memory_stats().get("allocation.all.allocated", 0) == allocated, "the op allocated"
    bad_head_dim = torch.randn(1, 128, 4, 96, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=message):  # checked before the inputs
        run_op(bad_head_dim, bad_head_dim, bad_head_dim, counts[:1, :, :1], indices[:1, :, :1], None, None, 128, 128,
               128, 0.1, True)


def test_backend_hopper_refusal_is_clear(monkeypatch):
    """hopper where the Hopper kernel cannot run (block_size 64 on an sm_90 device; any shape on
    another device): an error naming the variable and the reason, nothing allocated."""
    monkeypatch.setenv(BACKEND_ENV, "hopper")
    q, k, v, counts, indices, n, s, scale = backend_case(s=64)
    why = "block_size 128, got 64" if is_hopper() else "compute capability 9.0"
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_stats().get("allocation.all.allocated", 0)
    with pytest.raises(RuntimeError, match=f"PROXYATTN_BSA_BACKEND=hopper, but the Hopper kernel cannot run .*{why}"):
        run_op(q, k, v, counts, indices, None, None, n, n, s, scale, True)
    assert torch.cuda.memory_stats().get("allocation.all.allocated", 0) == allocated, "the op allocated"
    monkeypatch.setenv(BACKEND_ENV, "auto")  # auto takes the portable kernel there
    out, lse = run_op(q, k, v, counts, indices, None, None, n, n, s, scale, True)
    check_against_truth(out, lse, q, k, v, counts, indices, s, scale, True, "auto at block_size 64")
