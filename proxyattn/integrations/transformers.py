"""ProxyAttn as a Hugging Face transformers attention implementation.

    from proxyattn import ProxyAttnConfig
    from proxyattn.integrations import transformers as pa_hf

    pa_hf.register(ProxyAttnConfig(), dense_layers=2)               # name "proxyattn"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="proxyattn")
    # or, on a loaded model: model.set_attn_implementation("proxyattn")

`register` installs two functions under one name: an attention function in
`transformers.AttentionInterface` and a mask function in `AttentionMaskInterface`.

Routing (per call of one attention layer). The attention function runs
`proxyattn.proxy_attention` (layout bnhd; GQA without repeating K/V; transformers'
`scaling` becomes `softmax_scale`; causal aligned bottom-right, so a prefill chunk with
q_len < kv_len that follows a cached prefix is handled) only when all of these hold:

- the layer is not dense by the per-layer options (`dense_layers`, `layer_configs`; with them, a
  call that could run proxyattn needs the module's integer `layer_idx`, and one that SDPA takes
  anyway, such as a vision tower's, needs none);
- no gradient is needed: proxyattn is inference-only (its ops have no backward), so with grad
  mode on and a query/key/value that requires grad (training, fine-tuning) the call runs SDPA,
  and the first such call says so with one RuntimeWarning;
- the module is causal (`is_causal` kwarg, else `module.is_causal`, default True);
- q_len > 1 (decoding steps always go to SDPA: estimation cannot pay off for one row; and unless
  `config.dense_below` is 0, proxy_attention itself runs dense attention for fewer rows than a
  block, such as a speculative verification step, so assisted decoding attends as plain decoding
  does);
- `attention_mask is None` (see the mask rule below);
- dropout == 0 (transformers passes the module's dropout only in training mode);
- no softcap, attention sinks (`s_aux`, `sinks`), key selection of another sparse attention
  (`indices`, `block_indices`) or position bias, and no sliding window shorter than kv_len (SDPA
  adds a position bias; it computes none of the others, so a call that passes softcap raises
  ValueError and one that passes any other of them NotImplementedError, whatever the installed
  transformers' sdpa would do with them);
- q/k/v head dims are equal and in proxyattn.config.SUPPORTED_HEAD_DIMS (64, 128);
- dtype is fp16/bf16 on CUDA (fp16/bf16/fp32 on CPU, where the reference runs), device
  is CPU or CUDA, and q_len <= kv_len.

Otherwise the call goes to transformers' own "sdpa" attention function, with the same
arguments; the reason is counted (see `get_stats`). Below `config.dense_below` keys
proxy_attention itself runs dense attention.

Mask rule. The attention function never reads mask values (that would synchronise on CUDA).
Instead the registered mask function returns `None` only when the mask would be pure
bottom-right causal: plain causal mask function (no packing or custom overlays; a sliding window
or attention chunk only where it is longer than the keys, so that it changes nothing),
integer offsets with `q_offset - kv_offset == kv_length - q_length`, and a 2D padding mask that
is absent or all ones. In every other case it materialises the full
boolean mask as transformers' "sdpa" mask does (it never uses SDPA's own `is_causal` skips,
so `None` has this single meaning), and a non-None mask sends the call to SDPA. So a padded
batch (a 2D attention_mask with zeros) runs SDPA with the correct mask, a StaticCache (whose
keys include unwritten slots, so the offsets do not match) runs SDPA, and so do custom 4D
masks passed by the user. Checking that a 2D padding mask is all ones reads it on the host;
transformers' own sdpa mask does the same check. A StaticCache prefill therefore materialises a
q_len x max_cache_len boolean mask for SDPA (transformers' own sdpa mask crops the keys instead):
use a DynamicCache for long prompts.

When SDPA is called for a layer with `attention_mask is None` and 1 < q_len < kv_len
(a dense layer during chunked prefill), the fallback runs SDPA with torch's lower-right causal
bias (no q_len x kv_len mask), because transformers' sdpa function would otherwise align the
mask top-left.

Tested with transformers 5.24.0 (Llama and Qwen2, GQA). Models that call the attention
function with other conventions are not supported.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
import warnings
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import ops
from ..attention import ProxyAttnSelection, proxy_attention, sdpa_bottom_right
from ..config import SUPPORTED_HEAD_DIMS, ProxyAttnConfig, check_int

try:
    import transformers
    from transformers.masking_utils import (
        AttentionMaskInterface,
        causal_mask_function,
        prepare_padding_mask,
        sdpa_mask,
    )
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "proxyattn.integrations.transformers needs Hugging Face transformers with AttentionInterface and "
        "AttentionMaskInterface (tested with 5.24.0): pip install transformers") from exc

TESTED_TRANSFORMERS_VERSION = "5.24.0"
DEFAULT_NAME = "proxyattn"

ROUTE_PROXY = "proxyattn"
# Routes of calls that go to transformers' "sdpa" attention function.
FALLBACK_REASONS = ("dense_layer", "grad", "non_causal", "decode", "mask", "dropout", "unsupported_kwarg",
                    "sliding_window", "head_dim", "dtype", "device", "shape")

_MASK_PARAMS = set(inspect.signature(sdpa_mask).parameters)
if not {"q_length", "q_offset", "kv_length", "kv_offset"} <= _MASK_PARAMS:
    raise ImportError(
        f"proxyattn.integrations.transformers needs the mask API of transformers >= 5 "
        f"(sdpa_mask(q_length, q_offset, kv_length, kv_offset, ...)); installed transformers "
        f"{transformers.__version__} lacks it. Tested with {TESTED_TRANSFORMERS_VERSION}.")

try:
    from transformers.utils.import_utils import is_tracing as _hf_is_tracing
except ImportError:  # pragma: no cover
    def _hf_is_tracing(tensor=None) -> bool:
        return torch.compiler.is_compiling()

LayerConfigs = Union[Mapping[int, Optional[ProxyAttnConfig]], Sequence[Optional[ProxyAttnConfig]]]
SelectionCallback = Callable[[Optional[int], ProxyAttnSelection], None]


@dataclasses.dataclass(frozen=True)
class IntegrationSettings:
    """What `register` stored under one name.

    config: ProxyAttnConfig of every sparse layer without an entry in layer_configs.
    dense_layers: layers with index < dense_layers run SDPA.
    layer_configs: layer index -> ProxyAttnConfig, or None for a dense (SDPA) layer.
    on_selection: called as on_selection(layer_idx, ProxyAttnSelection) after every sparse call.
    """

    config: ProxyAttnConfig
    dense_layers: int
    layer_configs: Mapping[int, Optional[ProxyAttnConfig]]
    on_selection: Optional[SelectionCallback]

    @property
    def per_layer(self) -> bool:
        return self.dense_layers > 0 or len(self.layer_configs) > 0

    def layer_config(self, layer_idx: Optional[int]) -> Optional[ProxyAttnConfig]:
        """The config of one layer; None means the layer runs SDPA."""
        if not self.per_layer:
            return self.config
        if not _is_layer_index(layer_idx):
            raise ValueError(
                f"proxyattn: per-layer options (dense_layers, layer_configs) need the attention module to have an "
                f"integer `layer_idx`, got {layer_idx!r}")
        if layer_idx < self.dense_layers:
            return None
        return self.layer_configs.get(layer_idx, self.config)


def _is_layer_index(layer_idx) -> bool:
    return isinstance(layer_idx, int) and not isinstance(layer_idx, bool)


_SETTINGS: Dict[str, IntegrationSettings] = {}
_STATS: Dict[str, collections.Counter] = {}


def _check_config(what: str, cfg) -> None:
    if not isinstance(cfg, ProxyAttnConfig):
        raise TypeError(f"{what} must be a ProxyAttnConfig, got {type(cfg).__name__}")


def _normalise_layer_configs(layer_configs) -> Dict[int, Optional[ProxyAttnConfig]]:
    if layer_configs is None:
        return {}
    if isinstance(layer_configs, Mapping):
        items = list(layer_configs.items())
    elif isinstance(layer_configs, (list, tuple)):
        items = list(enumerate(layer_configs))
    else:
        raise TypeError(f"layer_configs must be a dict {{layer_idx: ProxyAttnConfig or None}}, a list/tuple or None, "
                        f"got {type(layer_configs).__name__}")
    out = {}
    for idx, cfg in items:
        if isinstance(idx, bool) or not isinstance(idx, int) or idx < 0:
            raise ValueError(f"layer_configs keys must be layer indices (ints >= 0), got {idx!r}")
        if cfg is not None:
            _check_config(f"layer_configs[{idx}]", cfg)
        out[idx] = cfg
    return out


def register(config: Optional[ProxyAttnConfig] = None, *, dense_layers: int = 0,
             layer_configs: Optional[LayerConfigs] = None, on_selection: Optional[SelectionCallback] = None,
             name: str = DEFAULT_NAME) -> str:
    """Register (or re-register) the ProxyAttn attention and mask functions under `name`.

    config: ProxyAttnConfig of sparse layers (default ProxyAttnConfig()). Its softmax_scale is
        replaced by the `scaling` transformers passes, when it passes one.
    dense_layers: the first `dense_layers` layers (module.layer_idx < dense_layers) run SDPA.
    layer_configs: per-layer overrides, either a dict {layer_idx: ProxyAttnConfig or None}
        (layers without a key use `config`) or a list/tuple indexed by layer (every entry
        explicit, layers past its end use `config`). None means the layer runs SDPA.
        dense_layers wins over layer_configs.
    on_selection: optional callback(layer_idx, ProxyAttnSelection) after every sparse call
        (its tensors stay on the device; nothing is synchronised).
    name: the attn_implementation name to use with transformers.

    Re-registering a name replaces its settings for models already using it. Returns name.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    if name == "eager" or (name in AttentionInterface._global_mapping and name not in _SETTINGS):
        raise ValueError(f"name {name!r} is already a transformers attention implementation; choose another name")
    cfg = ProxyAttnConfig() if config is None else config
    _check_config("config", cfg)
    check_int("dense_layers", dense_layers, 0)
    if on_selection is not None and not callable(on_selection):
        raise TypeError(f"on_selection must be callable or None, got {type(on_selection).__name__}")
    _SETTINGS[name] = IntegrationSettings(cfg, dense_layers, _normalise_layer_configs(layer_configs), on_selection)
    _STATS[name] = collections.Counter()  # counts start again with the new settings
    AttentionInterface.register(name, _make_attention_function(name))
    AttentionMaskInterface.register(name, proxyattn_mask)
    return name


