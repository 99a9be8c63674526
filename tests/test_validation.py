"""Bad input is rejected before any kernel runs, with a message naming the problem."""
import dataclasses
import math

import pytest
import torch

import proxyattn as pa
from proxyattn.config import check_proxy_grouping, default_proxy_heads


def _qkv(B=1, nq=130, nk=130, hq=4, hkv=2, d=64, dtype=torch.float32):
    return (torch.randn(B, nq, hq, d, dtype=dtype), torch.randn(B, nk, hkv, d, dtype=dtype),
            torch.randn(B, nk, hkv, d, dtype=dtype))


CFG = pa.ProxyAttnConfig(block_size=64, dense_below=0)


def _call(q, k, v, **kw):
    return pa.proxy_attention(q, k, v, CFG, **kw)


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda q, k, v: (q, k.double(), v), TypeError, "share one dtype"),
    (lambda q, k, v: (q.double(), k.double(), v.double()), TypeError, "unsupported dtype"),
    (lambda q, k, v: (q.to(torch.int32), k.to(torch.int32), v.to(torch.int32)), TypeError, "unsupported dtype"),
    (lambda q, k, v: (q[0], k[0], v[0]), ValueError, "rank 4"),
    (lambda q, k, v: tuple(torch.randn(*t.shape[:-1], 128)[..., ::2] for t in (q, k, v)), ValueError,
     "contiguous last dimension"),
    (lambda q, k, v: (q[..., :48].contiguous(), k[..., :48].contiguous(), v[..., :48].contiguous()), ValueError,
     "head_dim must be one of"),
    (lambda q, k, v: (q, k, v[:, :100]), ValueError, "same shape"),
    (lambda q, k, v: (q[:, :, :3], k, v), ValueError, "multiple of the 2 KV heads"),
    (lambda q, k, v: (q, torch.cat([k, k]), torch.cat([v, v])), ValueError, "same batch size"),
    (lambda q, k, v: (q, k[:, :100], v[:, :100]), ValueError, "seqlen_q <= seqlen_k"),
    (lambda q, k, v: (q[:, :0], k, v), ValueError, "zero-length"),
    (lambda q, k, v: (q, k.transpose(1, 2).contiguous().transpose(1, 2)[..., ::1], v), None, None),
    (lambda q, k, v: ("q", k, v), TypeError, "torch.Tensor"),
])
def test_bad_tensors(mutate, exc, match):
    q, k, v = mutate(*_qkv())
    if exc is None:  # any strides with a contiguous last dim are accepted, and read as such
        assert not k.is_contiguous()
        assert torch.equal(_call(q, k, v), _call(q, k.contiguous(), v))
        return
    with pytest.raises(exc, match=match):
        _call(q, k, v)


def test_dtype_and_device_messages_name_both():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"q is torch.float32, v is torch.float16"):
        _call(q, k, v.half())
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="one device"):
            _call(q, k.cuda(), v.cuda())


def test_non_causal_allows_longer_queries():
    q, k, v = _qkv(nq=200, nk=130)
    out = _call(q, k, v, causal=False)
    assert out.shape == q.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("kw,exc,match", [
    (dict(gamma=0.0), ValueError, r"gamma must be in \(0, 1\]"),
    (dict(gamma=1.5), ValueError, r"gamma must be in \(0, 1\]"),
    (dict(gamma=float("nan")), ValueError, "gamma"),
    (dict(stride=0), ValueError, "stride must be in"),
    (dict(stride=17), ValueError, "stride must be in"),
    (dict(block_size=32), ValueError, "block_size must be one of"),
    (dict(block_size=128.0), TypeError, "block_size must be an int"),
    (dict(min_budget=-1), ValueError, "min_budget"),
    (dict(sink_blocks=-1), ValueError, "sink_blocks"),
    (dict(local_blocks=-2), ValueError, "local_blocks"),
    (dict(num_proxy_heads=0), ValueError, "num_proxy_heads"),
    (dict(dense_below=-5), ValueError, "dense_below"),
    (dict(softmax_scale=-1.0), ValueError, "softmax_scale"),
    (dict(softmax_scale=3e38), ValueError, r"softmax_scale must be at most 2.3e\+38 for attention.*got 3e\+38"),
    (dict(softmax_scale=0.0), ValueError, r"softmax_scale must be finite and > 0, got 0"),
    (dict(softmax_scale=1e-39), ValueError, r"softmax_scale must be at least FLT_MIN.*got 1e-39"),
    (dict(gamma="high"), TypeError, "gamma must be a float"),
])
def test_bad_config(kw, exc, match):
    with pytest.raises(exc, match=match):
        pa.ProxyAttnConfig(**kw)


