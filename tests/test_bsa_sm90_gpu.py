"""GPU tests of the Hopper (sm_90a) kernel of torch.ops.proxyattn.block_sparse_attention.

Runs the grid of tests/test_bsa_gpu.py (block size 128: the Hopper kernel's only size) with
PROXYATTN_BSA_BACKEND=hopper, so the op raises instead of taking the portable kernel, and compares
the Hopper output with the portable one (PROXYATTN_BSA_BACKEND=portable) on the same inputs. The
op reads the variable on every call (csrc/ops/bsa_op.cpp). Same tolerances as tests/test_bsa_gpu.py.
Skipped unless the current device has compute capability 9.0.

Run on a Hopper GPU machine: python3 -m pytest -q -m gpu tests/test_bsa_sm90_gpu.py
"""

import pytest
import torch

import proxyattn  # noqa: F401  (loads the extension and registers the ops)
import test_bsa_gpu as base

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() != (9, 0),
                       reason="the Hopper kernel needs a compute capability 9.0 device"),
]

CASES_128 = [c for c in base.CASES if c[6] == 128] + [
    (1, 2000, 2000, 16, 2, 64, 128, True, 0.5),
    (3, 257, 513, 4, 1, 128, 128, True, 0.6),
    (1, 640, 640, 2, 2, 128, 128, False, 1.0),
]
CASE_IDS = lambda c: "B{}_q{}_k{}_h{}-{}_d{}_s{}_{}_{}".format(*c[:7], "causal" if c[7] else "full", c[8])  # noqa: E731


@pytest.fixture(autouse=True)
def hopper_backend(monkeypatch):
    """The Hopper kernel (or an error) unless a test sets the backend itself."""
    monkeypatch.setenv(base.BACKEND_ENV, "hopper")


@pytest.mark.parametrize("dtype", base.DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES_128, ids=CASE_IDS)
def test_fixed_length_sm90(case, dtype):
    base.test_fixed_length(case, dtype)


@pytest.mark.parametrize("dtype", base.DTYPES, ids=["bf16", "fp16"])
def test_garbage_past_counts_and_strides_sm90(dtype):
    base.test_garbage_past_counts_and_strides(dtype)


def test_rows_without_keys_sm90():
    base.test_rows_without_keys(128)


def test_cuda_graph_replay_sm90():
    base.test_cuda_graph_replay()


def test_work_order_with_a_smaller_last_section_sm90():
    base.test_work_order_with_a_smaller_last_section()


