"""python -m proxyattn: run proxy_attention once on an example and report what it did.

On a machine without a GPU this runs the pure-PyTorch reference on the CPU at a small
default length, and says so. The example plants shared "hub" key blocks that every head
attends to, so the selection has something to find.
"""
from __future__ import annotations

import argparse
import time

import torch

from . import ProxyAttnConfig, ops, proxy_attention, reference


def _example(b, n, hq, hkv, d, dtype, device, hubs=8, block=128):
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(b, n, hq, d, generator=g)
    k = torch.randn(b, n, hkv, d, generator=g)
    v = torch.randn(b, n, hkv, d, generator=g)
    u = torch.randn(d, generator=g)
    u = u / u.norm()
    q += 2.5 * u  # every query leans towards u ...
    nkb = -(-n // block)
    for blk in torch.randperm(nkb, generator=g)[:hubs].tolist():  # ... and a few key blocks hold u
        k[:, blk * block: (blk + 1) * block] += 3.0 * u
    return (t.to(device=device, dtype=dtype) for t in (q, k, v))


def _time(fn, device):
    if device.type == "cuda":
        fn()  # warm-up: module load, handles, autotuning
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        return out, start.elapsed_time(end)
    t0 = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t0) * 1e3


def main(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m proxyattn", description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=32768 if cuda else 4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--q-heads", type=int, default=32 if cuda else 8)
    p.add_argument("--kv-heads", type=int, default=8 if cuda else 2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--gamma", type=float, default=0.95)
    p.add_argument("--min-budget", type=int, default=2048)
    p.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    a = p.parse_args(argv)
    device = torch.device("cuda" if cuda and not a.cpu else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = ProxyAttnConfig(gamma=a.gamma, min_budget=a.min_budget, dense_below=0)
    if device.type == "cpu":
        print(f"no GPU in use: running the pure-PyTorch reference on the CPU (N={a.seq_len}; slow, for checking)")
    else:
        missing = [n for n in ops.OP_NAMES if not ops.cuda_kernel_available(n)]
        print(f"GPU: {torch.cuda.get_device_name()}; stages without a CUDA kernel (run on the reference): "
              f"{missing or 'none'}")
    q, k, v = _example(a.batch, a.seq_len, a.q_heads, a.kv_heads, a.head_dim, dtype, device)
    (out, sel), ms = _time(lambda: proxy_attention(q, k, v, cfg, return_selection=True), device)
    scale = a.head_dim ** -0.5
    dense, dense_ms = _time(lambda: reference.dense_attention(q, k, v, None, None, scale, True)[0]
                            if device.type == "cpu" else proxy_attention(q, k, v, ProxyAttnConfig(dense_below=2**62)),
                            device)
    err = ((out.float() - dense.float()).norm() / dense.float().norm()).item()
    dens = sel.density.float()
    print(f"shape B={a.batch} N={a.seq_len} Hq={a.q_heads} Hkv={a.kv_heads} D={a.head_dim} {dtype}, "
          f"gamma={a.gamma}, min_budget={a.min_budget}")
    print(f"proxy_attention: {ms:.1f} ms   dense: {dense_ms:.1f} ms   ({'reference' if device.type == 'cpu' else 'dense path'})")
    print(f"density (computed / causal block pairs): mean {dens.mean().item():.3f}, "
          f"min {dens.min().item():.3f}, max {dens.max().item():.3f}")
    print(f"relative output error vs dense: {err:.2e}")


if __name__ == "__main__":
    main()
