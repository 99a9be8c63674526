"""ProxyAttn as an SGLang attention backend for prefill (extend); decoding stays with another backend.

    from proxyattn import ProxyAttnConfig
    from proxyattn.integrations import sglang as pa_sgl

    pa_sgl.register(ProxyAttnConfig(), dense_layers=2)    # backend name "proxyattn"
    # python -m sglang.launch_server ... --page-size 64 \\
    #     --prefill-attention-backend proxyattn --decode-attention-backend fa3

SGLang runs the model in scheduler processes of its own, and each loads the plugins of the
"sglang.srt.plugins" entry-point group before it reads the server arguments. So a deployment
declares `plugin` below as such an entry point in a package it installs:

    [project.entry-points."sglang.srt.plugins"]
    proxyattn = "proxyattn.integrations.sglang:plugin"

and `plugin` registers the backend in every process, with the config from the environment
(PROXYATTN_SGLANG_CONFIG: a JSON object of ProxyAttnConfig fields; PROXYATTN_SGLANG_DENSE_LAYERS).

What the backend does, per extend forward: it writes the chunk's K/V into SGLang's KV pool (as the
engine's own backends do), then calls proxyattn.proxy_attention_paged on the pool's pages, with
the page table read from req_to_token, seqlens_k = seq_lens (prefix + chunk), cu_seqlens_q from
extend_seq_lens and softmax_scale = layer.scaling. Layers with layer_id < dense_layers run dense
attention (proxyattn's dense path). In MIXED batches (--enable-mixed-chunk) the running requests'
one-token extends get exact attention, like their decode steps: a sequence with fewer queries
than a block runs dense (ProxyAttnConfig.runs_dense), unless dense_below is 0 (the sparse path
on every sequence). Forward modes EXTEND and MIXED only:
decoding raises (pair the backend with --decode-attention-backend), and so do speculative
verify/draft and dLLM batches,
cross-attention, sliding windows, logit capping, MLA and pools that translate KV ids.

Page size: SGLang's default is 1, which proxy_attention_paged refuses (proxyattn.paged.PAGE_SIZES:
16 to 256): start SGLang with --page-size 16 or more (128 or more gives the Hopper kernel one TMA
box per key block). When SGLang builds the backend, at startup, it refuses page sizes outside
PAGE_SIZES, head dims outside proxyattn.config.SUPPORTED_HEAD_DIMS and a KV cache in another dtype
than the model's (FP8: --kv-cache-dtype fp8_*).

Importing this module does not import SGLang; the backend class, ProxyAttnBackend (an
AttentionBackend subclass), is built on first use. Tested with
SGLang 0.5.23 on the CPU (tests/test_sglang.py): its real pools and ForwardBatch, against SGLang's
own TorchNativeAttnBackend.
"""
from __future__ import annotations

import functools
from typing import Dict, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import ProxyAttnConfig
from ..paged import PAGE_SIZES, proxy_attention_paged
from ._common import (BackendSettings, head_dim_refusal, kv_dtype_refusal, layer_config, make_settings,
                      settings_from_env)

TESTED_SGLANG_VERSION = "0.5.23"
DEFAULT_NAME = "proxyattn"
CONFIG_ENV = "PROXYATTN_SGLANG_CONFIG"
DENSE_LAYERS_ENV = "PROXYATTN_SGLANG_DENSE_LAYERS"


_SETTINGS: Dict[str, BackendSettings] = {}


class PagedMetadata(NamedTuple):
    """The arguments of proxy_attention_paged that one ForwardBatch gives every layer."""

    page_table: Tensor  # int32 [B, max_pages]
    seqlens_k: Tensor  # int32 [B]: prefix + chunk
    cu_seqlens_q: Tensor  # int32 [B + 1]
    max_seqlen_q: int
    max_seqlen_k: int