@pytest.mark.parametrize("g,ok", [(1, True), (2, True), (3, False), (4, True), (8, True), (6, False), (16, False)])
def test_proxy_grouping_rule(g, ok):
    q, k, v = _qkv(hq=8, hkv=2)
    cfg = pa.ProxyAttnConfig(block_size=64, dense_below=0, num_proxy_heads=g)
    if ok:
        assert pa.proxy_attention(q, k, v, cfg).shape == q.shape
    else:
        with pytest.raises(ValueError, match=f"num_proxy_heads={g}"):
            pa.proxy_attention(q, k, v, cfg)


@pytest.mark.parametrize("hq,hkv,want", [(32, 8, 16), (8, 2, 4), (28, 4, 28), (40, 8, 40), (32, 32, 16),
                                          (12, 2, 6), (64, 8, 32), (1, 1, 1), (6, 3, 3), (6, 2, 6), (7, 1, 7)])
def test_default_proxy_heads(hq, hkv, want):
    """The default G pools two query heads per proxy where the design's grouping rule allows, else one
    proxy per query head; it is always a valid grouping."""
    assert default_proxy_heads(hq, hkv) == want
    check_proxy_grouping(want, hq, hkv)
    assert pa.ProxyAttnConfig().num_proxy_heads is None
    assert pa.ProxyAttnConfig().proxy_heads(hq, hkv) == want
    assert pa.ProxyAttnConfig(num_proxy_heads=1).proxy_heads(hq, hkv) == 1


def test_default_proxy_heads_run_as_explicit():
    """The default config on heads where Hq/2 is not a valid grouping (Hq=6, Hkv=2: G=3 would
    span KV heads) runs with G=Hq, exactly as the explicit config does."""
    q, k, v = _qkv(nq=640, nk=640, hq=6, hkv=2)
    dflt = pa.ProxyAttnConfig(block_size=64, dense_below=0, min_budget=64)
    out, sel = pa.proxy_attention(q, k, v, dflt, return_selection=True)
    ref, rsel = pa.proxy_attention(q, k, v, dataclasses.replace(dflt, num_proxy_heads=6), return_selection=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert torch.equal(sel.indices, rsel.indices)
    other = pa.proxy_attention(q, k, v, dataclasses.replace(dflt, num_proxy_heads=1, gamma=0.5), return_selection=True)
    assert not torch.equal(other[1].counts, sel.counts)  # the config reaches the selection


def test_config_type_checked():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="ProxyAttnConfig"):
        pa.proxy_attention(q, k, v, {"gamma": 0.9})


def _varlen():
    q = torch.randn(300, 4, 64)
    k = torch.randn(300, 2, 64)
    v = torch.randn(300, 2, 64)
    return q, k, v


@pytest.mark.parametrize("cu,maxlen,exc,match", [
    (torch.tensor([0, 100, 300], dtype=torch.int64), 200, TypeError, "int32"),
    (torch.tensor([[0, 100, 300]], dtype=torch.int32), 200, ValueError, "1-D"),
    (torch.tensor([0], dtype=torch.int32), 200, ValueError, "1-D"),
    (torch.tensor([5, 100, 300], dtype=torch.int32), 200, ValueError, "start at 0"),
    (torch.tensor([0, 200, 100, 300], dtype=torch.int32), 200, ValueError, "non-decreasing"),
    (torch.tensor([0, 100, 250], dtype=torch.int32), 200, ValueError, "total token count 300"),
    (torch.tensor([0, 100, 300], dtype=torch.int32), 150, ValueError, "max_seqlen"),
])
def test_bad_cu_seqlens(cu, maxlen, exc, match):
    q, k, v = _varlen()
    with pytest.raises(exc, match=match):
        pa.proxy_attention_varlen(q, k, v, cu, cu, maxlen, maxlen, CFG)


