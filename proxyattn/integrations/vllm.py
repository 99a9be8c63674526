"""ProxyAttn as a vLLM (V1) attention backend: prefill rows through proxyattn, the rest through
vLLM's FlashAttention backend.

    from proxyattn import ProxyAttnConfig
    from proxyattn.integrations import vllm as pa_vllm

    pa_vllm.register(ProxyAttnConfig(), dense_layers=2)    # backend name "PROXYATTN"
    # vllm serve ... --block-size 64 --attention-backend PROXYATTN

vLLM runs the model in worker processes, and each loads the plugins of the "vllm.general_plugins"
entry-point group first. So a deployment declares `plugin` below as such an entry point in a
package it installs:

    [project.entry-points."vllm.general_plugins"]
    proxyattn = "proxyattn.integrations.vllm:plugin"

and `plugin` registers the backend in every process, with the config from the environment
(PROXYATTN_VLLM_CONFIG: a JSON object of ProxyAttnConfig fields; PROXYATTN_VLLM_DENSE_LAYERS).

The backend, ProxyAttnBackend, subclasses vLLM's FlashAttentionBackend and keeps its metadata
builder (extended), its KV-cache update and its kernels for everything but prefill:
- The builder asks vLLM to put decode requests (query length <= 1, or 1 + the speculative tokens)
  at the front of the batch (reorder_batch_threshold) and splits each batch there
  (split_decodes_and_prefills): FlashAttention metadata for the decode rows, and the arguments of
  proxy_attention_paged for the rest.
- The impl sends decode rows to FlashAttentionImpl.forward and prefill rows (first chunks and
  later chunks behind a cached prefix) to proxyattn.proxy_attention_paged on the cache's views:
  page_table = block_table, seqlens_k = seq_lens (prefix + chunk), cu_seqlens_q from
  query_start_loc, max_seqlen_q / max_seqlen_k = the largest prefill query length and the
  largest prefill seq_lens_cpu_upper_bound (max_seq_len without it), softmax scale = impl.scale.
  Layers with index < dense_layers run dense attention (proxyattn's dense path).
- Left entirely to FlashAttention: layers that are not causal decoder self-attention or that use a
  sliding window, ALiBi, logit soft-capping, attention sinks, or a KV cache in FP8 or another dtype
  than the model's; batches with a per-request or non-causal mask, multimodal prefix-LM ranges or
  R-SWA. Decode context parallelism is refused (vLLM does not select the backend with it).
- Full CUDA graphs are offered for uniform decode batches only (prefill batches run eagerly, as
  with piecewise graphs).

Block size: vLLM's kernel block size is the page size (its allocation block, --block-size, may be
any multiple of one), and proxy_attention_paged takes 16, 32, 64, 128 and 256
(proxyattn.paged.PAGE_SIZES), the kernel block sizes the backend declares. The builder refuses
others when vLLM builds it at startup.

Importing this module does not import vLLM; the classes are built on first use. Tested with vLLM
0.33.0 on the CPU (tests/test_vllm.py): its real metadata builder and cache views.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Dict, NamedTuple, Optional

from torch import Tensor

from ..config import ProxyAttnConfig
from ..paged import PAGE_SIZES, proxy_attention_paged
from ._common import (BackendSettings, head_dim_refusal, kv_dtype_refusal, layer_config, make_settings,
                      settings_from_env)

TESTED_VLLM_VERSION = "0.33.0"
DEFAULT_NAME = "PROXYATTN"
CONFIG_ENV = "PROXYATTN_VLLM_CONFIG"
DENSE_LAYERS_ENV = "PROXYATTN_VLLM_DENSE_LAYERS"
BACKEND_PATH = __name__ + ".ProxyAttnBackend"

_SETTINGS: Optional[BackendSettings] = None


class PagedPrefill(NamedTuple):
    """The prefill rows of a batch as proxy_attention_paged's arguments: query rows
    token_start .. token_end, requests req_start .. req_start + page_table.shape[0]."""

    token_start: int
    token_end: int
    req_start: int
    page_table: Tensor  # int32 [B, max_blocks]
    seqlens_k: Tensor  # int32 [B]: computed + chunk
    cu_seqlens_q: Tensor  # int32 [B + 1], from 0
    max_seqlen_q: int
    max_seqlen_k: int


def paged_prefill(query_start_loc: Tensor, query_start_loc_cpu: Tensor, seq_lens: Tensor, block_table: Tensor,
                  max_seq_len: int, num_decodes: int, num_reqs: int,
                  seq_lens_upper_cpu: Optional[Tensor] = None) -> Optional[PagedPrefill]:
    """Map the requests num_decodes .. num_reqs of vLLM's batch metadata (query_start_loc,
    its host copy, seq_lens, block_table, max_seq_len) to proxy_attention_paged's arguments.
    Trailing requests without query tokens (batch padding) are left out; None when no request
    is left. max_seqlen_k bounds the prefill requests' keys alone when seq_lens_upper_cpu (a host
    upper bound of every request's length, vLLM's seq_lens_cpu_upper_bound) is given, so that a
    long decode in the batch neither sizes the estimate's buffers nor turns off the dense path of
    short prefills; else it is max_seq_len. Reads host values only: no device sync."""
    qsl = query_start_loc_cpu[:num_reqs + 1].tolist()
    end = num_reqs
    while end > num_decodes and qsl[end] == qsl[end - 1]:
        end -= 1
    if end == num_decodes:
        return None
    start_tok = qsl[num_decodes]
    max_k = int(max_seq_len)
    if seq_lens_upper_cpu is not None and seq_lens_upper_cpu.device.type == "cpu":
        max_k = min(max_k, int(seq_lens_upper_cpu[num_decodes:end].max()))
    return PagedPrefill(
        token_start=start_tok,
        token_end=qsl[end],
        req_start=num_decodes,
        page_table=block_table[num_decodes:end],
        seqlens_k=seq_lens[num_decodes:end],
        cu_seqlens_q=query_start_loc[num_decodes:end + 1] - start_tok,
        max_seqlen_q=max(b - a for a, b in zip(qsl[num_decodes:end], qsl[num_decodes + 1:end + 1])),
        max_seqlen_k=max_k,
    )


def kv_cache_views(kv_cache: Tensor, head_size: int):
    """K and V pages [num_blocks, block_size, Hkv, D] of one layer's cache [num_blocks, Hkv,
    block_size, 2 * D] (vLLM's logical shape, any physical layout), as FlashAttention reads them:
    views, K and V halves of each row."""
    return kv_cache.transpose(1, 2).split(head_size, dim=-1)


def register(config: Optional[ProxyAttnConfig] = None, dense_layers: int = 0) -> str:
    """Register the backend with vLLM's attention backend registry as "PROXYATTN" (select it with
    --attention-backend PROXYATTN) and store the settings it runs with. config: ProxyAttnConfig
    of the sparse layers (default ProxyAttnConfig(); its softmax_scale must be None, since each
    layer runs with its own scale). dense_layers: layers with index < dense_layers run dense
    attention. Calling it again replaces the settings of impls built afterwards. Returns the name."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    global _SETTINGS
    settings = make_settings(config, dense_layers)
    member = AttentionBackendEnum.__members__.get(DEFAULT_NAME)
    if member is None:
        register_backend(DEFAULT_NAME, BACKEND_PATH)
    elif member.get_path() != BACKEND_PATH:
        raise ValueError(f"{DEFAULT_NAME} is already a vLLM attention backend ({member.get_path()})")
    _SETTINGS = settings
    return DEFAULT_NAME


