"""Property-based bad input: random malformed calls to every public function and op wrapper
raise TypeError/ValueError (never another exception, a crash or a wrong-shaped result)."""
import math

import pytest
import torch

import proxyattn as pa

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64, torch.bool]


@st.composite
def qkv_calls(draw):
    """Half the time a valid call, else a mostly-valid one with one or more random defects."""
    clean = draw(st.booleans())
    b = draw(st.integers(1 if clean else 0, 2))
    nq = draw(st.integers(1 if clean else 0, 200))
    nk = draw(st.integers(1 if clean else 0, 200))
    causal = draw(st.booleans())
    if clean and causal:
        nq, nk = min(nq, nk), max(nq, nk)
    hkv = draw(st.sampled_from([1, 2, 3]))
    hq = hkv * draw(st.integers(1, 3)) + (0 if clean else draw(st.sampled_from([0, 0, 0, 1])))
    d = draw(st.sampled_from([64, 128] if clean else [64, 128, 32, 96]))
    dk = d if clean else draw(st.sampled_from([d, d, d, 64, 128]))
    if clean:
        dts = [draw(st.sampled_from(DTYPES[:3]))] * 3
    else:
        dts = [draw(st.sampled_from(DTYPES[:3] if draw(st.booleans()) else DTYPES)) for _ in range(3)]
    rank_drop = None if clean else draw(st.sampled_from([None, None, None, 0, 1, 2]))
    extra_v = 0 if clean else draw(st.sampled_from([0, 0, 1]))
    shapes = [(b, nq, hq, d), (b, nk, hkv, dk), (b, nk + extra_v, hkv, dk)]
    ts = []
    for i, (shape, dt) in enumerate(zip(shapes, dts)):
        if dt.is_floating_point:
            t = torch.randn(shape).to(dt)
        else:
            t = torch.randint(0, 3, shape).to(dt)
        if not clean and draw(st.integers(0, 5)) == 0 and t.shape[-1] > 1:
            t = t[..., ::2]
        if rank_drop == i and t.dim() > 0 and t.shape[0] > 0:
            t = t[0]
        ts.append(t)
    return ts, causal


def _valid(ts, causal):
    q, k, v = ts
    if any(t.dim() != 4 for t in ts) or not (q.dtype == k.dtype == v.dtype):
        return False
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    if k.shape != v.shape or q.shape[-1] not in (64, 128) or k.shape[-1] != q.shape[-1]:
        return False
    if any(t.stride(-1) != 1 for t in ts) or q.shape[0] != k.shape[0] or q.shape[0] == 0:
        return False
    if q.shape[2] % k.shape[2] or q.shape[1] == 0 or k.shape[1] == 0:
        return False
    return not (causal and q.shape[1] > k.shape[1])


@SETTINGS
@given(qkv_calls(), st.integers(1, 4))
def test_proxy_attention_random_inputs(call, groups):
    ts, causal = call
    cfg = pa.ProxyAttnConfig(block_size=64, dense_below=0, min_budget=64)
    hq = ts[0].shape[-2] if ts[0].dim() >= 2 else 1
    hkv = ts[1].shape[-2] if ts[1].dim() >= 2 else 1
    try:
        out = pa.proxy_attention(*ts, cfg, causal=causal)
    except (TypeError, ValueError) as e:
        assert str(e), "errors must say what is wrong"
        assert not _valid(ts, causal), f"valid input rejected: {e}"
        return
    assert _valid(ts, causal), "invalid input accepted"
    assert out.shape == ts[0].shape and out.dtype == ts[0].dtype and torch.isfinite(out).all()
    del hq, hkv, groups


@SETTINGS
@given(st.dictionaries(
    st.sampled_from(["block_size", "num_proxy_heads", "stride", "gamma", "min_budget", "sink_blocks",
                     "local_blocks", "dense_below", "softmax_scale"]),
    st.one_of(st.integers(-5, 300), st.floats(allow_nan=True, allow_infinity=True), st.none(), st.text(max_size=3),
              st.booleans()),
    max_size=4))
def test_config_random_values(kw):
    try:
        cfg = pa.ProxyAttnConfig(**kw)
    except (TypeError, ValueError) as e:
        assert str(e)
        return
    assert cfg.block_size in (64, 128) and 1 <= cfg.stride <= 16 and 0 < cfg.gamma <= 1
    assert min(cfg.min_budget, cfg.sink_blocks, cfg.local_blocks, cfg.dense_below) >= 0
    assert cfg.softmax_scale is None or (math.isfinite(cfg.softmax_scale) and cfg.softmax_scale > 0)


