"""Quality benchmark: ProxyAttn vs sequence-pooling, antidiagonal (XAttention-style) and
oracle block selection on structured synthetic attention (synthetic.py, peers.py,
proxyattn.metrics).

For every sequence length: density (computed / causal block pairs), mean attention recall
(true softmax mass inside the selection), relative output error vs dense attention, and
needle retrieval, for ProxyAttn at its default config plus a gamma sweep, and a knob sweep
of each baseline. Prints a table, writes a JSON (--out) and a recall-vs-density PNG.

    PYTHONPATH=. python bench/quality.py --quick                 # CI-sized, CPU
    PYTHONPATH=. python bench/quality.py --out bench/results/quality-cpu.json
    PYTHONPATH=. python bench/quality.py --device cuda           # 32k and 128k, Hq=32, Hkv=8
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time

import torch

import peers
import synthetic
from proxyattn import metrics as M
from proxyattn.attention import dense_attention
from proxyattn.config import ProxyAttnConfig, default_proxy_heads


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seq-lens", type=int, nargs="+", help="default: 4096 8192 on CPU, 32768 131072 on CUDA")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--q-heads", type=int, help="default 8 on CPU, 32 on CUDA")
    p.add_argument("--kv-heads", type=int, help="default 2 on CPU, 8 on CUDA")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--block-size", type=int, default=128, help="block size of the sweeps and baselines")
    p.add_argument("--shares", type=float, nargs="+", default=[0.8, 1.0],
                   help="how much the heads share their focus (generator knob), one case per value")
    p.add_argument("--needles", type=int, default=4)
    p.add_argument("--hubs", type=int, default=8)
    p.add_argument("--seed", type=int, default=None, help="default: fresh random seed (printed)")
    p.add_argument("--gammas", type=float, nargs="+", default=None)
    p.add_argument("--proxy-heads", type=int, nargs="+", default=None,
                   help="num_proxy_heads of the gamma sweep (default: 1, Hkv and the config's default)")
    p.add_argument("--sweep-min-budget", type=int, default=None,
                   help="min_budget of the gamma sweep (default: one block, so the budgets alone set density)")
    p.add_argument("--taus", type=float, nargs="+", default=None,
                   help="cumulative thresholds of the pooling and antidiagonal estimators")
    p.add_argument("--oracle-densities", type=float, nargs="+", default=None)
    p.add_argument("--xattn-stride", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="N=2048, block 64, Hq=8/Hkv=2, short sweeps (CI)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/quality-<device>-<date>.json)")
    p.add_argument("--plot", default=None, help="PNG path (default: the JSON path with .png)")
    a = p.parse_args(argv)
    cuda = a.device.startswith("cuda")
    if a.quick:
        a.seq_lens = a.seq_lens or [2048]
        a.block_size = 64
        a.gammas = a.gammas or [0.9, 0.95]
        a.taus = a.taus or [0.8, 0.9, 0.95, 0.99]
        a.oracle_densities = a.oracle_densities or [0.2, 0.4]
    a.seq_lens = a.seq_lens or ([32768, 131072] if cuda else [4096, 8192])
    a.gammas = a.gammas or [0.8, 0.9, 0.95, 0.98]
    a.taus = a.taus or [0.5, 0.7, 0.8, 0.9, 0.95, 0.99]
    a.oracle_densities = a.oracle_densities or [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5]
    a.q_heads = a.q_heads or (32 if cuda else 8)
    a.kv_heads = a.kv_heads or (8 if cuda else 2)
    a.proxy_heads = a.proxy_heads or sorted({1, a.kv_heads, default_proxy_heads(a.q_heads, a.kv_heads)})
    a.dtype = a.dtype or ("bfloat16" if cuda else "float32")
    a.sweep_min_budget = a.block_size if a.sweep_min_budget is None else a.sweep_min_budget
    if a.seed is None:
        a.seed = int.from_bytes(os.urandom(4), "little")
    if a.out is None:
        card = torch.cuda.get_device_name().replace(" ", "_") if cuda else "CPU_reference"  # <card>-<date>-<tag>
        stem = f"{card}-{time.strftime('%Y%m%d')}-quality{'-quick' if a.quick else ''}"
        a.out = os.path.join("bench", "results", f"{stem}.json")
    a.plot = a.plot or os.path.splitext(a.out)[0] + ".png"
    return a


def _commit() -> str:
    if os.environ.get("PROXYATTN_COMMIT"):  # copies of the tree on a device machine (benchlib.git_commit)
        return os.environ["PROXYATTN_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _interp(xs, ys, x):
    """Linear interpolation of a curve (sorted by xs) at x; None outside its range."""
    pts = sorted(zip(xs, ys))
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def run_case(a: argparse.Namespace, n: int, share: float) -> list:
    dev, S = torch.device(a.device), a.block_size
    dtype = getattr(torch, a.dtype)
    t0 = time.perf_counter()
    q, k, v, meta = synthetic.make_structured_inputs(a.batch, n, a.q_heads, a.kv_heads, a.head_dim, share=share,
                                                     needles=a.needles, hubs=a.hubs, seed=a.seed + n, dtype=dtype,
                                                     device=dev)
    dense = dense_attention(q, k, v)
    masses = {}

    def mass(bs):
        if bs not in masses:
            masses[bs] = M.block_mass(q, k, bs)
        return masses[bs]

    def dense_needles():
        return M.needle_retrieval(dense, meta).retrieval

    print(f"\nN={n} share={share}: inputs, dense output and block masses ({time.perf_counter() - t0:.1f} s); "
          f"dense attention retrieves {dense_needles():.2f} of the needles by the threshold rule", flush=True)
    rows = []

    def record(method, knob, counts, indices, bs, extra=None):
        t = time.perf_counter()
        r = M.evaluate_selection(q, k, v, counts, indices, bs, mass=mass(bs), dense_out=dense, needles=meta)
        r.update(dict(seq_len=n, share=share, method=method, knob=knob, block_size=bs, **(extra or {})))
        rows.append(r)
        print(f"{n:>7} {method:<18} {str(knob):<22} {r['density']:7.3f} {r['recall']:7.4f} {r['recall_min_head']:7.4f}"
              f" {r['rel_error']:8.4f} {r['needle_retrieval']:7.2f}   ({time.perf_counter() - t:.1f} s)", flush=True)

    print(f"{'N':>7} {'method':<18} {'knob':<22} {'density':>7} {'recall':>7} {'minhead':>7} {'relerr':>8} {'needle':>7}")
    default = ProxyAttnConfig()
    c, i, ks = peers.proxyattn_select(q, k, default)
    record("proxyattn-default", f"G={default.proxy_heads(a.q_heads, a.kv_heads)},g={default.gamma},mb={default.min_budget}", c, i,
           default.block_size,
           {"kstar": ks.float().mean().item()})
    for G in a.proxy_heads:
        base = ProxyAttnConfig(block_size=S, min_budget=a.sweep_min_budget, num_proxy_heads=G)
        scores = peers.proxy_scores(q, k, base)
        for g in a.gammas:
            cfg = dataclasses.replace(base, gamma=g)
            c, i, ks = peers.proxyattn_select(q, k, cfg, scores=scores)
            record(f"proxyattn-G{G}", f"gamma={g},mb={cfg.min_budget}", c, i, S, {"gamma": g, "proxy_heads": G})
    for tau in a.taus:
        c, i = peers.mean_pooling_select(q, k, S, tau)
        record("mean-pooling", f"tau={tau}", c, i, S, {"tau": tau})
    for tau in a.taus:
        c, i = peers.antidiagonal_select(q, k, S, tau, stride=a.xattn_stride)
        record("antidiagonal", f"tau={tau},s={a.xattn_stride}", c, i, S, {"tau": tau})
    for d in a.oracle_densities:
        c, i = peers.oracle_select(q, k, S, target_density=d, mass=mass(S))
        record("oracle", f"density={d}", c, i, S, {"target_density": d})
    return rows


def summarise(rows: list) -> list:
    """Per (N, share): each ProxyAttn sweep point against the mean-pooling curve at equal density."""
    out = []
    for n, share in sorted({(r["seq_len"], r["share"]) for r in rows}):
        case = [r for r in rows if r["seq_len"] == n and r["share"] == share]
        pool = [r for r in case if r["method"] == "mean-pooling"]
        for r in case:
            if not r["method"].startswith("proxyattn-G"):
                continue
            pr = _interp([p["density"] for p in pool], [p["recall"] for p in pool], r["density"])
            out.append(dict(seq_len=n, share=share, method=r["method"], knob=r["knob"], density=r["density"],
                            recall=r["recall"], pooling_recall_at_density=pr,
                            advantage=None if pr is None else r["recall"] - pr))
    return out


def plot(rows: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted({r["seq_len"] for r in rows})
    shares = sorted({r["share"] for r in rows})
    methods = sorted({r["method"] for r in rows})
    fig, axes = plt.subplots(len(shares), len(ns), figsize=(5.5 * len(ns), 4.2 * len(shares)), squeeze=False)
    style = {"proxyattn-default": "*", "mean-pooling": "s--", "antidiagonal": "^--", "oracle": "k:"}
    for ax_row, share in zip(axes, shares):
        for ax, n in zip(ax_row, ns):
            for m in methods:
                pts = sorted((r["density"], r["recall"]) for r in rows
                             if r["seq_len"] == n and r["share"] == share and r["method"] == m)
                ax.plot(*zip(*pts), style.get(m, "o-"), label=m, markersize=10 if m == "proxyattn-default" else 5)
            ax.set_title(f"N = {n}, share = {share}")
            ax.set_xlabel("density (computed / causal block pairs)")
            ax.set_ylabel("mean attention recall")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    a = _parse(argv)
    print(f"device={a.device} torch={torch.__version__} seed={a.seed} Hq={a.q_heads} Hkv={a.kv_heads} "
          f"D={a.head_dim} dtype={a.dtype} block={a.block_size} shares={a.shares}", flush=True)
    rows = []
    for share in a.shares:
        for n in a.seq_lens:
            rows += run_case(a, n, share)
    summary = summarise(rows)
    print("\nProxyAttn vs mean-pooling at equal density (pooling curve interpolated):")
    for s in summary:
        pr = "n/a (outside the pooling curve)" if s["pooling_recall_at_density"] is None else \
            f"{s['pooling_recall_at_density']:.4f} (advantage {s['advantage']:+.4f})"
        print(f"  N={s['seq_len']:>7} share={s['share']} {s['method']:<13} {s['knob']:<18} density {s['density']:.3f} recall {s['recall']:.4f} vs {pr}")
    try:
        import matplotlib
    except ImportError:
        matplotlib = None
    rec = {"card": torch.cuda.get_device_name() if a.device.startswith("cuda") else "CPU_reference",
           "cpu": platform.processor() or "cpu",
           "torch": torch.__version__, "matplotlib": getattr(matplotlib, "__version__", None), "commit": _commit(),
           "args": {k: v for k, v in vars(a).items() if k not in ("out", "plot")}, "cases": rows, "summary": summary}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(rec, f, indent=1)
    if matplotlib is None:
        print(f"\nwrote {a.out} (matplotlib not importable: no plot)")
        return 0
    plot(rows, a.plot)
    print(f"\nwrote {a.out} and {a.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