def _cu(lengths):
    return torch.tensor([0] + list(lengths), dtype=torch.int32).cumsum(0).to(torch.int32)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("keys", [0, 90], ids=["no_keys", "90_keys"])
@pytest.mark.parametrize("at", [0, 1, 2], ids=["first", "middle", "last"])
def test_varlen_empty_sequence_leaves_the_others_as_alone(at, keys, causal):
    """A packed batch with an empty sequence (no queries; no keys, or 90) first, in the middle or
    last, on the CPU: the four stage functions and proxy_attention_varlen (sparse and dense paths)
    give each other sequence, bit for bit, what it gets alone (fixed length), and the empty one no
    rows and what the CUDA kernels write for it: scores 0, k* 0, counts 0 and indices -1 in every
    row (whatever scores and budget select_blocks is handed), density and budget_ratio 0."""
    S, hq, hkv, d = 64, 4, 2, 64
    lens = [(300, 500), (130, 130)]  # Nq < Nk, and a partial last block
    lens.insert(at, (0, keys))
    lens_q, lens_k = zip(*lens)
    q = 3 * torch.randn(sum(lens_q), hq, d)  # sharper than unit scale: sparse budgets
    k, v = torch.randn(sum(lens_k), hkv, d), torch.randn(sum(lens_k), hkv, d)
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    mq, mk = max(lens_q), max(lens_k)
    nqb, nkb = -(-mq // S), -(-mk // S)
    cfg = dataclasses.replace(CFG, gamma=0.6, min_budget=64, num_proxy_heads=2)
    var = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, block_size=S, causal=causal)
    scores = pa.proxy_block_scores(q, k, num_proxy_heads=2, max_seqlen_q=mq, max_seqlen_k=mk, **var)
    kstar = pa.head_budgets(q, k, gamma=0.6, max_seqlen_q=mq, max_seqlen_k=mk, **var)
    assert scores[at].eq(0).all() and kstar[at].eq(0).all()
    handed_s, handed_k = scores.clone(), kstar.clone()
    handed_s[at], handed_k[at] = torch.rand(2, nqb, nkb), nkb  # would select blocks in a sequence with rows
    counts, idx = pa.select_blocks(handed_s, handed_k, seqlen_q=mq, seqlen_k=mk, min_budget=64, **var)
    assert counts[at].eq(0).all() and idx[at].eq(-1).all()
    full = pa.select_blocks(scores, torch.full_like(kstar, nkb), seqlen_q=mq, seqlen_k=mk, min_budget=64, **var)
    assert int(counts.sum()) < int(full[0].sum()), "the test needs a sparse selection"
    out, lse = pa.block_sparse_attention(q, k, v, counts, idx, max_seqlen_q=mq, max_seqlen_k=mk, **var)
    got, sel = pa.proxy_attention_varlen(q, k, v, cu_q, cu_k, mq, mk, cfg, causal=causal, return_selection=True)
    dense = pa.proxy_attention_varlen(q, k, v, cu_q, cu_k, mq, mk, dataclasses.replace(cfg, dense_below=10 ** 6),
                                      causal=causal)
    assert out.shape == got.shape == dense.shape == q.shape and lse.shape == (hq, q.shape[0])
    assert torch.equal(got, out) and torch.equal(sel.counts, counts) and torch.equal(sel.indices, idx)
    assert sel.kstar[at].eq(0).all() and sel.density[at].eq(0).all() and sel.budget_ratio[at].eq(0).all()
    for j, (nq, nk) in enumerate(lens):
        if nq == 0:
            continue
        rows, keys_j = slice(int(cu_q[j]), int(cu_q[j + 1])), slice(int(cu_k[j]), int(cu_k[j + 1]))
        qa, ka, va = q[None, rows], k[None, keys_j], v[None, keys_j]
        mb, nb = -(-nq // S), -(-nk // S)
        a_scores = pa.proxy_block_scores(qa, ka, num_proxy_heads=2, block_size=S, causal=causal)
        a_kstar = pa.head_budgets(qa, ka, gamma=0.6, block_size=S, causal=causal)
        a_counts, a_idx = pa.select_blocks(a_scores, a_kstar, seqlen_q=nq, seqlen_k=nk, block_size=S, min_budget=64,
                                           causal=causal)
        a_out, a_lse = pa.block_sparse_attention(qa, ka, va, a_counts, a_idx, block_size=S, causal=causal)
        a_got, a_sel = pa.proxy_attention(qa, ka, va, cfg, causal=causal, return_selection=True)
        assert torch.equal(scores[j, :, :mb, :nb], a_scores[0]) and a_scores.gt(0).any()
        assert scores[j, :, mb:].eq(0).all() and scores[j, :, :, nb:].eq(0).all()
        assert torch.equal(kstar[j], a_kstar[0])
        assert torch.equal(counts[j, :, :mb], a_counts[0]) and counts[j, :, mb:].eq(0).all()
        assert torch.equal(idx[j, :, :mb, :nb], a_idx[0])
        assert idx[j, :, mb:].eq(-1).all() and idx[j, ..., nb:].eq(-1).all()
        assert torch.equal(out[rows], a_out[0]) and torch.equal(lse[:, rows], a_lse[0])
        assert torch.equal(got[rows], a_got[0]) and torch.isfinite(a_got).all()
        assert torch.equal(sel.density[j], a_sel.density[0])
        assert torch.equal(sel.budget_ratio[j], a_sel.budget_ratio[0])
        assert torch.equal(dense[rows], pa.proxy_attention(qa, ka, va, dataclasses.replace(cfg, dense_below=10 ** 6),
                                                           causal=causal)[0])


def test_varlen_sequence_without_keys_sees_no_key():
    """Non-causal, a sequence with queries and no keys beside an empty one: its rows see no key (out
    0, lse -inf, no block selected), the other sequence is as alone."""
    S, hq, hkv, d = 64, 4, 2, 64
    lens_q, lens_k = (70, 0, 150), (0, 0, 200)
    q, k, v = torch.randn(sum(lens_q), hq, d), torch.randn(sum(lens_k), hkv, d), torch.randn(sum(lens_k), hkv, d)
    cfg = dataclasses.replace(CFG, gamma=0.8, min_budget=64)
    out, sel = pa.proxy_attention_varlen(q, k, v, _cu(lens_q), _cu(lens_k), 150, 200, cfg, causal=False,
                                         return_selection=True)
    assert out[:70].eq(0).all() and sel.counts[:2].eq(0).all() and sel.indices[:2].eq(-1).all()
    assert sel.kstar[:2].eq(0).all() and sel.density[:2].eq(0).all()
    alone = pa.proxy_attention(q[None, 70:], k[None], v[None], cfg, causal=False)
    assert torch.equal(out[70:], alone[0]) and torch.isfinite(alone).all() and alone.abs().sum() > 0
    _, lse = pa.block_sparse_attention(q, k, v, sel.counts, sel.indices, cu_seqlens_q=_cu(lens_q),
                                       cu_seqlens_k=_cu(lens_k), max_seqlen_q=150, max_seqlen_k=200, block_size=S,
                                       causal=False)
    assert lse[:, :70].eq(-math.inf).all() and torch.isfinite(lse[:, 70:]).all()


def test_varlen_input_without_tokens_is_refused():
    """No query or no key row at all is refused on every device (a shape), as a fixed-length input with
    a zero batch or length is; empty sequences beside others are not."""
    q, k = torch.randn(0, 4, 64), torch.randn(0, 2, 64)
    cu = torch.tensor([0, 0], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"zero-length input: total_q=0, total_k=0; expected at least one of each"):
        pa.proxy_attention_varlen(q, k, k, cu, cu, 1, 1, CFG)
    with pytest.raises(ValueError, match=r"zero-length input: total_q=0, total_k=40"):
        pa.proxy_attention_varlen(q, k.new_ones(40, 2, 64), k.new_ones(40, 2, 64), cu, _cu([40]), 1, 40, CFG)
    q1 = torch.randn(10, 4, 64)
    with pytest.raises(ValueError, match=r"zero-length input: total_q=10, total_k=0"):
        pa.proxy_block_scores(q1, k, cu_seqlens_q=_cu([10]), cu_seqlens_k=cu, max_seqlen_q=10, max_seqlen_k=1,
                              causal=False)


def test_varlen_other_checks():
    q, k, v = _varlen()
    cu = torch.tensor([0, 100, 300], dtype=torch.int32)
    with pytest.raises(ValueError, match="same length"):
        pa.proxy_attention_varlen(q, k, v, cu, torch.tensor([0, 300], dtype=torch.int32), 200, 300, CFG)
    with pytest.raises(ValueError, match="rank 3"):
        pa.proxy_attention_varlen(q[None], k[None], v[None], cu, cu, 200, 200, CFG)
    with pytest.raises(TypeError, match="max_seqlen_q must be an int"):
        pa.proxy_attention_varlen(q, k, v, cu, cu, 200.0, 200, CFG)
    cu_k = torch.tensor([0, 50, 300], dtype=torch.int32)
    with pytest.raises(ValueError, match="sequence 0 has 100 queries and 50 keys"):
        pa.proxy_attention_varlen(q, k, v, cu, cu_k, 200, 250, CFG)


def test_stage_function_checks():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="stride"):
        pa.proxy_block_scores(q, k, stride=0)
    with pytest.raises(ValueError, match="num_proxy_heads=3"):
        pa.proxy_block_scores(q, k, num_proxy_heads=3)
    with pytest.raises(ValueError, match="gamma"):
        pa.head_budgets(q, k, gamma=2.0)
    scores = torch.rand(1, 1, 2, 2)
    kstar = torch.zeros(1, 4, dtype=torch.int32)
    with pytest.raises(TypeError, match="scores must be float32"):
        pa.select_blocks(scores.double(), kstar, seqlen_q=130, seqlen_k=130, block_size=128)
    with pytest.raises(ValueError, match=r"scores must have shape \[B, G, 3, 3\].*got \(1, 1, 2, 2\)"):
        pa.select_blocks(scores, kstar, seqlen_q=300, seqlen_k=300, block_size=128)
    with pytest.raises(TypeError, match="kstar must be int32"):
        pa.select_blocks(scores, kstar.long(), seqlen_q=130, seqlen_k=130, block_size=128)
    with pytest.raises(ValueError, match="min_budget"):
        pa.select_blocks(scores, kstar, seqlen_q=130, seqlen_k=130, block_size=128, min_budget=-1)
    counts = torch.ones(1, 4, 3, dtype=torch.int32)
    idx = torch.zeros(1, 4, 3, 3, dtype=torch.int32)
    with pytest.raises(TypeError, match="counts must be int32"):
        pa.block_sparse_attention(q, k, v, counts.long(), idx, block_size=64)
    with pytest.raises(ValueError, match=r"counts must have shape \(1, 4, 3\)"):
        pa.block_sparse_attention(q, k, v, counts[:, :2], idx, block_size=64)
    with pytest.raises(ValueError, match="indices must have shape"):
        pa.block_sparse_attention(q, k, v, counts, idx[0], block_size=64)
    with pytest.raises(TypeError, match="indices must be int16 or int32, got torch.int64"):
        pa.block_sparse_attention(q, k, v, counts, idx.long(), block_size=64)
    # Stage 4's scale bound (the attention kernels' range) on every device; stage 1 takes any scale.
    with pytest.raises(ValueError, match=r"softmax_scale must be at most 2.3e\+38 for attention .*got 3e\+38"):
        pa.block_sparse_attention(q, k, v, counts, idx, block_size=64, softmax_scale=3e38)
    assert torch.isfinite(pa.proxy_block_scores(q, k, softmax_scale=3e38)).all()


