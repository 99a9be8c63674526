"""Context-parallel prefill: one causal sequence spread over the ranks of a torch.distributed group.

Each rank holds a shard of the queries, keys and values; all ranks see all keys (the all-gather
form of context parallelism). The sequence of N tokens is cut into chunks whose boundaries are
multiples of the block size, so every chunk's query blocks are blocks of the whole sequence, and
each rank estimates and computes only its own query blocks:

- layout "zigzag": 2 * world chunks of N / (2 * world) tokens; rank r holds chunks r and
  2 * world - 1 - r, in that order (each rank gets one early, cheap chunk and one late, expensive
  one, which balances causal work);
- layout "contiguous": world chunks; rank r holds chunk r.

Per rank (docs/design.md section 2, unchanged): K and V are all-gathered (asynchronously; V's
gather overlaps the estimate); stage 1 runs per own chunk against the keys up to its end
(bottom-right causal, so a chunk is a prefill chunk behind the earlier ones); stage 2 runs on the
rank that holds the last query block and its budgets are broadcast; stage 3 runs per own chunk on
that chunk's scores (select_blocks' budget_seqlen: the budgets scale with the whole sequence's
last query block), so a rank holds the block scores and indices of its own rows only; stage 4
runs per own chunk. The result equals proxy_attention on the whole sequence:
the same selections, and each row's output computed from the same blocks. One exception: stage 1
rounds a head group's pooled vectors to bf16 instead of fp16 where some pooled value of the call
overflows fp16, and a chunk's call sees only its own queries and the keys up to its end; where the
overflow lies elsewhere in the sequence, that group's scores are rounded differently and
selections can differ (pooled means beyond 65504 only). Nothing reads a device value on the host.
All ranks must call with the same shapes and config.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .attention import _DEFAULT_CONFIG, dense_attention, full_selection
from .config import ProxyAttnConfig

LAYOUTS = ("zigzag", "contiguous")


class CPSelection(NamedTuple):
    """This rank's part of the selection: counts int32 [B, Hq, m] and indices [B, Hq, m, nkb] of the
    m query blocks it holds, whose numbers in the whole sequence are `query_blocks`; kstar [B, Hq]
    (the same on every rank)."""

    counts: Tensor
    indices: Tensor
    kstar: Tensor
    query_blocks: List[int]


def chunk_spans(n: int, world: int, rank: int, layout: str) -> List[Tuple[int, int]]:
    """Token ranges [start, end) of the whole sequence that `rank` holds, in shard order."""
    if layout == "zigzag":
        c = n // (2 * world)
        return [(rank * c, (rank + 1) * c), ((2 * world - 1 - rank) * c, (2 * world - rank) * c)]
    c = n // world
    return [(rank * c, (rank + 1) * c)]


def _check(q: Tensor, k: Tensor, v: Tensor, cfg: ProxyAttnConfig, world: int, layout: str) -> int:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    lay = ops.check_qkv(q, k, v, None, None, None, None, True)
    if lay.max_seqlen_q != lay.max_seqlen_k:
        raise ValueError(f"q, k and v must be shards of one sequence (the same token count), got "
                         f"{lay.max_seqlen_q} queries and {lay.max_seqlen_k} keys")
    n = lay.max_seqlen_q * world
    parts = 2 * world if layout == "zigzag" else world
    if n % (parts * cfg.block_size):
        raise ValueError(f"layout {layout!r} on {world} ranks cuts the sequence into {parts} chunks that must be "
                         f"multiples of block_size {cfg.block_size}: the sequence length N = {world} x "
                         f"{lay.max_seqlen_q} = {n} must be divisible by {parts * cfg.block_size}")
    if not cfg.runs_dense(n):
        ops.check_key_blocks(n, cfg.block_size)
    return n


def _gather(shard: Tensor, world: int, group) -> Tuple[Tensor, Optional[object]]:
    """Start an all-gather of every rank's shard: returns the buffer [world, *shard.shape] and the
    work handle (wait before reading the buffer)."""
    buf = shard.new_empty((world,) + tuple(shard.shape))
    work = dist.all_gather(list(buf.unbind(0)), shard.contiguous(), group=group, async_op=True)
    return buf, work


def _natural_order(buf: Tensor, n: int, world: int, layout: str) -> Tensor:
    """[B, N, H, D] in sequence order from the gathered shards [world, B, N / world, H, D]."""
    b, _, h, d = buf.shape[1:]
    out = buf.new_empty((b, n, h, d))
    for r in range(world):
        pos = 0
        for s, e in chunk_spans(n, world, r, layout):
            out[:, s:e] = buf[r, :, pos:pos + e - s]
            pos += e - s
    return out


def proxy_attention_cp(q: Tensor, k: Tensor, v: Tensor, config: Optional[ProxyAttnConfig] = None, *, group=None,
                       layout: str = "zigzag", return_selection: bool = False
                       ) -> Union[Tensor, Tuple[Tensor, CPSelection]]:
    """proxy_attention (causal) over a sequence of N tokens sharded over the ranks of `group`.

    q [B, N / world, Hq, D], k/v [B, N / world, Hkv, D]: this rank's shard in `layout` order
    (module docstring). Returns this rank's output shard [B, N / world, Hq, D], and with
    return_selection a CPSelection of its query blocks. N must be divisible by
    2 * world * block_size (zigzag) or world * block_size (contiguous). Needs an initialised
    process group (gloo for CPU tensors, NCCL for CUDA). Inference only, like proxy_attention."""
    cfg = _DEFAULT_CONFIG if config is None else config
    if not isinstance(cfg, ProxyAttnConfig):
        raise TypeError(f"config must be a ProxyAttnConfig or None, got {type(cfg).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("proxy_attention_cp needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group)")
    group = dist.group.WORLD if group is None else group
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    n = _check(q, k, v, cfg, world, layout)
    ops.check_no_grad("proxy_attention_cp", [("q", q), ("k", k), ("v", v)])
    hq, hkv, d = q.shape[2], k.shape[2], q.shape[3]
    S, G, scale = cfg.block_size, cfg.proxy_heads(hq, hkv), cfg.scale(d)
    spans = chunk_spans(n, world, rank, layout)
    k_buf, k_work = _gather(k, world, group)
    v_buf, v_work = _gather(v, world, group)  # waited for only before stage 4
    k_work.wait()
    k_full = _natural_order(k_buf, n, world, layout)
    q_chunks, pos = [], 0
    for s, e in spans:
        q_chunks.append(q[:, pos:pos + e - s])
        pos += e - s
    batch = q.shape[0]
    sels = None  # per own chunk: counts [B, Hq, m] and indices [B, Hq, m, e / S]
    if not cfg.runs_dense(n):
        # Stage 1 per own chunk, as a prefill chunk behind the earlier ones (before the budgets'
        # broadcast, so that it overlaps the owner's stage 2): fp32 [B, G, m, e / S] each.
        scores = [ops.call("proxy_block_scores", qc, k_full[:, :e], None, None, e - s, e, S, G, cfg.stride, scale,
                           True) for (s, e), qc in zip(spans, q_chunks)]
        # Stage 2 on the rank that holds the last query block (its chunk ends at n).
        owner = next(r for r in range(world) if chunk_spans(n, world, r, layout)[-1][1] == n)
        if rank == owner:
            s, e = spans[-1]
            kstar = ops.call("head_budgets", q_chunks[-1], k_full, None, None, e - s, n, S, float(cfg.gamma),
                             cfg.sink_blocks, cfg.local_blocks, scale, True)
        else:
            kstar = torch.empty(batch, hq, dtype=torch.int32, device=q.device)
        dist.broadcast(kstar, src=dist.get_global_rank(group, owner), group=group)
        # Stage 3 per own chunk, its budgets scaled by the whole sequence's last query block.
        sels = [ops.call("select_blocks", sc, kstar, None, None, e - s, e, S, cfg.sink_blocks, cfg.local_blocks,
                         cfg.min_budget, True, n) for (s, e), sc in zip(spans, scores)]
        del scores
    v_work.wait()
    v_full = _natural_order(v_buf, n, world, layout)
    outs = []
    for i, ((s, e), qc) in enumerate(zip(spans, q_chunks)):
        if sels is None:
            outs.append(dense_attention(qc, k_full[:, :e], v_full[:, :e], causal=True, softmax_scale=scale))
        else:
            outs.append(ops.call("block_sparse_attention", qc, k_full[:, :e], v_full[:, :e], *sels[i], None, None,
                                 e - s, e, S, scale, True)[0])
    out = torch.cat(outs, dim=1)
    if not return_selection:
        return out
    blocks = [m for s, e in spans for m in range(s // S, e // S)]
    nb = n // S
    if sels is None:  # dense: every candidate of each own row, as proxy_attention reports it
        lens = torch.full((batch,), n, dtype=torch.int64, device=q.device)
        counts, indices = full_selection(lens, lens, nb, nb, hq, S, True)
        kstar = torch.zeros(batch, hq, dtype=torch.int32, device=q.device)
        # The own rows by slices (a list index would be copied to the device from the host).
        sels = [(counts[:, :, s // S:e // S], indices[:, :, s // S:e // S]) for s, e in spans]
    # Each chunk's rows padded with -1 to the whole sequence's nb key blocks.
    sel = CPSelection(torch.cat([c for c, _ in sels], dim=2),
                      torch.cat([F.pad(i, (0, nb - i.shape[-1]), value=-1) for _, i in sels], dim=2), kstar, blocks)
    return out, sel