@pytest.mark.parametrize("dtype", base.DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("d,causal", [(128, True), (64, True), (128, False), (64, False)])
def test_varlen_sm90(dtype, d, causal):
    """A packed batch of 4 sequences (one empty) equals running each sequence alone."""
    s, hq, hkv = 128, 8, 2
    lens_q, lens_k = [1000, 1, 0, 300], [1000, 129, 5, 700]
    gen = torch.Generator(device="cuda").manual_seed(17 + d + causal)
    max_q, max_k = max(lens_q), max(lens_k)
    nqb, nkb = (max_q + s - 1) // s, (max_k + s - 1) // s
    nseq = len(lens_q)
    qs, ks, vs, cs, ids = [], [], [], [], []
    counts = torch.zeros(nseq, hq, nqb, dtype=torch.int32, device="cuda")
    indices = torch.full((nseq, hq, nqb, nkb), -1, dtype=torch.int32, device="cuda")
    for i, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        q, k, v = base.rand_qkv(1, lq, lk, hq, hkv, d, dtype, gen)
        c, ix = base.random_selection(1, hq, lq, lk, s, causal, 0.4, gen)
        counts[i, :, :c.shape[2]] = c[0]
        indices[i, :, :ix.shape[2], :ix.shape[3]] = ix[0]
        qs.append(q[0]), ks.append(k[0]), vs.append(v[0]), cs.append(c), ids.append(ix)
    qp, kp, vp, cu_q, cu_k = base.pack_varlen(qs, ks, vs, lens_q, lens_k)
    scale = d ** -0.5
    out, lse = base.run_op(qp, kp, vp, counts, indices, cu_q, cu_k, max_q, max_k, s, scale, causal)
    assert out.shape == qp.shape and lse.shape == (hq, sum(lens_q))
    errs = []
    for i in range(nseq):
        a, e = int(cu_q[i]), int(cu_q[i + 1])
        if e == a:
            continue
        errs.append(base.check_against_truth(out[a:e].unsqueeze(0), lse[:, a:e].unsqueeze(0), qs[i].unsqueeze(0),
                                             ks[i].unsqueeze(0), vs[i].unsqueeze(0), cs[i], ids[i], s, scale, causal,
                                             f"sm90 varlen seq {i}"))
    out_r, _ = base.ref.block_sparse_attention(qp, kp, vp, counts, indices, cu_q, cu_k, max_q, max_k, s, scale,
                                               causal)
    d_ref = (out.double() - out_r.double()).abs().max().item()
    assert d_ref <= 3 * max(errs) + base.SLACK[dtype], f"sm90 varlen kernel vs reference: {d_ref:.3e}"


@pytest.mark.parametrize("dtype", base.DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [(2, 1000, 1000, 8, 2, 128, 128, True, 0.3), (1, 4096, 4096, 8, 1, 64, 128, True, 0.2),
                                  (1, 300, 1000, 8, 2, 128, 128, True, 0.5), (1, 129, 129, 8, 1, 128, 128, False, 0.5)],
                         ids=CASE_IDS)
def test_sm90_matches_sm80(monkeypatch, case, dtype):
    """Same inputs through both kernels: outputs within the lowp error budget, lse -inf patterns equal."""
    b, nq, nk, hq, hkv, d, s, causal, density = case
    gen = torch.Generator(device="cuda").manual_seed(hash(case) % (2**31) + 1)
    q, k, v = base.rand_qkv(b, nq, nk, hq, hkv, d, dtype, gen)
    counts, indices = base.random_selection(b, hq, nq, nk, s, causal, density, gen)
    scale = d ** -0.5
    out90, lse90 = base.run_op(q, k, v, counts, indices, None, None, nq, nk, s, scale, causal)
    monkeypatch.setenv(base.BACKEND_ENV, "portable")
    out80, lse80 = base.run_op(q, k, v, counts, indices, None, None, nq, nk, s, scale, causal)
    truth, _, _ = base.masked_attention(q, k, v, counts, indices, s, scale, causal, "truth")
    lowp, _, _ = base.masked_attention(q, k, v, counts, indices, s, scale, causal, "lowp")
    err_b = (lowp - truth).abs().max().item()
    diff = (out90.double() - out80.double()).abs().max().item()
    assert diff <= 2 * err_b + base.SLACK[dtype], f"sm90 vs sm80: {diff:.3e} (torch err {err_b:.3e})"
    fin = torch.isfinite(lse80)
    assert torch.equal(fin, torch.isfinite(lse90)), "lse -inf pattern differs between the kernels"
    if fin.any():
        assert (lse90[fin] - lse80[fin]).abs().max().item() <= base.LSE_ATOL


def test_hopper_refuses_block_64():
    q = torch.randn(1, 128, 4, 64, device="cuda", dtype=torch.bfloat16)
    counts = torch.ones(1, 4, 2, dtype=torch.int32, device="cuda")
    indices = torch.zeros(1, 4, 2, 2, dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="PROXYATTN_BSA_BACKEND=hopper, but .*block_size 128, got 64"):
        base.run_op(q, q, q, counts, indices, None, None, 128, 128, 64, 0.1, True)


def test_auto_falls_back_on_block_64(monkeypatch):
    """auto silently takes the portable kernel where the Hopper kernel cannot run."""
    monkeypatch.setenv(base.BACKEND_ENV, "auto")
    base.test_rows_without_keys(64)


@pytest.mark.parametrize("dtype", base.DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("step", [0.05, 0.3, 0.75, 2.0, 8.0])
def test_rising_scores_across_key_blocks_sm90(dtype, step):
    """Scores that rise from key block to key block in the order the kernel walks them (from the
    diagonal down), by about 0.5, 3, 7.5, 18 and 74 log2 units per block (against noise of about
    1.4), so the running max moves often, by small and by huge steps, and O is rescaled by factors
    from near 1 down to 2^-74 (only on the blocks where a row of the warp moved its max); against
    the fp64 truth."""
    b, n, hq, hkv, d, s = 1, 1024 + 37, 4, 1, 64, 128
    gen = torch.Generator(device="cuda").manual_seed(int(step * 100) + 7)
    q = torch.randn(b, n, hq, d, generator=gen, device="cuda").abs().to(dtype)
    k = torch.randn(b, n, hkv, d, generator=gen, device="cuda")
    v = torch.randn(b, n, hkv, d, generator=gen, device="cuda").to(dtype)
    nkb = (n + s - 1) // s
    blk = torch.arange(n, device="cuda") // s
    k = (k + step * (nkb - 1 - blk).view(1, n, 1, 1).float()).to(dtype)  # lower blocks score higher
    counts, indices = base.random_selection(b, hq, n, n, s, True, 1.0, gen)
    scale = d ** -0.5
    out, lse = base.run_op(q, k, v, counts, indices, None, None, n, n, s, scale, True)
    base.check_against_truth(out, lse, q, k, v, counts, indices, s, scale, True, f"rising scores, step {step}")


SCHEDULE_CASES = [
    # (B, Nq, Nk, Hq, Hkv, D, causal, density, rows without a block): work items far more than SMs,
    # rows of very different lengths, rows with no selected block (written by the scheduler warp)
    (2, 4096, 4096, 16, 4, 128, True, 0.15, 0.0),
    (1, 8192, 8192, 8, 2, 64, True, 0.1, 0.3),
    (3, 700, 1500, 8, 8, 128, False, 0.5, 0.5),
    (1, 2000, 2000, 32, 8, 128, True, 0.05, 0.0),
]


@pytest.mark.parametrize("dtype", base.DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", SCHEDULE_CASES, ids=lambda c: "B{}_q{}_k{}_h{}-{}_d{}_{}_{}_{}".format(*c))
def test_work_item_result_does_not_depend_on_the_schedule(case, dtype):
    """The persistent kernel runs many work items per CTA, in whatever order CTAs reach the counter,
    and pipelines each item's first tile with the previous item's last. A work item's result must
    not depend on which CTA ran it or what ran before it: each query head computed in a call of its
    own (a few items, at most one per CTA, in another work order) and each batch item alone give
    bitwise the rows of the full call."""
    b, nq, nk, hq, hkv, d, causal, density, empty = case
    gen = torch.Generator(device="cuda").manual_seed(hash(case) % (2**31) + 7)
    q, k, v = base.rand_qkv(b, nq, nk, hq, hkv, d, dtype, gen)
    counts, indices = base.random_selection(b, hq, nq, nk, 128, causal, density, gen)
    if empty > 0:
        drop = torch.rand(counts.shape, generator=gen, device="cuda") < empty
        counts = torch.where(drop, torch.zeros_like(counts), counts)
        assert (counts == 0).any(), "the case was meant to hold rows without a selected block"
    assert b * hq * ((nq + 127) // 128) > 132, "more work items than an H100/H200 has SMs"
    scale = d ** -0.5
    out, lse = base.run_op(q, k, v, counts, indices, None, None, nq, nk, 128, scale, causal)
    assert not torch.isnan(out).any(), "unwritten (poisoned) outputs"
    group = hq // hkv
    for h in range(hq):
        kh, vh = k[:, :, h // group:h // group + 1], v[:, :, h // group:h // group + 1]
        out_h, lse_h = base.run_op(q[:, :, h:h + 1], kh, vh, counts[:, h:h + 1], indices[:, h:h + 1], None, None,
                                   nq, nk, 128, scale, causal)
        assert torch.equal(out_h[:, :, 0], out[:, :, h]), f"head {h} alone: outputs differ"
        assert torch.equal(lse_h[:, 0], lse[:, h]), f"head {h} alone: lse differs"
    for i in range(b):
        out_b, lse_b = base.run_op(q[i:i + 1], k[i:i + 1], v[i:i + 1], counts[i:i + 1], indices[i:i + 1], None,
                                   None, nq, nk, 128, scale, causal)
        assert torch.equal(out_b[0], out[i]) and torch.equal(lse_b[0], lse[i]), f"batch item {i} alone differs"
    base.check_against_truth(out, lse, q, k, v, counts, indices, 128, scale, causal, "full call")
