"""python -m proxyattn: run proxy_attention once on structured inputs and report what it did.

On a machine without a GPU this runs the pure-PyTorch reference on the CPU at a small
default length, and says so. The inputs come from the source checkout's bench/synthetic.py
(attention sink, RoPE recency, shared hub spans, planted needles), so the selection has
structure to find; recall, needle retrieval and error (proxyattn.metrics) are measured against
dense attention. The demo needs that checkout (an editable install, `pip install -e .`).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

from . import ProxyAttnConfig, metrics, ops, proxy_attention
from .attention import dense_attention
from .config import SUPPORTED_HEAD_DIMS


def _synthetic():
    """bench/synthetic.py of the source checkout this package was installed from."""
    path = Path(__file__).resolve().parent.parent / "bench" / "synthetic.py"
    if not path.is_file():
        sys.exit(f"python -m proxyattn needs the source checkout: its structured inputs come from bench/synthetic.py, "
                 f"which is not at {path} (a non-editable install). Install with `pip install -e .` from a clone.")
    spec = importlib.util.spec_from_file_location("proxyattn_bench_synthetic", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


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


# Sizes by device (GPU, CPU): the CPU runs the pure-PyTorch reference, so smaller by default.
_SIZES = {"seq_len": (32768, 4096), "q_heads": (32, 8), "kv_heads": (8, 2)}


def _positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def main(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m proxyattn", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for name, what in (("seq_len", "tokens (query = key length)"), ("q_heads", "query heads Hq"),
                       ("kv_heads", "key/value heads Hkv")):
        gpu, cpu = _SIZES[name]
        p.add_argument("--" + name.replace("_", "-"), type=_positive, default=argparse.SUPPRESS,
                       help=f"{what} (default: {gpu} on a GPU, {cpu} on the CPU)")
    p.add_argument("--head-dim", type=int, default=128, choices=SUPPORTED_HEAD_DIMS, help="head dim D")
    dflt = ProxyAttnConfig()
    p.add_argument("--proxy-heads", type=int, default=dflt.num_proxy_heads,
                   help="num_proxy_heads; None: the config's, two query heads per proxy where possible")
    p.add_argument("--gamma", type=float, default=dflt.gamma, help="attention mass each head's budget reaches")
    p.add_argument("--min-budget", type=int, default=dflt.min_budget, help="minimum tokens per query block")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic inputs")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    a = p.parse_args(argv)
    device = torch.device("cuda" if cuda and not a.cpu else "cpu")
    for name, by_device in _SIZES.items():
        if not hasattr(a, name):
            setattr(a, name, by_device[device.type == "cpu"])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    synthetic = _synthetic()
    if a.q_heads % a.kv_heads:
        p.error(f"--q-heads ({a.q_heads}) must be a multiple of --kv-heads ({a.kv_heads})")
    try:  # the config's and the head counts' rules, as a usage error rather than a traceback
        cfg = ProxyAttnConfig(gamma=a.gamma, min_budget=a.min_budget, num_proxy_heads=a.proxy_heads, dense_below=0)
        cfg.check_heads(a.q_heads, a.kv_heads)
    except (TypeError, ValueError) as exc:
        p.error(str(exc))
    if device.type == "cpu":
        print(f"no GPU in use: running the pure-PyTorch reference on the CPU (N={a.seq_len}; slow, for checking)")
    else:
        missing = [n for n in ops.OP_NAMES if not ops.cuda_kernel_available(n)]
        print(f"GPU: {torch.cuda.get_device_name()}; stages without a CUDA kernel (run on the reference): "
              f"{missing or 'none'}")
    print(f"sparse path forced (dense_below=0) so that short lengths show the estimate's cost; proxy_attention's "
          f"default config runs dense attention below {dflt.dense_below} keys")
    q, k, v, meta = synthetic.make_structured_inputs(1, a.seq_len, a.q_heads, a.kv_heads, a.head_dim, seed=a.seed,
                                                     dtype=dtype, device=device)
    (out, sel), ms = _time(lambda: proxy_attention(q, k, v, cfg, return_selection=True), device)
    dense, dense_ms = _time(lambda: dense_attention(q, k, v), device)
    res = metrics.evaluate_selection(q, k, v, sel.counts, sel.indices, cfg.block_size, dense_out=dense, needles=meta)
    print(f"structured inputs B=1 N={a.seq_len} Hq={a.q_heads} Hkv={a.kv_heads} D={a.head_dim} {dtype}; "
          f"config gamma={a.gamma} min_budget={a.min_budget} proxy heads={cfg.proxy_heads(a.q_heads, a.kv_heads)}")
    print(f"proxy_attention: {ms:.2f} ms   dense attention: {dense_ms:.2f} ms "
          f"({'reference' if device.type == 'cpu' else 'torch SDPA'}; one run each)")
    print(f"density (computed / causal block pairs): {res['density']:.3f}")
    print(f"attention recall: mean {res['recall']:.3f}, worst head {res['recall_min_head']:.3f}; "
          f"needle retrieval {res.get('needle_retrieval')}; relative output error {res['rel_error']:.3f}")


if __name__ == "__main__":
    main()
