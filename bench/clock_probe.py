"""SM clock and board power while one call runs back to back, per call kind.

Each phase repeats one call for --seconds (no L2 flush: the sustained state), while nvidia-smi
samples the SM clock, power draw and temperature every 50 ms; the script prints, per phase, the
calls' mean time, the effective TFLOP/s and the median clock and power of the samples inside the
phase. Phases: cuDNN SDPA dense causal, then block_sparse_attention on random causal masks
(bench_bsa.py's random_causal_selection) and on window masks with the same row lengths, at each
density (density 1.0: random only), with the CTA sort on and off (PROXYATTN_BSA_SORT). B=1, Hq=32,
Hkv=8, bf16.

  python3 bench/clock_probe.py [--seq-len 131072] [--head-dim 128] [--densities 1.0 0.3 0.1] [--seconds 4]

Shows whether a kernel runs slower because it gets a lower clock under the power limit (more
DRAM traffic, say) rather than because it issues more work per clock.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import proxyattn  # noqa: F401,E402  (loads the extension)
import bench_bsa as bb  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-len", type=int, default=131072)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--densities", type=float, nargs="+", default=[0.1])
    ap.add_argument("--seconds", type=float, default=4.0)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("clock_probe.py needs a CUDA GPU")
    n, hq, hkv, d, s = args.seq_len, 32, 8, args.head_dim, 128
    scale = d ** -0.5
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, n, hq, d, generator=gen, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, n, hkv, d, generator=gen, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, n, hkv, d, generator=gen, device="cuda", dtype=torch.bfloat16)
    qt, ke, ve = q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(hq // hkv, 1), v.transpose(1, 2).repeat_interleave(hq // hkv, 1)
    phases = [("sdpa_cudnn", 1.0, lambda: F.scaled_dot_product_attention(qt, ke, ve, is_causal=True, scale=scale),
               lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION))]
    for target in args.densities:
        counts, indices, dens = bb.random_causal_selection(1, hq, n, s, target, gen)
        masks = [("random", (counts, indices))]
        if target < 1.0:  # a dense selection is its own window
            masks.append(("window", bb.window_selection(counts, indices)))
        for mask, (c, i) in masks:
            for sort in ("1", "0"):
                def call(c=c, i=i):
                    return torch.ops.proxyattn.block_sparse_attention(q, k, v, c, i, None, None, n, n, s, scale, True)
                phases.append((f"bsa_{mask}_sort{sort}", dens, call,
                               lambda sort=sort: bb.env_vars({"PROXYATTN_BSA_SORT": sort})))

    log = tempfile.NamedTemporaryFile("w+", suffix=".csv", delete=False)
    smi = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu",
                            "--format=csv,noheader,nounits", "-lms", "50", "-i", str(torch.cuda.current_device())],
                           stdout=log, stderr=subprocess.DEVNULL)
    spans = []
    try:
        time.sleep(0.5)
        for name, dens, fn, ctx in phases:
            with ctx():
                fn()
                torch.cuda.synchronize()
                t0 = time.time()
                calls, start = 0, torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                while time.time() - t0 < args.seconds:
                    fn()
                    calls += 1
                    if calls % 4 == 0:
                        torch.cuda.synchronize()
                end.record()
                end.synchronize()
                t1 = time.time()
            ms = start.elapsed_time(end) / calls
            spans.append((name, dens, ms, t0, t1))
        time.sleep(0.2)
    finally:
        smi.terminate()
        smi.wait()
    samples = []
    with open(log.name) as f:
        for line in f:
            parts = [x.strip() for x in line.split(",")]
            try:
                ts = time.mktime(time.strptime(parts[0].split(".")[0], "%Y/%m/%d %H:%M:%S")) + float("0." + parts[0].split(".")[1])
                samples.append((ts, float(parts[1]), float(parts[2]), float(parts[3])))
            except (ValueError, IndexError):
                continue
    os.unlink(log.name)
    print(f"N={n} D={d} B=1 Hq={hq} Hkv={hkv} bf16, {args.seconds:.0f} s per phase, no L2 flush")
    print(f"{'phase':24s} {'density':>7s} {'ms':>9s} {'TFLOP/s':>8s} {'MHz':>6s} {'W':>6s} {'C':>4s} samples")
    for name, dens, ms, t0, t1 in spans:
        inside = [x for x in samples if t0 + 0.5 <= x[0] <= t1]  # skip the first half second
        tf = dens * 4 * d * hq * n * n / 2 / (ms * 1e-3) / 1e12
        if inside:
            mhz = statistics.median(x[1] for x in inside)
            w = statistics.median(x[2] for x in inside)
            c = statistics.median(x[3] for x in inside)
            print(f"{name:24s} {dens:7.3f} {ms:9.3f} {tf:8.1f} {mhz:6.0f} {w:6.0f} {c:4.0f} {len(inside)}")
        else:
            print(f"{name:24s} {dens:7.3f} {ms:9.3f} {tf:8.1f}   (no clock samples)")


if __name__ == "__main__":
    main()
