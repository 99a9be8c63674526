"""Thin wrappers over torch.ops.proxyattn.*: input validation, fake (meta) kernels, and the
pure-PyTorch reference registered as the CPU kernel of every op.

Validation raises TypeError/ValueError naming what was expected and what arrived, before
any kernel runs. Values of cu_seqlens are checked only when they live on the CPU: reading
a CUDA tensor on the host would synchronise, so device-resident cu_seqlens are trusted
(kernels clamp each length into [0, max_seqlen], so bad values cannot corrupt memory).
"""
from __future__ import annotations

import inspect
import warnings
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from . import reference
from .config import (INT32_MAX, SUPPORTED_HEAD_DIMS, ProxyAttnConfig, check_attention_scale, check_field, check_int,
                     check_softmax_scale)

try:
    from . import _C  # noqa: F401  (loads the TORCH_LIBRARY schemas and the CUDA kernels)

    HAS_EXTENSION = True
    EXTENSION_ERROR: Optional[BaseException] = None
except ImportError as exc:  # CPU-only use still works through the reference
    HAS_EXTENSION = False
    EXTENSION_ERROR = exc

OP_NAMES = ("proxy_block_scores", "head_budgets", "select_blocks", "block_sparse_attention")

# select_blocks handles up to this many key blocks per row (one row of scores in shared memory);
# its block indices are int16. block_sparse_attention also takes hand-made int32 indices.
MAX_KEY_BLOCKS = 32768
INDEX_DTYPES = (torch.int16, torch.int32)

# The CUDA kernels put the batch and the query heads in grid dimensions of at most 65535 blocks;
# the limit holds on every device, so that CPU and CUDA accept the same calls.
MAX_BATCH = MAX_HEADS = 65535


def index_dtype(nkb: int) -> torch.dtype:
    """dtype of a selection's block indices for rows of nkb key blocks: int16 (as select_blocks
    writes them) while every block number fits, else int32."""
    return torch.int16 if nkb <= MAX_KEY_BLOCKS else torch.int32