def get_settings(name: str = DEFAULT_NAME) -> IntegrationSettings:
    """The settings registered under `name` (KeyError if none)."""
    if name not in _SETTINGS:
        raise KeyError(f"no proxyattn attention registered under {name!r}; call register(name={name!r}) first")
    return _SETTINGS[name]


def get_stats(name: str = DEFAULT_NAME) -> collections.Counter:
    """Calls per (layer_idx, route) since registration or the last reset_stats, where route is
    "proxyattn" (proxy_attention ran) or "sdpa:<reason>" with a reason from FALLBACK_REASONS.
    Host-side counting only; a copy is returned."""
    get_settings(name)
    return collections.Counter(_STATS[name])


def reset_stats(name: str = DEFAULT_NAME) -> None:
    get_settings(name)
    _STATS[name].clear()


# ------------------------------------------------------------------ mask function


def _is_bottom_right_causal(q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                            local_size) -> bool:
    if any(isinstance(x, Tensor) or not isinstance(x, int) for x in (q_length, kv_length, q_offset, kv_offset)):
        return False  # tensor offsets (StaticCache) or symbolic sizes: cannot decide without reading them
    if local_size is not None:
        # A sliding window or attention chunk (local_size) longer than the keys leaves the mask the
        # plain causal one (as transformers' sdpa mask decides too); one of the keys' length or
        # shorter goes to the materialised mask, which is right either way.
        if not (isinstance(local_size, int) and kv_length < local_size):
            return False
    elif mask_function is not causal_mask_function:
        return False
    if torch.compiler.is_exporting():
        return False
    if q_offset - kv_offset != kv_length - q_length:
        return False
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is None:
        return True
    if _hf_is_tracing(padding):
        return False
    if padding.shape[-1] > kv_length:
        padding = padding[:, kv_offset:kv_offset + kv_length]
    return bool(padding.all())  # host read, as transformers' sdpa mask does


