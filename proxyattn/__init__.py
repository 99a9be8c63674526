"""proxyattn: training-free block-sparse attention for long-context prefill, guided by
pooled proxy heads with per-head dynamic budgets (ProxyAttn, arXiv 2509.24745).

Public API: ProxyAttnConfig, proxy_attention, proxy_attention_varlen, proxy_attention_paged (a
paged KV cache; gather_paged_kv gives the stages its keys), and the four stages
proxy_block_scores, head_budgets, select_blocks, block_sparse_attention. CPU tensors run the
pure-PyTorch reference (proxyattn.reference); CUDA tensors run the compiled kernels.
"""
from . import reference
from .attention import ProxyAttnSelection, proxy_attention, proxy_attention_varlen
from .config import ProxyAttnConfig
from .ops import (
    EXTENSION_ERROR,
    HAS_EXTENSION,
    block_sparse_attention,
    cuda_kernel_available,
    head_budgets,
    proxy_block_scores,
    select_blocks,
)
from .paged import PagedKV, gather_paged_kv, proxy_attention_paged

__version__ = "0.1.0"

__all__ = [
    "ProxyAttnConfig",
    "ProxyAttnSelection",
    "proxy_attention",
    "proxy_attention_varlen",
    "proxy_attention_paged",
    "gather_paged_kv",
    "PagedKV",
    "proxy_block_scores",
    "head_budgets",
    "select_blocks",
    "block_sparse_attention",
    "cuda_kernel_available",
    "reference",
    "HAS_EXTENSION",
    "EXTENSION_ERROR",
]