def check_key_blocks(seqlen_k: int, block_size: int) -> None:
    """ValueError unless ceil(seqlen_k / block_size) <= MAX_KEY_BLOCKS."""
    nkb = -(-seqlen_k // block_size)
    if nkb > MAX_KEY_BLOCKS:
        raise ValueError(f"at most {MAX_KEY_BLOCKS} key blocks are supported (seqlen_k <= "
                         f"{MAX_KEY_BLOCKS * block_size} at block_size {block_size}), got seqlen_k={seqlen_k}: "
                         f"{nkb} blocks")

_CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CUDA_DTYPES = (torch.float16, torch.bfloat16)


class Layout(NamedTuple):
    varlen: bool
    batch: int
    max_seqlen_q: int
    max_seqlen_k: int
    q_heads: int
    kv_heads: int
    head_dim: int


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ------------------------------------------------------------------ validation


def _require_tensor(name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def resolve_scale(softmax_scale, head_dim: int) -> float:
    scale = check_softmax_scale(softmax_scale)
    return head_dim ** -0.5 if scale is None else scale


def check_no_grad(what: str, named) -> None:
    """RuntimeError if grad mode is on and a tensor of (name, tensor) pairs requires grad: the ops
    are inference-only (no backward), and an output without the gradient the caller asked for would
    be a silent wrong answer."""
    if not torch.is_grad_enabled():
        return
    for name, t in named:
        if isinstance(t, Tensor) and t.requires_grad:
            raise RuntimeError(
                f"{what} is inference-only (it has no backward), but {name} requires grad while grad mode is on; "
                f"run it under torch.no_grad() or torch.inference_mode(), or pass {name}.detach()")


def check_aligned(named) -> None:
    """The kernels move 16 bytes at a time: every row and head of each (name, CUDA tensor) must
    start 16-byte aligned (size-1 dims excepted). Under torch.compile the storage offset is not
    traceable; the op's own C++ check still runs. Raises ValueError."""
    if torch.compiler.is_compiling():
        return
    for name, t in named:
        if not t.is_cuda:
            continue
        shape, stride = t.shape, t.stride()
        if is_fake(t):  # no data to point at (fake tensors outside torch.compile): the offset is all there is
            off = t.storage_offset() * t.element_size() % 16
        else:  # the pointer, not the storage offset: from_dlpack / from_numpy views can be off at offset 0
            off = t.data_ptr() % 16
        bad = off
        for i in range(t.dim() - 1):
            bad = bad or (shape[i] > 1 and stride[i] % 8)
        if bad:
            raise ValueError(f"{name} must start on a 16-byte boundary with strides that are multiples of 8 "
                             f"(16-byte aligned rows), got a data pointer {off} bytes past one and strides "
                             f"{tuple(t.stride())}; pass a fresh copy (.clone(memory_format=torch.contiguous_format)): "
                             f".contiguous() keeps the pointer of an already contiguous view")


def check_qkv(q: Tensor, k: Tensor, v: Optional[Tensor], cu_seqlens_q: Optional[Tensor],
              cu_seqlens_k: Optional[Tensor], max_seqlen_q: Optional[int], max_seqlen_k: Optional[int],
              causal: bool) -> Layout:
    """Validate attention inputs; return their layout. Raises TypeError/ValueError.

    The 16-byte alignment rule (check_aligned) holds for every path, proxy_attention's dense
    one included: on an H200, SDPA (torch 2.11, cuDNN backend) returned wrong values for views
    8 bytes off (tests/test_hardening_gpu.py::test_dense_path_rejects_misaligned_views)."""
    named = [("q", q), ("k", k)] + ([("v", v)] if v is not None else [])
    for name, t in named:
        _require_tensor(name, t)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    for name, t in named[1:]:
        if t.dtype != q.dtype:
            raise TypeError(f"q, k and v must share one dtype: q is {q.dtype}, {name} is {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"q, k and v must be on one device: q is on {q.device}, {name} is on {t.device}")
    if q.device.type not in ("cpu", "cuda"):
        raise ValueError(f"proxyattn runs on CPU and CUDA tensors, got q on {q.device}")
    allowed = _CUDA_DTYPES if q.is_cuda else _CPU_DTYPES
    if q.dtype not in allowed:
        raise TypeError(f"unsupported dtype {q.dtype} on {q.device.type}: expected one of {list(allowed)}")
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    rank = 3 if varlen else 4
    layout_txt = "[total, heads, head_dim] with cu_seqlens" if varlen else "[batch, seqlen, heads, head_dim]"
    for name, t in named:
        if t.dim() != rank:
            raise ValueError(f"{name} must have rank {rank} ({layout_txt}), got shape {tuple(t.shape)}")
    if v is not None and k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    d = q.shape[-1]
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {d}")
    if k.shape[-1] != d:
        raise ValueError(f"q and k must have the same head_dim, got {d} and {k.shape[-1]}")
    hq, hkv = q.shape[-2], k.shape[-2]
    if hq == 0 or hkv == 0 or hq % hkv != 0:
        raise ValueError(f"the {hq} query heads must be a positive multiple of the {hkv} KV heads")
    _check_heads(hq)
    for name, t in named:
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides "
                             f"{tuple(t.stride())}; call .contiguous()")
    check_aligned(named)
    if not varlen:
        b, nq, nk = q.shape[0], q.shape[1], k.shape[1]
        if k.shape[0] != b:
            raise ValueError(f"q and k must have the same batch size, got {b} and {k.shape[0]}")
        _check_tokens(batch=b, seqlen_q=nq, seqlen_k=nk)
        _check_batch(b)
        if causal and nq > nk:
            raise ValueError(f"causal attention needs seqlen_q <= seqlen_k (bottom-right aligned), got {nq} > {nk}")
        for name, given, actual in (("max_seqlen_q", max_seqlen_q, nq), ("max_seqlen_k", max_seqlen_k, nk)):
            if given is not None and given != actual:
                raise ValueError(f"{name}={given} disagrees with the fixed-length input's {actual}")
        return Layout(False, b, nq, nk, hq, hkv, d)
    if cu_seqlens_q is None or cu_seqlens_k is None:
        raise ValueError("varlen inputs need both cu_seqlens_q and cu_seqlens_k")
    _check_tokens(total_q=q.shape[0], total_k=k.shape[0])
    batch = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q)
    if _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q) != batch:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length, got "
                         f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
    _check_batch(batch)
    mq = check_int("max_seqlen_q", max_seqlen_q, 1, INT32_MAX)
    mk = check_int("max_seqlen_k", max_seqlen_k, 1, INT32_MAX)
    if cu_seqlens_q.device.type == "cpu" and cu_seqlens_k.device.type == "cpu":
        _check_cu_values("cu_seqlens_q", cu_seqlens_q, q.shape[0], mq)
        _check_cu_values("cu_seqlens_k", cu_seqlens_k, k.shape[0], mk)
        if causal:
            _check_causal_lengths(cu_seqlens_q, cu_seqlens_k)
    return Layout(True, batch, mq, mk, hq, hkv, d)


