"""bench_proxyattn (C++, no torch) against the Python timings of the same cases, back to back on
one card.

    python3 bench/compare_binary.py --binary build/bench_proxyattn [--seq-len 131072] [--density 0.1]

Runs `bench_proxyattn --stage all` (scores, budgets, select, the estimate chain, and bsa on a
random causal selection of --density), then times the same stages in
this process with the torch ops on fresh random inputs of the same shapes (bench_estimate's
stage calls, bench_bsa's random causal selection), cold L2, median of --reps. Prints each
stage's two medians and their ratio (target: within 5%) and writes the docs/design.md section 6 JSON
(tag binary-vs-python) with both sets of cases (names prefixed `binary_` for the C++ side).
The two sides draw different random numbers, so selections differ in detail; the densities are
printed beside the times.
"""
import argparse
import subprocess
import sys

import torch

import proxyattn  # noqa: F401
from bench_bsa import random_causal_selection
from bench_estimate import estimate_stage_fns
from benchlib import causal_tflops, l2_flush_buffer, time_cold, write_record

OPS = torch.ops.proxyattn


def run_binary(a):
    cmd = [a.binary, "--stage", "all", "--seq-len", str(a.seq_len), "--density", str(a.density),
           "--proxy-heads", str(a.proxy_heads), "--gamma", str(a.gamma), "--iters", str(a.reps)]
    print("$", " ".join(cmd), flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    print(out, flush=True)
    rows = []
    for line in out.splitlines():
        f = line.split()
        if len(f) == 12 and f[0] in ("scores", "budgets", "select", "estimate", "bsa") and f[1].isdigit():
            rows.append(dict(stage=f[0], density=None if f[8] == "-" else float(f[8]), ms=float(f[9])))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", default="build/bench_proxyattn")
    ap.add_argument("--seq-len", type=int, default=131072)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--proxy-heads", type=int, default=1)
    ap.add_argument("--gamma", type=float, default=0.95)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("compare_binary.py needs a CUDA GPU")
    binary = run_binary(a)
    n, hq, hkv, d, S = a.seq_len, 32, 8, 128, 128
    g = torch.Generator(device="cuda").manual_seed(n)
    q = torch.randn(1, n, hq, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, n, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, n, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g)
    scale = d ** -0.5
    flush = l2_flush_buffer()
    fns = estimate_stage_fns(q, k, None, None, n, n, S, a.proxy_heads, 4, a.gamma, 2048, scale)
    counts, indices = fns["estimate_select"]()
    nqb = -(-n // S)
    est_density = float(counts.double().sum() / (hq * nqb * (nqb + 1) / 2))
    rc, ri, rand_density = random_causal_selection(1, hq, n, S, a.density, g)
    py = [dict(stage="scores", density=None, ms=time_cold(fns["estimate_scores"], a.reps, 3, flush)),
          dict(stage="budgets", density=None, ms=time_cold(fns["estimate_budgets"], a.reps, 3, flush)),
          dict(stage="select", density=est_density, ms=time_cold(fns["estimate_select"], a.reps, 3, flush)),
          dict(stage="estimate", density=est_density, ms=time_cold(fns["estimate"], a.reps, 3, flush))]
    ms = time_cold(lambda: OPS.block_sparse_attention(q, k, v, rc, ri, None, None, n, n, S, scale, True), a.reps, 3,
                   flush)
    py.append(dict(stage="bsa", density=rand_density, ms=ms))
    common = dict(seq_len=n, batch=1, q_heads=hq, kv_heads=hkv, head_dim=d, dtype="bf16", num_proxy_heads=a.proxy_heads)
    flops = causal_tflops(n, n, hq, d)
    cases = []
    print(f"{'stage':9s} {'binary ms':>10s} {'python ms':>10s} {'ratio':>6s}  densities (binary / python)")
    for i, p in enumerate(py):
        b = binary[i] if i < len(binary) and binary[i]["stage"] == p["stage"] else None
        for name, r in (("binary_", b), ("", p)):
            if r is not None:
                tf = flops * r["density"] / r["ms"] / 1e9 if r["stage"] == "bsa" and r["density"] else None
                cases.append(dict(name=f"{name}{'estimate_' if r['stage'] in ('scores', 'budgets', 'select') else ''}"
                                       f"{r['stage']}", **common, density=r["density"], ms=r["ms"], tflops=tf))
        if b is None:
            print(f"{p['stage']:9s} {'-':>10s} {p['ms']:10.3f}")
            continue
        fmt = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
        print(f"{p['stage']:9s} {b['ms']:10.3f} {p['ms']:10.3f} {b['ms'] / p['ms']:6.3f}  "
              f"{fmt(b['density'])} / {fmt(p['density'])}")
    print("wrote", write_record(cases, "binary-vs-python", a.out))


if __name__ == "__main__":
    main()