def test_index_dtypes_and_key_block_limit():
    """select_blocks returns int16 indices; stage 4 gives the same answer for int16 and int32 ones;
    more key blocks than int16 can number are refused before anything runs."""
    torch.manual_seed(5)
    q, k, v = torch.randn(1, 300, 4, 64), torch.randn(1, 300, 2, 64), torch.randn(1, 300, 2, 64)
    scores = pa.proxy_block_scores(q, k, block_size=64)
    kstar = pa.head_budgets(q, k, block_size=64, gamma=0.7)
    counts, idx = pa.select_blocks(scores, kstar, seqlen_q=300, seqlen_k=300, block_size=64, min_budget=0)
    assert idx.dtype == torch.int16 and counts.dtype == torch.int32
    assert pa.ops.index_dtype(32768) == torch.int16 and pa.ops.index_dtype(32769) == torch.int32
    assert int(counts.min()) >= 1 and int(counts.max()) <= 5 and (idx >= -1).all() and (idx < 5).all()
    o16, l16 = pa.block_sparse_attention(q, k, v, counts, idx, block_size=64)
    o32, l32 = pa.block_sparse_attention(q, k, v, counts, idx.int(), block_size=64)
    assert torch.equal(o16, o32) and torch.equal(l16, l32)
    big = 32768 * 64 + 1
    with pytest.raises(ValueError, match="at most 32768 key blocks"):
        pa.select_blocks(torch.zeros(1, 1, 1, 32769), torch.zeros(1, 4, dtype=torch.int32), seqlen_q=64,
                         seqlen_k=big, block_size=64)
    # The CPU kernel itself, called directly, refuses too (rather than wrap an index to a negative one).
    with pytest.raises((ValueError, RuntimeError), match="at most 32768 key blocks"):
        pa.reference.select_blocks(torch.zeros(1, 1, 1, 32769), torch.zeros(1, 4, dtype=torch.int32), None, None,
                                   64, big, 64, 1, 1, 0, True)


