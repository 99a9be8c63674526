"""Context-parallel prefill (proxyattn.distributed) with the gloo backend on the CPU: 2 and 4
processes, zigzag and contiguous layouts, against proxy_attention on the whole sequence in one
process: the same selections exactly, outputs within float32 rounding. GPU runs with NCCL need
several GPUs (tests/test_distributed_gpu.py)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import chunked
import proxyattn as pa
from proxyattn.distributed import chunk_spans, proxy_attention_cp

SPARSE = pa.ProxyAttnConfig(block_size=64, min_budget=128, gamma=0.9, dense_below=0)
DENSE = pa.ProxyAttnConfig(block_size=64)  # 1024 keys < dense_below: dense attention everywhere


def shard(t, spans):
    return torch.cat([t[:, s:e] for s, e in spans], dim=1).contiguous()


def check_rank(q, k, v, cfg, world, rank, layout, tol):
    """This rank's proxy_attention_cp against proxy_attention on the whole sequence: the same
    budgets and selection rows exactly, outputs within tol. Returns the one-process selection."""
    spans = chunk_spans(q.shape[1], world, rank, layout)
    out, sel = proxy_attention_cp(shard(q, spans), shard(k, spans), shard(v, spans), cfg, layout=layout,
                                  return_selection=True)
    want, wsel = pa.proxy_attention(q, k, v, cfg, return_selection=True)
    assert torch.equal(sel.kstar, wsel.kstar)
    assert torch.equal(sel.counts, wsel.counts[:, :, sel.query_blocks])
    assert torch.equal(sel.indices, wsel.indices[:, :, sel.query_blocks])
    torch.testing.assert_close(out, shard(want, spans), rtol=tol, atol=tol)
    return wsel


def _worker(rank, world, init, n, layout, cfg_name):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        cfg = SPARSE if cfg_name == "sparse" else DENSE
        q, k, v, _ = chunked.synthetic.make_structured_inputs(1, n, 4, 2, 64, seed=7, hubs=6, needles=2)
        # Memory: a rank's score matrices (what select_blocks reads) are one own chunk's rows each.
        call, selected = pa.ops.call, []

        def recording_call(name, *args):
            if name == "select_blocks":
                selected.append(tuple(args[0].shape))
            return call(name, *args)

        pa.ops.call = recording_call
        try:
            wsel = check_rank(q, k, v, cfg, world, rank, layout, 1e-5)
        finally:
            pa.ops.call = call
        S = cfg.block_size
        own = [(1, 2, (e - s) // S, e // S) for s, e in chunk_spans(n, world, rank, layout)]
        whole = [(1, 2, n // S, n // S)]  # proxy_attention's, in check_rank
        assert selected == (own + whole if cfg_name == "sparse" else [])
        if cfg_name == "sparse":
            assert float(wsel.density.mean()) < 0.9, "the test needs a sparse selection"
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("cfg_name", ["sparse", "dense"])
def test_context_parallel_equals_one_process(tmp_path, world, layout, cfg_name):
    init = "file://" + os.path.join(str(tmp_path), "init")
    mp.start_processes(_worker, args=(world, init, 1024, layout, cfg_name), nprocs=world, start_method="spawn")


def test_chunk_spans_cover_the_sequence_once():
    for world in (1, 2, 3, 4, 8):
        for layout in ("zigzag", "contiguous"):
            got = sorted(sp for r in range(world) for sp in chunk_spans(96 * world, world, r, layout))
            assert got[0][0] == 0 and got[-1][1] == 96 * world
            assert all(a[1] == b[0] for a, b in zip(got, got[1:]))
    assert chunk_spans(800, 4, 1, "zigzag") == [(100, 200), (600, 700)]


def _bad_worker(rank, world, init):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        q, k = torch.randn(1, 96, 4, 64), torch.randn(1, 96, 2, 64)
        with pytest.raises(ValueError, match=r"N = 2 x 96 = 192 must be divisible by 256"):
            proxy_attention_cp(q, k, k, SPARSE)
        with pytest.raises(ValueError, match=r"layout must be one of"):
            proxy_attention_cp(q, k, k, SPARSE, layout="ring")
        # Too many key blocks for the selection's int16 indices: refused before any all-gather (stride-0
        # shards of 2^20 + 128 tokens, so N = 2^21 + 256 is 32772 blocks of 64; gathered they would be 2 GiB).
        big_q = torch.randn(1, 1, 4, 64).expand(1, (1 << 20) + 128, 4, 64)
        big_k = torch.randn(1, 1, 2, 64).expand(1, (1 << 20) + 128, 2, 64)
        gather = dist.all_gather

        def no_gather(*args, **kwargs):
            raise AssertionError("an all-gather started before the inputs were checked")

        dist.all_gather = no_gather
        try:
            with pytest.raises(ValueError, match=r"at most 32768 key blocks are supported .* 32772 blocks"):
                proxy_attention_cp(big_q, big_k, big_k, SPARSE)
        finally:
            dist.all_gather = gather
        with pytest.raises(RuntimeError, match=r"proxy_attention_cp is inference-only"):
            q2, k2 = torch.randn(1, 256, 4, 64, requires_grad=True), torch.randn(1, 256, 2, 64)
            proxy_attention_cp(q2, k2, k2, SPARSE)
    finally:
        dist.destroy_process_group()


def test_clear_errors(tmp_path):
    init = "file://" + os.path.join(str(tmp_path), "init")
    mp.start_processes(_bad_worker, args=(2, init), nprocs=2, start_method="spawn")
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        proxy_attention_cp(torch.randn(1, 256, 4, 64), torch.randn(1, 256, 2, 64), torch.randn(1, 256, 2, 64))
