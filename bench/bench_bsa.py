"""Benchmark torch.ops.proxyattn.block_sparse_attention against same-run anchors.

Anchors (docs/design.md sections 5 and 6), all on the same inputs in the same process:
  sdpa_flash, sdpa_cudnn  dense causal SDPA (KV expanded to Hq heads with repeat_interleave)
  fa4                     flash-attn-4 dense causal (flash_attn.cute.flash_attn_func, native GQA)
  flex                    compiled FlexAttention (Triton) on a BlockMask of the same selection
                          (diagonal blocks partial with a causal mask_mod, the others full)
  flex_flash              the same FlexAttention call with kernel_options={"BACKEND": "FLASH"}
                          (FA4's kernels through torch)
  fa4_sparse              flash-attn-4 block sparsity on the same selection (BlockSparseTensorsTorch:
                          diagonal blocks as masked blocks, the others as full blocks, causal=True)
fa4, flex_flash and fa4_sparse need the optional flash-attn-4 wheels (../shared/GPU.md); where
flash_attn.cute does not import they are skipped with one line saying why. Each anchor is set up in
its own try/except: one that fails is reported and the others still run.

Outputs are checked before their timed runs (benchlib.compare_outputs: row by row, within a few bf16
ulps of the row's largest value). On every random selection our output (the first --backends entry,
computed into poisoned memory, benchlib.poisoned_outputs) must be finite, else the run stops naming
the case; the other backends' outputs and the block-sparse anchors' (flex, flex_flash, fa4_sparse) are
compared with it (max_abs_diff_vs_bsa in their records). Per length FA4's dense output is compared
with cuDNN's (max_abs_diff_vs_sdpa_cudnn). A case that disagrees is printed loudly and still timed;
both records carry disagrees: true (and disagrees_with; disagreeing_rows on the compared one).

Random causal block selections keep the sink block and the diagonal block; density = computed
block pairs / causal block pairs. Cold L2 (a 256 MB buffer is rewritten before every timed run),
CUDA events, median of --reps >= 10 runs after warm-up. By default the kernels of one length and
density run in shuffled interleaved rounds (--no-interleave: each timed alone, one after another);
the record's meta holds reps, the warm-up runs per length and whether the rounds were interleaved.
Effective TFLOP/s counts only computed pairs: density * 4 * D * Hq * N^2 / 2 per batch item.
--backends also times our kernel with PROXYATTN_BSA_BACKEND=portable or hopper (records
bsa_portable, bsa_hopper; `auto`, the default, leaves the variable as it is and records bsa).

  python3 bench/bench_bsa.py [--seqlens 32768 131072] [--densities 1.0 0.3 0.1] [--out PATH]
      [--backends auto portable] [--masks random window split2 split4] [--no-interleave]
      [--head-dims 128 64] [--reps 10]

Writes bench/results/<card>-<yyyymmdd>-bsa.json (docs/design.md section 6 format) and prints a table.
"""
import argparse
import contextlib
import inspect
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchlib import (add_head_args, allow_recompiles, compare_outputs, l2_flush_buffer, poisoned_outputs,
                      record_comparison, require_finite, time_cold, time_cold_interleaved, write_record)

BACKEND_ENV = "PROXYATTN_BSA_BACKEND"  # auto | portable | hopper: the op's one kernel switch
FA4_ANCHORS = ("fa4", "fa4_sparse", "flex_flash")


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


def _causal(b_, h_, q_idx, kv_idx):
    """FlexAttention mask_mod of the partial (diagonal) blocks. One module-level function, so a
    compiled flex call is not recompiled for every new BlockMask."""
    return q_idx >= kv_idx


def flex_block_mask(counts, indices, n, s):
    """FlexAttention BlockMask of a causal selection (Nq == Nk = n): the diagonal block (the last
    selected entry of every row) partial with a causal mask_mod, the others full."""
    from torch.nn.attention.flex_attention import BlockMask

    b, h, nqb, nkb = indices.shape
    indices = indices.to(torch.int32)  # select_blocks writes int16; BlockMask reads int32
    full_num = (counts - 1).clamp(min=0).contiguous()
    full_idx = indices.clamp(min=0).contiguous()  # padding entries are never read; keep them in range
    part_num = torch.ones_like(counts)
    part_idx = torch.zeros_like(indices)
    part_idx[..., 0] = torch.arange(nqb, device=indices.device, dtype=torch.int32).view(1, 1, -1)
    extra = {}
    if "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters:
        extra["compute_q_blocks"] = False  # forward only: skip the transposed (backward) indices
    return BlockMask.from_kv_blocks(part_num, part_idx, full_num, full_idx, BLOCK_SIZE=s, mask_mod=_causal,
                                    seq_lengths=(n, n), **extra)