def test_head_budgets_key_block_limit_and_grid_limits():
    """The limits the CUDA kernels have hold on every device, so CPU and CUDA accept the same
    calls: at most 32768 key blocks for head_budgets too, 65535 sequences and 65535 query heads."""
    big = 32768 * 64 + 1
    q = torch.randn(1, 1, 2, 64)
    k = torch.randn(1, 1, 1, 64).expand(1, big, 1, 64)  # stride 0: no memory, and it passes the layout checks
    with pytest.raises(ValueError, match="at most 32768 key blocks"):
        pa.head_budgets(q, k, block_size=64)
    with pytest.raises(ValueError, match="at most 65535 sequences per call are supported, got 65536"):
        pa.proxy_block_scores(torch.randn(65536, 1, 1, 64), torch.randn(65536, 1, 1, 64))
    with pytest.raises(ValueError, match="at most 65535 query heads are supported, got 65536"):
        pa.proxy_block_scores(torch.randn(1, 1, 65536, 64), torch.randn(1, 1, 1, 64))
    cu = torch.arange(65537, dtype=torch.int32)
    with pytest.raises(ValueError, match="at most 65535 sequences per call are supported, got 65536"):
        pa.proxy_attention_varlen(torch.randn(65536, 1, 64), torch.randn(65536, 1, 64), torch.randn(65536, 1, 64),
                                  cu, cu, 1, 1, CFG)
    with pytest.raises(ValueError, match="must divide the 0 query heads"):
        pa.select_blocks(torch.rand(1, 1, 3, 3), torch.zeros(1, 0, dtype=torch.int32), seqlen_q=130, seqlen_k=130,
                         block_size=64)


