"""The local-block rule for any offset Nk - Nq (chunked prefill behind a prefix of any length),
NaN and infinite scores in the selection, on the reference (CPU). The GPU kernels are held to the
reference in tests/test_local_blocks_gpu.py. The rule itself comes from tests/selection_rules.py,
written from the design's words."""
import numpy as np
import pytest
import torch

import proxyattn as pa
import selection_rules as rules
from proxyattn import reference as ref


def _select(scores, kstar, nq, nk, S, sink, local, min_budget, causal=True):
    return pa.select_blocks(scores, kstar, seqlen_q=nq, seqlen_k=nk, block_size=S, sink_blocks=sink,
                            local_blocks=local, min_budget=min_budget, causal=causal)


def _check_rows(counts, idx, scores, kstar, nq, nk, S, sink, local, min_budget, causal=True, group=1):
    nqb = rules.cdiv(nq, S)
    for h in range(counts.shape[1]):
        for m in range(nqb):
            sel = idx[0, h, m, : int(counts[0, h, m])].tolist()
            c = rules.candidates(m, nq, nk, S, causal)
            f = rules.forced(m, nq, nk, S, sink, local, causal)
            assert f <= set(sel), (h, m, sorted(f), sel)
            assert sel == sorted(set(sel)) and all(0 <= x < c for x in sel), (h, m, sel)
            assert len(sel) == rules.budget(m, nqb - 1, nq, nk, S, sink, local, int(kstar[0, h]), min_budget,
                                            causal), (h, m)
            # The rest: the best non-forced candidates by score, ties to the lower block.
            free = sorted((n for n in range(c) if n not in f), key=lambda n: (-float(scores[0, h // group, m, n]), n))
            assert set(sel) - f == set(free[: len(sel) - len(f)]), (h, m)


@pytest.mark.parametrize("S,residues", [(64, range(64)), (128, [0, 1, 17, 63, 64, 65, 100, 127])])
@pytest.mark.parametrize("sink,local", [(0, 0), (0, 1), (1, 1), (1, 2), (0, 2), (1, 0)])
def test_forced_blocks_every_offset(S, residues, sink, local):
    """Every offset residue (Nk - Nq) mod S: each query block keeps the sink, every key block that
    holds one of its rows' own positions and local - 1 before the earliest; the budget counts them
    first; the rest are the best-scored candidates."""
    nq = 3 * S + 21
    for r in residues:
        nk = nq + S + r
        nqb, nkb = rules.cdiv(nq, S), rules.cdiv(nk, S)
        scores = torch.rand(1, 1, nqb, nkb)
        scores[0, 0, :, 1::3] = scores[0, 0, :, 0:1]  # ties
        kstar = torch.randint(0, 4, (1, 2), dtype=torch.int32)
        counts, idx = _select(scores, kstar, nq, nk, S, sink, local, min_budget=S)
        _check_rows(counts, idx, scores, kstar, nq, nk, S, sink, local, S, group=2)


def test_aligned_offsets_keep_the_last_candidates():
    """With Nk - Nq a multiple of S the local blocks are the last local_blocks candidates: the
    selection of an aligned prefix is what it was before the rule covered unaligned ones."""
    S = 64
    for nq, nk in [(200, 200), (200, 328), (64, 640), (777, 777 + 5 * 64)]:
        for local in (1, 2, 3):
            for m in range(rules.cdiv(nq, S)):
                c = rules.candidates(m, nq, nk, S)
                assert rules.forced(m, nq, nk, S, 0, local) == set(range(max(0, c - local), c))
                c2, lo, hi = ref.forced_range(m, nq, nk, S, 0, local, True)
                assert (c2, lo, hi) == (c, 0, max(0, c - local))


def test_unaligned_block_keeps_both_diagonal_blocks():
    S = 64
    nq, nk = 128, 228  # offset 100: rows 0..27 of block 0 sit in key block 1, rows 28..63 in block 2
    assert rules.forced(0, nq, nk, S, 0, 1) == {1, 2}
    assert ref.forced_range(0, nq, nk, S, 0, 1, True) == (3, 0, 1)
    assert rules.forced(0, nq, nk, S, 0, 2) == {0, 1, 2}


def test_chunk_behind_unaligned_prefix_sees_its_own_keys():
    """A prefill chunk of 128 rows behind a 100-token prefix, with no sink, no budget floor and a
    tiny gamma: every row still attends to its own key block, so no row comes out as zeros, and
    with a sink at gamma 0.7 the first rows of each block are as accurate as the others."""
    C = pa.ProxyAttnConfig
    q, k, v = torch.randn(1, 128, 2, 64), torch.randn(1, 228, 2, 64), torch.randn(1, 228, 2, 64)
    out = pa.proxy_attention(q, k, v, C(block_size=64, sink_blocks=0, min_budget=0, gamma=1e-6, dense_below=0))
    assert int((out.abs().sum(-1) == 0).sum()) == 0
    out, sel = pa.proxy_attention(q, k, v, C(block_size=64, sink_blocks=1, min_budget=0, gamma=0.7, dense_below=0),
                                  return_selection=True)
    assert bool((sel.counts < 4).any()), "the test needs a sparse selection"
    dense = ref.dense_attention(q, k, v, None, None, 64 ** -0.5, True)[0]
    err = (out - dense).norm(dim=-1)[0]  # [128, H]
    first = torch.cat([err[:28], err[64:92]])  # rows whose own position is in the earlier diagonal block
    rest = torch.cat([err[28:64], err[92:]])
    assert float(first.mean()) < 3 * float(rest.mean()) + 1e-3, (float(first.mean()), float(rest.mean()))


@pytest.mark.parametrize("offset", [0, 1, 37, 63])
def test_budget_counts_forced_mass_first(offset):
    """Stage 2 at any offset: k* is the fewest non-forced blocks (by descending mass) whose mass,
    added to the forced blocks' of the last query block, reaches gamma."""
    S, nq = 64, 200
    nk = nq + 64 + offset
    q, k = torch.randn(1, nq, 4, 64) * 1.5, torch.randn(1, nk, 2, 64)
    for sink, local, gamma in [(1, 1, 0.8), (0, 2, 0.9), (1, 0, 0.5)]:
        got = pa.head_budgets(q, k, block_size=S, gamma=gamma, sink_blocks=sink, local_blocks=local)
        w = ref.last_block_mass(q[0], k[0], S, 64 ** -0.5, True).numpy().astype(np.float32)
        f = rules.forced(rules.cdiv(nq, S) - 1, nq, nk, S, sink, local)
        for h in range(4):
            base = np.float32(sum(np.float32(w[h, n]) for n in sorted(f)))
            rest = sorted((w[h, n] for n in range(w.shape[1]) if n not in f), reverse=True)
            run, want = base, 0
            while run < np.float32(gamma) and want < len(rest):
                run = np.float32(run + rest[want])
                want += 1
            assert abs(int(got[0, h]) - want) <= (1 if abs(float(run) - gamma) < 1e-5 else 0), (h, int(got[0, h]), want)


# ---------------------------------------------------------------- NaN and infinite scores


def _nan_inf_scores(nqb, nkb, G=2):
    scores = torch.rand(1, G, nqb, nkb)
    scores[0, 0, :, 0] = float("nan")        # the sink block's score
    scores[0, 0, :, -1] = float("nan")       # a local block's score (on the diagonal rows)
    scores[0, 0, :, 1] = float("inf")
    scores[0, 0, :, 2] = float("-inf")
    scores[0, 0, :, 3] = float("nan")
    scores[0, 0, 2:, 4] = -float("nan")      # negative NaN too
    return scores


def test_nan_and_inf_scores_never_displace_forced_blocks():
    """NaN ranks below every number (-inf included) and never displaces a forced block; +inf ranks
    first among the free candidates; a NaN in one proxy group's scores leaves the other group's
    heads exactly as they were."""
    S, nq, nk = 64, 6 * 64, 8 * 64 + 40
    nqb, nkb = rules.cdiv(nq, S), rules.cdiv(nk, S)
    scores = _nan_inf_scores(nqb, nkb)
    clean = scores.clone()
    clean[0, 0] = torch.rand(nqb, nkb)
    kstar = torch.tensor([[2, 0, 3, 9]], dtype=torch.int32)
    for sink, local in [(1, 1), (0, 1), (1, 2), (0, 0)]:
        counts, idx = _select(scores, kstar, nq, nk, S, sink, local, min_budget=0)
        c2, i2 = _select(clean, kstar, nq, nk, S, sink, local, min_budget=0)
        assert torch.equal(counts[:, 2:], c2[:, 2:]) and torch.equal(idx[:, 2:], i2[:, 2:])
        for h in range(2):
            for m in range(nqb):
                c = rules.candidates(m, nq, nk, S)
                sel = set(idx[0, h, m, : int(counts[0, h, m])].tolist())
                f = rules.forced(m, nq, nk, S, sink, local)
                assert f <= sel, (sink, local, h, m)
                free = [n for n in range(c) if n not in f]
                r = len(sel) - len(f)
                nums = [n for n in free if not torch.isnan(scores[0, 0, m, n])]
                nans = [n for n in free if torch.isnan(scores[0, 0, m, n])]
                order = sorted(nums, key=lambda n: (-float(scores[0, 0, m, n]), n)) + nans
                assert sel - f == set(order[:r]), (sink, local, h, m, sorted(sel - f), order[:r])


# ---------------------------------------------------------------- inference only


def test_sparse_path_refuses_inputs_that_need_grad():
    q = torch.randn(1, 256, 4, 64, requires_grad=True)
    k, v = torch.randn(1, 256, 2, 64), torch.randn(1, 256, 2, 64)
    sparse = pa.ProxyAttnConfig(block_size=64, dense_below=0, min_budget=64)
    msg = r"inference-only \(it has no backward\), but q requires grad while grad mode is on"
    with pytest.raises(RuntimeError, match="proxy_attention's sparse path is " + msg):
        pa.proxy_attention(q, k, v, sparse)
    with pytest.raises(RuntimeError, match=r"proxyattn.proxy_block_scores is inference-only.*but q requires grad"):
        pa.proxy_block_scores(q, k, block_size=64)
    counts = torch.full((1, 4, 4), 4, dtype=torch.int32)
    idx = torch.arange(4, dtype=torch.int16).expand(1, 4, 4, 4)
    with pytest.raises(RuntimeError, match=r"proxyattn.block_sparse_attention is inference-only.*but v requires grad"):
        pa.block_sparse_attention(q.detach(), k, v.clone().requires_grad_(), counts, idx, block_size=64)
    with torch.no_grad():
        out = pa.proxy_attention(q, k, v, sparse)
    assert not out.requires_grad
    out = pa.proxy_attention(q.detach(), k, v, sparse)  # nothing asks for a gradient
    with torch.inference_mode():
        pa.proxy_attention(q, k, v, sparse)
    # The dense path (fewer keys than dense_below) stays differentiable.
    dense = pa.ProxyAttnConfig(block_size=64)
    out = pa.proxy_attention(q, k, v, dense)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    # varlen on CPU runs the reference's dense attention below dense_below: differentiable too;
    # above it, the same refusal.
    qv = q.detach()[0].requires_grad_()
    cu = torch.tensor([0, 100, 256], dtype=torch.int32)
    pa.proxy_attention_varlen(qv, k[0], v[0], cu, cu, 156, 156, dense).sum().backward()
    assert qv.grad is not None
    with pytest.raises(RuntimeError, match=msg):
        pa.proxy_attention_varlen(qv, k[0], v[0], cu, cu, 156, 156, sparse)


@pytest.mark.skipif(not pa.HAS_EXTENSION, reason=f"proxyattn._C not built: {pa.EXTENSION_ERROR}")
def test_direct_op_calls_refuse_inputs_that_need_grad():
    """torch.ops.proxyattn.* called directly (no Python wrapper) refuse an input that requires grad
    while grad mode is on, naming it, before anything runs (their Autograd kernel), on every device;
    under no_grad the same call runs."""
    S, s = 64, 64 ** -0.5
    q = torch.randn(1, 128, 4, 64, requires_grad=True)
    k, v = torch.randn(1, 128, 2, 64), torch.randn(1, 128, 2, 64).requires_grad_()
    counts = torch.full((1, 4, 2), 2, dtype=torch.int32)
    idx = torch.arange(2, dtype=torch.int16).expand(1, 4, 2, 2)
    ops = torch.ops.proxyattn
    calls = [(ops.proxy_block_scores, (q, k, None, None, 128, 128, S, 2, 4, s, True), "q"),
             (ops.head_budgets, (q, k, None, None, 128, 128, S, 0.9, 1, 1, s, True), "q"),
             (ops.select_blocks, (torch.rand(1, 2, 2, 2, requires_grad=True), torch.zeros(1, 4, dtype=torch.int32),
                                  None, None, 128, 128, S, 1, 1, 0, True), "scores"),
             (ops.block_sparse_attention, (q.detach(), k, v, counts, idx, None, None, 128, 128, S, s, True), "v")]
    for op, args, name in calls:
        with pytest.raises(RuntimeError, match=rf"proxyattn::\w+ is inference-only .*but {name} requires grad"):
            op(*args)
        with torch.no_grad():
            out = op(*args)
        for t in (out if isinstance(out, tuple) else (out,)):
            assert not t.requires_grad


def test_rows_that_see_no_key_get_count_zero():
    """A causal sequence with fewer keys than queries (reachable through the ops with device
    cu_seqlens): query blocks whose rows see no key have c_m = 0 and count 0, as in the kernels, never
    a negative count."""
    S, nq, nk = 128, 300, 10
    assert [ref.candidate_count(m, nq, nk, S, True) for m in range(3)] == [rules.candidates(m, nq, nk, S)
                                                                         for m in range(3)] == [0, 0, 1]
    cu_q = torch.tensor([0, nq], dtype=torch.int32)
    cu_k = torch.tensor([0, nk], dtype=torch.int32)
    counts, idx = ref.select_blocks(torch.rand(1, 1, 3, 1), torch.zeros(1, 2, dtype=torch.int32), cu_q, cu_k, nq, nk,
                                    S, 1, 1, 0, True)
    assert counts.tolist() == [[[0, 0, 1], [0, 0, 1]]]
    assert idx[0, :, 2, 0].tolist() == [0, 0] and (idx[0, :, :2] == -1).all()


def test_scores_of_a_sequence_with_fewer_keys_than_queries():
    """Stage 1 on a causal varlen sequence with Nk < Nq: query blocks whose rows see no key score 0
    (never NaN), and the others score as the same rows do in a sequence without the unseeing rows
    (Nq - Nk = 128 keeps the block boundaries and the kept positions)."""
    torch.manual_seed(1)
    nq, nk, S, s, d = 228, 100, 64, 2, 32
    q, k = torch.randn(nq, 2, d), torch.randn(nk, 1, d)
    cu_q, cu_k = (torch.tensor([0, n], dtype=torch.int32) for n in (nq, nk))
    A = ref.proxy_block_scores(q, k, cu_q, cu_k, nq, nk, S, 1, s, d ** -0.5, True)[0, 0]
    cu_t = torch.tensor([0, nk], dtype=torch.int32)
    trimmed = ref.proxy_block_scores(q[nq - nk:], k, cu_t, cu_k, nk, nk, S, 1, s, d ** -0.5, True)[0, 0]
    assert torch.isfinite(A).all() and A[:2].eq(0).all()
    assert torch.equal(A[2:], trimmed) and trimmed.gt(0).any()


def test_budget_of_a_head_with_nan_masses_is_zero():
    """NaN inputs make a head's block masses NaN: k* = 0 (its forced blocks only), as the kernel's
    finalize gives, and the other heads keep their budgets."""
    torch.manual_seed(0)
    S, n = 64, 256
    q, k = torch.randn(1, n, 2, 32), torch.randn(1, n, 1, 32)
    good = ref.head_budgets(q, k, None, None, n, n, S, 0.9, 1, 1, 32 ** -0.5, True)
    q[0, -1, 1, 0] = float("nan")  # the last row of head 1
    got = ref.head_budgets(q, k, None, None, n, n, S, 0.9, 1, 1, 32 ** -0.5, True)
    assert got[0, 1] == 0 and got[0, 0] == good[0, 0] and good[0, 1] > 0


# ---------------------------------------------------------------- clear errors


def test_select_blocks_checks_cpu_cu_seqlens_values():
    S = 64
    scores, kstar = torch.rand(1 + 1, 1, 2, 3), torch.zeros(2, 2, dtype=torch.int32)
    good = torch.tensor([0, 100, 150], dtype=torch.int32)
    ok = pa.select_blocks(scores, kstar, seqlen_q=100, seqlen_k=150, block_size=S, cu_seqlens_q=good,
                          cu_seqlens_k=torch.tensor([0, 150, 250], dtype=torch.int32))
    assert ok[0].shape == (2, 2, 2)
    bad = {
        "start": ([1, 100, 150], [0, 150, 250], r"cu_seqlens_q must start at 0"),
        "decreasing": ([0, 100, 50], [0, 150, 250], r"cu_seqlens_q must be non-decreasing"),
        "too long": ([0, 100, 150], [0, 150, 400], r"max_seqlen for cu_seqlens_k is 150, but sequence 1 has 250"),
        "causal": ([0, 100, 150], [0, 90, 190], r"causal attention needs seqlen_q <= seqlen_k"),
    }
    for name, (cq, ck, match) in bad.items():
        with pytest.raises(ValueError, match=match):
            pa.select_blocks(scores, kstar, seqlen_q=100, seqlen_k=150, block_size=S,
                             cu_seqlens_q=torch.tensor(cq, dtype=torch.int32),
                             cu_seqlens_k=torch.tensor(ck, dtype=torch.int32))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("at", [0, 1, 2], ids=["first", "middle", "last"])
def test_select_blocks_empty_sequences(at, causal):
    """cu_seqlens with empty sequences (no queries, with 200 keys and with none) first, in the middle
    or last: their rows count 0 blocks and hold -1 whatever their scores and budgets (as the CUDA
    kernel writes every row past a sequence's query blocks), and each other sequence selects exactly
    what it selects alone, by the rule (_check_rows)."""
    S, hq, G, sink, local = 64, 4, 2, 1, 1
    lens = [(300, 700), (130, 130)]
    lens[at:at] = [(0, 200), (0, 0)]
    lens_q, lens_k = zip(*lens)
    mq, mk = max(lens_q), max(lens_k)
    scores = torch.rand(len(lens), G, rules.cdiv(mq, S), rules.cdiv(mk, S))
    kstar = torch.randint(0, 6, (len(lens), hq), dtype=torch.int32)
    kstar[at:at + 2] = 1000
    cu_q, cu_k = (torch.tensor([0] + list(n), dtype=torch.int32).cumsum(0).to(torch.int32) for n in (lens_q, lens_k))
    counts, idx = pa.select_blocks(scores, kstar, seqlen_q=mq, seqlen_k=mk, block_size=S, sink_blocks=sink,
                                   local_blocks=local, min_budget=0, causal=causal, cu_seqlens_q=cu_q,
                                   cu_seqlens_k=cu_k)
    assert counts[at:at + 2].eq(0).all() and idx[at:at + 2].eq(-1).all()
    sparse = False
    for j, (nq, nk) in enumerate(lens):
        if nq == 0:
            continue
        mb, nb = rules.cdiv(nq, S), rules.cdiv(nk, S)
        alone = scores[j:j + 1, :, :mb, :nb].contiguous()
        a_counts, a_idx = _select(alone, kstar[j:j + 1], nq, nk, S, sink, local, 0, causal)
        _check_rows(a_counts, a_idx, alone, kstar[j:j + 1], nq, nk, S, sink, local, 0, causal, group=hq // G)
        assert torch.equal(counts[j, :, :mb], a_counts[0]) and counts[j, :, mb:].eq(0).all()
        assert torch.equal(idx[j, :, :mb, :nb], a_idx[0])
        assert idx[j, :, mb:].eq(-1).all() and idx[j, ..., nb:].eq(-1).all()
        sparse |= bool((a_counts[0] < torch.tensor([rules.candidates(m, nq, nk, S, causal) for m in range(mb)])).any())
    assert sparse, "the test needs rows that leave candidates out"


@pytest.mark.parametrize("field,value", [("min_budget", 10**30), ("sink_blocks", 2**63), ("local_blocks", 2**31),
                                         ("dense_below", 2**64), ("num_proxy_heads", 2**40), ("stride", 17)])
def test_config_ints_have_upper_bounds(field, value):
    with pytest.raises(ValueError, match=rf"ProxyAttnConfig.{field} must be in \[\d+, \d+\], got {value}"):
        pa.ProxyAttnConfig(**{field: value})


def test_stage_functions_bound_their_ints():
    q, k = torch.randn(1, 128, 2, 64), torch.randn(1, 128, 2, 64)
    with pytest.raises(ValueError, match=r"sink_blocks must be in \[0, 2147483647\], got 9223372036854775808"):
        pa.head_budgets(q, k, sink_blocks=2**63)
    with pytest.raises(ValueError, match=r"min_budget must be in \[0, 2147483647\]"):
        pa.select_blocks(torch.rand(1, 1, 1, 1), torch.zeros(1, 2, dtype=torch.int32), seqlen_q=128, seqlen_k=128,
                         min_budget=10**30)


def test_stage_defaults_are_the_config_defaults():
    import inspect

    d = pa.ProxyAttnConfig()
    for fn in (pa.proxy_block_scores, pa.head_budgets, pa.select_blocks, pa.block_sparse_attention):
        for name, p in inspect.signature(fn).parameters.items():
            if hasattr(d, name) and name != "softmax_scale":
                assert p.default == getattr(d, name), (fn.__name__, name)


def test_meta_tensors_get_a_clear_error():
    q = torch.empty(300, 4, 64, device="meta")
    k = torch.empty(300, 2, 64, device="meta")
    cu = torch.tensor([0, 100, 300], dtype=torch.int32)
    for cfg in (pa.ProxyAttnConfig(), pa.ProxyAttnConfig(dense_below=0)):
        with pytest.raises(ValueError, match=r"proxyattn runs on CPU and CUDA tensors, got q on meta"):
            pa.proxy_attention_varlen(q, k, k, cu, cu, 200, 200, cfg)
    with pytest.raises(ValueError, match=r"got q on meta"):
        pa.proxy_attention(q[None], k[None], k[None])