# ------------------------------------------------------------------ FlashAttention-4 anchors
#
# Read from flash-attn-4 4.0.0b36 (the wheel ../shared/tools/fa4-prep.sh fetches), flash_attn/cute/:
# - interface.py: flash_attn_func(q, k, v, qv=None, gather_kv_indices=None, softmax_scale=None,
#   causal=False, ..., block_sparse_tensors=None, ..., return_lse=False) -> (out, lse); q [B, N, Hq, D],
#   k/v [B, N, Hkv, D] (our layout, GQA native); lse is None unless asked for.
# - block_sparsity.py: BlockSparseTensorsTorch(mask_block_cnt, mask_block_idx, full_block_cnt=None,
#   full_block_idx=None, cu_total_m_blocks=None, cu_block_idx_offsets=None, block_size=None, ...):
#   counts int32 CUDA [B, H, M], indices int32 CUDA [B, H, M, <= N] (entries 0..cnt-1 are read, so
#   the last dim may be compact), H = Hq (or 1, broadcast), M = ceil(Nq / block_size[0]),
#   N = ceil(Nk / block_size[1]); block_size (q, kv) must be a multiple of the kernel's tile: on
#   sm90 128 x 128 for D = 128 (tile_m 192 for D = 64 unless the sparse q block is not a multiple of
#   192, then 128; 64-token blocks shrink the tiles to 64). "mask" blocks get the mask (causal
#   here, with causal=True), "full" blocks none; per-head (H = Hq) tensors turn pack_gqa off.
# - torch 2.14's FlexAttention FLASH backend (torch/_inductor/kernel/flex/flex_flash_attention.py,
#   templates/flash_attention.py.jinja) lowers a compiled flex_attention call with
#   kernel_options={"BACKEND": "FLASH"} to the same _flash_attn_fwd with the BlockMask's kv blocks
#   (partial blocks as mask blocks with the mask_mod, causal=False); it raises RuntimeError when
#   flash_attn.cute is not importable, and GQA goes through enable_gqa=True (FA4's native GQA).
# Checked on an H200 (torch 2.11, flash-attn-4 4.0.0b36, Hq=32, Hkv=8, bf16, N=4096, random causal
# selection of density 0.3, D=128 and 64): fa4 within 0.004 of SDPA; fa4_sparse, flex_flash and flex
# all within 0.016 (one bf16 step) of proxyattn.reference.block_sparse_attention.


class FA4:
    """flash_attn.cute's entry points (flash_attn_func, BlockSparseTensorsTorch) and version."""

    def __init__(self):
        from flash_attn.cute import flash_attn_func
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

        self.func, self.BlockSparseTensorsTorch = flash_attn_func, BlockSparseTensorsTorch
        try:
            from importlib.metadata import version

            self.version = version("flash-attn-4")
        except Exception:  # a source tree on PYTHONPATH has no distribution metadata
            self.version = "unknown"

    def dense(self, q, k, v, scale):
        """Dense causal attention, q [B, N, Hq, D], k/v [B, N, Hkv, D] -> out like q."""
        res = self.func(q, k, v, softmax_scale=scale, causal=True)
        return res[0] if isinstance(res, tuple) else res

    def sparse_tensors(self, counts, indices, block):
        """BlockSparseTensorsTorch of a causal selection (Nq == Nk): each row's last selected entry
        (its diagonal block) as the one masked block, the others as full blocks."""
        cnt = counts.to(torch.int32)
        width = max(1, int(cnt.max()))  # compact index rows (FA4 reads entries 0..cnt-1 only)
        idx = indices[..., :width].to(torch.int32)
        last = idx.gather(-1, (cnt.long() - 1).clamp(min=0).unsqueeze(-1))  # [B, Hq, nqb, 1]
        fields = dict(mask_block_cnt=(cnt > 0).to(torch.int32).contiguous(), mask_block_idx=last.contiguous(),
                      full_block_cnt=(cnt - 1).clamp(min=0).contiguous(), full_block_idx=idx.clamp(min=0).contiguous())
        if "block_size" in self.BlockSparseTensorsTorch._fields:
            fields["block_size"] = (block, block)
        return self.BlockSparseTensorsTorch(**fields)

    def sparse(self, q, k, v, tensors, scale):
        """FA4's block-sparse kernel with causal=True: it applies the causal mask to the full blocks
        too (flash_fwd_sm90.py passes mask_causal to every block), so this anchor is a little slower
        than FA4's sparse kernel can be; flex_flash (FA4's kernel with the mask applied to partial
        blocks only) is the fair block-sparse bar."""
        res = self.func(q, k, v, softmax_scale=scale, causal=True, block_sparse_tensors=tensors)
        return res[0] if isinstance(res, tuple) else res