@st.composite
def cu_seqlens_calls(draw, total=120):
    """(values, dtype, max_seqlen): half the time a valid cu_seqlens for `total` tokens (empty
    sequences included), else random values, dtype and max_seqlen."""
    if draw(st.booleans()):
        cuts = sorted(draw(st.lists(st.integers(0, total), max_size=4)))
        vals = [0, *cuts, total]
        longest = max(b - a for a, b in zip(vals[:-1], vals[1:]))
        return vals, torch.int32, draw(st.integers(longest, 150))
    return (draw(st.lists(st.integers(-3, total), min_size=0, max_size=5)),
            draw(st.sampled_from([torch.int32, torch.int64])), draw(st.integers(-1, 150)))


@SETTINGS
@given(cu_seqlens_calls())
def test_varlen_random_cu_seqlens(call):
    vals, dtype, maxlen = call
    total = 120
    q = torch.randn(total, 4, 64)
    k = torch.randn(total, 2, 64)
    cu = torch.tensor(vals, dtype=dtype)
    cfg = pa.ProxyAttnConfig(block_size=64, dense_below=0, min_budget=64)
    lens = [b - a for a, b in zip(vals[:-1], vals[1:])]
    valid = (dtype == torch.int32 and len(vals) >= 2 and vals[0] == 0 and vals[-1] == total and min(lens) >= 0
             and 1 <= max(lens) <= maxlen)
    try:
        out = pa.proxy_attention_varlen(q, k, k, cu, cu, maxlen, maxlen, cfg)
    except (TypeError, ValueError) as e:
        assert str(e)
        assert not valid, f"valid cu_seqlens {vals} (max_seqlen {maxlen}) rejected: {e}"
        return
    assert valid, "invalid cu_seqlens accepted"
    assert out.shape == q.shape and torch.isfinite(out).all()