def plugin() -> None:
    """Entry point of the "vllm.general_plugins" group (see the module docstring): register()
    with the config of PROXYATTN_VLLM_CONFIG (a JSON object of ProxyAttnConfig fields, e.g.
    '{"gamma": 0.95}') and PROXYATTN_VLLM_DENSE_LAYERS (an int), both optional."""
    settings = settings_from_env(CONFIG_ENV, DENSE_LAYERS_ENV)
    register(settings.config, dense_layers=settings.dense_layers)


def get_settings() -> BackendSettings:
    if _SETTINGS is None:
        raise KeyError("the proxyattn vLLM backend is not registered; call register() (or plugin()) first")
    return _SETTINGS


@functools.lru_cache(maxsize=1)
def _classes():
    from vllm.config import get_current_vllm_config_or_none
    from vllm.model_executor.models.utils import extract_layer_index
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE
    from vllm.v1.attention.backend import AttentionCGSupport, AttentionType
    from vllm.v1.attention.backends.flash_attn import (FlashAttentionBackend, FlashAttentionImpl,
                                                       FlashAttentionMetadata, FlashAttentionMetadataBuilder)
    from vllm.v1.attention.backends.utils import split_decodes_and_prefills
    from vllm.v1.kv_cache_interface import is_quantized_kv_cache

    @dataclasses.dataclass
    class ProxyAttnMetadata(FlashAttentionMetadata):
        """FlashAttention's metadata of the whole batch, and its split: the first decode_reqs
        requests (decode_tokens rows), with FlashAttention metadata of their own (decode) where
        the batch also has prefill rows, and the rest as proxy_attention_paged's arguments
        (prefill; None where no row goes to proxyattn, and the whole batch runs on
        FlashAttention)."""

        decode_reqs: int = 0
        decode_tokens: int = 0
        decode: Optional[FlashAttentionMetadata] = None
        prefill: Optional[PagedPrefill] = None

    class ProxyAttnMetadataBuilder(FlashAttentionMetadataBuilder):
        # Rebuilt rather than patched: the split holds its own block-table slices.
        supports_update_block_table = False
        supports_draft_decode_metadata_update = False

        def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
            super().__init__(kv_cache_spec, layer_names, vllm_config, device)
            if self.block_size not in PAGE_SIZES:
                raise ValueError(f"the proxyattn vLLM backend needs a block size in {PAGE_SIZES} (the page sizes of "
                                 f"proxy_attention_paged), but the KV cache has blocks of {self.block_size} tokens: "
                                 f"start vLLM with --block-size 64 (or 16, 32, 128, 256)")
            # Decodes (and speculative verification rows) first, so that one split divides the batch.
            self._init_reorder_batch_threshold(1, supports_spec_as_decode=True)

        @classmethod
        def get_cudagraph_support(cls, vllm_config, kv_cache_spec):
            # Prefill rows go through proxyattn with host-side metadata: full graphs for decode only.
            support = super().get_cudagraph_support(vllm_config, kv_cache_spec)
            return min(support, AttentionCGSupport.UNIFORM_BATCH, key=lambda s: s.value)

        def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
            cm = common_attn_metadata
            num_decodes, num_prefills, num_decode_tokens, _ = split_decodes_and_prefills(
                cm, decode_threshold=self.reorder_batch_threshold or 1)
            prefill = None
            if num_prefills > 0 and cm.causal is True and self.dcp_world_size == 1:
                prefill = paged_prefill(cm.query_start_loc, cm.query_start_loc_cpu, cm.seq_lens,
                                        cm.block_table_tensor, cm.max_seq_len, num_decodes, cm.num_reqs,
                                        getattr(cm, "seq_lens_cpu_upper_bound", None))
            if prefill is None:
                full = super().build(common_prefix_len, cm, fast_build)
                return ProxyAttnMetadata(**_fields(full), decode_reqs=num_decodes, decode_tokens=num_decode_tokens)
            # The whole batch's metadata without an ahead-of-time schedule, so that the decode rows'
            # metadata, built with vLLM's usual options, keeps vLLM's persistent schedule buffer to
            # itself; only the layers that fall back to FlashAttention whole run on it.
            full = super().build(common_prefix_len, cm, fast_build=True)
            decode = None
            if num_decodes > 0:
                qsl = cm.query_start_loc_cpu[:num_decodes + 1]
                dcm = cm.unpadded(num_decode_tokens, num_decodes).replace(
                    max_query_len=int((qsl[1:] - qsl[:-1]).max()))
                decode = super().build(common_prefix_len, dcm, fast_build)
            return ProxyAttnMetadata(**_fields(full), decode_reqs=num_decodes, decode_tokens=num_decode_tokens,
                                     decode=decode, prefill=prefill)

    class ProxyAttnImpl(FlashAttentionImpl):
        """FlashAttentionImpl with prefill rows through proxy_attention_paged."""

        supports_dcp = False  # vLLM then refuses the backend under decode context parallelism

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.settings = get_settings()
            self.fallback_reason = self._fallback_reason()
            self._configs: Dict[str, ProxyAttnConfig] = {}

        def _fallback_reason(self) -> Optional[str]:
            """Why this layer runs entirely on FlashAttention, or None."""
            if self.attn_type != AttentionType.DECODER:
                return f"attention type {self.attn_type}"
            if self.sliding_window not in (None, (-1, -1)):
                return "sliding window"
            if self.alibi_slopes is not None:
                return "ALiBi"
            if self.logits_soft_cap:
                return "logit soft-capping"
            if self.sinks is not None:
                return "attention sinks"
            # FlashAttention takes quantized (FP8) caches, and more head sizes than proxyattn.
            return (kv_dtype_refusal(self.kv_cache_dtype, self._cache_in_model_dtype())
                    or head_dim_refusal(self.head_size))

        def _cache_in_model_dtype(self) -> bool:
            """Whether the cache holds K/V in the model's dtype, the queries': not a quantized one,
            and an unquantized one of the model's dtype as the config vLLM builds the model under
            says (a name vLLM maps to no torch dtype counts as another one: FlashAttention then runs
            the layer, as without proxyattn). An impl built outside that (no current config) is
            judged on quantization alone; proxy_attention_paged checks the dtypes at the call."""
            if is_quantized_kv_cache(self.kv_cache_dtype):
                return False
            config = get_current_vllm_config_or_none()
            model = None if config is None else config.model_config
            if model is None or self.kv_cache_dtype == "auto":
                return True
            return STR_DTYPE_TO_TORCH_DTYPE.get(self.kv_cache_dtype) == model.dtype

        def layer_config(self, layer) -> ProxyAttnConfig:
            """The config of a layer (index from layer.layer_name, dense for index <
            dense_layers), built once per layer."""
            cfg = self._configs.get(layer.layer_name)
            if cfg is None:
                index = extract_layer_index(layer.layer_name) if self.settings.dense_layers else 0
                cfg = self._configs[layer.layer_name] = layer_config(self.settings, index, self.scale)
            return cfg

        def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                    output_block_scale=None):
            prefill = getattr(attn_metadata, "prefill", None)
            if (prefill is None or self.fallback_reason is not None or output_scale is not None
                    or output_block_scale is not None or attn_metadata.mm_prefix_query_range_tensor is not None
                    or attn_metadata.rswa_prefix_lens is not None):
                return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                       output_block_scale)
            if attn_metadata.decode is not None:
                n = attn_metadata.decode_tokens
                # key and value are None in a layer that shares another layer's KV cache.
                super().forward(layer, query[:n], None if key is None else key[:n],
                                None if value is None else value[:n], kv_cache, attn_metadata.decode, output[:n])
            k_cache, v_cache = kv_cache_views(kv_cache, self.head_size)
            p = prefill
            out = proxy_attention_paged(query[p.token_start:p.token_end], k_cache, v_cache, p.page_table, p.seqlens_k,
                                        p.cu_seqlens_q, p.max_seqlen_q, p.max_seqlen_k, self.layer_config(layer),
                                        causal=True)
            rows = output[p.token_start:p.token_end]
            rows.copy_(out.view(rows.shape))
            return output

    class ProxyAttnBackend(FlashAttentionBackend):
        """FlashAttentionBackend with ProxyAttnImpl and ProxyAttnMetadataBuilder."""

        @staticmethod
        def get_name() -> str:
            return DEFAULT_NAME

        @staticmethod
        def get_impl_cls():
            return ProxyAttnImpl

        @staticmethod
        def get_builder_cls():
            return ProxyAttnMetadataBuilder

        @classmethod
        def get_supported_kernel_block_sizes(cls, kv_cache_spec=None):
            sizes = super().get_supported_kernel_block_sizes(kv_cache_spec)
            return [p for p in PAGE_SIZES
                    if any(p == s if isinstance(s, int) else p % s.base == 0 for s in sizes)]

    return dict(ProxyAttnBackend=ProxyAttnBackend, ProxyAttnImpl=ProxyAttnImpl,
                ProxyAttnMetadataBuilder=ProxyAttnMetadataBuilder, ProxyAttnMetadata=ProxyAttnMetadata)


def _fields(metadata) -> dict:
    return {f.name: getattr(metadata, f.name) for f in dataclasses.fields(metadata)}


def __getattr__(name: str):
    if name in ("ProxyAttnBackend", "ProxyAttnImpl", "ProxyAttnMetadataBuilder", "ProxyAttnMetadata"):
        return _classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BACKEND_PATH",
    "BackendSettings",
    "CONFIG_ENV",
    "DENSE_LAYERS_ENV",
    "DEFAULT_NAME",
    "PagedPrefill",
    "TESTED_VLLM_VERSION",
    "get_settings",
    "kv_cache_views",
    "paged_prefill",
    "plugin",
    "register",
]