def paged_metadata(forward_batch, req_to_token: Tensor, page_size: int) -> PagedMetadata:
    """Map an extend ForwardBatch to proxy_attention_paged's arguments.

    req_to_token [rows, max_context_len] int32 holds each request's token slots; SGLang allocates
    whole pages (slot = page * page_size + offset), so the page of every page_size-th slot is the
    page table. The maxima come from the batch's host copies (seq_lens_cpu,
    extend_seq_lens_cpu), read without a device sync; where a copy is missing the device value is
    read."""
    seq_lens = forward_batch.seq_lens
    if forward_batch.seq_lens_cpu is not None:
        max_k = int(forward_batch.seq_lens_cpu.max())
    else:
        max_k = int(seq_lens.max())
    if forward_batch.extend_seq_lens_cpu is not None:
        max_q = max(forward_batch.extend_seq_lens_cpu)
    else:
        max_q = int(forward_batch.extend_seq_lens.max())
    pages = -(-max_k // page_size)
    slots = req_to_token[forward_batch.req_pool_indices, : pages * page_size : page_size]
    return PagedMetadata(
        page_table=torch.div(slots, page_size, rounding_mode="floor").to(torch.int32),
        seqlens_k=seq_lens.to(torch.int32),
        cu_seqlens_q=F.pad(torch.cumsum(forward_batch.extend_seq_lens, 0, dtype=torch.int32), (1, 0)),
        max_seqlen_q=int(max_q),
        max_seqlen_k=max_k,
    )


def cache_pages(buffer: Tensor, page_size: int) -> Tensor:
    """A layer's K or V buffer of the KV pool as pages [num_pages, page_size, H, D], a view: NHD
    buffers [slots, H, D] (the default) are cut into pages, HND buffers [pages, H, page_size, D]
    (SGLANG_USE_HND_KVCACHE) are transposed."""
    if buffer.dim() == 4:
        return buffer.transpose(1, 2)
    rows = buffer.shape[0] - buffer.shape[0] % page_size
    return buffer[:rows].view(-1, page_size, buffer.shape[1], buffer.shape[2])


def register(config: Optional[ProxyAttnConfig] = None, *, dense_layers: int = 0, name: str = DEFAULT_NAME) -> str:
    """Register (or re-register) the backend with SGLang's attention registry under `name` and
    add `name` to the choices of --attention-backend, --prefill-attention-backend and
    --decode-attention-backend. config: ProxyAttnConfig of the sparse layers (default
    ProxyAttnConfig(); its softmax_scale must be None, since each layer runs with its own scaling).
    dense_layers: layers with layer_id < dense_layers run dense attention. Returns name."""
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS, register_attention_backend

    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    if name in ATTENTION_BACKENDS and name not in _SETTINGS:
        raise ValueError(f"name {name!r} is already an SGLang attention backend; choose another name")
    _SETTINGS[name] = make_settings(config, dense_layers)
    register_attention_backend(name)(functools.partial(_create_backend, name))
    if name not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([name])
    return name


def plugin() -> None:
    """Entry point of the "sglang.srt.plugins" group (see the module docstring): register() with
    the config of PROXYATTN_SGLANG_CONFIG (a JSON object of ProxyAttnConfig fields, e.g.
    '{"gamma": 0.95}') and PROXYATTN_SGLANG_DENSE_LAYERS (an int), both optional."""
    settings = settings_from_env(CONFIG_ENV, DENSE_LAYERS_ENV)
    register(settings.config, dense_layers=settings.dense_layers)


def get_settings(name: str = DEFAULT_NAME) -> BackendSettings:
    if name not in _SETTINGS:
        raise KeyError(f"no proxyattn backend registered under {name!r}; call register(name={name!r}) first")
    return _SETTINGS[name]


def _create_backend(name: str, model_runner):
    return _backend_class()(model_runner, name=name)


def _refuse(what: str) -> NotImplementedError:
    return NotImplementedError(f"the proxyattn SGLang backend does not support {what}")


@functools.lru_cache(maxsize=1)
def _backend_class():
    from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
    from sglang.srt.mem_cache.memory_pool import KVWriteLoc
    from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    class ProxyAttnBackend(AttentionBackend):
        """Prefill (extend) attention through proxyattn.proxy_attention_paged on SGLang's KV pool.
        Built by the attention registry as ATTENTION_BACKENDS[name](model_runner)."""

        def __init__(self, model_runner, name: str = DEFAULT_NAME):
            super().__init__()
            self.settings = get_settings(name)
            self.name = name
            self.device = model_runner.device
            self.req_to_token_pool = model_runner.req_to_token_pool
            self.token_to_kv_pool = model_runner.token_to_kv_pool
            self.page_size = model_runner.page_size
            if self.page_size not in PAGE_SIZES:
                raise ValueError(f"the proxyattn backend needs pages of {PAGE_SIZES} tokens (proxy_attention_paged), "
                                 f"but SGLang runs with page size {self.page_size}: start it with --page-size 64 "
                                 f"(or 16, 32, 128, 256)")
            if getattr(model_runner, "use_mla_backend", False):
                raise _refuse("MLA models")
            if getattr(model_runner, "decode_attention_backend_str", None) == name:
                raise ValueError(f"{name} runs prefill only: pass --prefill-attention-backend {name} and a decode "
                                 f"backend of SGLang, e.g. --decode-attention-backend fa3")
            if isinstance(self.token_to_kv_pool, SWAKVPool):
                raise _refuse("sliding-window KV pools")
            # What the kernels take, read off the model runner as SGLang's own backends read it: the
            # pool's dtype (kv_cache_dtype: under --kv-cache-dtype auto the model's, or FP8 where the
            # checkpoint asks for it), the queries' (dtype, the model's) and the model config's head
            # dim. A layer whose head dim is not the config's meets proxy_attention_paged's own check.
            kv_dtype, q_dtype = model_runner.kv_cache_dtype, model_runner.dtype
            why = kv_dtype_refusal(f"{kv_dtype} with queries in {q_dtype}", kv_dtype == q_dtype)
            if why is not None:
                raise ValueError(f"the proxyattn SGLang backend cannot read this KV cache ({why}): start SGLang "
                                 f"with a cache in the model's dtype (--kv-cache-dtype auto, or bfloat16 for a "
                                 f"bfloat16 model whose checkpoint asks for an FP8 cache)")
            why = head_dim_refusal(model_runner.model_config.head_dim)
            if why is not None:
                raise ValueError(f"the proxyattn SGLang backend cannot run this model ({why}): serve it with "
                                 f"another --prefill-attention-backend")
            self.forward_metadata: Optional[PagedMetadata] = None
            self._configs: Dict[tuple, ProxyAttnConfig] = {}

        def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
            mode = forward_batch.forward_mode
            if mode not in (ForwardMode.EXTEND, ForwardMode.MIXED):
                raise _refuse(f"forward mode {mode.name} (extend and mixed batches only; decoding belongs to "
                              f"--decode-attention-backend)")
            if forward_batch.encoder_lens is not None:
                raise _refuse("encoder-decoder batches")
            translator = self.kv_index_translator
            if translator is not None and getattr(translator, "is_translating", False):
                raise _refuse("KV pools that translate token ids (unified pools)")
            self.forward_metadata = paged_metadata(forward_batch, self.req_to_token_pool.req_to_token,
                                                   self.page_size)

        def layer_config(self, layer) -> ProxyAttnConfig:
            """The config of one layer: the registered one with the layer's scaling; dense
            (dense_below past any length) for layer_id < dense_layers."""
            key = (layer.layer_id, float(layer.scaling))
            cfg = self._configs.get(key)
            if cfg is None:
                cfg = self._configs[key] = layer_config(self.settings, layer.layer_id, layer.scaling)
            return cfg

        def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs):
            unsupported = sorted(key for key, val in kwargs.items() if val is not None and val is not False)
            if unsupported:
                raise _refuse(f"the arguments {unsupported}")
            if layer.is_cross_attention or getattr(layer.attn_type, "name", "DECODER") != "DECODER":
                raise _refuse("cross-attention and encoder-only layers")
            if layer.sliding_window_size is not None and layer.sliding_window_size > -1:
                raise _refuse("sliding-window layers")
            if layer.logit_cap and layer.logit_cap > 0:
                raise _refuse("logit capping")
            if layer.qk_head_dim != layer.v_head_dim:
                raise _refuse(f"different q/k and v head dims ({layer.qk_head_dim}, {layer.v_head_dim})")
            if save_kv_cache and k is not None:
                self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc.for_layer(forward_batch, layer), k, v,
                                                    layer.k_scale, layer.v_scale)
            k_buf, v_buf = self.token_to_kv_pool.get_kv_buffer(layer.layer_id)
            m = self.forward_metadata
            out = proxy_attention_paged(q.view(-1, layer.tp_q_head_num, layer.qk_head_dim),
                                        cache_pages(k_buf, self.page_size), cache_pages(v_buf, self.page_size),
                                        m.page_table, m.seqlens_k, m.cu_seqlens_q, m.max_seqlen_q, m.max_seqlen_k,
                                        self.layer_config(layer), causal=True)
            return out.view(-1, layer.tp_q_head_num * layer.v_head_dim)

        def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs):
            raise _refuse(f"decoding: pass --prefill-attention-backend {self.name} with a decode backend of SGLang "
                          f"(--decode-attention-backend fa3, for example)")

        def support_triton(self):
            return False

    return ProxyAttnBackend


def __getattr__(name: str):
    if name == "ProxyAttnBackend":
        return _backend_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BackendSettings",
    "DEFAULT_NAME",
    "PagedMetadata",
    "TESTED_SGLANG_VERSION",
    "cache_pages",
    "get_settings",
    "paged_metadata",
    "plugin",
    "register",
]
