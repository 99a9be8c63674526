"""What the serving-engine backends (sglang.py, vllm.py) share: the settings `register` stores,
reading them from the environment in an entry-point `plugin`, the config of one layer, and the
rules on an engine's head dim and KV cache dtype that proxyattn's kernels set."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

from ..config import INT64_MAX, SUPPORTED_HEAD_DIMS, ProxyAttnConfig, check_int


@dataclasses.dataclass(frozen=True)
class BackendSettings:
    """What `register` stored: the config of sparse layers, and how many first layers
    (layer index < dense_layers) run dense attention."""

    config: ProxyAttnConfig
    dense_layers: int


def make_settings(config: Optional[ProxyAttnConfig], dense_layers: int) -> BackendSettings:
    """Validated settings; config None means ProxyAttnConfig(). The config's softmax_scale must be
    None: every layer runs with its own scale, the engine's."""
    cfg = ProxyAttnConfig() if config is None else config
    if not isinstance(cfg, ProxyAttnConfig):
        raise TypeError(f"config must be a ProxyAttnConfig, got {type(cfg).__name__}")
    if cfg.softmax_scale is not None:
        raise ValueError(f"a serving backend runs every layer with the engine's softmax scale for it, so "
                         f"the config's softmax_scale must be None, got {cfg.softmax_scale}")
    return BackendSettings(cfg, check_int("dense_layers", dense_layers, 0))


def settings_from_env(config_env: str, dense_layers_env: str) -> BackendSettings:
    """Settings from the environment: config_env holds a JSON object of ProxyAttnConfig fields
    (e.g. '{"gamma": 0.95}'), dense_layers_env an int; both optional. A bad value raises
    ValueError or TypeError naming the variable and what it holds."""
    raw = os.environ.get(config_env) or "{}"
    try:
        fields = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_env} must be a JSON object of ProxyAttnConfig fields, got {raw!r} ({e})") from None
    if not isinstance(fields, dict):
        raise ValueError(f"{config_env} must be a JSON object of ProxyAttnConfig fields, got {fields!r}")
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(ProxyAttnConfig)})
    if unknown:
        raise ValueError(f"{config_env} names unknown ProxyAttnConfig fields {unknown} (in {raw!r})")
    layers = os.environ.get(dense_layers_env) or "0"
    try:
        dense_layers = int(layers)
    except ValueError:
        raise ValueError(f"{dense_layers_env} must be an int (the first layers that run dense), "
                         f"got {layers!r}") from None
    dense_layers = check_int(dense_layers_env, dense_layers, 0)
    try:  # dense_layers is valid here, so what make_settings refuses is the config
        return make_settings(ProxyAttnConfig(**fields), dense_layers)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{config_env}={raw!r}: {e}") from None


def layer_config(settings: BackendSettings, layer_index: int, scale: float) -> ProxyAttnConfig:
    """The config of one layer: the registered one with the layer's softmax scale, and dense
    (dense_below past any length) for layer_index < dense_layers."""
    changes = dict(softmax_scale=float(scale))
    if layer_index < settings.dense_layers:
        changes["dense_below"] = INT64_MAX
    return dataclasses.replace(settings.config, **changes)


# What proxy_attention_paged cannot take of an engine's attention, one rule each. Both backends
# apply them when the engine builds them (SGLang then refuses the model, vLLM leaves the layer to
# FlashAttention), not at a first call. Each returns the expected and the given value, or None.


def head_dim_refusal(head_dim: int) -> Optional[str]:
    """The kernels take head dims in SUPPORTED_HEAD_DIMS."""
    if head_dim in SUPPORTED_HEAD_DIMS:
        return None
    return f"head dim: expected one of {SUPPORTED_HEAD_DIMS}, got {head_dim}"


def kv_dtype_refusal(kv_cache_dtype, in_query_dtype: bool) -> Optional[str]:
    """The kernels read K/V in the queries' dtype, so no quantized (FP8) cache. in_query_dtype:
    whether the engine's cache holds K/V in the queries' dtype, as the engine tells it (SGLang: its
    kv_cache_dtype is the model's dtype; vLLM: its cache dtype is not a quantized one and, where
    vLLM's config is current, resolves to the model's dtype);
    kv_cache_dtype: the engine's name of the cache's dtype, for the message."""
    if in_query_dtype:
        return None
    return f"KV cache dtype: expected the queries' dtype (no quantized, e.g. FP8, cache), got {kv_cache_dtype}"