def test_numbers_too_large_for_a_float_are_value_errors():
    with pytest.raises(ValueError, match="softmax_scale must be a float, got an int too large"):
        pa.ProxyAttnConfig(softmax_scale=10**400)
    with pytest.raises(ValueError, match="gamma must be a float, got an int too large"):
        pa.ProxyAttnConfig(gamma=10**400)


def test_misaligned_data_pointer_at_storage_offset_zero():
    """Alignment is the data pointer's, not the storage offset's: a tensor made from memory 2 bytes
    off a 16-byte boundary has storage offset 0 and is still refused (CUDA tensors; the rule is
    checked here on a CPU tensor through the same helper)."""
    import numpy as np

    raw = np.zeros(2 * 64 * 4 + 8, dtype=np.float16)
    start = next(i for i in range(8) if (raw[i:].ctypes.data % 16) == 2)
    t = torch.from_numpy(raw[start: start + 2 * 64 * 4]).view(1, 2, 4, 64)
    assert t.storage_offset() == 0 and t.data_ptr() % 16 == 2

    class _Cuda:  # check_aligned looks at CUDA tensors only; this one answers as one
        is_cuda, shape = True, t.shape

        def __getattr__(self, name):
            return getattr(t, name)

    with pytest.raises(ValueError, match="a data pointer 2 bytes past one"):
        pa.ops.check_aligned([("q", _Cuda())])
    pa.ops.check_aligned([("q", t.clone(memory_format=torch.contiguous_format))])