def _check_tokens(**sizes: int) -> None:
    """ValueError for an input without tokens: a zero among `sizes` (name=size), a fixed-length
    input's batch and lengths or a varlen input's query and key rows. Shapes, not values, so every
    device refuses the same calls; empty sequences beside others in a varlen batch are accepted
    (_check_cu_values)."""
    if 0 in sizes.values():
        raise ValueError("zero-length input: " + ", ".join(f"{name}={n}" for name, n in sizes.items())
                         + "; expected at least one of each")


def _check_batch(batch: int) -> None:
    if batch > MAX_BATCH:
        raise ValueError(f"at most {MAX_BATCH} sequences per call are supported, got {batch}")


def _check_heads(q_heads: int) -> None:
    if q_heads > MAX_HEADS:
        raise ValueError(f"at most {MAX_HEADS} query heads are supported, got {q_heads}")


def _check_cu_seqlens(name: str, cu, like: Tensor) -> int:
    _require_tensor(name, cu)
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be 1-D with batch + 1 >= 2 entries, got shape {tuple(cu.shape)}")
    if not cu.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {tuple(cu.stride())}; call .contiguous()")
    if like.is_cuda and cu.device != like.device:
        raise ValueError(f"{name} must be on {like.device} like q, got {cu.device}")
    if not like.is_cuda and cu.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU like q, got {cu.device}")
    return cu.numel() - 1


def _check_cu_values(name: str, cu: Tensor, total: Optional[int], max_seqlen: int) -> None:
    """Values of a CPU cu_seqlens: from 0, non-decreasing, ending at `total` (when given), no
    sequence longer than max_seqlen. Equal neighbours are an empty sequence, which CUDA (where the
    values are not read) and the CPU both take (docs/design.md, Composite)."""
    vals = cu.tolist()
    if vals[0] != 0:
        raise ValueError(f"{name} must start at 0, got {vals[0]}")
    lens = [b - a for a, b in zip(vals[:-1], vals[1:])]
    for i, n in enumerate(lens):
        if n < 0:
            raise ValueError(f"{name} must be non-decreasing, but entry {i + 1} ({vals[i + 1]}) < entry {i} ({vals[i]})")
    if total is not None and vals[-1] != total:
        raise ValueError(f"{name} must end at the total token count {total}, got {vals[-1]}")
    if max(lens) > max_seqlen:
        raise ValueError(f"max_seqlen for {name} is {max_seqlen}, but sequence {lens.index(max(lens))} "
                         f"has {max(lens)} tokens")


def _check_causal_lengths(cu_q: Tensor, cu_k: Tensor) -> None:
    lq, lk = torch.diff(cu_q), torch.diff(cu_k)
    bad = torch.nonzero(lq > lk).flatten().tolist()
    if bad:
        i = bad[0]
        raise ValueError(f"causal attention needs seqlen_q <= seqlen_k in every sequence; sequence {i} has "
                         f"{int(lq[i])} queries and {int(lk[i])} keys")


def _check_int_tensor(name: str, t, shape: Tuple[int, ...], like: Tensor, last_free: bool = False,
                      dtypes: Tuple[torch.dtype, ...] = (torch.int32,)) -> None:
    _require_tensor(name, t)
    if t.dtype not in dtypes:
        want = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must be {want}, got {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name} must be on {like.device}, got {t.device}")
    ok = t.dim() == len(shape) and tuple(t.shape[: len(shape) - (1 if last_free else 0)]) == (
        shape[:-1] if last_free else shape)
    if not ok or (last_free and t.shape[-1] < 1):
        want = tuple(shape[:-1]) + ("K>=1",) if last_free else tuple(shape)
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")


# ------------------------------------------------------------------ dispatch


