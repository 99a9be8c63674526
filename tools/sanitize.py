"""Small grid of every CUDA op, for compute-sanitizer (memcheck, racecheck, synccheck):

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 tools/sanitize.py

Shapes cover lengths that are not multiples of the block, Nq < Nk, GQA, both head dims and
dtypes, both block sizes, varlen, and hand-made selections with padding and bad entries.
"""
import torch

import proxyattn as pa

OPS = torch.ops.proxyattn


def run_pipeline(q, k, v, S, G, cu_q=None, cu_k=None, mq=None, mk=None, causal=True):
    mq = mq or q.shape[1]
    mk = mk or k.shape[1]
    scale = q.shape[-1] ** -0.5
    sc = OPS.proxy_block_scores(q, k, cu_q, cu_k, mq, mk, S, G, 3, scale, causal)
    ks = OPS.head_budgets(q, k, cu_q, cu_k, mq, mk, S, 0.9, 1, 1, scale, causal)
    counts, idx = OPS.select_blocks(sc, ks, cu_q, cu_k, mq, mk, S, 1, 1, S, causal)
    out, lse = OPS.block_sparse_attention(q, k, v, counts, idx, cu_q, cu_k, mq, mk, S, scale, causal)
    return out, lse


def main():
    torch.manual_seed(0)
    dev = "cuda"
    for dtype in (torch.bfloat16, torch.float16):
        for d in (64, 128):
            for S in (64, 128):
                for nq, nk, hq, hkv, G in ((1, 1, 2, 1, 1), (129, 129, 4, 2, 2), (100, 300, 8, 2, 8),
                                           (257, 257, 4, 4, 4)):
                    q = torch.randn(2, nq, hq, d, device=dev, dtype=dtype)
                    k = torch.randn(2, nk, hkv, d, device=dev, dtype=dtype)
                    v = torch.randn(2, nk, hkv, d, device=dev, dtype=dtype)
                    run_pipeline(q, k, v, S, G)
                    run_pipeline(q, k, v, S, G, causal=False)
            lens_q, lens_k = [70, 200, 129], [90, 200, 300]
            cu_q = torch.tensor([0, 70, 270, 399], dtype=torch.int32, device=dev)
            cu_k = torch.tensor([0, 90, 290, 590], dtype=torch.int32, device=dev)
            q = torch.randn(sum(lens_q), 4, d, device=dev, dtype=dtype)
            k = torch.randn(sum(lens_k), 2, d, device=dev, dtype=dtype)
            run_pipeline(q, k, torch.randn_like(k), 64, 2, cu_q, cu_k, max(lens_q), max(lens_k))
    # Hand-made selection: -1, out-of-range and duplicate-free garbage past counts, empty rows.
    q = torch.randn(1, 200, 2, 64, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, 200, 1, 64, device=dev, dtype=torch.bfloat16)
    counts = torch.tensor([[[0, 2], [1, 5]]], dtype=torch.int32, device=dev)
    idx = torch.tensor([[[[7, -1], [0, 1]], [[-1, 9], [1, 99]]]], dtype=torch.int32, device=dev)
    OPS.block_sparse_attention(q, k, k, counts, idx, None, None, 200, 200, 128, 0.125, True)
    torch.cuda.synchronize()
    print("sanitize grid ran:", pa.__version__)


if __name__ == "__main__":
    main()
