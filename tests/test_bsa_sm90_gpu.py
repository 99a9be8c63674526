"""GPU tests of the Hopper (sm_90a) path of torch.ops.proxyattn.block_sparse_attention.

Runs the grid of tests/test_bsa_gpu.py (block size 128: the sm90 path's only size) with
PROXYATTN_BSA_SM90=require, so the op raises instead of falling back to the sm80 path, and
compares the sm90 output with the sm80 output (PROXYATTN_BSA_FORCE_SM80=1) on the same inputs.
Every sm90 kernel variant runs (the persistent kernel, the default: PROXYATTN_BSA_SM90_PERSISTENT=1;
one CTA per work item: =0, overlapped with a 2- or 3-stage K/V ring: PROXYATTN_BSA_SM90_STAGES,
serial: PROXYATTN_BSA_SM90_OVERLAP=0, overlapped with pingpong: PROXYATTN_BSA_SM90_PINGPONG=1; each
order also sorted by selected-block count: PROXYATTN_BSA_SORT=1). The environment is
read by the op on every call (csrc/kernels/bsa_launch.h). Same tolerances as
tests/test_bsa_gpu.py. Skipped unless the current device has compute capability 9.0.

Run on a Hopper GPU machine: python3 -m pytest -q -m gpu tests/test_bsa_sm90_gpu.py
"""
import itertools

import pytest
import torch

import proxyattn  # noqa: F401  (loads the extension and registers the ops)
import test_bsa_gpu as base

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() != (9, 0),
                       reason="the sm90 path needs a compute capability 9.0 device"),
]

CASES_128 = [c for c in base.CASES if c[6] == 128] + [
    (1, 2000, 2000, 16, 2, 64, 128, True, 0.5),
    (3, 257, 513, 4, 1, 128, 128, True, 0.6),
    (1, 640, 640, 2, 2, 128, 128, False, 1.0),
]
CASE_IDS = lambda c: "B{}_q{}_k{}_h{}-{}_d{}_s{}_{}_{}".format(*c[:7], "causal" if c[7] else "full", c[8])  # noqa: E731


# PROXYATTN_BSA_SM90_OVERLAP, _PINGPONG, _STAGES, PROXYATTN_BSA_SORT and PROXYATTN_BSA_SM90_PERSISTENT
# of each variant ("sorted": one CTA per work item, in the opt-in order of csrc/kernels/bsa_order.cu;
# "persistent": the default, one CTA per SM taking work items from a counter)
VARIANT_ENV = {"serial": ("0", "0", "2", "0", "0"), "overlap": ("1", "0", "2", "0", "0"),
               "overlap3": ("1", "0", "3", "0", "0"), "pingpong": ("1", "1", "2", "0", "0"),
               "sorted": ("1", "0", "2", "1", "0"), "persistent": ("1", "0", "2", "0", "1"),
               "persistent_sorted": ("1", "0", "2", "1", "1")}


def set_variant(monkeypatch, variant):
    names = ("SM90_OVERLAP", "SM90_PINGPONG", "SM90_STAGES", "SORT", "SM90_PERSISTENT")
    for name, value in zip(names, VARIANT_ENV[variant]):
        monkeypatch.setenv(f"PROXYATTN_BSA_{name}", value)


@pytest.fixture(params=sorted(VARIANT_ENV))
def sm90(request, monkeypatch):
    """The sm90 path (or an error), in each kernel variant (csrc/kernels/bsa_launch.h)."""
    monkeypatch.delenv("PROXYATTN_BSA_FORCE_SM80", raising=False)
    monkeypatch.setenv("PROXYATTN_BSA_SM90", "require")
    set_variant(monkeypatch, request.param)


@pytest.mark.parametrize("dtype", base.DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES_128, ids=CASE_IDS)
def test_fixed_length_sm90(sm90, case, dtype):
    base.test_fixed_length(case, dtype)


