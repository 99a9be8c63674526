"""block_sparse_attention reads each index row as a set (docs/design.md section 2, stage 4), on both
kernels (PROXYATTN_BSA_BACKEND=portable and hopper).

The selected blocks of (b, h, m) are the distinct values among the first counts[b, h, m] entries
(a count below 0 reads as 0, one above K as K) that lie in [0, nkb); order and repetition do not
matter, and keys a row may not see stay masked by causality. Rows here hold every kind of noise:
repeated entries, unsorted entries, entries >= nkb (up to INT16 / INT32 max), negative entries (down
to INT16 / INT32 min), negative counts, counts past K, blocks in the causal future of the query
block, rows whose entries are all invalid, and valid-looking garbage past the count. Fixed length
and varlen (mixed lengths, Nq < Nk), int16 and int32 indices, block sizes 64 and 128 (the Hopper
kernel: 128 only).

Each output is compared with the fp64 truth of tests/test_bsa_gpu.py (tolerance relative to the
same math in torch at the input precision, rows that see no key exactly 0 with lse -inf) and with
``proxyattn.reference.block_sparse_attention`` run on CPU copies. Rows that only repeat entries or
add invalid ones to an ascending row walk the same blocks in the same order, so they give bitwise
the output of the clean row.

Run on a GPU machine: python3 -m pytest -q -m gpu tests/test_bsa_set_semantics_gpu.py
"""
import itertools

import pytest
import torch

import proxyattn  # noqa: F401  (loads the extension and registers the ops)
import test_bsa_gpu as base
from proxyattn import reference as ref

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

INT16_MIN, INT16_MAX = -(2**15), 2**15 - 1
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
KINDS = ("repeated", "unsorted", "past_nkb", "negative", "negative_count", "count_past_k", "future", "all_invalid",
         "garbage_past_count")
EMPTY_KINDS = ("negative_count", "all_invalid")  # rows that must see no key at all


@pytest.fixture(params=["portable", "hopper"])
def backend(request, monkeypatch):
    if request.param == "hopper" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Hopper kernel needs a compute capability 9.0 device")
    monkeypatch.setenv(base.BACKEND_ENV, request.param)
    return request.param


def skip_unsupported(backend, s):
    if backend == "hopper" and s != 128:
        pytest.skip("the Hopper kernel takes block_size 128 only")


def invalid_values(nkb, idx_dtype):
    vals = [-1, -7, nkb, nkb + 3]
    if idx_dtype == torch.int16:
        return vals + [INT16_MAX, INT16_MIN]
    return vals + [INT32_MAX, INT32_MIN, INT16_MAX + 1, INT16_MIN - 1]


