"""Benchmark torch.ops.proxyattn.block_sparse_attention against same-run anchors.

Anchors (DESIGN.md sections 5 and 6): SDPA flash (FA2) and cuDNN SDPA on dense causal attention
(KV expanded to Hq heads with repeat_interleave), and compiled FlexAttention fed a BlockMask built
from the same block selection (diagonal blocks partial with a causal mask_mod, the others full).
Random causal block selections keep the sink block and the diagonal block; density = computed
block pairs / causal block pairs. Cold L2 (a 256 MB buffer is rewritten before every timed run),
CUDA events, median of --reps runs after warm-up. Effective TFLOP/s counts only computed pairs:
density * 4 * D * Hq * N^2 / 2 per batch item.

  python3 bench/bench_bsa.py [--seqlens 32768 131072] [--densities 1.0 0.3 0.1] [--out PATH]
      [--orders auto heads kv:<n>] [--variants default serial pingpong stages3 nosort]
      [--masks random window split2 split4]

Writes bench/results/<card>-<yyyymmdd>-bsa.json (DESIGN.md section 6 format) and prints a table.
"""
import argparse
import contextlib
import inspect
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import proxyattn  # noqa: F401  (loads the extension)
from benchlib import l2_flush_buffer, time_cold, time_cold_interleaved, write_record