def proxyattn_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                   mask_function: Callable = causal_mask_function, attention_mask: Optional[Tensor] = None,
                   local_size: Optional[int] = None, allow_is_causal_skip: bool = True, **kwargs) -> Optional[Tensor]:
    """Mask function registered with AttentionMaskInterface.

    Returns None exactly when the mask is pure bottom-right causal with no padding (see the
    module docstring); otherwise the materialised boolean mask [B, 1, q_length, kv_length]
    of transformers' sdpa_mask, with its `is_causal` skips turned off."""
    if allow_is_causal_skip and _is_bottom_right_causal(q_length, kv_length, q_offset, kv_offset, mask_function,
                                                        attention_mask, local_size):
        return None
    kwargs["allow_is_bidirectional_skip"] = False
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     local_size=local_size, allow_is_causal_skip=False, **kwargs)


# ------------------------------------------------------------------ attention function

# Arguments that change what attention computes and that neither proxyattn nor SDPA takes (what
# each is, for the error); transformers' sdpa drops them without a word (softcap too in some
# versions, 5.17), so a call that passes one is refused whatever the installed version does.
_REFUSED_KWARGS = {
    "softcap": "soft-capped scores",
    "s_aux": "attention sinks",
    "sinks": "attention sinks",
    "indices": "the keys another sparse attention selected",
    "block_indices": "the key blocks another sparse attention selected",
}
_UNSUPPORTED_KWARGS = tuple(_REFUSED_KWARGS) + ("position_bias",)  # position_bias: SDPA adds it