# Which ops have a CUDA kernel in this build, read once (a plain dict lookup traces under
# torch.compile; the dispatcher query does not).
_CUDA_KERNELS = {name: HAS_EXTENSION and torch._C._dispatch_has_kernel_for_dispatch_key(f"proxyattn::{name}", "CUDA")
                 for name in OP_NAMES}


def _has_cuda_kernel(name: str) -> bool:
    return _CUDA_KERNELS[name]


def cuda_kernel_available(name: str) -> bool:
    """Whether this build has a CUDA kernel for torch.ops.proxyattn.<name>."""
    if name not in OP_NAMES:
        raise ValueError(f"unknown op {name!r}; expected one of {OP_NAMES}")
    return _has_cuda_kernel(name)


_warned = set()
# Each op's argument names, in schema order (the references registered as the CPU kernels take the
# same arguments), for the errors `call` raises.
_ARG_NAMES = {n: tuple(inspect.signature(getattr(reference, n)).parameters) for n in OP_NAMES}


def call(name: str, *args):
    """The one dispatch of the library: torch.ops.proxyattn.<name> (the CUDA kernel, or on CPU the
    reference registered as its CPU kernel); on CUDA without a kernel in this build (or without the
    extension), the reference on the GPU, with one warning per op. Raises the inference-only error
    (check_no_grad) before anything runs. args: the op's schema arguments, tensors first."""
    check_no_grad(f"proxyattn.{name}", [(n, a) for n, a in zip(_ARG_NAMES[name], args) if isinstance(a, Tensor)])
    device = args[0].device
    if device.type == "cuda" and not _has_cuda_kernel(name):
        if name not in _warned:
            _warned.add(name)
            why = f"the extension failed to import ({EXTENSION_ERROR})" if not HAS_EXTENSION else "this build has none"
            warnings.warn(f"proxyattn: no CUDA kernel for {name} ({why}); running the slow reference on the GPU",
                          RuntimeWarning, stacklevel=3)
        return getattr(reference, name)(*args)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"proxyattn runs on CPU and CUDA tensors, got {device}")
    if HAS_EXTENSION:
        return getattr(torch.ops.proxyattn, name)(*args)
    return getattr(reference, name)(*args)


# ------------------------------------------------------------------ paged KV caches


# Page sizes the paged entry point takes (the CUDA glue checks the same range). Why these: the
# Hopper kernel loads K/V pages with TMA boxes, so a key block (64 or 128 tokens) must be a whole
# number of pages or lie inside one page, which powers of two give; below 16 tokens a 128-token block would take more than 8 page
# loads (page size 1, SGLang's default, is a gather of single tokens: raise it with --page-size);
# above 256 no kernel has been measured.
PAGE_SIZES = (16, 32, 64, 128, 256)


def _page_size_error(page_size: int) -> str:
    return (f"k_cache.shape[1] is the page size and must be one of {PAGE_SIZES}, got {page_size}. "
            f"The kernels load pages whole (TMA boxes on Hopper), so a key block of 64 or 128 "
            f"tokens must be a whole number of pages or lie inside one page (powers of two); pages under 16 "
            f"tokens would make a block more than 8 separate loads (SGLang's default page size 1: start it "
            f"with --page-size 16 or more); pages over 256 tokens are not measured")