def load_fa4(note=print):
    """(FA4, None) if flash_attn.cute imports, else (None, reason) after one line (via `note`) saying why."""
    try:
        fa4 = FA4()
    except Exception as e:  # ImportError, or the CuTe DSL failing to load
        why = f"flash_attn.cute does not import: {failure(e)}"
        note(f"{', '.join(FA4_ANCHORS)}: skipped ({why})")
        return None, why
    note(f"flash-attn-4 {fa4.version}: timing {', '.join(FA4_ANCHORS)}")
    return fa4, None


def make_flex_flash():
    """Compiled FlexAttention with the FLASH backend: fn(q, k, v, block_mask, scale) on [B, H, N, D]."""
    from torch.nn.attention.flex_attention import flex_attention

    def flex_flash(q, k, v, block_mask, scale):
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True,
                              kernel_options={"BACKEND": "FLASH"})

    return torch.compile(flex_flash, dynamic=False)


def failure(e):
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


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


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqlens", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.3, 0.1])
    add_head_args(ap)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--reps", type=int, default=10, help="timed runs per measurement (median; >= 10)")
    ap.add_argument("--skip", nargs="*", default=[],
                    choices=["sdpa_flash", "sdpa_cudnn", "flex", "flex_flash", "fa4", "fa4_sparse"],
                    help="anchors to skip")
    ap.add_argument("--backends", nargs="+", default=["auto"], choices=["auto", "portable", "hopper"],
                    help=f"our kernel under {BACKEND_ENV}: auto leaves the variable as it is (recorded as bsa), "
                         "portable / hopper set it around the call (recorded as bsa_portable / bsa_hopper); the "
                         "first one's output is the one the others and the anchors are compared with")
    ap.add_argument("--masks", nargs="+", default=["random"], choices=["random", "window", "split2", "split4"],
                    help="random: random causal blocks (default); window: the same row lengths as contiguous "
                         "blocks ending at the diagonal (plus the sink), recorded with the suffix _window; "
                         "split<k>: the random blocks cut into k key ranges, one call per range in sequence, "
                         "timed together without merging the partial outputs (suffix _split<k>). The records "
                         "of a mask other than random say which in their field mask (the anchors run on "
                         "the random one)")
    ap.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=True,
                    help="per sequence length and density, time the dense anchors (cuDNN, FA4), every bsa case and "
                         "the block-sparse anchors with their runs interleaved (benchlib.time_cold_interleaved), so "
                         "clock and thermal drift hits each alike; the dense anchors are then recorded once per "
                         "density, with that density in their field paired_density (default; --no-interleave "
                         "times each alone, the dense anchors once per length)")
    ap.add_argument("--head-dims", type=int, nargs="+", default=None,
                    help="several head dims in one run and one record, one after another (overrides --head-dim); "
                         "an anchor that fails is not tried again at a later head dim either")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.reps < 10:
        ap.error("--reps must be >= 10 (docs/design.md section 5: medians of at least 10 runs)")
    return a


def warmup_runs(n):
    """Warm-up runs before the timed ones at sequence length n (block-sparse anchors timed alone, with
    --no-interleave, get one more)."""
    return 1 if n > 65536 else 2


def bsa_label(backend):
    """The record name of our kernel under a --backends value."""
    return "bsa" if backend == "auto" else f"bsa_{backend}"