def causal_candidates(nqb, n, s, device):
    m = torch.arange(nqb, device=device)
    return ((torch.clamp((m + 1) * s, max=n) - 1) // s + 1).to(torch.int64)  # Nq == Nk


def random_causal_selection(b, h, n, s, density, gen):
    """Ascending index rows, sink and diagonal always kept, others kept with the probability that
    makes the expected density (computed / causal block pairs) equal to `density`."""
    dev = "cuda"
    nqb = (n + s - 1) // s
    c = causal_candidates(nqb, n, s, dev)
    nk = torch.arange(nqb, device=dev)
    cand = nk.view(1, -1) < c.view(-1, 1)  # [nqb, nkb]
    forced = (nk.view(1, -1) == 0) | (nk.view(1, -1) == (c - 1).view(-1, 1))
    total = cand.sum().item()
    nforced = (forced & cand).sum().item()
    p = 1.0 if density >= 1.0 else max(0.0, (density * total - nforced) / max(1, total - nforced))
    counts = torch.empty(b, h, nqb, dtype=torch.int32, device=dev)
    indices = torch.empty(b, h, nqb, nqb, dtype=torch.int32, device=dev)
    for bi in range(b):
        for hi in range(h):  # per head to keep the temporaries at nqb^2
            keep = ((torch.rand(nqb, nqb, generator=gen, device=dev) < p) | forced) & cand
            cnt = keep.sum(-1)
            key = torch.where(keep, nk.view(1, -1), nk.view(1, -1) + nqb)
            idx = key.sort(-1).values
            counts[bi, hi] = cnt.to(torch.int32)
            indices[bi, hi] = torch.where(nk.view(1, -1) < cnt.view(-1, 1), idx, -1).to(torch.int32)
    actual = counts.sum().item() / (b * h * total)
    return counts, indices, actual


def window_selection(counts, indices):
    """The same row lengths as a selection, but contiguous: the sink block and the count - 1 blocks
    that end at the row's diagonal (its last entry). Separates the cost of short rows from that of
    scattered key blocks (L2 locality)."""
    b, h, nqb, nkb = indices.shape
    last = indices.gather(-1, (counts.long() - 1).clamp(min=0).unsqueeze(-1)).long()  # diagonal block
    j = torch.arange(nkb, device=indices.device).view(1, 1, 1, -1)
    cnt = counts.long().unsqueeze(-1)
    # entry 0 is the sink (block 0), entries 1 .. cnt - 1 the blocks last - cnt + 2 .. last (ascending)
    blocks = torch.where(j == 0, torch.zeros_like(last), last - cnt + 1 + j)
    win = torch.where(j < cnt, blocks, torch.full_like(blocks, -1)).to(indices.dtype)
    assert (win[j.expand_as(win) < cnt] >= 0).all(), "window selection left the key range"
    return counts, win


def key_split_selections(counts, indices, parts):
    """The selection cut into `parts` key ranges of equal block count: for each range, every row keeps
    its blocks inside it (ascending, -1 padded). Running the parts one after another keeps each
    part's K/V working set 1/parts of a KV head's; the partial outputs would still need a merge."""
    b, h, nqb, nkb = indices.shape
    j = torch.arange(nkb, device=indices.device).view(1, 1, 1, -1)
    valid = j < counts.long().unsqueeze(-1)
    idx = indices.long()
    out = []
    for part in range(parts):
        lo, hi = part * nkb // parts, (part + 1) * nkb // parts
        keep = valid & (idx >= lo) & (idx < hi)
        key = torch.where(keep, idx, idx.new_full((), 2 * nkb)).sort(-1).values
        cnt = keep.sum(-1)
        out.append((cnt.to(counts.dtype), torch.where(j < cnt.unsqueeze(-1), key, -1).to(indices.dtype)))
    return out


def flex_block_mask(counts, indices, n, s):
    from torch.nn.attention.flex_attention import BlockMask

    b, h, nqb, nkb = indices.shape
    indices = indices.to(torch.int32)  # select_blocks writes int16; BlockMask reads int32
    # Diagonal block (the last selected entry of every row) is partial; the others are full.
    full_num = (counts - 1).clamp(min=0).contiguous()
    full_idx = indices.clamp(min=0).contiguous()  # padding entries are never read; keep them in range
    part_num = torch.ones_like(counts)
    part_idx = torch.zeros_like(indices)
    part_idx[..., 0] = torch.arange(nqb, device=indices.device, dtype=torch.int32).view(1, 1, -1)

    def causal(b_, h_, q_idx, kv_idx):
        return q_idx >= kv_idx

    extra = {}
    if "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters:
        extra["compute_q_blocks"] = False  # forward only: skip the transposed (backward) indices
    return BlockMask.from_kv_blocks(part_num, part_idx, full_num, full_idx, BLOCK_SIZE=s, mask_mod=causal,
                                    seq_lengths=(n, n), **extra)


# sm90 kernel variants (csrc/kernels/bsa_launch.h): "default" leaves the environment as it is (the
# op's own choice); any other name is a "+"-joined list of serial | overlap | pingpong | stages<2|3>
# on top of overlap with 2 stages and one CTA per work item (the 3-stage ring exists for the
# overlapped variant without pingpong only), persistent (the persistent overlapped kernel, 2 stages,
# no pingpong; the op's default), sort | nosort (PROXYATTN_BSA_SORT=1 | 0, the work order by
# selected-block count; both paths; unset otherwise, the op's own choice), and lazy<t>
# (PROXYATTN_BSA_SM90_LAZY=t, the lazy-rescaling threshold; unset otherwise).
VARIANT_ENV = ("PROXYATTN_BSA_SM90_OVERLAP", "PROXYATTN_BSA_SM90_PINGPONG", "PROXYATTN_BSA_SM90_STAGES",
               "PROXYATTN_BSA_SORT", "PROXYATTN_BSA_SM90_PERSISTENT", "PROXYATTN_BSA_SM90_LAZY")


def _is_number(text):
    try:
        float(text)
    except ValueError:
        return False
    return True


def variant_env(name):
    """Environment of a variant name: a value per VARIANT_ENV name, None for unset."""
    if name == "default":
        return {}
    env = dict(zip(VARIANT_ENV, ("1", "0", "2", None, "0", None)))
    for part in name.split("+"):
        if part == "serial":
            env["PROXYATTN_BSA_SM90_OVERLAP"] = "0"
        elif part == "overlap":
            pass
        elif part == "pingpong":
            env["PROXYATTN_BSA_SM90_PINGPONG"] = "1"
        elif part in ("stages2", "stages3"):
            env["PROXYATTN_BSA_SM90_STAGES"] = part[-1]
        elif part == "persistent":
            env["PROXYATTN_BSA_SM90_PERSISTENT"] = "1"
        elif part.startswith("lazy") and _is_number(part[4:]):
            env["PROXYATTN_BSA_SM90_LAZY"] = part[4:]
        elif part in ("sort", "nosort"):
            env["PROXYATTN_BSA_SORT"] = "1" if part == "sort" else "0"
        else:
            raise argparse.ArgumentTypeError(f"unknown sm90 variant part {part!r} in {name!r}")
    # Combinations the kernel would ignore (csrc/kernels/bsa_launch.h) would be recorded under a
    # name that does not say what ran: refuse them.
    serial = env["PROXYATTN_BSA_SM90_OVERLAP"] == "0"
    if serial and env["PROXYATTN_BSA_SM90_PINGPONG"] == "1":
        raise argparse.ArgumentTypeError(f"{name!r}: pingpong needs the overlapped kernel, not serial")
    if env["PROXYATTN_BSA_SM90_STAGES"] == "3" and (serial or env["PROXYATTN_BSA_SM90_PINGPONG"] == "1"):
        raise argparse.ArgumentTypeError(f"{name!r}: the 3-stage ring exists for the overlapped kernel without "
                                         "pingpong only")
    if env["PROXYATTN_BSA_SM90_PERSISTENT"] == "1" and (serial or env["PROXYATTN_BSA_SM90_PINGPONG"] == "1"
                                                        or env["PROXYATTN_BSA_SM90_STAGES"] == "3"):
        raise argparse.ArgumentTypeError(f"{name!r}: the persistent kernel is overlapped, 2 stages, no pingpong")
    return env


def set_env(name, value):
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


@contextlib.contextmanager
def env_vars(values):
    """Sets {name: value or None (unset)} for the block, then restores what was there."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            set_env(name, value)
        yield
    finally:
        for name, value in saved.items():
            set_env(name, value)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqlens", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.3, 0.1])
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--skip", nargs="*", default=[], help="anchors to skip: sdpa_flash sdpa_cudnn flex")
    ap.add_argument("--orders", nargs="+", default=["auto"],
                    help="CTA work orders to time (PROXYATTN_BSA_ORDER): auto (the default, recorded as bsa), "
                         "heads, kv:<n> (recorded as bsa_order_<name>)")
    ap.add_argument("--variants", nargs="+", default=["default"],
                    help="sm90 kernel variants to time on the same masks: default (the op's own choice, recorded "
                         "as bsa) or '+'-joined serial|overlap|pingpong|stages2|stages3|persistent|sort|nosort|lazy<t> "
                         "(recorded as bsa_<variant>)")
    ap.add_argument("--masks", nargs="+", default=["random"], choices=["random", "window", "split2", "split4"],
                    help="random: random causal blocks (default); window: the same row lengths as contiguous "
                         "blocks ending at the diagonal (plus the sink), recorded with the suffix _window; "
                         "split<k>: the random blocks cut into k key ranges, one call per range in sequence, "
                         "timed together without merging the partial outputs (suffix _split<k>)")
    ap.add_argument("--interleave", action="store_true",
                    help="per sequence length and density, time cuDNN's dense causal call, every bsa case and "
                         "flex with their runs interleaved (benchlib.time_cold_interleaved), so clock and thermal "
                         "drift hits each alike; cuDNN is then recorded once per density, with that density in "
                         "its field paired_density")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    try:
        envs = {v: variant_env(v) for v in args.variants}
    except argparse.ArgumentTypeError as e:
        ap.error(str(e))
    if not torch.cuda.is_available():
        sys.exit("bench_bsa.py needs a CUDA GPU")

    b, hq, hkv, d, s = 1, args.q_heads, args.kv_heads, args.head_dim, args.block_size
    dtype = torch.bfloat16
    scale = d ** -0.5
    flush = l2_flush_buffer()
    gen = torch.Generator(device="cuda").manual_seed(0)
    flex = None
    if "flex" not in args.skip:
        from torch.nn.attention.flex_attention import flex_attention
        flex = torch.compile(flex_attention, dynamic=False)

    cases = []

    def record(name, n, density, ms, **extra):
        tflops = density * 4 * d * hq * n * n / 2 * b / (ms * 1e-3) / 1e12
        cases.append({"name": name, "seq_len": n, "batch": b, "q_heads": hq, "kv_heads": hkv, "head_dim": d,
                      "dtype": "bf16", "density": round(density, 4), "ms": round(ms, 3),
                      "tflops": round(tflops, 1), **extra})
        print(f"{name:12s} N={n:7d} density={density:5.3f} {ms:10.3f} ms {tflops:7.1f} TFLOP/s", flush=True)

    for n in args.seqlens:
        reps = args.reps
        warmup = 1 if n > 65536 else 2
        q = torch.randn(b, n, hq, d, generator=gen, device="cuda", dtype=dtype)
        k = torch.randn(b, n, hkv, d, generator=gen, device="cuda", dtype=dtype)
        v = torch.randn(b, n, hkv, d, generator=gen, device="cuda", dtype=dtype)
        qt = q.transpose(1, 2)  # [B, H, N, D] views for SDPA / flex
        kt, vt = k.transpose(1, 2), v.transpose(1, 2)

        ke = ve = None
        if "sdpa_flash" not in args.skip or "sdpa_cudnn" not in args.skip:
            ke = kt.repeat_interleave(hq // hkv, dim=1)
            ve = vt.repeat_interleave(hq // hkv, dim=1)
            for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
                if name in args.skip or (args.interleave and name == "sdpa_cudnn"):
                    continue
                try:
                    with sdpa_kernel(backend):
                        ms = time_cold(lambda: F.scaled_dot_product_attention(qt, ke, ve, is_causal=True, scale=scale),
                                       reps, warmup, flush)
                    record(name, n, 1.0, ms)
                except RuntimeError as e:
                    print(f"{name}: unavailable ({str(e).splitlines()[0]})")
        cudnn = None
        if args.interleave and "sdpa_cudnn" not in args.skip:
            def cudnn():
                return F.scaled_dot_product_attention(qt, ke, ve, is_causal=True, scale=scale)
            try:
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    cudnn()
            except RuntimeError as e:
                print(f"sdpa_cudnn: unavailable ({str(e).splitlines()[0]})")
                cudnn = None

        if flex is not None:
            qf, kf, vf = qt.contiguous(), kt.contiguous(), vt.contiguous()  # [B, H, N, D]
        for target in args.densities:
            counts, indices, density = random_causal_selection(b, hq, n, s, target, gen)
            saved = {name: os.environ.get(name) for name in VARIANT_ENV + ("PROXYATTN_BSA_ORDER",)}
            timed = {}  # --interleave: label -> (fn, context factory), timed together below
            if cudnn is not None:
                timed["sdpa_cudnn"] = (cudnn, lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION))
            for mask in args.masks:
                if mask == "random":
                    sels = [(counts, indices)]
                elif mask == "window":
                    sels = [window_selection(counts, indices)]
                else:
                    sels = key_split_selections(counts, indices, int(mask[len("split"):]))
                suffix = "" if mask == "random" else f"_{mask}"

                def call(sels=sels):
                    for mc, mi in sels:
                        out = torch.ops.proxyattn.block_sparse_attention(
                            q, k, v, mc, mi, None, None, n, n, s, scale, True)
                    return out

                for order in args.orders:  # the environment is read on every call
                    for variant in args.variants:
                        env = {name: saved[name] for name in VARIANT_ENV}
                        env.update(envs[variant])
                        env["PROXYATTN_BSA_ORDER"] = saved["PROXYATTN_BSA_ORDER"] if order == "auto" else order
                        label = "bsa" if order == "auto" else f"bsa_order_{order}"
                        label = (label if variant == "default" else f"{label}_{variant}") + suffix
                        if args.interleave:
                            timed[label] = (call, lambda env=env: env_vars(env))
                        else:
                            with env_vars(env):
                                ms = time_cold(call, reps, warmup, flush)
                            record(label, n, density, ms)
            bm = None
            if flex is not None:
                try:
                    bm = flex_block_mask(counts, indices, n, s)

                    def flex_call(bm=bm):
                        return flex(qf, kf, vf, block_mask=bm, scale=scale, enable_gqa=True)
                    if args.interleave:
                        flex_call()  # compile outside the timed runs
                        timed["flex"] = (flex_call, None)
                    else:
                        record("flex", n, density, time_cold(flex_call, reps, warmup + 1, flush))
                except Exception as e:  # compile problems must not lose the other numbers
                    print(f"flex: failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            if timed:
                for label, ms in time_cold_interleaved(timed, reps, warmup, flush).items():
                    if label == "sdpa_cudnn":
                        record(label, n, 1.0, ms, paired_density=round(density, 4))
                    else:
                        record(label, n, density, ms)
            del counts, indices, bm, timed
        del q, k, v, qt, kt, vt, ke, ve
        if flex is not None:
            del qf, kf, vf
        torch.cuda.empty_cache()

    out_path = write_record(cases, "bsa", args.out)
    print(f"\n{'name':12s} {'N':>7s} {'density':>8s} {'ms':>10s} {'TFLOP/s':>8s}")
    for c in cases:
        print(f"{c['name']:12s} {c['seq_len']:7d} {c['density']:8.3f} {c['ms']:10.3f} {c['tflops']:8.1f}")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
