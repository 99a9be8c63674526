"""Context-parallel prefill with NCCL on 2 and 4 GPUs of one host (structured inputs, bf16, the
default config at 64k tokens): the same selections as proxy_attention on the whole sequence on one
GPU, outputs within bf16 rounding. Skipped where fewer GPUs are visible. On one GPU (a group of
one): the call, its selection included, does not synchronise with the host."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import chunked
import proxyattn as pa
from test_distributed import check_rank

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _worker(rank, world, init, n, layout):
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=init, rank=rank, world_size=world)
    try:
        dev = torch.device("cuda", rank)
        q, k, v, _ = chunked.synthetic.make_structured_inputs(1, n, 8, 2, 128, seed=5, dtype=torch.bfloat16,
                                                              device=dev)
        check_rank(q, k, v, pa.ProxyAttnConfig(), world, rank, layout, 2e-2)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_context_parallel_nccl(tmp_path, world, layout):
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs, {torch.cuda.device_count()} visible")
    init = "file://" + os.path.join(str(tmp_path), "init")
    mp.start_processes(_worker, args=(world, init, 65536, layout), nprocs=world, start_method="spawn")


def _sync_free_worker(rank, world, init, n):
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=init, rank=rank, world_size=world)
    try:
        q, k, v, _ = chunked.synthetic.make_structured_inputs(1, n, 8, 2, 128, seed=5, dtype=torch.bfloat16,
                                                              device=torch.device("cuda", rank))
        cfg = pa.ProxyAttnConfig(dense_below=0)
        from proxyattn.distributed import proxy_attention_cp
        proxy_attention_cp(q, k, v, cfg, return_selection=True)  # the communicator's first use
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            proxy_attention_cp(q, k, v, cfg, return_selection=True)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        check_rank(q, k, v, cfg, world, rank, "zigzag", 2e-2)
    finally:
        dist.destroy_process_group()


def test_context_parallel_does_not_synchronise(tmp_path):
    init = "file://" + os.path.join(str(tmp_path), "init")
    mp.start_processes(_sync_free_worker, args=(1, init, 8192), nprocs=1, start_method="spawn")
