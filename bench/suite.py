"""One-command benchmark suite: proxy_attention, block_sparse_attention and the anchors, one process, one card.

    python3 bench/suite.py                 # default sweep: 4k-512k, D 64 and 128, varlen (on an H200: 4k-256k 258 s, 512k alone 400 s)
    python3 bench/suite.py --quick         # N 4k and 32k, D 128, a minute or two
    python3 bench/suite.py --seq-lens 32768 131072 524288 --head-dims 128 --no-varlen

For every length N and head dim D (B = 1, q [1, N, Hq, D], k/v [1, N, Hkv, D], bf16, causal), on
structured inputs (bench/synthetic.py make_structured_inputs: sink, RoPE recency, shared hubs,
needles; so the selection's density means something), timed on the same tensors:
  sdpa_cudnn, sdpa_flash   dense causal SDPA with KV expanded to Hq heads (docs/design.md section 5)
  fa4                      flash-attn-4 dense causal (flash_attn.cute.flash_attn_func)
  proxy_attention          end to end (sparse path, dense_below = 0), with the density it chose
  estimate, estimate_*     stages 1-3 chained (timed as one call), and each stage alone
  bsa                      block_sparse_attention alone on proxy_attention's selection
  flex                     compiled FlexAttention (Triton) on the same selection as a BlockMask
  flex_flash               the same with kernel_options={"BACKEND": "FLASH"} (FA4's kernels)
  fa4_sparse               flash-attn-4 block sparsity on the same selection (bench_bsa.FA4)
fa4, flex_flash and fa4_sparse need the optional flash-attn-4 wheels (../shared/GPU.md): where
flash_attn.cute does not import they are skipped with one line saying why (and the JSON's
"skipped"); an anchor that fails to run is reported and skipped for that head dim from then on.

Outputs are checked before their timed runs (benchlib.compare_outputs: row by row, within a few bf16
ulps of the row's largest value). On every selection bsa's output, computed into poisoned memory
(benchlib.poisoned_outputs), must be finite, else the suite stops naming the case; it is compared with
the block-sparse anchors' outputs (fixed length, max_abs_diff_vs_bsa in their records), with bsa on each
sequence alone at fixed length (varlen, max_abs_diff_vs_bsa_alone), and with proxy_attention's own
output on that selection (max_abs_diff_vs_bsa in its record). FA4's dense output is compared with
cuDNN's (max_abs_diff_vs_sdpa_cudnn). A case that disagrees is printed loudly and still timed, and
both records carry disagrees: true (and disagrees_with; disagreeing_rows on the compared one).

At the --density-at lengths also bsa and the block-sparse anchors on random causal selections
(sink and diagonal kept; bench_bsa.random_causal_selection) at each --densities value, for TFLOP/s
vs density; these are the cases bench_proxyattn --stage bsa --density R reproduces. A varlen
batch (packed sequences of --varlen-split fractions of each --varlen-totals value, structured
per sequence) times proxy_attention_varlen, its estimate and bsa, and SDPA looped over the
sequences (no FA4, no flex).

Timing: cold L2 (256 MiB flush before every run), CUDA events, median of --reps >= 10 runs after
warm-up. The dense anchors of a case and proxy_attention end to end run in shuffled interleaved
rounds (benchlib.time_cold_interleaved), and so do bsa and the block-sparse anchors of each
selection, so clock drift and the card's heat hit the contenders alike; the estimate stages, a
breakdown, are timed alone (benchlib.time_cold). density = computed / causal block pairs; TFLOP/s counts computed pairs only
(dense causal: 4 * D * Hq * N^2 / 2 per sequence). Structured inputs are generated on the GPU
before each case (--gen-device cuda), or on the CPU by --gen-workers background processes while
the GPU measures (--gen-device cpu; single-threaded, minutes at 512k). Writes the docs/design.md
section 6 JSON (bench/results/<card>-<date>-suite.json unless --out) after every case, so a
killed run keeps what it measured, and at the end, with matplotlib, <json stem>-speedup.png and
<json stem>-tflops.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
if os.path.dirname(HERE) not in sys.path:
    sys.path.insert(0, os.path.dirname(HERE))

DENSE_ANCHORS = ("sdpa_cudnn", "sdpa_flash", "fa4")  # dense causal (docs/design.md section 6 names)
SPARSE_ANCHORS = ("flex", "flex_flash", "fa4_sparse")  # on the same selection as bsa
FA4_ANCHORS = ("fa4", "fa4_sparse", "flex_flash")  # need the optional flash-attn-4 wheels


def parse_args(argv=None):
    from benchlib import proxy_heads_arg
    from proxyattn.config import ProxyAttnConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--seq-lens", type=int, nargs="+", default=None,
                    help="default 4096 8192 16384 32768 65536 131072 262144 524288 (each skipped, with a note, when "
                         "free GPU memory is too small)")
    ap.add_argument("--head-dims", type=int, nargs="+", default=None, choices=[64, 128], help="default 64 128")
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--proxy-heads", type=proxy_heads_arg, nargs="+", default=[None],
                    help="num_proxy_heads values; 'default' is the config's (two query heads per proxy)")
    ap.add_argument("--gamma", type=float, default=ProxyAttnConfig().gamma)
    ap.add_argument("--min-budget", type=int, default=ProxyAttnConfig().min_budget)
    ap.add_argument("--block-size", type=int, default=128, choices=[64, 128])
    ap.add_argument("--share", type=float, default=0.8, help="make_structured_inputs share knob")
    ap.add_argument("--densities", type=float, nargs="+", default=None,
                    help="random-selection densities for bsa / flex (default 1.0 0.3 0.1 0.05)")
    ap.add_argument("--density-at", type=int, nargs="*", default=None,
                    help="lengths with the random-density sweep (default 32768 131072; must be in --seq-lens)")
    ap.add_argument("--varlen-totals", type=int, nargs="*", default=None,
                    help="total tokens of each varlen batch (default 32768 131072)")
    ap.add_argument("--varlen-split", type=float, nargs="+", default=[0.5, 0.25, 0.125, 0.125],
                    help="fractions of the total per sequence (default 0.5 0.25 0.125 0.125)")
    ap.add_argument("--no-varlen", action="store_true")
    ap.add_argument("--skip", nargs="*", default=[], choices=list(DENSE_ANCHORS + SPARSE_ANCHORS) + ["bsa", "estimate"],
                    help="measurements to skip (fa4, fa4_sparse and flex_flash are skipped anyway, with one line "
                         "saying why, where flash_attn.cute does not import)")
    ap.add_argument("--reps", type=int, default=10, help="timed runs per measurement (median; >= 10)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up runs (default 3, 1 above 64k)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gen-device", choices=["cuda", "cpu"], default="cuda",
                    help="where structured inputs are generated: on the GPU before each case (default; seconds at "
                         "512k), or on the CPU by --gen-workers processes ahead of the GPU (minutes at 512k). The "
                         "two draw different random numbers from the same distribution")
    ap.add_argument("--gen-workers", type=int, default=3,
                    help="with --gen-device cpu: processes generating inputs ahead of the GPU (0: inline)")
    ap.add_argument("--quick", action="store_true", help="N 4096 32768, D 128, one density, varlen total 32768")
    ap.add_argument("--tag", default=None, help="record tag (default suite, suite-quick with --quick, which the "
                                                "docs' tables never take for a full suite)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/<card>-<date>-<tag>.json)")
    ap.add_argument("--no-plots", action="store_true")
    a = ap.parse_args(argv)
    a.tag = a.tag or ("suite-quick" if a.quick else "suite")
    if a.quick:
        a.seq_lens = a.seq_lens or [4096, 32768]
        a.head_dims = a.head_dims or [128]
        a.densities = a.densities or [0.1]
        a.density_at = a.density_at if a.density_at is not None else [32768]
        a.varlen_totals = a.varlen_totals if a.varlen_totals is not None else [32768]
    a.seq_lens = a.seq_lens or [4096, 8192, 16384, 32768, 65536, 131072, 262144, 524288]
    a.head_dims = a.head_dims or [64, 128]
    a.densities = a.densities or [1.0, 0.3, 0.1, 0.05]
    a.density_at = a.density_at if a.density_at is not None else [32768, 131072]
    a.varlen_totals = [] if a.no_varlen else (a.varlen_totals if a.varlen_totals is not None else [32768, 131072])
    if a.reps < 10:
        ap.error("--reps must be >= 10 (docs/design.md section 5: medians of at least 10 runs)")
    if a.q_heads % a.kv_heads:
        ap.error("--q-heads must be a multiple of --kv-heads")
    if not all(0 < d <= 1 for d in a.densities):
        ap.error("--densities must lie in (0, 1]")
    if not all(0 < f for f in a.varlen_split) or sum(a.varlen_split) > 1 + 1e-9:
        ap.error("--varlen-split fractions must be positive and sum to at most 1")
    return a


# ------------------------------------------------------------------ structured inputs


def structured(lens, hq, hkv, d, share, seed, device):
    """Structured q, k, v (bf16, on `device`) per sequence length, concatenated along tokens
    ([sum N, H, D])."""
    from synthetic import make_structured_inputs

    qs, ks, vs = [], [], []
    for i, n in enumerate(lens):
        q, k, v, _ = make_structured_inputs(1, n, hq, hkv, d, share=share, seed=seed + 1000003 * i,
                                            dtype=torch.bfloat16, device=device)
        qs.append(q[0])
        ks.append(k[0])
        vs.append(v[0])
    return torch.cat(qs), torch.cat(ks), torch.cat(vs)


def _generate(batch_lens, hq, hkv, d, share, seed, path):
    """Worker (--gen-device cpu): structured(...) on the CPU, saved to `path`. Runs in a separate
    process (spawn), one CPU thread."""
    torch.set_num_threads(1)
    q, k, v = structured(batch_lens, hq, hkv, d, share, seed, "cpu")
    torch.save({"q": q, "k": k, "v": v}, path)
    return path


class InputSource:
    """Structured inputs per case: generated on the GPU just before the case (--gen-device cuda),
    or ahead by CPU worker processes (or inline)."""

    def __init__(self, cases, args):
        self.args = args
        self.dir = tempfile.mkdtemp(prefix="proxyattn-suite-")
        self.futures = {}
        self.pool = None
        if args.gen_device == "cpu" and args.gen_workers > 0:
            import multiprocessing as mp

            self.pool = ProcessPoolExecutor(max_workers=args.gen_workers, mp_context=mp.get_context("spawn"))
            for c in cases:  # submitted in run order: the first cases are ready first
                self.futures[c.key] = self.pool.submit(_generate, c.lens, args.q_heads, args.kv_heads, c.head_dim,
                                                       args.share, c.seed, os.path.join(self.dir, f"{c.key}.pt"))

    def get(self, c):
        t0 = time.time()
        if self.args.gen_device == "cuda":
            q, k, v = structured(c.lens, self.args.q_heads, self.args.kv_heads, c.head_dim, self.args.share, c.seed,
                                 "cuda")
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # the generator's fp64 temporaries
            return q, k, v, time.time() - t0
        path = os.path.join(self.dir, f"{c.key}.pt")
        if c.key in self.futures:
            self.futures.pop(c.key).result()
        else:
            _generate(c.lens, self.args.q_heads, self.args.kv_heads, c.head_dim, self.args.share, c.seed, path)
        data = torch.load(path)
        os.remove(path)
        return data["q"], data["k"], data["v"], time.time() - t0

    def close(self):
        if self.pool is not None:
            for f in self.futures.values():
                f.cancel()
            self.pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.dir, ignore_errors=True)


# ------------------------------------------------------------------ plan


@dataclasses.dataclass
class Case:
    layout: str  # "fixed" (B = 1) or "varlen"
    lens: list   # sequence lengths (one for fixed)
    head_dim: int
    seed: int
    density_sweep: bool

    @property
    def key(self):
        return f"{self.layout}-{'_'.join(map(str, self.lens))}-d{self.head_dim}"

    @property
    def total(self):
        return sum(self.lens)


def plan(a):
    cases = []
    for d in a.head_dims:
        for n in a.seq_lens:
            cases.append(Case("fixed", [n], d, a.seed + n, n in a.density_at))
        for tot in a.varlen_totals:
            lens = [max(256, int(round(tot * f))) for f in a.varlen_split]
            cases.append(Case("varlen", lens, d, a.seed + 7 * tot + 1, False))
    cases.sort(key=lambda c: (c.total, c.layout, c.head_dim))  # small first: early results, generation ahead
    return cases


def steps_of(c, a):
    """Names of the timed measurements of one case (for the progress bar). a.anchors: the anchors
    that run (set in main)."""
    fixed = c.layout == "fixed"
    s = [x for x in DENSE_ANCHORS if x in a.anchors and (fixed or x.startswith("sdpa_"))]
    sparse = ["bsa"] if "bsa" not in a.skip else []
    sparse += [x for x in SPARSE_ANCHORS if x in a.anchors and fixed]
    for _ in a.proxy_heads:
        s.append("proxy_attention")
        if "estimate" not in a.skip:
            s += ["estimate"] + (["estimate_scores", "estimate_budgets", "estimate_select"] if fixed else [])
        s += sparse
    if c.density_sweep:
        for _ in a.densities:
            s += sparse
    return s


# ------------------------------------------------------------------ progress


class Progress:
    """tqdm when importable, else a one-line text bar on stderr."""

    def __init__(self, total):
        self.total, self.done, self.t0 = total, 0, time.time()
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="run", dynamic_ncols=True, file=sys.stderr)
        except ImportError:
            self.bar = None

    def step(self, desc):
        self.done += 1
        if self.bar is not None:
            self.bar.set_description(desc)
            self.bar.update(1)
            return
        w = 30
        fill = int(w * self.done / max(1, self.total))
        el = time.time() - self.t0
        sys.stderr.write(f"\r[{'#' * fill}{'.' * (w - fill)}] {self.done}/{self.total} {el:5.0f}s {desc[:50]:50s}")
        sys.stderr.flush()

    def write(self, line):
        if self.bar is not None:
            self.bar.write(line)
        else:
            sys.stderr.write("\r" + " " * 100 + "\r")
            print(line, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        else:
            sys.stderr.write("\n")


# ------------------------------------------------------------------ measurement


def enough_memory(c, a):
    """Rough peak bytes of one case (q, out, flex copies, expanded KV, selections, masks) vs free memory."""
    n, d, hq = c.total, c.head_dim, a.q_heads
    tokens = 2 * n * hq * d * 7  # q, out, expanded k/v (2), flex q copy, SDPA out, slack
    nqb = -(-max(c.lens) // a.block_size)
    sel = 4 * hq * nqb * nqb * len(c.lens) * 6  # proxy + random selections, flex block masks
    free, _ = torch.cuda.mem_get_info()
    return tokens + sel < 0.9 * free, (tokens + sel) / 2 ** 30, free / 2 ** 30


def run_case(c, q, k, v, a, ctx, record, progress):
    import contextlib

    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import proxyattn as pa
    from bench_bsa import failure, flex_block_mask, random_causal_selection
    from bench_estimate import estimate_stage_fns
    from benchlib import (compare_outputs, poisoned_outputs, record_comparison, require_finite, time_cold,
                          time_cold_interleaved)

    OPS = torch.ops.proxyattn
    hq, hkv, d, S = a.q_heads, a.kv_heads, c.head_dim, a.block_size
    scale = d ** -0.5
    varlen = c.layout == "varlen"
    warm = a.warmup if a.warmup is not None else (3 if max(c.lens) <= 65536 else 1)
    flush = ctx["flush"]
    fa4, flex, flex_flash = ctx.get("fa4"), ctx.get("flex"), ctx.get("flex_flash")

    def timed(name, fn, warmup=warm):
        ms = time_cold(fn, a.reps, warmup, flush)
        progress.step(f"{name} {c.key}")
        return ms

    def fail(name, e):
        """An anchor that failed is not tried again at this head dim; the JSON says why."""
        ctx["failed"][name, d] = why = failure(e)
        ctx["skipped"][name] = f"D={d}: {why}"
        progress.write(f"{name}: failed at {c.key} ({why}); skipped for D={d} from here on")

    def timed_group(entries, ours=None, vs="bsa", checked=SPARSE_ANCHORS, extras=None):
        """{name: (fn, context factory or None)}: each runs once first (compiles, and shows that it runs
        at all; one that fails is dropped with its reason), then the rest are timed together in shuffled
        interleaved rounds (benchlib.time_cold_interleaved), so drift hits them alike. The first outputs of
        the entries named in `checked` are compared (benchlib.compare_outputs) with `ours`, or where ours is
        None with the output of the entry `vs`, which runs before them: the results go into `extras` ({name:
        extra record fields}, benchlib.record_comparison); one that disagrees is timed all the same. Returns
        ({name: ms}, extras)."""
        ok, extras = {}, ({} if extras is None else extras)
        ref = ours
        last = [x for x in entries if x in checked][-1:]  # after it, an entry's output is no longer needed
        for name, (fn, cm) in entries.items():
            try:
                with cm() if cm is not None else contextlib.nullcontext():
                    out = fn()
                torch.cuda.synchronize()
            except Exception as e:  # a compile or launch problem must not lose the other numbers
                progress.step(f"{name} failed")
                if name.startswith("sdpa_"):
                    progress.write(f"{name}: unavailable ({failure(e)})")
                else:
                    fail(name, e)
                continue
            ok[name] = (fn, cm)
            if ours is None and name == vs and any(x in entries for x in checked):
                ref = bnhd(name, out)
            elif name in checked and ref is not None:
                res = compare_outputs(ref, bnhd(name, out), f"{vs} at {c.key}")
                progress.write(record_comparison(extras, name, vs, res, c.key))
                if ours is None and [name] == last:
                    ref = None
            out = None
        ref = None
        if not ok:
            return {}, extras
        res = time_cold_interleaved(ok, a.reps, warm, flush)
        for name in res:
            progress.step(f"{name} {c.key}")
        return res, extras

    def usable(name):
        return name in a.anchors and (name, d) not in ctx["failed"]

    def bnhd(name, out):
        """An output in our layout: SDPA and flex write [B, H, N, D]."""
        return out.transpose(1, 2) if name in ("sdpa_cudnn", "sdpa_flash", "flex", "flex_flash") else out

    flops_dense = sum(4 * d * hq * n * n / 2 for n in c.lens)
    base = dict(seq_len=c.total, batch=len(c.lens), q_heads=hq, kv_heads=hkv, head_dim=d, dtype="bf16",
                layout=c.layout)
    if varlen:
        base["seq_lens"] = list(c.lens)
        cu = torch.tensor([0] + list(torch.tensor(c.lens).cumsum(0).tolist()), dtype=torch.int32, device="cuda")
        mx = max(c.lens)
        starts = cu.tolist()
    else:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)  # [1, N, H, D]

    # ---- dense anchors, interleaved: SDPA with KV expanded to Hq heads ([B, H, N, D] views), FA4 (fixed length)
    dense = {}
    if "sdpa_cudnn" not in a.skip or "sdpa_flash" not in a.skip:
        if varlen:
            views = []
            for b in range(len(c.lens)):
                sl = slice(starts[b], starts[b + 1])
                views.append((q[sl].transpose(0, 1).unsqueeze(0),
                              k[sl].transpose(0, 1).repeat_interleave(hq // hkv, dim=0).unsqueeze(0),
                              v[sl].transpose(0, 1).repeat_interleave(hq // hkv, dim=0).unsqueeze(0)))

            def sdpa(views=views):
                for qt, ke, ve in views:
                    F.scaled_dot_product_attention(qt, ke, ve, is_causal=True, scale=scale)
        else:
            qt = q.transpose(1, 2)
            ke = k.transpose(1, 2).repeat_interleave(hq // hkv, dim=1)
            ve = v.transpose(1, 2).repeat_interleave(hq // hkv, dim=1)

            def sdpa(qt=qt, ke=ke, ve=ve):
                return F.scaled_dot_product_attention(qt, ke, ve, is_causal=True, scale=scale)
        for name, backend in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
            if name not in a.skip:
                dense[name] = (sdpa, lambda backend=backend: sdpa_kernel(backend))
    if not varlen and usable("fa4"):
        dense["fa4"] = (lambda: fa4.dense(q, k, v, scale), None)
    # proxy_attention end to end joins the dense anchors' rounds: its ratio to them is the headline,
    # and a call timed alone runs on a cooler card than one right after a dense call of 250 ms.
    cfgs = {}
    for g in a.proxy_heads:
        cfg = pa.ProxyAttnConfig(num_proxy_heads=g, gamma=a.gamma, min_budget=a.min_budget, block_size=S,
                                 dense_below=0)
        cfgs[g] = cfg
        if varlen:
            call = lambda cfg=cfg: pa.proxy_attention_varlen(q, k, v, cu, cu, mx, mx, cfg)  # noqa: E731
        else:
            call = lambda cfg=cfg: pa.proxy_attention(q, k, v, cfg)  # noqa: E731
        dense[f"proxy_attention@{g}"] = (call, None)
    dense_res, dense_extras = timed_group(dense, vs="sdpa_cudnn", checked=("fa4",))  # FA4 against cuDNN
    for name, ms in dense_res.items():
        if not name.startswith("proxy_attention@"):
            record(name, base, 1.0, ms, flops_dense, **dense_extras.get(name, {}))
    dense_ms = dense_res.get("sdpa_cudnn")
    dense = sdpa = views = qt = ke = ve = None  # noqa: F841  (free the expanded copies)
    torch.cuda.empty_cache()

    if not varlen and (flex is not None or flex_flash is not None):
        qf, kf, vf = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # [1, H, N, D]

    def sparse_group(counts, indices):
        """bsa and the block-sparse anchors on one selection, as timed_group entries."""
        group = {}
        if "bsa" not in a.skip:
            group["bsa"] = (lambda: OPS.block_sparse_attention(q, k, v, counts, indices, cu_q, cu_k, mq, mk, S, scale,
                                                               True)[0], None)
        if varlen:
            return group
        if (usable("flex") and flex is not None) or (usable("flex_flash") and flex_flash is not None):
            try:
                bm = flex_block_mask(counts, indices, c.total, S)
                if usable("flex") and flex is not None:
                    group["flex"] = (lambda: flex(qf, kf, vf, block_mask=bm, scale=scale, enable_gqa=True), None)
                if usable("flex_flash") and flex_flash is not None:
                    group["flex_flash"] = (lambda: flex_flash(qf, kf, vf, bm, scale), None)
            except Exception as e:
                progress.write(f"flex BlockMask: failed ({failure(e)})")
        if usable("fa4_sparse"):
            try:
                bst = fa4.sparse_tensors(counts, indices, S)
                group["fa4_sparse"] = (lambda: fa4.sparse(q, k, v, bst, scale), None)
            except Exception as e:
                fail("fa4_sparse", e)
        return group

    def bsa_checked(counts, indices):
        """bsa's output on a selection, computed into poisoned memory, outside the timed runs; it must be
        finite (else benchlib.NonFiniteOutput stops the suite)."""
        with poisoned_outputs():
            out = OPS.block_sparse_attention(q, k, v, counts, indices, cu_q, cu_k, mq, mk, S, scale, True)[0]
        require_finite(out, f"bsa at {c.key}")
        return out

    def bsa_alone(counts, indices):
        """bsa on each sequence of the varlen batch alone, at fixed length ([1, n, H, D] views of its packed
        rows, its rows of the selection), into poisoned memory, concatenated like the packed rows: what the
        varlen call must equal. Each must be finite."""
        outs = []
        for i, n in enumerate(c.lens):
            rows, nqb = slice(starts[i], starts[i + 1]), -(-n // S)
            with poisoned_outputs():
                out = OPS.block_sparse_attention(q[rows].unsqueeze(0), k[rows].unsqueeze(0), v[rows].unsqueeze(0),
                                                 counts[i:i + 1, :, :nqb], indices[i:i + 1, :, :nqb], None, None, n,
                                                 n, S, scale, True)[0]
            require_finite(out, f"bsa at fixed length {n}, sequence {i} of {c.key}")
            outs.append(out[0])
        return torch.cat(outs)

    def run_sparse(counts, indices, density, flops, extra, extras=None):
        """Checks our output on one selection, then times sparse_group(counts, indices) and records it:
        bsa's output (bsa_checked) is compared with bsa on each sequence alone (varlen) and with the
        block-sparse anchors' outputs (fixed length, in timed_group). `extras` ({name: extra record
        fields}) may hold earlier checks' fields. Returns bsa's ms (None if not timed)."""
        ours = bsa_checked(counts, indices)
        extras = {} if extras is None else extras
        if varlen:
            res = compare_outputs(bsa_alone(counts, indices), ours, f"bsa alone at {c.key}")
            progress.write(record_comparison(extras, "bsa", "bsa_alone", res, c.key))
            extras.pop("bsa_alone", None)  # no record of its own
        res, extras = timed_group(sparse_group(counts, indices), ours, extras=extras)
        del ours
        for name, ms in res.items():
            record(name, base, density, ms, flops, **extra, **extras.get(name, {}))
        return res.get("bsa")

    # ---- proxy_attention end to end, estimation and attention apart, on its own selection
    for g_arg, cfg in cfgs.items():
        total = dense_res.get(f"proxy_attention@{g_arg}")
        if total is None:  # it failed in the rounds (the reason is in the record's skipped list)
            continue
        g = cfg.proxy_heads(hq, hkv)
        with poisoned_outputs():  # its output is checked against bsa's on the selection below
            if varlen:
                e2e_out, sel = pa.proxy_attention_varlen(q, k, v, cu, cu, mx, mx, cfg, return_selection=True)
                cu_q = cu_k = cu
                mq = mk = mx
            else:
                e2e_out, sel = pa.proxy_attention(q, k, v, cfg, return_selection=True)
                cu_q = cu_k = None
                mq = mk = c.total
        dens_b = sel.density.double().mean(dim=1)  # [B]: per sequence, mean over heads
        density = float((dens_b * torch.tensor(c.lens, device=dens_b.device, dtype=torch.float64) ** 2).sum()
                        / sum(n * n for n in c.lens))  # pair-weighted over the batch
        flops = float(sum(float(db) * 4 * d * hq * n * n / 2 for db, n in zip(dens_b.tolist(), c.lens)))
        extra = dict(selection="proxy", proxy_heads=g, gamma=a.gamma, min_budget=a.min_budget, share=a.share,
                     gen_device=a.gen_device)
        rec = record("proxy_attention", base, density, total, flops, **extra,
                     speedup_vs_cudnn=(round(dense_ms / total, 3) if dense_ms else None))
        # Its output (poisoned above) must be finite and equal bsa's on its selection.
        require_finite(e2e_out, f"proxy_attention at {c.key}")
        checks = {}  # name -> extra record fields
        res = compare_outputs(bsa_checked(sel.counts, sel.indices), e2e_out, f"bsa at {c.key}")
        progress.write(record_comparison(checks, "proxy_attention", "bsa", res, c.key))
        rec.update(checks.pop("proxy_attention"))
        e2e_out = None
        est_ms = None
        if "estimate" not in a.skip:
            fns = estimate_stage_fns(q, k, cu_q, cu_k, mq, mk, S, g, cfg.stride, a.gamma, a.min_budget, scale,
                                     cfg.sink_blocks, cfg.local_blocks)
            est_ms = timed("estimate", fns["estimate"])
            record("estimate", base, density, est_ms, None, **extra)
            if not varlen:
                for stage in ("estimate_scores", "estimate_budgets", "estimate_select"):
                    record(stage, base, None, timed(stage, fns[stage]), None, **extra)
            del fns
        attn_ms = run_sparse(sel.counts, sel.indices, density, flops, extra, checks)
        rec.update(estimate_ms=None if est_ms is None else round(est_ms, 4),
                   attention_ms=None if attn_ms is None else round(attn_ms, 4))
        sel = None  # free the selection before the next one

    # ---- random causal selections: TFLOP/s vs density (the bench_proxyattn --stage bsa cases)
    if c.density_sweep and not varlen:
        gen = torch.Generator(device="cuda").manual_seed(a.seed + c.total)
        cu_q = cu_k = None
        mq = mk = c.total
        for target in a.densities:
            counts, indices, density = random_causal_selection(1, hq, c.total, S, target, gen)
            run_sparse(counts, indices, density, density * flops_dense, dict(selection="random", target_density=target))
            del counts, indices


# ------------------------------------------------------------------ plots


def plots(cases, json_path, note):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        note("matplotlib not importable: no plots")
        return []
    stem = os.path.splitext(json_path)[0]
    out = []
    fixed = [c for c in cases if c.get("layout") == "fixed"]
    dims = sorted({c["head_dim"] for c in fixed})

    # speedup vs length over cuDNN (same file, same N and D)
    fig, axes = plt.subplots(1, max(1, len(dims)), figsize=(6 * max(1, len(dims)), 4.5), squeeze=False)
    for ax, d in zip(axes[0], dims):
        cudnn = {c["seq_len"]: c["ms"] for c in fixed if c["head_dim"] == d and c["name"] == "sdpa_cudnn"}
        for name, style in (("proxy_attention", "o-"), ("bsa", "s--"), ("flex", "^:"), ("flex_flash", "v:"),
                            ("fa4_sparse", "P--"), ("sdpa_flash", "x-."), ("fa4", "d-.")):
            pts = sorted((c["seq_len"], cudnn[c["seq_len"]] / c["ms"]) for c in fixed
                         if c["head_dim"] == d and c["name"] == name and c["seq_len"] in cudnn
                         and c.get("selection", "proxy") == "proxy")
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length N")
        ax.set_ylabel("speedup over cuDNN SDPA (dense causal)")
        ax.set_title(f"D={d}, B=1, structured inputs (proxy selection)")
        ax.legend()
        ax.grid(alpha=0.3)
    p = stem + "-speedup.png"
    fig.tight_layout()
    fig.savefig(p, dpi=120)
    plt.close(fig)
    out.append(p)

    # effective TFLOP/s vs density
    fig, axes = plt.subplots(1, max(1, len(dims)), figsize=(6 * max(1, len(dims)), 4.5), squeeze=False)
    for ax, d in zip(axes[0], dims):
        for i, (name, marker) in enumerate((("bsa", "o"), ("flex", "^"), ("flex_flash", "v"), ("fa4_sparse", "P"))):
            for sel, fill in (("random", "full"), ("proxy", "none")):
                pts = [(c["density"], c["tflops"]) for c in fixed if c["head_dim"] == d and c["name"] == name
                       and c.get("selection") == sel and c["tflops"]]
                if pts:
                    col = f"C{i}"
                    ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, edgecolors=col,
                               facecolors=col if fill == "full" else "none", label=f"{name} ({sel} selection)")
        for name, ls in (("sdpa_cudnn", "--"), ("sdpa_flash", ":"), ("fa4", "-.")):
            vals = [c["tflops"] for c in fixed if c["head_dim"] == d and c["name"] == name]
            if vals:
                ax.axhline(sorted(vals)[len(vals) // 2], ls=ls, color="gray", label=f"{name} dense (median)")
        ax.set_xscale("log")
        ax.set_xlabel("density (computed / causal block pairs)")
        ax.set_ylabel("effective TFLOP/s (computed pairs)")
        ax.set_title(f"D={d}, all lengths")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    p = stem + "-tflops.png"
    fig.tight_layout()
    fig.savefig(p, dpi=120)
    plt.close(fig)
    out.append(p)
    return out


# ------------------------------------------------------------------ main


def print_table(cases):
    print(f"\n{'name':17s} {'layout':6s} {'N':>8s} {'D':>4s} {'density':>8s} {'ms':>10s} {'TFLOP/s':>8s} {'vs cuDNN':>9s}")
    cudnn = {(c["layout"], c["seq_len"], c["head_dim"]): c["ms"] for c in cases if c["name"] == "sdpa_cudnn"}
    for c in cases:
        dens = "-" if c["density"] is None else f"{c['density']:.4f}"
        tf = "-" if c["tflops"] is None else f"{c['tflops']:.1f}"
        ref = cudnn.get((c["layout"], c["seq_len"], c["head_dim"]))
        ratio = f"{ref / c['ms']:.2f}x" if ref and c["name"] != "sdpa_cudnn" else "-"
        sel = c.get("selection", "")
        name = c["name"] + ("*" if sel == "random" else "")
        diff = "".join(f"  max|out-{key[len('max_abs_diff_vs_'):]}| {val}" for key, val in c.items()
                       if key.startswith("max_abs_diff_vs_"))
        if c.get("disagrees"):
            diff += "  DISAGREES with " + ", ".join(c["disagrees_with"])
        print(f"{name:17s} {c['layout']:6s} {c['seq_len']:8d} {c['head_dim']:4d} {dens:>8s} {c['ms']:10.3f} "
              f"{tf:>8s} {ratio:>9s}{diff}")
    print("* random causal selection at the target density (bench_proxyattn --stage bsa reproduces these)")


def main(argv=None):
    a = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/suite.py needs a CUDA GPU: torch.cuda.is_available() is False on this machine "
                 "(run it on an H100/H200; see /work/shared/GPU.md)")
    import proxyattn as pa

    missing = [op for op in ("proxy_block_scores", "head_budgets", "select_blocks", "block_sparse_attention")
               if not pa.cuda_kernel_available(op)]
    if missing:
        sys.exit(f"bench/suite.py: the proxyattn extension has no CUDA kernel for {missing} "
                 f"(extension error: {pa.EXTENSION_ERROR}); build it first (pip install --no-build-isolation -e .)")
    from bench_bsa import load_fa4, make_flex_flash
    from benchlib import allow_recompiles, l2_flush_buffer, write_record

    ctx = {"flush": l2_flush_buffer(), "failed": {}, "skipped": {}}
    a.anchors = {x for x in DENSE_ANCHORS + SPARSE_ANCHORS if x not in a.skip and x not in FA4_ANCHORS}
    if not all(x in a.skip for x in FA4_ANCHORS):
        ctx["fa4"], why = load_fa4()
        if ctx["fa4"] is None:
            ctx["skipped"].update({x: why for x in FA4_ANCHORS if x not in a.skip})
        else:
            a.anchors |= {x for x in FA4_ANCHORS if x not in a.skip}
    cases_plan = plan(a)
    total_steps = sum(len(steps_of(c, a)) for c in cases_plan)
    card = torch.cuda.get_device_name()
    print(f"{card}: {len(cases_plan)} cases, {total_steps} timed measurements x {a.reps} runs; "
          f"Hq={a.q_heads} Hkv={a.kv_heads} S={a.block_size} bf16 causal, proxy heads {a.proxy_heads}, "
          f"gamma {a.gamma}, min_budget {a.min_budget}", flush=True)

    if "flex" in a.anchors or "flex_flash" in a.anchors:
        from torch.nn.attention.flex_attention import flex_attention

        allow_recompiles()  # one compile per shape; never fall back to eager flex
        if "flex" in a.anchors:
            ctx["flex"] = torch.compile(flex_attention, dynamic=False)
        if "flex_flash" in a.anchors:
            ctx["flex_flash"] = make_flex_flash()

    cases = []
    progress = Progress(total_steps)

    def record(name, base, density, ms, flops, **extra):
        tflops = flops / (ms * 1e-3) / 1e12 if flops else None
        if name in FA4_ANCHORS:
            extra["fa4_version"] = ctx["fa4"].version
        rec = dict(name=name, **base, density=None if density is None else round(density, 4), ms=round(ms, 4),
                   tflops=None if tflops is None else round(tflops, 1), **extra)
        cases.append(rec)
        dens = "" if density is None else f" density {density:.4f}"
        tf = "" if tflops is None else f" {tflops:7.1f} TFLOP/s"
        sel = f" [{extra['selection']}]" if "selection" in extra else ""
        flag = "  DISAGREES with " + ", ".join(extra["disagrees_with"]) if extra.get("disagrees") else ""
        progress.write(f"{name:16s} {base['layout']:6s} N={base['seq_len']:7d} D={base['head_dim']:3d}"
                       f"{dens} {ms:10.3f} ms{tf}{sel}{flag}")
        return rec

    src = InputSource(cases_plan, a)
    t_start = time.time()
    out = a.out
    try:
        for c in cases_plan:
            ok, need, free = enough_memory(c, a)
            if not ok:
                progress.write(f"skip {c.key}: needs ~{need:.1f} GiB, {free:.1f} GiB free")
                for s in steps_of(c, a):
                    progress.step(f"skipped {c.key}")
                continue
            q, k, v, wait = src.get(c)
            if wait > 1:
                progress.write(f"{c.key}: {wait:.1f}s for structured inputs ({a.gen_device})")
            q, k, v = (t.to("cuda", non_blocking=False) for t in (q, k, v))
            try:
                run_case(c, q, k, v, a, ctx, record, progress)
            except torch.cuda.OutOfMemoryError as e:
                progress.write(f"{c.key}: out of memory ({str(e).splitlines()[0]}); continuing")
            del q, k, v
            torch.cuda.empty_cache()
            # Rewrite the record after every case, so a run that is killed keeps what it measured.
            out = write_record(cases, a.tag, out, skipped=ctx["skipped"])
    except KeyboardInterrupt:  # keep what was measured (e.g. under `timeout -s INT`)
        progress.write(f"interrupted: writing the {len(cases)} records measured so far")
    finally:
        progress.close()
        src.close()
    out = write_record(cases, a.tag, out, skipped=ctx["skipped"])
    print_table(cases)
    for name, why in ctx["skipped"].items():
        print(f"{name}: not measured ({why})")
    print(f"\n{len(cases)} records in {time.time() - t_start:.0f}s; wrote {out}")
    if not a.no_plots:
        for p in plots(cases, out, print):
            print(f"wrote {p}")


if __name__ == "__main__":
    main()
