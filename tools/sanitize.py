"""Small grid of every CUDA op, for compute-sanitizer (memcheck, racecheck, synccheck):

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 tools/sanitize.py
    tools/sanitize.sh LOGDIR          # memcheck + synccheck on the full grid, racecheck on --small

Shapes cover lengths that are not multiples of the block, Nq < Nk, GQA, both head dims and
dtypes, both block sizes, varlen, and hand-made selections with padding and bad entries.
Garbage device-resident inputs the kernels must survive without an out-of-bounds access
(docs/design.md: cu_seqlens are never read on the host; kernels clamp lengths into
[0, max_seqlen] and skip out-of-range block indices) run in every mode. The pipeline grid runs
the default kernel choice; the hand-made selections, the garbage inputs and the set-semantics rows
(docs/design.md section 2, stage 4: repeated, unsorted, out-of-range, negative and INT16/INT32-extreme
entries, negative counts, counts past K, future blocks; fixed length and varlen, int16 and int32)
run on each attention kernel the device has (PROXYATTN_BSA_BACKEND=portable, and hopper on sm_90).

--small: one dtype per head dim and fewer shapes (every kernel instantiation still runs once
per head dim and block size), for the slow racecheck tool.
"""
import argparse
import itertools
import os

import torch

import proxyattn as pa

OPS = torch.ops.proxyattn


def run_pipeline(q, k, v, S, G, cu_q=None, cu_k=None, mq=None, mk=None, causal=True):
    mq = mq or q.shape[1]
    mk = mk or k.shape[1]
    scale = q.shape[-1] ** -0.5
    # Stage 1 at stride 4 (S/stride a power of two: the Hopper kernel on sm_90, the aligned mma.sync
    # kernel elsewhere) and at stride 3 (the mma.sync kernel's general path).
    OPS.proxy_block_scores(q, k, cu_q, cu_k, mq, mk, S, G, 4, scale, causal)
    sc = OPS.proxy_block_scores(q, k, cu_q, cu_k, mq, mk, S, G, 3, scale, causal)
    ks = OPS.head_budgets(q, k, cu_q, cu_k, mq, mk, S, 0.9, 1, 1, scale, causal)
    counts, idx = OPS.select_blocks(sc, ks, cu_q, cu_k, mq, mk, S, 1, 1, S, causal)
    out, lse = OPS.block_sparse_attention(q, k, v, counts, idx, cu_q, cu_k, mq, mk, S, scale, causal)
    return out, lse


def block_sizes():
    """Block sizes of the attention kernel chosen by PROXYATTN_BSA_BACKEND (hopper: 128 only)."""
    return (128,) if os.environ.get("PROXYATTN_BSA_BACKEND") == "hopper" else (64, 128)