def test_serving_settings_from_env_name_the_variable(monkeypatch):
    from proxyattn.integrations._common import settings_from_env

    for raw, err, match in [("{gamma: 1}", ValueError, r"PA_CFG must be a JSON object.*'\{gamma: 1\}'"),
                            ("[1]", ValueError, "PA_CFG must be a JSON object"),
                            ('{"gama": 0.9}', ValueError, r"PA_CFG names unknown ProxyAttnConfig fields \['gama'\]"),
                            ('{"gamma": 2.0}', ValueError, r"PA_CFG='\{\"gamma\": 2.0\}': ProxyAttnConfig.gamma"),
                            ('{"stride": "4"}', TypeError, "PA_CFG=.*ProxyAttnConfig.stride must be an int"),
                            ('{"softmax_scale": 0.1}', ValueError,
                             r"PA_CFG='\{\"softmax_scale\": 0.1\}': .*softmax_scale must be None, got 0.1")]:
        monkeypatch.setenv("PA_CFG", raw)
        with pytest.raises(err, match=match):
            settings_from_env("PA_CFG", "PA_DL")
    monkeypatch.setenv("PA_CFG", '{"gamma": 0.9}')
    for raw, match in [("two", "PA_DL must be an int .*got 'two'"), ("-1", "PA_DL must be >= 0, got -1")]:
        monkeypatch.setenv("PA_DL", raw)
        with pytest.raises(ValueError, match=match):
            settings_from_env("PA_CFG", "PA_DL")
    monkeypatch.setenv("PA_DL", "2")
    s = settings_from_env("PA_CFG", "PA_DL")
    assert s.config == pa.ProxyAttnConfig(gamma=0.9) and s.dense_layers == 2


@pytest.mark.parametrize("argv,message", [
    (["--head-dim", "96"], "--head-dim: invalid choice: 96"),
    (["--seq-len", "0"], "--seq-len: must be a positive integer, got 0"),
    (["--q-heads", "8", "--kv-heads", "3"], "--q-heads (8) must be a multiple of --kv-heads (3)"),
    (["--proxy-heads", "3"], "num_proxy_heads"),
    (["--gamma", "1.5"], "gamma"),
])
def test_cli_refuses_bad_arguments_as_usage_errors(argv, message, capsys):
    """python -m proxyattn turns a bad size or config into argparse's usage error (exit 2, the
    rule in one line), before any input is built."""
    import proxyattn.__main__ as cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["--cpu"] + argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: python -m proxyattn" in err and message in err, err


@pytest.mark.parametrize("argv,cuda,sizes", [
    (["--cpu"], True, (4096, 8, 2)),  # a GPU present, the CPU asked for: the CPU's sizes
    ([], False, (4096, 8, 2)),
    (["--cpu", "--seq-len", "1024", "--q-heads", "4"], True, (1024, 4, 2)),
])
def test_cli_sizes_follow_the_device_in_use(argv, cuda, sizes, monkeypatch):
    """python -m proxyattn sizes its inputs by the device it runs on, not by whether a GPU exists:
    --cpu on a GPU machine runs the reference at the CPU's sizes (README: 4096 tokens)."""
    from unittest import mock

    import proxyattn.__main__ as cli

    seen = {}

    def inputs(b, n, hq, hkv, d, **kw):
        seen.update(sizes=(n, hq, hkv), device=kw["device"])
        raise SystemExit(0)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    with mock.patch.object(cli, "_synthetic") as synthetic:
        synthetic.return_value.make_structured_inputs.side_effect = inputs
        with pytest.raises(SystemExit):
            cli.main(argv)
    assert seen == {"sizes": sizes, "device": torch.device("cpu")}
