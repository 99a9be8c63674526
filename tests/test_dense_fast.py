"""proxy_attention's dense path in one C++ call (csrc/ops/dense_fast.cpp).

It must give exactly what the Python dense path gives, and step aside (return None, so the
Python path validates and decides) for anything but the plain valid dense case."""
import dataclasses

import pytest
import torch

import proxyattn as pa
from proxyattn import attention, ops

needs_ext = pytest.mark.skipif(attention._dense_fast is None, reason="proxyattn._C not built")
FAST = attention._dense_fast


def _args(q, k, v, causal=True, cfg=pa.ProxyAttnConfig()):
    return (q, k, v, causal, cfg.num_proxy_heads, cfg.softmax_scale)


@needs_ext
def test_cpu_tensors_and_junk_step_aside():
    """On the CPU (and for anything that is not three tensors) it returns None; a wrong argument
    count is a TypeError, not a crash. (Argument types on CUDA: test_fast_path_steps_aside.)"""
    q, k, v = torch.randn(1, 256, 4, 64), torch.randn(1, 256, 2, 64), torch.randn(1, 256, 2, 64)
    assert FAST(*_args(q, k, v)) is None
    assert FAST(*_args(q.bfloat16(), k.bfloat16(), v.bfloat16())) is None
    assert FAST(*_args(q.numpy(), k, v)) is None
    with pytest.raises(TypeError, match="6 arguments"):
        FAST(q, k, v)
    # the public call still runs the Python path on the CPU
    out = pa.proxy_attention(q, k, v)
    ref = ops.reference.dense_attention(q, k, v, None, None, 64 ** -0.5, True)[0]
    torch.testing.assert_close(out, ref)


def _qkv(b, nq, nk, hq, hkv, d, dtype):
    return (torch.randn(b, nq, hq, d, device="cuda", dtype=dtype),
            torch.randn(b, nk, hkv, d, device="cuda", dtype=dtype),
            torch.randn(b, nk, hkv, d, device="cuda", dtype=dtype))


CASES = [  # b, n, hq, hkv, d, dtype, causal, softmax_scale, num_proxy_heads
    (1, 1024, 32, 8, 128, torch.bfloat16, True, None, None),
    (2, 777, 8, 2, 64, torch.float16, True, None, 2),
    (1, 2048, 4, 4, 128, torch.bfloat16, False, 0.07, 1),
    (3, 100, 6, 2, 64, torch.bfloat16, True, 0.2, 6),
]


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}-n{c[1]}-h{c[2]}x{c[3]}-d{c[4]}-{c[6]}")
def test_fast_path_equals_python_path(case, monkeypatch):
    b, n, hq, hkv, d, dt, causal, scale, g = case
    q, k, v = _qkv(b, n, n, hq, hkv, d, dt)
    cfg = pa.ProxyAttnConfig(softmax_scale=scale, num_proxy_heads=g)
    calls = []

    def spy(*a):
        out = FAST(*a)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(attention, "_dense_fast", spy)
    fast = pa.proxy_attention(q, k, v, cfg, causal=causal)
    assert calls == [True]  # the public call took the C++ path
    sparse = dataclasses.replace(cfg, dense_below=n)
    pa.proxy_attention(q, k, v, sparse, causal=causal)
    # a call at dense_below keys is not handed to it, unless it has fewer queries than one block,
    # which still runs dense (docs/design.md; stated independently of ProxyAttnConfig.runs_dense)
    assert calls == ([True, True] if n < sparse.block_size else [True])
    monkeypatch.setattr(attention, "_dense_fast", None)
    slow = pa.proxy_attention(q, k, v, cfg, causal=causal)
    assert fast.shape == q.shape and fast.is_contiguous() and fast.dtype == dt
    torch.testing.assert_close(fast, slow, rtol=0, atol=0)  # the same SDPA call
    ref = ops.reference.dense_attention(q.float(), k.float(), v.float(), None, None,
                                        cfg.scale(d), causal)[0]
    torch.testing.assert_close(fast.float(), ref, rtol=2e-2, atol=2e-2)