def garbage_inputs(dev):
    """Device-resident values no host check can see: bad cu_seqlens, counts and indices."""
    total_q, total_k, hq, hkv, d = 300, 260, 4, 2, 64
    q = torch.randn(total_q, hq, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(total_k, hkv, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    bad_cus = [
        ([0, 500, 100], [-7, 90, 1 << 30]),            # past the end, negative, huge
        ([200, 100, 300], [0, 260, 100]),              # decreasing
        ([0, 0, 300], [0, 0, 260]),                    # an empty sequence
        ([0, 300, 300], [0, 10, 260]),                 # causal: 300 queries see 10 keys
        ([-2147483647, 2147483647, 5], [2147483647, -1, 0]),
    ]
    for cq, ck in bad_cus:
        cu_q = torch.tensor(cq, dtype=torch.int32, device=dev)
        cu_k = torch.tensor(ck, dtype=torch.int32, device=dev)
        for S in block_sizes():
            for causal in (True, False):
                run_pipeline(q, k, v, S, 2, cu_q, cu_k, 200, 180, causal)
    for S in block_sizes():
        # Hand-made selection with counts past K, negative counts, indices past nkb and negative.
        q = torch.randn(2, 200, 2, 64, device=dev, dtype=torch.float16)
        k = torch.randn(2, 260, 1, 64, device=dev, dtype=torch.float16)
        nqb, K = -(-200 // S), 3
        counts = torch.tensor([7, -3, 1, 3], dtype=torch.int32, device=dev).repeat(2, 2, 1)[..., :nqb].contiguous()
        idx = torch.randint(-50, 50, (2, 2, nqb, K), dtype=torch.int32, device=dev)
        for causal in (True, False):
            OPS.block_sparse_attention(q, k, k, counts, idx, None, None, 200, 260, S, 0.125, causal)
        # Varlen selection whose indices point past each sequence's own key blocks.
        cu_q = torch.tensor([0, 50, 200], dtype=torch.int32, device=dev)
        cu_k = torch.tensor([0, 60, 260], dtype=torch.int32, device=dev)
        qv, kv = q[0].contiguous(), k.reshape(-1, 1, 64)[:260].contiguous()
        nqb = -(-150 // S)
        counts = torch.full((2, 2, nqb), 5, dtype=torch.int32, device=dev)
        idx = torch.arange(5, dtype=torch.int32, device=dev).expand(2, 2, nqb, 5).contiguous()
        OPS.block_sparse_attention(qv, kv, kv, counts, idx, cu_q, cu_k, 150, 200, S, 0.125, True)
    # select_blocks with kstar far outside [0, c_last - f_last].
    sc = torch.rand(2, 1, 4, 5, device=dev)
    for kst in (-(1 << 30), 1 << 30, 3):
        ks = torch.full((2, 4), kst, dtype=torch.int32, device=dev)
        OPS.select_blocks(sc, ks, None, None, 200, 260, 64, 1, 1, 64, True)
        OPS.select_blocks(sc, ks, None, None, 200, 260, 64, 0, 0, 0, False)


def backends():
    """The attention kernels this device runs (PROXYATTN_BSA_BACKEND values)."""
    return ["portable"] + (["hopper"] if torch.cuda.get_device_capability() == (9, 0) else [])


def messy_rows(b, hq, nqb, nkb, K, idx_dtype, gen):
    """counts [b, hq, nqb] and indices [b, hq, nqb, K] whose rows mix valid blocks (repeated,
    unsorted) with entries outside [0, nkb) down to / up to the index type's extremes, and counts
    that are negative or past K."""
    info = torch.iinfo(idx_dtype)
    bad = torch.tensor([-1, -7, nkb, nkb + 3, info.max, info.min])
    valid = torch.randint(0, nkb, (b, hq, nqb, K), generator=gen)
    junk = bad[torch.randint(0, len(bad), (b, hq, nqb, K), generator=gen)]
    idx = torch.where(torch.rand(b, hq, nqb, K, generator=gen) < 0.3, junk, valid)
    idx[..., 1::3] = idx[..., 0::3][..., :idx[..., 1::3].shape[-1]]  # repeats
    choices = torch.tensor([-5, -(2**31), 0, 1, K // 2, K, K + 1, 10**6, 2**31 - 1])
    counts = choices[torch.randint(0, len(choices), (b, hq, nqb), generator=gen)].to(torch.int32)
    return counts, idx.to(idx_dtype)


def set_semantics_inputs(dev, small):
    """Rows read as sets on fixed-length and varlen inputs, both index types."""
    gen = torch.Generator().manual_seed(7)
    for S, idx_dtype in itertools.product(block_sizes(), (torch.int16, torch.int32)):
        # fixed length, Nq < Nk
        b, nq, nk, hq, hkv, d = 2, 200, 333, 4, 2, 64 if small else 128
        q = torch.randn(b, nq, hq, d, device=dev, dtype=torch.bfloat16)
        k = torch.randn(b, nk, hkv, d, device=dev, dtype=torch.bfloat16)
        nqb, nkb = -(-nq // S), -(-nk // S)
        for causal in (True, False):
            counts, idx = messy_rows(b, hq, nqb, nkb, 2 * nkb + 3, idx_dtype, gen)
            OPS.block_sparse_attention(q, k, k, counts.to(dev), idx.to(dev), None, None, nq, nk, S, 0.125, causal)
        # varlen of mixed lengths (an empty sequence, Nq < Nk)
        lens_q, lens_k = [150, 0, 77], [300, 9, 77]
        cu_q = torch.tensor([0, 150, 150, 227], dtype=torch.int32, device=dev)
        cu_k = torch.tensor([0, 300, 309, 386], dtype=torch.int32, device=dev)
        qv = torch.randn(sum(lens_q), hq, d, device=dev, dtype=torch.float16)
        kv = torch.randn(sum(lens_k), hkv, d, device=dev, dtype=torch.float16)
        nqb, nkb = -(-max(lens_q) // S), -(-max(lens_k) // S)
        counts, idx = messy_rows(3, hq, nqb, nkb, 2 * nkb + 3, idx_dtype, gen)
        OPS.block_sparse_attention(qv, kv, kv, counts.to(dev), idx.to(dev), cu_q, cu_k, max(lens_q), max(lens_k), S,
                                   0.125, True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="reduced grid for racecheck")
    args = parser.parse_args()
    torch.manual_seed(0)
    dev = "cuda"
    if args.small:
        grid = [(torch.bfloat16, 64), (torch.float16, 128)]
        shapes = ((129, 129, 4, 2, 2), (100, 300, 8, 2, 8))
        batch = 1
    else:
        grid = [(dt, d) for dt in (torch.bfloat16, torch.float16) for d in (64, 128)]
        shapes = ((1, 1, 2, 1, 1), (129, 129, 4, 2, 2), (100, 300, 8, 2, 8), (257, 257, 4, 4, 4))
        batch = 2
    for dtype, d in grid:
        for S in (64, 128):
            for nq, nk, hq, hkv, G in shapes:
                q = torch.randn(batch, nq, hq, d, device=dev, dtype=dtype)
                k = torch.randn(batch, nk, hkv, d, device=dev, dtype=dtype)
                v = torch.randn(batch, nk, hkv, d, device=dev, dtype=dtype)
                run_pipeline(q, k, v, S, G)
                run_pipeline(q, k, v, S, G, causal=False)
        lens_q, lens_k = [70, 200, 129], [90, 200, 300]
        cu_q = torch.tensor([0, 70, 270, 399], dtype=torch.int32, device=dev)
        cu_k = torch.tensor([0, 90, 290, 590], dtype=torch.int32, device=dev)
        q = torch.randn(sum(lens_q), 4, d, device=dev, dtype=dtype)
        k = torch.randn(sum(lens_k), 2, d, device=dev, dtype=dtype)
        run_pipeline(q, k, torch.randn_like(k), 64, 2, cu_q, cu_k, max(lens_q), max(lens_k))
    for backend in backends():
        os.environ["PROXYATTN_BSA_BACKEND"] = backend  # read by the op on every call
        # Hand-made selection: -1, out-of-range and duplicate-free garbage past counts, empty rows.
        q = torch.randn(1, 200, 2, 64, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, 200, 1, 64, device=dev, dtype=torch.bfloat16)
        counts = torch.tensor([[[0, 2], [1, 5]]], dtype=torch.int32, device=dev)
        idx = torch.tensor([[[[7, -1], [0, 1]], [[-1, 9], [1, 99]]]], dtype=torch.int32, device=dev)
        OPS.block_sparse_attention(q, k, k, counts, idx, None, None, 200, 200, 128, 0.125, True)
        run_pipeline(q, k, k, 128, 1)  # stage 1 on this backend's kernels too (portable: mma.sync)
        garbage_inputs(dev)
        set_semantics_inputs(dev, args.small)
        print("ran on the", backend, "kernel", flush=True)
    os.environ.pop("PROXYATTN_BSA_BACKEND", None)
    torch.cuda.synchronize()
    print("sanitize grid ran:", pa.__version__, "(small)" if args.small else "(full)")


if __name__ == "__main__":
    main()
