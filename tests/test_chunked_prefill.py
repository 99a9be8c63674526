"""Chunked prefill behind a prefix of any length (CPU reference, small sizes): chunks of random
lengths that are not multiples of the block give the dense result at gamma = 1, keep the mean
attention recall of block-aligned chunking (within 0.01), and no row sees zero keys. The GPU
version at 64k tokens is tests/test_chunked_prefill_gpu.py."""
import dataclasses

import torch

import chunked
import proxyattn as pa


def test_chunked_prefill_random_lengths_cpu():
    S, n = 64, 2048
    q, k, v, _ = chunked.synthetic.make_structured_inputs(1, n, 4, 2, 64, seed=11, hubs=6, needles=2)
    cfg = pa.ProxyAttnConfig(block_size=S, min_budget=2 * S, gamma=0.9, dense_below=0)
    gen = torch.Generator().manual_seed(5)
    ragged = chunked.random_chunks(n, 150, 500, S, gen)
    aligned = [4 * S] * (n // (4 * S))
    assert any(x % S for x in ragged) and sum(ragged) == sum(aligned) == n
    # gamma = 1: every candidate is selected, so each chunk is dense attention over its prefix.
    exact = dataclasses.replace(cfg, gamma=1.0)
    out, recall, worst = chunked.run_chunks(q, k, v, ragged, exact)
    dense = chunked.dense_chunks(q, k, v, ragged)
    assert (out - dense).abs().max() < 1e-4
    assert abs(recall - 1.0) < 1e-6  # fp32 softmax sums
    # The default rule: ragged chunks keep the recall of aligned ones, and every row sees keys.
    _, r_ragged, worst = chunked.run_chunks(q, k, v, ragged, cfg)
    _, r_aligned, w_aligned = chunked.run_chunks(q, k, v, aligned, cfg)
    assert worst > -float("inf") and w_aligned > -float("inf")
    assert r_ragged >= r_aligned - 0.01, (r_ragged, r_aligned)
    assert r_aligned < 0.999, "the test needs a sparse selection"
