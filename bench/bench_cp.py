"""Context-parallel prefill (proxyattn.distributed.proxy_attention_cp) against one GPU.

    torchrun --nproc-per-node 2 bench/bench_cp.py [--seq-lens 262144 524288 1048576] [--out PATH]

For every length N and layout (zigzag, contiguous): structured inputs (bench/synthetic.py, the
same on every rank: generated on each GPU from one seed), B=1, Hq=32, Hkv=8, D=128, bf16, the
default config. Each rank times its call with CUDA events (median of --reps >= 10 runs after one
warm-up, L2 evicted and a barrier before each); rank 0 also times proxy_attention on the whole sequence alone (the one-GPU baseline, in the
same process). Records per rank: ms, peak memory (its shards plus what the call allocates); per
case: the slowest rank's time (the call's time), speedup = one GPU / slowest rank, imbalance =
slowest / fastest rank. Rank 0 writes the
docs/design.md section 6 JSON (bench/results/<card>-<date>-cp<world>.json unless --out).
"""
import argparse
import os
import statistics
import sys

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import proxyattn as pa  # noqa: E402
from benchlib import cold_run, add_head_args, l2_flush_buffer, write_record  # noqa: E402
from proxyattn.distributed import chunk_spans, proxy_attention_cp  # noqa: E402
from synthetic import make_structured_inputs  # noqa: E402


def _time(fn, reps, flush, barrier=True):
    times = []
    for i in range(reps + 1):
        if barrier:
            dist.barrier()
        start, end = cold_run(fn, flush)
        torch.cuda.synchronize()
        if i:  # the first run warms up
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[262144, 524288, 1048576])
    ap.add_argument("--layouts", nargs="+", default=["zigzag", "contiguous"], choices=["zigzag", "contiguous"])
    add_head_args(ap)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    cfg, cases, flush = pa.ProxyAttnConfig(), [], l2_flush_buffer()
    for n in a.seq_lens:
        q, k, v, _ = make_structured_inputs(1, n, a.q_heads, a.kv_heads, a.head_dim, seed=n, dtype=torch.bfloat16,
                                            device="cuda")
        single = None
        if rank == 0:
            single = _time(lambda: pa.proxy_attention(q, k, v, cfg), a.reps, flush, barrier=False)
        dist.barrier()
        for layout in a.layouts:
            spans = chunk_spans(n, world, rank, layout)
            qs, ks, vs = (torch.cat([t[:, s:e] for s, e in spans], dim=1).contiguous() for t in (q, k, v))
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            ms = _time(lambda: proxy_attention_cp(qs, ks, vs, cfg, layout=layout), a.reps, flush)
            # What a rank needs: its shards plus what the call allocates (the whole-sequence inputs
            # this script keeps for the one-GPU baseline do not count).
            shards = sum(t.numel() * t.element_size() for t in (qs, ks, vs))
            stats = torch.tensor([ms, (torch.cuda.max_memory_allocated() - base + shards) / 2**30], device="cuda")
            every = [torch.empty_like(stats) for _ in range(world)]
            dist.all_gather(every, stats)
            if rank == 0:
                per = [(float(s[0]), float(s[1])) for s in every]
                slow, fast = max(p[0] for p in per), min(p[0] for p in per)
                cases.append({"name": f"proxy_attention_cp_{layout}", "seq_len": n, "batch": 1,
                              "q_heads": a.q_heads, "kv_heads": a.kv_heads, "head_dim": a.head_dim, "dtype": "bf16",
                              "world": world, "ms": slow, "single_gpu_ms": single, "speedup": single / slow,
                              "imbalance": slow / fast, "rank_ms": [p[0] for p in per],
                              "rank_peak_gib": [p[1] for p in per]})
                print(f"N={n:8d} {layout:10s} world {world}: {slow:9.2f} ms (one GPU {single:9.2f} ms, "
                      f"{single / slow:.2f}x), imbalance {slow / fast:.2f}, peak GiB "
                      f"{max(p[1] for p in per):.1f}", flush=True)
            del qs, ks, vs
        del q, k, v
        torch.cuda.empty_cache()
    if rank == 0:
        print("wrote", write_record(cases, f"cp{world}", a.out))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
