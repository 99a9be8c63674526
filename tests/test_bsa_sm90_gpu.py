"""GPU tests of the Hopper (sm_90a) path of torch.ops.proxyattn.block_sparse_attention.

Runs the grid of tests/test_bsa_gpu.py (block size 128: the sm90 path's only size) with
PROXYATTN_BSA_SM90=require, so the op raises instead of falling back to the sm80 path, and
compares the sm90 output with the sm80 output (PROXYATTN_BSA_FORCE_SM80=1) on the same inputs.
Both sm90 kernel variants run (serial, and PROXYATTN_BSA_SM90_OVERLAP=1). The environment is
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


@pytest.fixture(params=["serial", "overlap"])
def sm90(request, monkeypatch):
    """The sm90 path (or an error), in both kernel variants (PROXYATTN_BSA_SM90_OVERLAP)."""
    monkeypatch.delenv("PROXYATTN_BSA_FORCE_SM80", raising=False)
    monkeypatch.setenv("PROXYATTN_BSA_SM90", "require")
    monkeypatch.setenv("PROXYATTN_BSA_SM90_OVERLAP", "1" if request.param == "overlap" else "0")


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
@pytest.mark.parametrize("overlap", ["0", "1"], ids=["serial", "overlap"])
def test_sm90_matches_sm80(monkeypatch, case, dtype, overlap):
    """Same inputs through both paths: outputs within the lowp error budget, lse -inf patterns equal."""
    monkeypatch.setenv("PROXYATTN_BSA_SM90_OVERLAP", overlap)
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


# ----------------------------------------------------------------------------------------------
# Opt-in persistent kernel variants (PROXYATTN_BSA_SM90_VARIANT=persistent | pingpong): grid = SM
# count, each CTA strides over the tiles; the default kernel is unchanged. Same checks as above,
# plus tile counts below / at / around / far above the SM count, varlen, int16 indices, CUDA graphs.
# ----------------------------------------------------------------------------------------------
@pytest.fixture(params=["persistent", "pingpong"])
def sm90_persistent(request, monkeypatch):
    """The sm90 path (or an error) in a persistent variant."""
    monkeypatch.delenv("PROXYATTN_BSA_FORCE_SM80", raising=False)
    monkeypatch.setenv("PROXYATTN_BSA_SM90", "require")
    monkeypatch.setenv("PROXYATTN_BSA_SM90_VARIANT", request.param)
    return request.param


@pytest.mark.parametrize("dtype", base.DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES_128, ids=CASE_IDS)
def test_fixed_length_persistent(sm90_persistent, case, dtype):
    base.test_fixed_length(case, dtype)


@pytest.mark.parametrize("dtype", base.DTYPES, ids=["bf16", "fp16"])
def test_garbage_past_counts_and_strides_persistent(sm90_persistent, dtype):
    base.test_garbage_past_counts_and_strides(dtype)


def test_rows_without_keys_persistent(sm90_persistent):
    base.test_rows_without_keys(128)


def test_cuda_graph_replay_persistent(sm90_persistent):
    base.test_cuda_graph_replay()


@pytest.mark.parametrize("dtype", base.DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("d,causal", [(128, True), (64, True), (128, False), (64, False)])
def test_varlen_persistent(sm90_persistent, dtype, d, causal):
    test_varlen_sm90(None, dtype, d, causal)


@pytest.mark.parametrize("order", ["heads", "kv:1", "kv:3", "auto"])
def test_work_orders_persistent(sm90_persistent, monkeypatch, order):
    test_work_orders_sm90(None, monkeypatch, order)


def _num_sms():
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def _tile_count_cases():
    """(B, Nq, Nk, Hq, Hkv, D, S, causal, density) with B * Hq * ceil(Nq / 128) tiles equal to: a few,
    SMs - 1, SMs, SMs + 1, about 16 x SMs."""
    sms = _num_sms()
    hq = 2 if sms % 2 == 0 else 1

    def rows(nqb):
        return nqb * 128 - 5  # a partial last query block

    cases = [("few", (1, 300, 300, 2, 1, 128, 128, True, 0.5))]  # 6 tiles
    cases.append(("sms-1", (1, rows(sms - 1), rows(sms - 1), 1, 1, 64, 128, True, 0.1)))
    cases.append(("sms", (1, rows(sms // hq), rows(sms // hq), hq, 1, 128, 128, True, 0.1)))
    cases.append(("sms+1", (1, rows(sms + 1), rows(sms + 1), 1, 1, 128, 128, False, 0.05)))
    nqb = max(1, (16 * sms) // (2 * 16))
    cases.append(("16x", (2, rows(nqb), rows(nqb), 16, 4, 128, 128, True, 0.1)))
    cases.append(("16x_d64_prefill", (1, rows(nqb), rows(nqb) + 3000, 32, 8, 64, 128, True, 0.1)))
    return cases


@pytest.mark.parametrize("dtype", base.DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("which", ["few", "sms-1", "sms", "sms+1", "16x", "16x_d64_prefill"])
def test_tile_counts_persistent(sm90_persistent, monkeypatch, which, dtype):
    """Tiles fewer than, equal to, around and far more than the SMs: truth check, and the same
    result (within the lowp error budget) as the default sm90 kernel on the same inputs."""
    case = dict(_tile_count_cases())[which]
    b, nq, nk, hq, hkv, d, s, causal, density = case
    gen = torch.Generator(device="cuda").manual_seed(1234 + nq + hq)
    q, k, v = base.rand_qkv(b, nq, nk, hq, hkv, d, dtype, gen)
    counts, indices = base.random_selection(b, hq, nq, nk, s, causal, density, gen)
    scale = d ** -0.5
    base.poison_allocator()
    out, lse = base.run_op(q, k, v, counts, indices, None, None, nq, nk, s, scale, causal)
    err_b = base.check_against_truth(out, lse, q, k, v, counts, indices, s, scale, causal, f"{which} {case}")
    monkeypatch.delenv("PROXYATTN_BSA_SM90_VARIANT")
    out_d, lse_d = base.run_op(q, k, v, counts, indices, None, None, nq, nk, s, scale, causal)
    diff = (out.double() - out_d.double()).abs().max().item()
    assert diff <= 2 * err_b + base.SLACK[dtype], f"persistent vs default: {diff:.3e}"
    fin = torch.isfinite(lse_d)
    assert torch.equal(fin, torch.isfinite(lse))
    if fin.any():
        assert (lse[fin] - lse_d[fin]).abs().max().item() <= base.LSE_ATOL


@pytest.mark.parametrize("idx_dtype", [torch.int16, torch.int32], ids=["int16", "int32"])
def test_index_dtypes_and_bad_entries_persistent(sm90_persistent, idx_dtype):
    """int16 and int32 indices; rows with count 0, -1 and out-of-range entries inside counts, and
    counts past the row length, spread over many more tiles than SMs (empty tiles between busy ones)."""
    dtype, b, n, hq, hkv, d, s = torch.bfloat16, 2, 3000, 16, 4, 128, 128
    gen = torch.Generator(device="cuda").manual_seed(99)
    q, k, v = base.rand_qkv(b, n, n, hq, hkv, d, dtype, gen)
    counts, indices = base.random_selection(b, hq, n, n, s, True, 0.3, gen)
    nkb = indices.shape[-1]
    sel = torch.rand(counts.shape, generator=gen, device="cuda")
    counts = torch.where(sel < 0.25, torch.zeros_like(counts), counts)                   # empty rows
    indices[..., 0] = torch.where(sel > 0.8, torch.full_like(indices[..., 0], -1), indices[..., 0])
    bad = (sel > 0.6) & (sel <= 0.8) & (counts > 0)
    last = (counts.long() - 1).clamp(min=0).unsqueeze(-1)
    indices.scatter_(-1, last, torch.where(bad.unsqueeze(-1), torch.full_like(last, nkb + 7).int(),
                                           indices.gather(-1, last)))
    counts = torch.where((sel > 0.5) & (sel <= 0.6), torch.full_like(counts, 10**6), counts)  # clamped
    indices = indices.to(idx_dtype)
    scale = d ** -0.5
    base.poison_allocator()
    out, lse = base.run_op(q, k, v, counts, indices, None, None, n, n, s, scale, True)
    base.check_against_truth(out, lse, q, k, v, counts, indices.int(), s, scale, True, f"bad entries {idx_dtype}")


def test_varlen_many_sequences_persistent(sm90_persistent):
    """Packed batch of 40 sequences (some empty, some far shorter than max_seqlen, so most tiles lie
    past their sequence and are skipped) with more tiles than SMs; equals each sequence alone."""
    dtype, s, hq, hkv, d, causal = torch.float16, 128, 8, 2, 128, True
    gen = torch.Generator(device="cuda").manual_seed(41)
    lens_q = [int(x) for x in torch.randint(0, 900, (40,), generator=gen, device="cuda").tolist()]
    lens_q[3], lens_q[7] = 0, 2000
    lens_k = [lq + int(x) for lq, x in zip(lens_q, torch.randint(0, 300, (40,), generator=gen, device="cuda").tolist())]
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
    assert nseq * hq * nqb > _num_sms()
    base.poison_allocator()
    out, lse = base.run_op(qp, kp, vp, counts, indices, cu_q, cu_k, max_q, max_k, s, scale, causal)
    assert torch.isfinite(out).all()
    for i in range(nseq):
        a, e = int(cu_q[i]), int(cu_q[i + 1])
        if e == a:
            continue
        base.check_against_truth(out[a:e].unsqueeze(0), lse[:, a:e].unsqueeze(0), qs[i].unsqueeze(0),
                                 ks[i].unsqueeze(0), vs[i].unsqueeze(0), cs[i], ids[i], s, scale, causal,
                                 f"persistent varlen seq {i}")


def test_cuda_graph_many_tiles_persistent(sm90_persistent):
    """Graph capture with many more tiles than SMs; replays with new data and new selections (including
    all-empty rows) equal eager runs bit for bit (no state carried between launches)."""
    dtype, b, n, hq, hkv, d, s = torch.bfloat16, 2, 4000, 16, 4, 128, 128
    gen = torch.Generator(device="cuda").manual_seed(55)
    q, k, v = base.rand_qkv(b, n, n, hq, hkv, d, dtype, gen)
    counts, indices = base.random_selection(b, hq, n, n, s, True, 0.2, gen)
    scale = d ** -0.5
    assert b * hq * ((n + s - 1) // s) > 2 * _num_sms()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        base.run_op(q, k, v, counts, indices, None, None, n, n, s, scale, True)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_g, lse_g = base.run_op(q, k, v, counts, indices, None, None, n, n, s, scale, True)
    for seed in (1, 2, 3):
        g2 = torch.Generator(device="cuda").manual_seed(200 + seed)
        q2, k2, v2 = base.rand_qkv(b, n, n, hq, hkv, d, dtype, g2)
        c2, i2 = base.random_selection(b, hq, n, n, s, True, 0.1 * seed, g2)
        if seed == 3:
            c2[:, ::2] = 0  # every other head empty
        q.copy_(q2), k.copy_(k2), v.copy_(v2), counts.copy_(c2), indices.copy_(i2)
        for _ in range(2):
            graph.replay()
        torch.cuda.synchronize()
        out_e, lse_e = base.run_op(q2, k2, v2, c2, i2, None, None, n, n, s, scale, True)
        assert torch.equal(out_g, out_e) and torch.equal(lse_g, lse_e)
        base.check_against_truth(out_g, lse_g, q2, k2, v2, c2, i2, s, scale, True, f"graph replay {seed}")