def check_paged_cache(k_cache, v_cache, page_table, seqlens_k, max_seqlen_k, batch: Optional[int]) -> None:
    """The paged arguments alone (shapes, dtypes, devices, page size, capacity; values where they
    are on the CPU). batch: the batch size the caller's other arguments give, or None."""
    _require_tensor("k_cache", k_cache)
    if v_cache is not None:
        _require_tensor("v_cache", v_cache)
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must have rank 4 [num_pages, page_size, Hkv, D], got shape {tuple(k_cache.shape)}")
    if v_cache is not None and v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have the shape of k_cache {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    if v_cache is not None and (v_cache.device != k_cache.device or v_cache.dtype != k_cache.dtype):
        raise TypeError(f"v_cache must have the dtype and device of k_cache ({k_cache.dtype} on {k_cache.device}), "
                        f"got {v_cache.dtype} on {v_cache.device}")
    num_pages, page_size = k_cache.shape[0], k_cache.shape[1]
    if page_size not in PAGE_SIZES:
        raise ValueError(_page_size_error(page_size))
    if num_pages < 1:
        raise ValueError(f"k_cache must hold at least one page, got shape {tuple(k_cache.shape)}")
    max_seqlen_k = check_int("max_seqlen_k", max_seqlen_k, 1, INT32_MAX)
    _require_tensor("page_table", page_table)
    if page_table.dim() != 2:
        raise ValueError(f"page_table must have shape [B, max_pages], got {tuple(page_table.shape)}")
    b = page_table.shape[0] if batch is None else batch
    _check_int_tensor("page_table", page_table, (b, 1), k_cache, last_free=True)
    _check_int_tensor("seqlens_k", seqlens_k, (b,), k_cache)
    if b * max_seqlen_k > INT32_MAX:
        raise ValueError(f"batch * max_seqlen_k = {b} * {max_seqlen_k} must be below 2^31 (the int32 prefix sums of "
                         f"the key lengths, and the rows of a gather, must not overflow)")
    capacity = page_table.shape[1] * page_size
    if capacity < max_seqlen_k:
        raise ValueError(f"page_table has room for {page_table.shape[1]} pages of {page_size} tokens "
                         f"({capacity} keys) per sequence, fewer than max_seqlen_k={max_seqlen_k}")
    if seqlens_k.device.type != "cpu":
        return  # device values are trusted (reading them would synchronise) and clamped by the gather
    lens = seqlens_k.tolist()
    for i, n in enumerate(lens):
        if not 0 <= n <= max_seqlen_k:
            raise ValueError(f"seqlens_k[{i}] = {n} is outside [0, max_seqlen_k={max_seqlen_k}]")
    used = torch.arange(page_table.shape[1])[None, :] < torch.tensor([-(-n // page_size) for n in lens])[:, None]
    bad = torch.nonzero(used & ((page_table < 0) | (page_table >= num_pages)))
    if bad.numel():
        i, j = bad[0].tolist()
        raise ValueError(f"page_table[{i}, {j}] = {int(page_table[i, j])} is not a page of k_cache (which has "
                         f"{num_pages}); sequence {i} reads its first {-(-lens[i] // page_size)} entries")


# ------------------------------------------------------------------ public stage functions


_D = ProxyAttnConfig()  # the stage functions' defaults are the config's


def proxy_block_scores(q: Tensor, k: Tensor, *, block_size: int = _D.block_size,
                       num_proxy_heads: Optional[int] = _D.num_proxy_heads, stride: int = _D.stride,
                       softmax_scale: Optional[float] = None, causal: bool = True,
                       cu_seqlens_q: Optional[Tensor] = None, cu_seqlens_k: Optional[Tensor] = None,
                       max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None) -> Tensor:
    """Stage 1: fp32 [B, G, nqb, nkb] max-pooled softmax scores of the pooled proxy heads.
    num_proxy_heads None: the config's default for these head counts (default_proxy_heads)."""
    lay = check_qkv(q, k, None, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal)
    check_field("block_size", block_size)
    check_field("num_proxy_heads", num_proxy_heads)
    check_field("stride", stride)
    g = ProxyAttnConfig(num_proxy_heads=num_proxy_heads).proxy_heads(lay.q_heads, lay.kv_heads)
    scale = resolve_scale(softmax_scale, lay.head_dim)
    return call("proxy_block_scores", q, k, cu_seqlens_q, cu_seqlens_k, lay.max_seqlen_q, lay.max_seqlen_k,
                block_size, g, stride, scale, causal)


def head_budgets(q: Tensor, k: Tensor, *, block_size: int = _D.block_size, gamma: float = _D.gamma,
                 sink_blocks: int = _D.sink_blocks, local_blocks: int = _D.local_blocks,
                 softmax_scale: Optional[float] = None, causal: bool = True,
                 cu_seqlens_q: Optional[Tensor] = None, cu_seqlens_k: Optional[Tensor] = None,
                 max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None) -> Tensor:
    """Stage 2: int32 [B, Hq] k*, the non-forced blocks each head needs to reach gamma."""
    lay = check_qkv(q, k, None, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal)
    check_field("block_size", block_size)
    gamma = check_field("gamma", gamma)
    check_field("sink_blocks", sink_blocks)
    check_field("local_blocks", local_blocks)
    check_key_blocks(lay.max_seqlen_k, block_size)
    scale = resolve_scale(softmax_scale, lay.head_dim)
    return call("head_budgets", q, k, cu_seqlens_q, cu_seqlens_k, lay.max_seqlen_q, lay.max_seqlen_k, block_size,
                gamma, sink_blocks, local_blocks, scale, causal)


def select_blocks(scores: Tensor, kstar: Tensor, *, seqlen_q: int, seqlen_k: int, block_size: int = _D.block_size,
                  sink_blocks: int = _D.sink_blocks, local_blocks: int = _D.local_blocks,
                  min_budget: int = _D.min_budget, causal: bool = True,
                  cu_seqlens_q: Optional[Tensor] = None, cu_seqlens_k: Optional[Tensor] = None,
                  budget_seqlen: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Stage 3: counts int32 [B, Hq, nqb] and ascending, -1 padded indices int16 [B, Hq, nqb, nkb].

    nkb = ceil(seqlen_k / block_size) is at most MAX_KEY_BLOCKS (32768), so every block index fits
    int16: at 1M tokens the index tensor takes half the memory int32 would. NaN scores rank below
    every number and never displace a forced block.

    seqlen_q/seqlen_k are Nq/Nk (fixed length) or max_seqlen_q/k (varlen). Each row's budget
    scales with the candidates of the sequence's last query block; budget_seqlen (fixed length,
    at least seqlen_k and at most MAX_KEY_BLOCKS * block_size) makes that the last query block of a
    sequence of budget_seqlen queries and keys whose chunk the call's rows are (a chunk that ends at
    seqlen_k, bottom-right aligned): the rows then get the selections they get in that whole
    sequence's call."""
    _require_tensor("scores", scores)
    _require_tensor("kstar", kstar)
    check_field("block_size", block_size)
    check_int("seqlen_q", seqlen_q, 1, INT32_MAX)
    check_int("seqlen_k", seqlen_k, 1, INT32_MAX)
    check_field("sink_blocks", sink_blocks)
    check_field("local_blocks", local_blocks)
    check_field("min_budget", min_budget)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if causal and seqlen_q > seqlen_k and cu_seqlens_q is None and cu_seqlens_k is None:
        raise ValueError(f"causal selection needs seqlen_q <= seqlen_k, got {seqlen_q} > {seqlen_k}")
    if scores.dtype != torch.float32:
        raise TypeError(f"scores must be float32, got {scores.dtype}")
    if scores.dim() != 4:
        raise ValueError(f"scores must have shape [B, G, nqb, nkb], got {tuple(scores.shape)}")
    b, g = scores.shape[0], scores.shape[1]
    check_key_blocks(seqlen_k, block_size)
    nqb, nkb = _cdiv(seqlen_q, block_size), _cdiv(seqlen_k, block_size)
    if tuple(scores.shape[2:]) != (nqb, nkb):
        raise ValueError(f"scores must have shape [B, G, {nqb}, {nkb}] for seqlen_q={seqlen_q}, seqlen_k={seqlen_k}, "
                         f"block_size={block_size}, got {tuple(scores.shape)}")
    if kstar.dim() != 2 or kstar.shape[0] != b:
        raise ValueError(f"kstar must have shape [B={b}, Hq], got {tuple(kstar.shape)}")
    hq = kstar.shape[1]
    if g < 1 or hq < 1 or hq % g != 0:
        raise ValueError(f"the {g} proxy groups of scores must divide the {hq} query heads of kstar")
    _check_batch(b)
    _check_heads(hq)
    _check_int_tensor("kstar", kstar, (b, hq), scores)
    if cu_seqlens_q is not None or cu_seqlens_k is not None:
        if cu_seqlens_q is None or cu_seqlens_k is None:
            raise ValueError("varlen selection needs both cu_seqlens_q and cu_seqlens_k")
        for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
            if _check_cu_seqlens(name, cu, scores) != b:
                raise ValueError(f"{name} must have B + 1 = {b + 1} entries, got {cu.numel()}")
        if cu_seqlens_q.device.type == "cpu" and cu_seqlens_k.device.type == "cpu":
            _check_cu_values("cu_seqlens_q", cu_seqlens_q, None, seqlen_q)
            _check_cu_values("cu_seqlens_k", cu_seqlens_k, None, seqlen_k)
            if causal:
                _check_causal_lengths(cu_seqlens_q, cu_seqlens_k)
    if budget_seqlen is not None:
        if cu_seqlens_q is not None:
            raise ValueError("budget_seqlen takes the chunk of one fixed-length sequence, got cu_seqlens (varlen)")
        # The length of a sequence check_key_blocks takes.
        check_int("budget_seqlen", budget_seqlen, seqlen_k, MAX_KEY_BLOCKS * block_size)
    return call("select_blocks", scores, kstar, cu_seqlens_q, cu_seqlens_k, seqlen_q, seqlen_k, block_size,
                sink_blocks, local_blocks, min_budget, causal, budget_seqlen or 0)


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, counts: Tensor, indices: Tensor, *,
                           block_size: int = _D.block_size, softmax_scale: Optional[float] = None,
                           causal: bool = True, cu_seqlens_q: Optional[Tensor] = None,
                           cu_seqlens_k: Optional[Tensor] = None, max_seqlen_q: Optional[int] = None,
                           max_seqlen_k: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Stage 4: attention over the selected key blocks. Returns out (like q) and lse fp32
    ([B, Hq, Nq]; varlen [Hq, total_q]). Rows that see no key: out 0, lse -inf.

    The selection of (b, h, query block m) is read as a set: the distinct values among the first
    counts[b, h, m] entries of indices[b, h, m] (a count below 0 reads as 0, one above K as K) that
    lie in [0, nkb) of that sequence. Order and repetition do not matter, other entries are
    ignored, and keys a row may not see stay masked by causality; so any counts/indices (int16 or
    int32) are memory-safe, and CPU and CUDA compute the same thing. Speed does depend on order:
    ascending rows (as select_blocks writes them) are walked in one pass, rows in another order
    pay a scan of the entries already walked for each entry (up to count^2 loads per row), so sort
    hand-made rows ascending. Inference only."""
    lay = check_qkv(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal)
    check_field("block_size", block_size)
    scale = resolve_scale(softmax_scale, lay.head_dim)
    check_attention_scale(scale)
    nqb = _cdiv(lay.max_seqlen_q, block_size)
    _check_int_tensor("counts", counts, (lay.batch, lay.q_heads, nqb), q)
    _check_int_tensor("indices", indices, (lay.batch, lay.q_heads, nqb, 1), q, last_free=True,
                      dtypes=INDEX_DTYPES)
    return call("block_sparse_attention", q, k, v, counts, indices, cu_seqlens_q, cu_seqlens_k, lay.max_seqlen_q,
                lay.max_seqlen_k, block_size, scale, causal)


# ------------------------------------------------------------------ CPU kernels and fakes

if HAS_EXTENSION:
    for _name in OP_NAMES:
        torch.library.impl(f"proxyattn::{_name}", "CPU")(getattr(reference, _name))

    def _batch(q: Tensor, cu_q: Optional[Tensor]) -> int:
        return q.shape[0] if cu_q is None else cu_q.shape[0] - 1

    @torch.library.register_fake("proxyattn::proxy_block_scores")
    def _scores_fake(q, k, cu_q, cu_k, max_q, max_k, block_size, num_proxy_heads, stride, scale, causal,
                     page_table=None):
        return q.new_empty((_batch(q, cu_q), num_proxy_heads, _cdiv(max_q, block_size), _cdiv(max_k, block_size)),
                           dtype=torch.float32)

    @torch.library.register_fake("proxyattn::head_budgets")
    def _budgets_fake(q, k, cu_q, cu_k, max_q, max_k, block_size, gamma, sink, local, scale, causal,
                      page_table=None):
        return q.new_empty((_batch(q, cu_q), q.shape[-2]), dtype=torch.int32)

    @torch.library.register_fake("proxyattn::select_blocks")
    def _select_fake(scores, kstar, cu_q, cu_k, max_q, max_k, block_size, sink, local, min_budget, causal,
                     budget_seqlen=0):
        b, hq = kstar.shape
        nqb, nkb = scores.shape[2], scores.shape[3]
        return (scores.new_empty((b, hq, nqb), dtype=torch.int32),
                scores.new_empty((b, hq, nqb, nkb), dtype=torch.int16))

    @torch.library.register_fake("proxyattn::block_sparse_attention")
    def _bsa_fake(q, k, v, counts, indices, cu_q, cu_k, max_q, max_k, block_size, scale, causal, page_table=None):
        hq = q.shape[-2]
        lse_shape = (hq, q.shape[0]) if cu_q is not None else (q.shape[0], hq, q.shape[1])
        return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(lse_shape, dtype=torch.float32)