def backend_env(backend):
    """The environment our kernel runs under for a --backends value."""
    return {} if backend == "auto" else {BACKEND_ENV: backend}


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_bsa.py needs a CUDA GPU")
    import proxyattn  # noqa: F401  (loads the extension)

    b, hq, hkv, s = 1, args.q_heads, args.kv_heads, args.block_size
    dtype = torch.bfloat16
    flush = l2_flush_buffer()
    gen = torch.Generator(device="cuda").manual_seed(0)
    from torch.nn.attention.flex_attention import flex_attention
    failed = {}  # anchor -> reason it was skipped or failed (in the JSON as "skipped"); not tried again
    fa4 = None
    if not all(x in args.skip for x in FA4_ANCHORS):
        fa4, why = load_fa4()
        failed.update({x: why for x in FA4_ANCHORS if fa4 is None and x not in args.skip})
    if "flex" not in args.skip or (fa4 is not None and "flex_flash" not in args.skip):
        allow_recompiles()
    flex = None if "flex" in args.skip else torch.compile(flex_attention, dynamic=False)
    flex_flash = None if fa4 is None or "flex_flash" in args.skip else make_flex_flash()
    use = {name: fa4 is not None and name not in args.skip for name in ("fa4", "fa4_sparse")}
    meta = {"reps": args.reps, "warmup": {str(n): warmup_runs(n) for n in args.seqlens}, "interleave": args.interleave}

    cases = []

    def record(name, n, density, ms, **extra):
        tflops = density * 4 * d * hq * n * n / 2 * b / (ms * 1e-3) / 1e12
        if name in FA4_ANCHORS:
            extra["fa4_version"] = fa4.version
        cases.append({"name": name, "seq_len": n, "batch": b, "q_heads": hq, "kv_heads": hkv, "head_dim": d,
                      "dtype": "bf16", "density": round(density, 4), "ms": round(ms, 3),
                      "tflops": round(tflops, 1), **extra})
        flag = "  DISAGREES with " + ", ".join(extra["disagrees_with"]) if extra.get("disagrees") else ""
        print(f"{name:16s} N={n:7d} density={density:5.3f} {ms:10.3f} ms {tflops:7.1f} TFLOP/s{flag}", flush=True)

    def fail(name, e):
        failed[name] = failure(e)
        print(f"{name}: failed ({failed[name]}); not tried again", flush=True)

    for d in args.head_dims or [args.head_dim]:
        scale = d ** -0.5
        for n in args.seqlens:
            reps = args.reps
            warmup = warmup_runs(n)
            q = torch.randn(b, n, hq, d, generator=gen, device="cuda", dtype=dtype)
            k = torch.randn(b, n, hkv, d, generator=gen, device="cuda", dtype=dtype)
            v = torch.randn(b, n, hkv, d, generator=gen, device="cuda", dtype=dtype)
            qt = q.transpose(1, 2)  # [B, H, N, D] views for SDPA / flex
            kt, vt = k.transpose(1, 2), v.transpose(1, 2)

            def bsa(mc, mi):
                return torch.ops.proxyattn.block_sparse_attention(q, k, v, mc, mi, None, None, n, n, s, scale, True)[0]

            # dense anchors: {name: (fn, context factory)}; timed here, or with every density (interleaved)
            dense = {}
            dense_extras = {}  # name -> extra record fields (FA4's output against cuDNN's)
            ke = ve = None
            if "sdpa_flash" not in args.skip or "sdpa_cudnn" not in args.skip:
                ke = kt.repeat_interleave(hq // hkv, dim=1)
                ve = vt.repeat_interleave(hq // hkv, dim=1)
                for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION),
                                      ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
                    if name not in args.skip:
                        dense[name] = (lambda: F.scaled_dot_product_attention(qt, ke, ve, is_causal=True, scale=scale),
                                       lambda backend=backend: sdpa_kernel(backend))
            if use["fa4"] and "fa4" not in failed:
                dense["fa4"] = (lambda: fa4.dense(q, k, v, scale), None)
            cudnn_out = None
            for name, (fn, ctx) in list(dense.items()):
                try:  # compiles (FA4: tens of seconds) and checks that the anchor runs at all
                    with ctx() if ctx is not None else contextlib.nullcontext():
                        out = fn()
                    torch.cuda.synchronize()
                except Exception as e:
                    del dense[name]
                    if name == "fa4":
                        fail(name, e)
                    else:
                        print(f"{name}: unavailable ({failure(e)})")
                    continue
                if name == "sdpa_cudnn" and "fa4" in dense:
                    cudnn_out = out.transpose(1, 2)  # [B, N, H, D], like FA4's
                elif name == "fa4" and cudnn_out is not None:
                    where = f"N={n}, D={d}"
                    res = compare_outputs(cudnn_out, out, f"sdpa_cudnn ({where})")
                    print(record_comparison(dense_extras, "fa4", "sdpa_cudnn", res, where), flush=True)
                    cudnn_out = None
                del out
            cudnn_out = None
            for name, (fn, ctx) in list(dense.items()):
                # SDPA flash (slow) is timed once per length; interleaved, the others join every density's rounds
                if not args.interleave or name == "sdpa_flash":
                    with ctx() if ctx is not None else contextlib.nullcontext():
                        ms = time_cold(fn, reps, warmup, flush)
                    record(name, n, 1.0, ms, **dense_extras.get(name, {}))
                    del dense[name]

            if flex is not None or flex_flash is not None:
                qf, kf, vf = qt.contiguous(), kt.contiguous(), vt.contiguous()  # [B, H, N, D]
            for target in args.densities:
                counts, indices, density = random_causal_selection(b, hq, n, s, target, gen)
                where = f"N={n}, D={d}, density {density:.3f}"
                timed = dict(dense)  # interleaved: label -> (fn, context factory), timed together below
                extras = {}  # label -> extra record fields (the output checks on the random selection)
                # Our output on the random selection, into poisoned memory and outside the timed runs: it must
                # be finite; the other backends' and the block-sparse anchors' outputs are compared with it.
                ours_label = bsa_label(args.backends[0])
                with env_vars(backend_env(args.backends[0])), poisoned_outputs():
                    ours = bsa(counts, indices)
                require_finite(ours, f"{ours_label} ({where})")
                for backend in args.backends[1:]:
                    label = bsa_label(backend)
                    with env_vars(backend_env(backend)), poisoned_outputs():
                        out = bsa(counts, indices)
                    require_finite(out, f"{label} ({where})")
                    res = compare_outputs(ours, out, f"{ours_label} ({where})")
                    print(record_comparison(extras, label, ours_label, res, where), flush=True)
                    del out

                anchors = {}  # block-sparse anchors on the random selection: name -> fn
                bm = None
                if flex is not None or flex_flash is not None:
                    try:
                        bm = flex_block_mask(counts, indices, n, s)
                    except Exception as e:
                        print(f"flex BlockMask: failed ({failure(e)})")
                if bm is not None and flex is not None and "flex" not in failed:
                    anchors["flex"] = lambda bm=bm: flex(qf, kf, vf, block_mask=bm, scale=scale, enable_gqa=True)
                if bm is not None and flex_flash is not None and "flex_flash" not in failed:
                    anchors["flex_flash"] = lambda bm=bm: flex_flash(qf, kf, vf, bm, scale)
                if use["fa4_sparse"] and "fa4_sparse" not in failed:
                    try:
                        bst = fa4.sparse_tensors(counts, indices, s)
                        anchors["fa4_sparse"] = lambda bst=bst: fa4.sparse(q, k, v, bst, scale)
                    except Exception as e:
                        fail("fa4_sparse", e)
                for name, fn in list(anchors.items()):
                    try:  # compile outside the timed runs
                        out = fn()
                        torch.cuda.synchronize()
                    except Exception as e:  # compile problems must not lose the other numbers
                        del anchors[name]
                        fail(name, e)
                        continue
                    out = out.transpose(1, 2) if name in ("flex", "flex_flash") else out
                    res = compare_outputs(ours, out, f"{ours_label} ({where})")
                    print(record_comparison(extras, name, ours_label, res, where), flush=True)  # timed all the same
                    del out
                del ours

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
                            out = bsa(mc, mi)
                        return out

                    for backend in args.backends:  # the op reads the variable on every call
                        label = bsa_label(backend) + suffix
                        if mask != "random":  # the anchors ran on the random mask: results_table keys on it
                            extras.setdefault(label, {})["mask"] = mask
                        env = backend_env(backend)
                        if args.interleave:
                            timed[label] = (call, lambda env=env: env_vars(env))
                        else:
                            with env_vars(env):
                                ms = time_cold(call, reps, warmup, flush)
                            record(label, n, density, ms, **extras.get(label, {}))

                for name, fn in anchors.items():
                    if args.interleave:
                        timed[name] = (fn, None)
                    else:
                        record(name, n, density, time_cold(fn, reps, warmup + 1, flush), **extras.get(name, {}))
                if args.interleave and timed:
                    for label, ms in time_cold_interleaved(timed, reps, warmup, flush).items():
                        if label in dense:
                            record(label, n, 1.0, ms, paired_density=round(density, 4), **dense_extras.get(label, {}))
                        else:
                            record(label, n, density, ms, **extras.get(label, {}))
                del counts, indices, bm, timed, anchors
            del q, k, v, qt, kt, vt, ke, ve, dense
            if flex is not None or flex_flash is not None:
                del qf, kf, vf
            torch.cuda.empty_cache()
            # so far: a run cut short keeps it
            write_record(cases, "bsa", args.out, skipped=failed or None, meta=meta)

    out_path = write_record(cases, "bsa", args.out, skipped=failed or None, meta=meta)
    print(f"\n{'name':16s} {'N':>7s} {'density':>8s} {'ms':>10s} {'TFLOP/s':>8s}")
    for c in cases:
        flag = "  DISAGREES with " + ", ".join(c["disagrees_with"]) if c.get("disagrees") else ""
        print(f"{c['name']:16s} {c['seq_len']:7d} {c['density']:8.3f} {c['ms']:10.3f} {c['tflops']:8.1f}{flag}")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