@pytest.mark.parametrize("dtype", base.DTYPES, ids=["bf16", "fp16"])
def test_garbage_past_counts_and_strides_sm90(sm90, dtype):
    base.test_garbage_past_counts_and_strides(dtype)


def test_rows_without_keys_sm90(sm90):
    base.test_rows_without_keys(128)


def test_cuda_graph_replay_sm90(sm90):
    base.test_cuda_graph_replay()


@pytest.mark.parametrize("dtype", base.DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("d,causal", [(128, True), (64, True), (128, False), (64, False)])
def test_varlen_sm90(sm90, dtype, d, causal):
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
    cu_q = torch.tensor([0] + list(itertools.accumulate(lens_q)), dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0] + list(itertools.accumulate(lens_k)), dtype=torch.int32, device="cuda")
    qp, kp, vp = torch.cat(qs), torch.cat(ks), torch.cat(vs)
    scale = d ** -0.5
    base.poison_allocator()
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
@pytest.mark.parametrize("variant", sorted(VARIANT_ENV))
def test_sm90_matches_sm80(monkeypatch, case, dtype, variant):
    """Same inputs through both paths: outputs within the lowp error budget, lse -inf patterns equal."""
    set_variant(monkeypatch, variant)
    monkeypatch.delenv("PROXYATTN_BSA_FORCE_SM80", raising=False)
    b, nq, nk, hq, hkv, d, s, causal, density = case
    gen = torch.Generator(device="cuda").manual_seed(hash(case) % (2**31) + 1)
    q, k, v = base.rand_qkv(b, nq, nk, hq, hkv, d, dtype, gen)
    counts, indices = base.random_selection(b, hq, nq, nk, s, causal, density, gen)
    scale = d ** -0.5
    monkeypatch.setenv("PROXYATTN_BSA_SM90", "require")
    out90, lse90 = base.run_op(q, k, v, counts, indices, None, None, nq, nk, s, scale, causal)
    monkeypatch.setenv("PROXYATTN_BSA_FORCE_SM80", "1")
    out80, lse80 = base.run_op(q, k, v, counts, indices, None, None, nq, nk, s, scale, causal)
    truth, _, _ = base.masked_attention(q, k, v, counts, indices, s, scale, causal, "truth")
    lowp, _, _ = base.masked_attention(q, k, v, counts, indices, s, scale, causal, "lowp")
    err_b = (lowp - truth).abs().max().item()
    diff = (out90.double() - out80.double()).abs().max().item()
    assert diff <= 2 * err_b + base.SLACK[dtype], f"sm90 vs sm80: {diff:.3e} (torch err {err_b:.3e})"
    fin = torch.isfinite(lse80)
    assert torch.equal(fin, torch.isfinite(lse90)), "lse -inf pattern differs between the paths"
    if fin.any():
        assert (lse90[fin] - lse80[fin]).abs().max().item() <= base.LSE_ATOL


def test_require_refuses_block_64(sm90):
    q = torch.randn(1, 128, 4, 64, device="cuda", dtype=torch.bfloat16)
    counts = torch.ones(1, 4, 2, dtype=torch.int32, device="cuda")
    indices = torch.zeros(1, 4, 2, 2, dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="block_size 128"):
        base.run_op(q, q, q, counts, indices, None, None, 128, 128, 64, 0.1, True)


def test_opt_in_falls_back_on_block_64(monkeypatch):
    monkeypatch.delenv("PROXYATTN_BSA_FORCE_SM80", raising=False)
    """PROXYATTN_BSA_SM90=1 silently uses the sm80 path where the sm90 path cannot run."""
    monkeypatch.setenv("PROXYATTN_BSA_SM90", "1")
    base.test_rows_without_keys(64)