@st.composite
def selection_shapes(draw):
    """(n, b, h, m, K, counts dtype, indices dtype): half the time the valid shapes for n tokens
    (any K >= 1, wider or narrower than the key blocks), else random ones."""
    n = draw(st.integers(1, 300))
    if draw(st.booleans()):
        return (n, 1, 2, -(-n // 64), draw(st.integers(1, 12)), torch.int32,
                draw(st.sampled_from([torch.int16, torch.int32])))
    return (n, draw(st.integers(0, 3)), draw(st.integers(0, 3)), draw(st.integers(0, 4)), draw(st.integers(0, 4)),
            draw(st.sampled_from([torch.int32, torch.int64, torch.float32])),
            draw(st.sampled_from([torch.int16, torch.int32, torch.int64, torch.float32])))


@SETTINGS
@given(selection_shapes())
def test_block_sparse_attention_random_selection_shapes(call):
    n, b, h, m, kk, cdt, idt = call
    q = torch.randn(1, n, 2, 64)
    kv = torch.randn(1, n, 1, 64)
    nkb = -(-n // 64)
    counts = torch.randint(-1, kk + 2, (b, h, m)).to(cdt)  # any count reads as clamped into [0, K]
    idx = torch.randint(-2, nkb + 2, (b, h, m, kk)).to(idt)  # entries outside [0, nkb) are ignored
    valid = (b, h, m) == (1, 2, nkb) and kk >= 1 and cdt == torch.int32 and idt in (torch.int16, torch.int32)
    try:
        out, lse = pa.block_sparse_attention(q, kv, kv, counts, idx, block_size=64)
    except (TypeError, ValueError) as e:
        assert str(e)
        assert not valid, f"valid selection shapes rejected: {e}"
        return
    assert valid, "invalid selection shapes accepted"
    assert out.shape == q.shape and lse.shape == (1, 2, n) and torch.isfinite(out).all()


def _is_int(x, low, high=None):
    return isinstance(x, int) and not isinstance(x, bool) and x >= low and (high is None or x <= high)


def _is_scale(x):
    return x is None or (isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0)


ODD_VALUES = st.one_of(st.integers(-3, 300), st.floats(allow_nan=True, allow_infinity=True), st.none(),
                       st.booleans(), st.text(max_size=2))


@SETTINGS
@given(st.fixed_dictionaries({}, optional={"block_size": st.one_of(st.sampled_from([64, 128]), ODD_VALUES),
                                           "num_proxy_heads": st.one_of(st.sampled_from([1, 2, 4]), ODD_VALUES),
                                           "stride": st.one_of(st.integers(1, 16), ODD_VALUES),
                                           "softmax_scale": st.one_of(st.floats(0.01, 1.0), ODD_VALUES),
                                           "causal": st.one_of(st.booleans(), ODD_VALUES)}))
def test_proxy_block_scores_random_arguments(kw):
    """Stage 1 keyword arguments of any type/value: accepted exactly when valid."""
    q = torch.randn(1, 130, 4, 64)
    k = torch.randn(1, 130, 2, 64)
    g = kw.get("num_proxy_heads")  # None: the config's default for Hq=4, Hkv=2, two heads per proxy
    ok = (kw.get("block_size", 128) in (64, 128) and _is_int(kw.get("block_size", 128), 64)
          and (g is None or (_is_int(g, 1) and g in (1, 2, 4))) and _is_int(kw.get("stride", 4), 1, 16)
          and _is_scale(kw.get("softmax_scale")) and isinstance(kw.get("causal", True), bool))
    try:
        sc = pa.proxy_block_scores(q, k, **kw)
    except (TypeError, ValueError) as e:
        assert str(e) and not ok, f"valid arguments rejected: {kw}: {e}"
        return
    assert ok, f"invalid arguments accepted: {kw}"
    s = kw.get("block_size", 128)
    assert sc.shape == (1, 2 if g is None else g, -(-130 // s), -(-130 // s)) and torch.isfinite(sc).all()


@SETTINGS
@given(st.fixed_dictionaries({}, optional={"gamma": st.one_of(st.floats(0.05, 1.0), ODD_VALUES),
                                           "sink_blocks": st.one_of(st.integers(0, 3), ODD_VALUES),
                                           "local_blocks": st.one_of(st.integers(0, 3), ODD_VALUES),
                                           "block_size": st.one_of(st.sampled_from([64, 128]), ODD_VALUES)}),
       st.booleans())
def test_head_budgets_and_select_random_arguments(kw, varlen):
    """Stages 2 and 3 keyword arguments of any type/value, fixed length and varlen."""
    if varlen:
        q, k = torch.randn(250, 4, 64), torch.randn(300, 2, 64)
        cu_q = torch.tensor([0, 100, 250], dtype=torch.int32)
        cu_k = torch.tensor([0, 120, 300], dtype=torch.int32)
        extra = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=150, max_seqlen_k=180)
        mq, mk, b = 150, 180, 2
    else:
        q, k = torch.randn(1, 200, 4, 64), torch.randn(1, 260, 2, 64)
        extra, mq, mk, b = {}, 200, 260, 1
    gamma = kw.get("gamma", 0.95)
    ok = (_is_int(kw.get("block_size", 128), 64) and kw.get("block_size", 128) in (64, 128)
          and isinstance(gamma, (int, float)) and not isinstance(gamma, bool) and 0 < gamma <= 1
          and _is_int(kw.get("sink_blocks", 1), 0) and _is_int(kw.get("local_blocks", 1), 0))
    try:
        ks = pa.head_budgets(q, k, **kw, **extra)
    except (TypeError, ValueError) as e:
        assert str(e) and not ok, f"valid arguments rejected: {kw}: {e}"
        return
    assert ok, f"invalid arguments accepted: {kw}"
    s = kw.get("block_size", 128)
    assert ks.shape == (b, 4) and ks.dtype == torch.int32 and (ks >= 0).all()
    scores = torch.rand(b, 1, -(-mq // s), -(-mk // s))
    sel_kw = {n: kw[n] for n in ("block_size", "sink_blocks", "local_blocks") if n in kw}
    counts, idx = pa.select_blocks(scores, ks, seqlen_q=mq, seqlen_k=mk, min_budget=0,
                                   cu_seqlens_q=extra.get("cu_seqlens_q"), cu_seqlens_k=extra.get("cu_seqlens_k"),
                                   **sel_kw)
    assert counts.shape == scores.shape[:1] + (4,) + scores.shape[2:3] and idx.shape[-1] == scores.shape[-1]
    assert ((idx >= -1) & (idx < scores.shape[-1])).all()


@SETTINGS
@given(st.lists(st.integers(0, 120), min_size=1, max_size=3), st.lists(st.integers(0, 120), min_size=1, max_size=3),
       st.booleans())
def test_varlen_per_sequence_causal_lengths(lq, lk, causal):
    """Varlen on CPU: causal needs seqlen_q <= seqlen_k in every sequence (checked on the host), and
    the call some query and some key; accepted calls behave like each sequence alone (empty ones
    included: no rows; queries without keys, non-causal: rows that see no key, out 0)."""
    n = min(len(lq), len(lk))
    lq, lk = lq[:n], lk[:n]
    cu_q = torch.tensor([0] + torch.tensor(lq).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lk).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v = torch.randn(sum(lq), 2, 64), torch.randn(sum(lk), 1, 64), torch.randn(sum(lk), 1, 64)
    cfg = pa.ProxyAttnConfig(block_size=64, dense_below=0, min_budget=64)
    valid = sum(lq) > 0 and sum(lk) > 0 and not (causal and any(a > b for a, b in zip(lq, lk)))
    try:
        out = pa.proxy_attention_varlen(q, k, v, cu_q, cu_k, max(max(lq), 1), max(max(lk), 1), cfg, causal=causal)
    except ValueError as e:
        assert not valid, str(e)
        return
    assert valid
    i = 0
    for j, (a, b) in enumerate(zip(lq, lk)):
        ks = int(cu_k[j])
        if a and not b:
            assert out[i:i + a].eq(0).all()
        elif a:
            alone = pa.proxy_attention(q[None, i:i + a], k[None, ks:ks + b], v[None, ks:ks + b], cfg, causal=causal)
            assert torch.allclose(out[i:i + a], alone[0], atol=1e-5, rtol=1e-5)
        i += a
