"""One block_sparse_attention call per (density, mask kind) for Nsight Compute.

Random causal block masks against contiguous ("window") masks with the same row lengths
(bench_bsa.py's random_causal_selection and window_selection), B=1, Hq=32, Hkv=8, D=128 (or
--head-dim 64), bf16,
N = 128k by default, so a profiler sees the cost of scattered key blocks (L2 hit rate, DRAM traffic)
separately from the cost of short rows. Kernels run in the order density x --masks.

  ncu --clock-control none --kernel-name regex:bsa_fwd_sm90 --section SpeedOfLight \\
      --section MemoryWorkloadAnalysis python3 bench/ncu_masks.py [--seq-len N] [--densities 0.3 0.1]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import proxyattn  # noqa: F401,E402  (loads the extension)
import bench_bsa as bb  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-len", type=int, default=131072)
    ap.add_argument("--densities", type=float, nargs="+", default=[0.3, 0.1])
    ap.add_argument("--head-dim", type=int, default=128, choices=[64, 128])
    ap.add_argument("--masks", nargs="+", default=["random", "window"], choices=["random", "window"])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("ncu_masks.py needs a CUDA GPU")
    n, hq, hkv, d, s = args.seq_len, 32, 8, args.head_dim, 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, n, hq, d, generator=gen, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, n, hkv, d, generator=gen, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, n, hkv, d, generator=gen, device="cuda", dtype=torch.bfloat16)
    for density in args.densities:
        counts, indices, actual = bb.random_causal_selection(1, hq, n, s, density, gen)
        for mask in args.masks:
            mc, mi = (counts, indices) if mask == "random" else bb.window_selection(counts, indices)
            torch.ops.proxyattn.block_sparse_attention(q, k, v, mc, mi, None, None, n, n, s, d ** -0.5, True)
            torch.cuda.synchronize()
            print(f"ran {mask} density {actual:.3f}", flush=True)


if __name__ == "__main__":
    main()