@pytest.mark.parametrize("order", ["heads", "kv:1", "kv:3", "auto"])
def test_work_orders_sm90(sm90, monkeypatch, order):
    if order == "auto":
        monkeypatch.delenv("PROXYATTN_BSA_ORDER", raising=False)
    else:
        monkeypatch.setenv("PROXYATTN_BSA_ORDER", order)
    for case in [(2, 1000, 1000, 12, 4, 128, 128, True, 0.3), (3, 700, 900, 8, 4, 64, 128, True, 0.5),
                 (2, 500, 500, 6, 3, 128, 128, False, 0.4)]:
        base.test_fixed_length(case, torch.bfloat16)


@pytest.mark.parametrize("dtype", base.DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("step", [0.05, 0.3, 0.75, 2.0, 8.0])
@pytest.mark.parametrize("lazy", ["0", "8"])
def test_rising_scores_across_key_blocks_sm90(sm90, monkeypatch, dtype, step, lazy):
    """Scores that rise from key block to key block in the order the kernel walks them (from the
    diagonal down), by about 0.5, 3, 7.5, 18 and 74 log2 units per block (against noise of about
    1.4), so the running max moves often, by small and by huge steps, and O is rescaled by factors
    from near 1 down to 2^-74; against the fp64 truth, in every sm90 variant. The kernels move a
    row's reference max only when the running max exceeds it by more than t log2 units
    (PROXYATTN_BSA_SM90_LAZY=t): at t = 0 on every rise; at t = 8 and 0.5 per block it never moves
    after the first block, at 3 and 7.5 every few blocks, with exponentials up to about 2^8 in
    between, at 18 and 74 on every block."""
    monkeypatch.setenv("PROXYATTN_BSA_SM90_LAZY", lazy)
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
    base.poison_allocator()
    out, lse = base.run_op(q, k, v, counts, indices, None, None, n, n, s, scale, True)
    base.check_against_truth(out, lse, q, k, v, counts, indices, s, scale, True, f"rising scores, step {step}")


@pytest.mark.parametrize("dtype", base.DTYPES, ids=["bf16", "fp16"])
def test_lazy_rescaling_settings_sm90(sm90, monkeypatch, dtype):
    """PROXYATTN_BSA_SM90_LAZY: unset, empty and 0 give the same out and lse bit for bit; -1 (O
    rescaled on every key block) the same out, and lse within rounding of the max; 8 (lazy) an output
    that differs from those (P rounded against another reference) but is within the tolerance
    against the fp64 truth; any other value is refused before a kernel runs, naming it."""
    b, n, hq, hkv, d, s = 1, 2000, 8, 2, 128, 128
    gen = torch.Generator(device="cuda").manual_seed(11)
    q, k, v = base.rand_qkv(b, n, n, hq, hkv, d, dtype, gen)
    q = q * 2  # sharper rows: the running max rises less often, so lazy rescaling keeps stale references
    counts, indices = base.random_selection(b, hq, n, n, s, True, 0.6, gen)
    scale = d ** -0.5
    results = {}
    for bad in ("junk", "9", "-0.5", "nan", "8x"):
        monkeypatch.setenv("PROXYATTN_BSA_SM90_LAZY", bad)
        with pytest.raises(RuntimeError, match=f"PROXYATTN_BSA_SM90_LAZY must be a number .*got '{bad}'"):
            base.run_op(q, k, v, counts, indices, None, None, n, n, s, scale, True)
    monkeypatch.setenv("PROXYATTN_BSA_FORCE_SM80", "1")  # refused on the portable path too
    monkeypatch.setenv("PROXYATTN_BSA_SM90", "0")
    with pytest.raises(RuntimeError, match="PROXYATTN_BSA_SM90_LAZY must be a number .*got '8x'"):
        base.run_op(q, k, v, counts, indices, None, None, n, n, s, scale, True)
    monkeypatch.delenv("PROXYATTN_BSA_FORCE_SM80")
    monkeypatch.setenv("PROXYATTN_BSA_SM90", "require")
    for value in (None, "", "0", "-1", "8"):
        if value is None:
            monkeypatch.delenv("PROXYATTN_BSA_SM90_LAZY", raising=False)
        else:
            monkeypatch.setenv("PROXYATTN_BSA_SM90_LAZY", value)
        base.poison_allocator()
        results[value] = base.run_op(q, k, v, counts, indices, None, None, n, n, s, scale, True)
    out0, lse0 = results[None]
    assert not torch.isnan(out0).any(), "unwritten (poisoned) outputs"
    for value in ("", "0"):
        assert torch.equal(results[value][0], out0), f"LAZY={value}: out differs from the default"
        assert torch.equal(results[value][1], lse0), f"LAZY={value}: lse differs from the default"
    out_all, lse_all = results["-1"]
    assert torch.equal(out_all, out0), "LAZY=-1: out differs from the default"
    fin = torch.isfinite(lse0)
    assert torch.equal(fin, torch.isfinite(lse_all))
    assert (lse_all[fin] - lse0[fin]).abs().max().item() <= 1e-5
    out8, lse8 = results["8"]
    assert not torch.equal(out8, out0), "LAZY=8 gave the default's output: the setting had no effect"
    base.check_against_truth(out8, lse8, q, k, v, counts, indices, s, scale, True, "LAZY=8")


PERSISTENT_CASES = [
    # (B, Nq, Nk, Hq, Hkv, D, causal, density, rows without a block): work items far more than SMs,
    # rows of very different lengths, rows with no selected block (written by the scheduler warp)
    (2, 4096, 4096, 16, 4, 128, True, 0.15, 0.0),
    (1, 8192, 8192, 8, 2, 64, True, 0.1, 0.3),
    (3, 700, 1500, 8, 8, 128, False, 0.5, 0.5),
    (1, 2000, 2000, 32, 8, 128, True, 0.05, 0.0),
]


@pytest.mark.parametrize("dtype", base.DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", PERSISTENT_CASES, ids=lambda c: "B{}_q{}_k{}_h{}-{}_d{}_{}_{}_{}".format(*c))
@pytest.mark.parametrize("sort", ["0", "1"])
def test_persistent_is_bitwise_one_cta_per_item(monkeypatch, case, dtype, sort):
    """The persistent kernel walks each row's blocks in the order of the kernel with one CTA per work
    item, with the same arithmetic, so its outputs and lse equal that kernel's bit for bit; only
    which CTA runs a work item, and in what sequence, differs."""
    b, nq, nk, hq, hkv, d, causal, density, empty = case
    gen = torch.Generator(device="cuda").manual_seed(hash(case) % (2**31) + 7)
    q, k, v = base.rand_qkv(b, nq, nk, hq, hkv, d, dtype, gen)
    counts, indices = base.random_selection(b, hq, nq, nk, 128, causal, density, gen)
    if empty > 0:
        drop = torch.rand(counts.shape, generator=gen, device="cuda") < empty
        counts = torch.where(drop, torch.zeros_like(counts), counts)
    assert b * hq * ((nq + 127) // 128) > 132, "more work items than an H100/H200 has SMs"
    scale = d ** -0.5
    monkeypatch.delenv("PROXYATTN_BSA_FORCE_SM80", raising=False)
    monkeypatch.setenv("PROXYATTN_BSA_SM90", "require")
    results = {}
    for persistent in ("0", "1"):
        set_variant(monkeypatch, "persistent" if persistent == "1" else "overlap")
        monkeypatch.setenv("PROXYATTN_BSA_SORT", sort)  # after set_variant, which sets its own
        base.poison_allocator()
        results[persistent] = base.run_op(q, k, v, counts, indices, None, None, nq, nk, 128, scale, causal)
    (out0, lse0), (out1, lse1) = results["0"], results["1"]
    assert not torch.isnan(out1).any(), "unwritten (poisoned) outputs"
    assert torch.equal(out1, out0), f"outputs differ: {(out1.double() - out0.double()).abs().max().item():.3e}"
    assert torch.equal(lse1, lse0), "lse differs"
    if empty > 0:
        assert (counts == 0).any(), "the case was meant to hold rows without a selected block"