def _misaligned(t):
    big = torch.empty(t.numel() + 8, device=t.device, dtype=t.dtype)
    out = big[4:4 + t.numel()].view(t.shape)
    out.copy_(t)
    return out


class _Sub(torch.Tensor):
    pass


@pytest.mark.gpu
@needs_ext
def test_fast_path_steps_aside():
    """Every case the Python path must see returns None from the C++ entry point."""
    q, k, v = _qkv(1, 512, 512, 8, 2, 64, torch.bfloat16)
    cfg = pa.ProxyAttnConfig()
    assert FAST(*_args(q, k, v)) is not None
    declines = {
        "misaligned q": _args(_misaligned(q), k, v),
        "fp32": _args(q.float(), k.float(), v.float()),
        "dtype mix": _args(q, k.half(), v),
        "rank 3": _args(q[0], k[0], v[0]),
        "head_dim 96": _args(*_qkv(1, 512, 512, 8, 2, 96, torch.bfloat16)),
        "heads 6/4": _args(*_qkv(1, 512, 512, 6, 4, 64, torch.bfloat16)),
        "65536 sequences": _args(*_qkv(65536, 1, 1, 1, 1, 64, torch.bfloat16)),
        "65536 query heads": _args(*_qkv(1, 1, 1, 65536, 1, 64, torch.bfloat16)),
        "strided last dim": _args(torch.randn(1, 512, 8, 128, device="cuda", dtype=torch.bfloat16)[..., ::2], k, v),
        "causal chunk": _args(q[:, :256], k, v),
        "bad grouping": _args(q, k, v, cfg=dataclasses.replace(cfg, num_proxy_heads=3)),
        "k on cpu": _args(q, k.cpu(), v),
        "subclass": _args(q.as_subclass(_Sub), k, v),
        "v shape": _args(q, k, v[:, :-1]),
        "causal not a bool": (q, k, v, 1, None, None),
        "grouping not an int": (q, k, v, True, 2.0, None),
        "scale not a number": (q, k, v, True, None, "0.1"),
    }
    for name, a in declines.items():
        assert FAST(*a) is None, name

    class Mode(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Mode():
        assert FAST(*_args(q, k, v)) is None


@pytest.mark.gpu
@needs_ext
def test_public_errors_unchanged_on_dense_lengths():
    """Bad input on the dense path still raises the documented errors (the Python path's)."""
    q, k, v = _qkv(1, 512, 512, 8, 2, 64, torch.bfloat16)
    with pytest.raises(ValueError, match="16-byte aligned"):
        pa.proxy_attention(_misaligned(q), k, v)
    with pytest.raises(ValueError, match="num_proxy_heads=3"):
        pa.proxy_attention(q, k, v, pa.ProxyAttnConfig(num_proxy_heads=3))
    with pytest.raises(TypeError, match="share one dtype"):
        pa.proxy_attention(q, k.half(), v)
    with pytest.raises(ValueError, match="seqlen_q <= seqlen_k"):
        pa.proxy_attention(q, k[:, :100], v[:, :100])
    with pytest.raises(ValueError, match="at most 65535 sequences per call are supported, got 65536"):
        pa.proxy_attention(*_qkv(65536, 1, 1, 1, 1, 64, torch.bfloat16))


@pytest.mark.gpu
@needs_ext
def test_fast_path_under_graph_capture():
    """The C++ dense path is capturable and replays the same result."""
    q, k, v = _qkv(1, 1024, 1024, 8, 2, 128, torch.bfloat16)
    eager = pa.proxy_attention(q, k, v)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        pa.proxy_attention(q, k, v)  # warm-up off the default stream
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = pa.proxy_attention(q, k, v)
    out.fill_(float("nan"))
    for t, src in ((q, torch.randn_like(q)), (k, torch.randn_like(k)), (v, torch.randn_like(v))):
        t.copy_(src)
    g.replay()
    torch.testing.assert_close(out, pa.proxy_attention(q, k, v), rtol=0, atol=0)
    assert not torch.equal(out, eager)
