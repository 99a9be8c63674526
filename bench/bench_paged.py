"""Paged K/V against contiguous K/V, in one process (issue targets: attention with pages of 128 within
3% of the contiguous kernel and pages of 16 within 10%; the estimate within 5%).

    python bench/bench_paged.py [--seq-len 131072] [--page-sizes 16 128] [--density 0.1] [--out PATH]

One sequence of --seq-len tokens (B=1, Hq=32, Hkv=8, D=128, bf16, random inputs) held both packed
(varlen, cu_seqlens) and in a paged cache whose pages are shuffled (page table of a random
permutation, so neighbouring keys are never neighbouring pages). Timed with cold L2, all cases
interleaved in shuffled rounds: stages 1 and 2 (proxy_block_scores at the default proxy heads,
head_budgets) contiguous and paged; block_sparse_attention on one random causal selection of
--density, contiguous on the portable and on the default kernel (Hopper where available), and
paged on the default choice (the Hopper kernel where available). Writes the docs/design.md section 6 record (tag
"paged"; paged cases carry their page_size).
"""
import argparse
import os

import torch

import proxyattn  # noqa: F401  (registers torch.ops.proxyattn)
from bench_bsa import random_causal_selection
from benchlib import add_head_args, causal_tflops, l2_flush_buffer, time_cold_interleaved, write_record
from proxyattn.config import default_proxy_heads

OPS = torch.ops.proxyattn


class Backend:
    """Context manager that sets PROXYATTN_BSA_BACKEND (read by the op at every call)."""

    def __init__(self, name):
        self.name, self.old = name, None

    def __enter__(self):
        self.old = os.environ.get("PROXYATTN_BSA_BACKEND")
        os.environ["PROXYATTN_BSA_BACKEND"] = self.name

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop("PROXYATTN_BSA_BACKEND", None)
        else:
            os.environ["PROXYATTN_BSA_BACKEND"] = self.old


def paged_copy(x, page_size, perm):
    """x [N, H, D] into a cache [pages, page_size, H, D]: the sequence's page j in physical page
    perm[j]; unwritten slots hold NaN."""
    n = x.shape[0]
    cache = torch.full((perm.numel(), page_size) + tuple(x.shape[1:]), float("nan"), dtype=x.dtype, device=x.device)
    pos = torch.arange(n, device=x.device)
    cache[perm[pos // page_size].long(), pos % page_size] = x
    return cache


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=131072)
    add_head_args(ap)
    ap.add_argument("--page-sizes", type=int, nargs="+", default=[16, 128])
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_paged.py needs a CUDA GPU")
    n, hq, hkv, d, S, s = a.seq_len, a.q_heads, a.kv_heads, a.head_dim, 128, 4
    G = default_proxy_heads(hq, hkv)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(n, hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(n, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(n, hkv, d, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
    scale = d ** -0.5
    counts, idx, density = random_causal_selection(1, hq, n, S, a.density,
                                                   torch.Generator(device="cuda").manual_seed(1))
    caches = {}  # page size -> (k cache, v cache, page table [1, pages]); shuffled physical pages
    for p in a.page_sizes:
        perm = torch.randperm(-(-n // p), generator=gen).to(device="cuda", dtype=torch.int32)
        caches[p] = (paged_copy(k, p, perm), paged_copy(v, p, perm), perm[None])

    def scores(kk, table=None):
        return lambda: OPS.proxy_block_scores(q, kk, cu, cu, n, n, S, G, s, scale, True, table)

    def budgets(kk, table=None):
        return lambda: OPS.head_budgets(q, kk, cu, cu, n, n, S, 0.97, 1, 1, scale, True, table)

    def bsa(kk, vv, table=None):
        return lambda: OPS.block_sparse_attention(q, kk, vv, counts, idx, cu, cu, n, n, S, scale, True, table)

    fns = {"scores": (scores(k), None), "budgets": (budgets(k), None),
           "bsa_portable": (bsa(k, v), lambda: Backend("portable")), "bsa_auto": (bsa(k, v), lambda: Backend("auto"))}
    for p, (kc, vc, table) in caches.items():
        fns[f"scores_p{p}"] = (scores(kc, table), None)
        fns[f"budgets_p{p}"] = (budgets(kc, table), None)
        fns[f"bsa_p{p}"] = (bsa(kc, vc, table), lambda: Backend("auto"))
        # Correctness on the way: the same kernels on the same keys give the same bits.
        assert torch.equal(fns[f"scores_p{p}"][0](), fns["scores"][0]()), f"page size {p}: stage 1 differs"
        assert torch.equal(fns[f"budgets_p{p}"][0](), fns["budgets"][0]()), f"page size {p}: stage 2 differs"
        with Backend("auto"):
            got = fns[f"bsa_p{p}"][0]()[0]
            want = fns["bsa_auto"][0]()[0]
        assert torch.equal(got, want), f"page size {p}: attention differs"
    ms = time_cold_interleaved(fns, reps=max(10, a.reps), flush=l2_flush_buffer())

    card = torch.cuda.get_device_name()
    base = dict(seq_len=n, batch=1, q_heads=hq, kv_heads=hkv, head_dim=d, dtype="bf16")
    flops = causal_tflops(n, n, hq, d, density=density)
    print(f"{card}  N={n} Hq={hq} Hkv={hkv} D={d} bf16, G={G}, selection density {density:.3f}")
    cases = []
    for name, t in ms.items():
        page = int(name.rsplit("_p", 1)[1]) if "_p" in name and name.rsplit("_p", 1)[1].isdigit() else None
        stage = name.split("_p")[0] if page else name
        rel = ""
        if page and stage == "bsa":  # #24's target is against the default (Hopper where available) kernel
            rel = f"  {t / ms['bsa_auto']:6.3f}x contiguous default, {t / ms['bsa_portable']:6.3f}x contiguous portable"
        elif page:
            rel = f"  {t / ms[stage]:6.3f}x contiguous"
        print(f"  {name:14s} {t:9.3f} ms{rel}")
        is_bsa = name.startswith("bsa")
        cases.append(dict(name=("bsa" if is_bsa else "estimate_" + stage) + ("_paged" if page else ""), **base,
                          density=density if is_bsa else None, ms=t,
                          tflops=flops / t / 1e9 if is_bsa else None, page_size=page,
                          backend=(name.split("_", 1)[1] if not page else "auto") if is_bsa else None))
    print(f"wrote {write_record(cases, 'paged', a.out)}")


if __name__ == "__main__":
    main()