def _needs_grad(query: Tensor, key: Tensor, value: Tensor) -> bool:
    return torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)


_warned_grad = False


def _warn_grad_once() -> None:
    global _warned_grad
    if not _warned_grad:
        _warned_grad = True
        warnings.warn("proxyattn: attention inputs require grad with grad mode on (training or fine-tuning); "
                      "proxyattn is inference-only (its ops have no backward), so these calls run transformers' "
                      "SDPA attention instead. Run inference under torch.no_grad() or torch.inference_mode() to "
                      "use proxyattn.", RuntimeWarning, stacklevel=4)


def _fallback_reason(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, dropout: float,
                     causal: bool, kwargs) -> Optional[str]:
    q_len, kv_len = query.shape[2], key.shape[2]
    if _needs_grad(query, key, value):
        _warn_grad_once()
        return "grad"
    if not causal:
        return "non_causal"
    if q_len == 1:
        return "decode"
    if attention_mask is not None:
        return "mask"
    if dropout:
        return "dropout"
    if any(kwargs.get(k) is not None for k in _UNSUPPORTED_KWARGS):
        return "unsupported_kwarg"
    window = kwargs.get("sliding_window")
    if window is not None and kv_len > window:
        return "sliding_window"
    d = query.shape[-1]
    if d not in SUPPORTED_HEAD_DIMS or key.shape[-1] != d or value.shape[-1] != d:
        return "head_dim"
    if query.device.type not in ("cpu", "cuda"):
        return "device"
    allowed = ops._CUDA_DTYPES if query.is_cuda else ops._CPU_DTYPES
    if query.dtype not in allowed or key.dtype != query.dtype or value.dtype != query.dtype:
        return "dtype"
    if q_len > kv_len or key.shape[1] == 0 or query.shape[1] % key.shape[1] != 0 or key.shape != value.shape:
        return "shape"
    return None


@functools.lru_cache(maxsize=256)
def _scaled(cfg: ProxyAttnConfig, scaling: Optional[float]) -> ProxyAttnConfig:
    if scaling is None or cfg.softmax_scale == scaling:
        return cfg
    return dataclasses.replace(cfg, softmax_scale=float(scaling))


