"""Chunked prefill on the GPU at 64k tokens (structured inputs, bf16): chunks of random lengths
that are not multiples of 128, each against the growing prefix, give the dense result at gamma = 1;
at the default config their mean attention recall is at least that of 128-aligned chunking minus
0.01, and no row sees zero keys."""
import dataclasses

import pytest
import torch

import chunked
import proxyattn as pa

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_chunked_prefill_64k():
    n, hq, hkv, d = 65536, 8, 2, 128
    q, k, v, _ = chunked.synthetic.make_structured_inputs(1, n, hq, hkv, d, seed=3, dtype=torch.bfloat16,
                                                          device="cuda")
    cfg = pa.ProxyAttnConfig()
    gen = torch.Generator().manual_seed(1)
    ragged = chunked.random_chunks(n, 3000, 12000, 128, gen)
    aligned = [8192] * (n // 8192)
    assert all(x % 128 for x in ragged[:-1])
    exact = dataclasses.replace(cfg, gamma=1.0, dense_below=0)
    out, recall, worst = chunked.run_chunks(q, k, v, ragged, exact)
    dense = chunked.dense_chunks(q, k, v, ragged)
    err = (out.float() - dense.float()).abs()
    # Two bf16 ulps of each output (2^-7 relative) plus an absolute floor for outputs near zero:
    # the two kernels sum in different orders, so a one-ulp difference at |out| >= 4 is 0.031.
    bound = dense.float().abs() * 2.0**-7 + 1e-2
    assert bool((err <= bound).all()) and float(err.mean()) < 1e-3, (float((err - bound).max()), float(err.mean()))
    assert abs(recall - 1.0) < 1e-4 and worst > -float("inf")
    _, r_ragged, worst = chunked.run_chunks(q, k, v, ragged, cfg)
    _, r_aligned, w_aligned = chunked.run_chunks(q, k, v, aligned, cfg)
    print(f"mean recall: ragged chunks {r_ragged:.4f}, 128-aligned chunks {r_aligned:.4f}")
    assert worst > -float("inf") and w_aligned > -float("inf")
    assert r_ragged >= r_aligned - 0.01, (r_ragged, r_aligned)
    assert r_aligned < 0.999, "the test needs a sparse selection"