def messy_row(kind, c, nkb, K, idx_dtype, gen):
    """(count, entries[K]) of one row of the given kind; the candidates of its query block are
    [0, c) (the blocks >= c hold only keys in the causal future of every row)."""
    def pick(n, lo, hi):  # n distinct blocks of [lo, hi), random
        n = max(0, min(n, hi - lo))
        return (torch.randperm(hi - lo, generator=gen)[:n] + lo).tolist()

    def shuffled(xs):
        return [xs[i] for i in torch.randperm(len(xs), generator=gen).tolist()]

    bad = invalid_values(nkb, idx_dtype)
    r = int(torch.randint(1, max(2, c + 1), (1,), generator=gen))
    chosen = sorted(pick(r, 0, c) if c > 0 else [])
    if kind == "repeated":  # ascending, each block 1 to 3 times
        ent = [x for x in chosen for _ in range(int(torch.randint(1, 4, (1,), generator=gen)))]
    elif kind == "unsorted":
        ent = shuffled(chosen + chosen[: len(chosen) // 2])
    elif kind == "past_nkb":
        ent = shuffled(chosen + [bad[2], bad[3], bad[4]])
    elif kind == "negative":
        ent = shuffled(chosen + [bad[0], bad[1], bad[5]])
    elif kind == "negative_count":
        ent = chosen
    elif kind == "count_past_k":
        ent = shuffled(chosen + chosen + bad)
    elif kind == "future":  # blocks past the causal limit, plus some visible ones (maybe none)
        ent = shuffled(pick(3, c, nkb) + chosen[: len(chosen) // 2])
    elif kind == "all_invalid":
        ent = shuffled(bad + pick(2, c, nkb))  # future blocks too: invisible to every row
    else:  # garbage_past_count: valid-looking blocks after the count
        ent = chosen
    ent = ent[:K]
    count = len(ent)
    if kind == "negative_count":
        count = [-3, INT32_MIN][int(torch.randint(0, 2, (1,), generator=gen))]
    elif kind == "count_past_k":
        count = [K + 1, 10**6, INT32_MAX][int(torch.randint(0, 3, (1,), generator=gen))]
    # past the entries: -1 padding, or (garbage_past_count, count_past_k) blocks that look valid
    fill_valid = kind in ("garbage_past_count", "count_past_k")
    tail = (torch.randint(0, nkb, (K - len(ent),), generator=gen).tolist() if fill_valid
            else [-1] * (K - len(ent)))
    return count, ent + tail


def messy_selection(b, hq, nq, nk, s, causal, idx_dtype, gen, nqb=None, nkb_row=None):
    """counts int32 [b, hq, nqb], indices [b, hq, nqb, K] (K = 2 nkb + 10) and the kind of each
    row (cycled over KINDS row by row, so every kind appears wherever there are as many rows as
    kinds); nqb / nkb_row widen a varlen sequence's rows to the batch's."""
    nqb_s, nkb = (nq + s - 1) // s, (nk + s - 1) // s
    nqb = nqb or nqb_s
    K = 2 * (nkb_row or nkb) + 10
    counts = torch.zeros(b, hq, nqb, dtype=torch.int32)
    indices = torch.full((b, hq, nqb, K), -1, dtype=torch.int64)
    kinds = {}
    for bi, h, m in itertools.product(range(b), range(hq), range(nqb_s)):
        kind = KINDS[(bi * hq * nqb_s + h * nqb_s + m) % len(KINDS)]
        c = max(0, base.num_candidates(m, nq, nk, s, causal)) if nk > 0 else 0
        count, ent = messy_row(kind, c, nkb, K, idx_dtype, gen)
        counts[bi, h, m] = count
        indices[bi, h, m] = torch.tensor(ent)
        kinds[(bi, h, m)] = kind
    return counts.cuda(), indices.to(idx_dtype).cuda(), kinds


def compare(out, lse, q, k, v, counts, indices, cu_q, cu_k, max_q, max_k, s, scale, causal, errs, what):
    """Kernel against proxyattn.reference on CPU copies, within 3x the torch lowp error (errs)."""
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    out_r, lse_r = ref.block_sparse_attention(cpu(q), cpu(k), cpu(v), cpu(counts), cpu(indices), cpu(cu_q), cpu(cu_k),
                                              max_q, max_k, s, scale, causal)
    d_ref = (out.cpu().double() - out_r.double()).abs().max().item() if out.numel() else 0.0
    assert d_ref <= 3 * max(errs) + base.SLACK[q.dtype], f"{what}: kernel vs reference {d_ref:.3e}"
    lse_c = lse.cpu()
    fin = torch.isfinite(lse_r)
    assert torch.equal(fin, torch.isfinite(lse_c)), f"{what}: lse -inf pattern differs from the reference"
    assert torch.equal(torch.isneginf(lse_r), torch.isneginf(lse_c)), f"{what}: lse -inf pattern differs"
    if fin.any():
        assert (lse_c[fin] - lse_r[fin]).abs().max().item() <= base.LSE_ATOL, f"{what}: lse vs reference"


def check_empty_rows(out, lse, kinds, s, nq, what, row0=0, seq=None):
    """Rows of a query block whose entries are all invalid (or whose count is negative): out 0,
    lse -inf. out [rows, Hq, D] and lse [Hq, rows] of one sequence."""
    for (bi, h, m), kind in kinds.items():
        if kind in EMPTY_KINDS and (seq is None or bi == seq):
            r0, r1 = row0 + m * s, row0 + min(nq, (m + 1) * s)
            assert (out[r0:r1, h] == 0).all(), f"{what}: ({bi}, {h}, {m}) {kind}: out not 0"
            assert torch.isneginf(lse[h, r0:r1]).all(), f"{what}: ({bi}, {h}, {m}) {kind}: lse not -inf"


FIXED_CASES = [
    # (B, Nq, Nk, Hq, Hkv, D, causal, dtype)
    (2, 600, 600, 6, 2, 64, True, torch.bfloat16),
    (1, 300, 1000, 4, 4, 128, True, torch.float16),  # Nq < Nk: a chunk behind a prefix
    (1, 257, 700, 4, 1, 128, False, torch.bfloat16),
]


@pytest.mark.parametrize("idx_dtype", [torch.int16, torch.int32], ids=["int16", "int32"])
@pytest.mark.parametrize("s", [64, 128])
@pytest.mark.parametrize("case", FIXED_CASES, ids=lambda c: "B{}_q{}_k{}_h{}-{}_d{}_{}".format(
    *c[:6], "causal" if c[6] else "full"))
def test_set_semantics_fixed(backend, case, s, idx_dtype):
    skip_unsupported(backend, s)
    b, nq, nk, hq, hkv, d, causal, dtype = case
    gen = torch.Generator().manual_seed(hash(case[:7] + (s, idx_dtype == torch.int16)) % (2**31))
    q, k, v = base.rand_qkv(b, nq, nk, hq, hkv, d, dtype, torch.Generator(device="cuda").manual_seed(nq + s))
    counts, indices, kinds = messy_selection(b, hq, nq, nk, s, causal, idx_dtype, gen)
    scale = d ** -0.5
    out, lse = base.run_op(q, k, v, counts, indices, None, None, nq, nk, s, scale, causal)
    what = f"{backend} fixed {case[:7]} s={s} {idx_dtype}"
    err_b = base.check_against_truth(out, lse, q, k, v, counts, indices, s, scale, causal, what)
    compare(out, lse, q, k, v, counts, indices, None, None, nq, nk, s, scale, causal, [err_b], what)
    for bi in range(b):
        check_empty_rows(out[bi], lse[bi], kinds, s, nq, what, seq=bi)


@pytest.mark.parametrize("idx_dtype", [torch.int16, torch.int32], ids=["int16", "int32"])
@pytest.mark.parametrize("s", [64, 128])
@pytest.mark.parametrize("d,dtype", [(128, torch.bfloat16), (64, torch.float16)], ids=["d128_bf16", "d64_fp16"])
def test_set_semantics_varlen(backend, d, dtype, s, idx_dtype):
    """A packed batch of mixed lengths (one sequence of one row, one empty, Nq < Nk) with messy rows."""
    skip_unsupported(backend, s)
    lens_q, lens_k = [300, 1, 0, 450], [700, 129, 5, 450]
    hq, hkv, causal = 4, 2, True
    gen = torch.Generator().manual_seed(1000 + d + s + (idx_dtype == torch.int16))
    dgen = torch.Generator(device="cuda").manual_seed(77 + d + s)
    max_q, max_k = max(lens_q), max(lens_k)
    nqb, nkb = (max_q + s - 1) // s, (max_k + s - 1) // s
    K = 2 * nkb + 10
    counts = torch.zeros(len(lens_q), hq, nqb, dtype=torch.int32, device="cuda")
    indices = torch.full((len(lens_q), hq, nqb, K), -1, dtype=idx_dtype, device="cuda")
    qs, ks, vs, parts = [], [], [], []
    for i, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        q, k, v = base.rand_qkv(1, lq, lk, hq, hkv, d, dtype, dgen)
        c, ix, kinds = messy_selection(1, hq, lq, lk, s, causal, idx_dtype, gen, nqb=nqb, nkb_row=nkb)
        counts[i] = c[0]
        indices[i] = ix[0]
        qs.append(q[0]), ks.append(k[0]), vs.append(v[0]), parts.append((c, ix, kinds))
    qp, kp, vp, cu_q, cu_k = base.pack_varlen(qs, ks, vs, lens_q, lens_k)
    scale = d ** -0.5
    out, lse = base.run_op(qp, kp, vp, counts, indices, cu_q, cu_k, max_q, max_k, s, scale, causal)
    what = f"{backend} varlen d={d} s={s} {idx_dtype}"
    errs = [0.0]
    for i, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        if lq == 0:
            continue
        a = int(cu_q[i])
        c, ix, kinds = parts[i]
        nqb_i = (lq + s - 1) // s
        errs.append(base.check_against_truth(out[a:a + lq].unsqueeze(0), lse[:, a:a + lq].unsqueeze(0),
                                             qs[i].unsqueeze(0), ks[i].unsqueeze(0), vs[i].unsqueeze(0),
                                             c[:, :, :nqb_i], ix[:, :, :nqb_i], s, scale, causal, f"{what} seq {i}"))
        check_empty_rows(out, lse, kinds, s, lq, f"{what} seq {i}", row0=a)
    compare(out, lse, qp, kp, vp, counts, indices, cu_q, cu_k, max_q, max_k, s, scale, causal, errs, what)


@pytest.mark.parametrize("idx_dtype", [torch.int16, torch.int32], ids=["int16", "int32"])
@pytest.mark.parametrize("s", [64, 128])
def test_repeats_and_invalid_entries_change_nothing(backend, s, idx_dtype):
    """Ascending rows with every entry repeated 1 to 3 times, invalid values (negative, >= nkb,
    the index type's extremes) inserted anywhere, garbage past the count and counts past K where
    the row is full: the kernel walks the same blocks in the same order as on the clean rows
    (select_blocks' form), so out and lse are bitwise the same."""
    skip_unsupported(backend, s)
    b, n, hq, hkv, d = 1, 1000, 4, 2, 128
    dgen = torch.Generator(device="cuda").manual_seed(s + 9)
    q, k, v = base.rand_qkv(b, n, n, hq, hkv, d, torch.bfloat16, dgen)
    counts, indices = base.random_selection(b, hq, n, n, s, True, 0.5, dgen)
    nqb, nkb = counts.shape[2], indices.shape[3]
    gen = torch.Generator().manual_seed(s + 3 * (idx_dtype == torch.int16))
    bad = invalid_values(nkb, idx_dtype)
    K = 4 * nkb + 8
    noisy_counts = torch.zeros_like(counts, device="cpu")
    noisy = torch.full((b, hq, nqb, K), -1, dtype=torch.int64)
    cc, ii = counts.cpu(), indices.cpu()
    for h, m in itertools.product(range(hq), range(nqb)):
        ent = []
        for x in ii[0, h, m, :cc[0, h, m]].tolist():
            if int(torch.randint(0, 3, (1,), generator=gen)) == 0:
                ent.append(bad[int(torch.randint(0, len(bad), (1,), generator=gen))])
            ent += [x] * int(torch.randint(1, 4, (1,), generator=gen))
        noisy[0, h, m, :len(ent)] = torch.tensor(ent, dtype=torch.int64)
        if int(torch.randint(0, 4, (1,), generator=gen)) == 0:
            # a count past K (read as K): the rest of the row holds invalid values only
            noisy[0, h, m, len(ent):] = torch.tensor(bad)[torch.randint(0, len(bad), (K - len(ent),), generator=gen)]
            noisy_counts[0, h, m] = [K + 1, INT32_MAX][int(torch.randint(0, 2, (1,), generator=gen))]
        else:
            noisy[0, h, m, len(ent):] = torch.randint(0, nkb, (K - len(ent),), generator=gen)  # ignored
            noisy_counts[0, h, m] = len(ent)
    out0, lse0 = base.run_op(q, k, v, counts, indices.to(idx_dtype), None, None, n, n, s, d ** -0.5, True)
    out1, lse1 = base.run_op(q, k, v, noisy_counts.cuda(), noisy.to(idx_dtype).cuda(), None, None, n, n, s,
                             d ** -0.5, True)
    assert torch.equal(out1, out0), f"out differs: {(out1.double() - out0.double()).abs().max().item():.3e}"
    assert torch.equal(lse1, lse0), "lse differs"
    base.check_against_truth(out0, lse0, q, k, v, counts, indices, s, d ** -0.5, True, f"{backend} clean rows")