def _sdpa(module, query, key, value, attention_mask, dropout, scaling, causal, kwargs):
    for arg, what in _REFUSED_KWARGS.items():
        if kwargs.get(arg) is not None:
            shown = f"{arg}={kwargs[arg]}" if arg == "softcap" else arg
            raise (ValueError if arg == "softcap" else NotImplementedError)(
                f"proxyattn: this model passes {what} ({shown}) to its attention, which neither proxyattn nor SDPA "
                "computes; load it with attn_implementation='eager' (or an attention kernel that computes it)")
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is None and causal and 1 < q_len < kv_len:
        # transformers' sdpa would align is_causal top-left (and crop the keys); we mean bottom-right,
        # a chunk behind its prefix. Plain calls: torch's lower-right causal bias, without a q_len x
        # kv_len mask (and GQA without repeating K/V). With position_bias, which transformers' sdpa
        # adds, the mask, explicitly.
        if kwargs.get("position_bias") is None:
            out = sdpa_bottom_right(query, key, value, scaling, True, dropout_p=dropout)
            return out.transpose(1, 2).contiguous(), None
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
        attention_mask = attention_mask[None, None]
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, dropout=dropout,
                                           scaling=scaling, **kwargs)


def _attention_forward(name: str, module, query: Tensor, key: Tensor, value: Tensor, attention_mask,
                       dropout: float, scaling: Optional[float], kwargs) -> Tuple[Tensor, None]:
    settings = get_settings(name)
    layer_idx = getattr(module, "layer_idx", None)
    is_causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    def fallback():
        return _fallback_reason(module, query, key, value, attention_mask, dropout, causal, kwargs)

    if settings.per_layer and not _is_layer_index(layer_idx):
        # The per-layer options cannot place a module without a layer index: a call that SDPA takes
        # anyway passes (vision towers, non-causal blocks); any other raises, naming what is missing.
        reason = fallback()
        cfg = settings.layer_config(layer_idx) if reason is None else None
    else:
        cfg = settings.layer_config(layer_idx)
        reason = "dense_layer" if cfg is None else fallback()
    if reason is not None:
        _STATS[name][(layer_idx, "sdpa:" + reason)] += 1
        return _sdpa(module, query, key, value, attention_mask, dropout, scaling, causal, kwargs)
    cfg = _scaled(cfg, None if scaling is None else float(scaling))
    try:
        cfg.check_heads(query.shape[1], key.shape[1])
    except ValueError as exc:
        raise ValueError(f"proxyattn (layer {layer_idx}): {exc}") from exc
    _STATS[name][(layer_idx, ROUTE_PROXY)] += 1
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, N, H, D], last dim contiguous
    if settings.on_selection is None:
        return proxy_attention(q, k, v, cfg, causal=True), None
    out, selection = proxy_attention(q, k, v, cfg, causal=True, return_selection=True)
    settings.on_selection(layer_idx, selection)
    return out, None


def _make_attention_function(name: str):
    def proxyattn_attention_forward(module, query: Tensor, key: Tensor, value: Tensor,
                                    attention_mask: Optional[Tensor], dropout: float = 0.0,
                                    scaling: Optional[float] = None, **kwargs) -> Tuple[Tensor, None]:
        """transformers attention function: query [B, Hq, q_len, D], key/value [B, Hkv, kv_len, D]
        (not repeated) -> (attn_output [B, q_len, Hq, D], None). Routing: module docstring of
        proxyattn.integrations.transformers."""
        return _attention_forward(name, module, query, key, value, attention_mask, dropout, scaling, kwargs)

    proxyattn_attention_forward.__qualname__ = f"proxyattn_attention_forward[{name}]"
    return proxyattn_attention_forward


__all__ = [
    "DEFAULT_NAME",
    "FALLBACK_REASONS",
    "IntegrationSettings",
    "ROUTE_PROXY",
    "TESTED_TRANSFORMERS_VERSION",
    "get_settings",
    "get_stats",
    "proxyattn_mask",
    "register",
    "reset_stats",
]
