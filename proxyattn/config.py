"""ProxyAttnConfig: the knobs of the ProxyAttn pipeline, validated on construction."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

SUPPORTED_BLOCK_SIZES = (64, 128)
SUPPORTED_HEAD_DIMS = (64, 128)
MAX_STRIDE = 16

# Default budget mass. With the default proxy heads (two query heads per proxy where the head
# counts allow), gamma 0.97 reached mean attention recall 0.95-0.98 at 32k and 128k on structured
# inputs whose heads keep a fifth of their mass to themselves (share 0.8; bench/NOTES.md, H200).
DEFAULT_GAMMA = 0.97

# Below this many keys proxy_attention runs dense attention: estimation and the min_budget
# floor cannot pay off on short inputs. Measured on an H100 (bench/results/*-e2e.json,
# structured inputs, G=1): the sparse path ran 0.85x cuDNN's speed at 8k keys and 1.70x at 16k;
# on an H200 with the current defaults (G=16, gamma 0.97; *-e2e-defaults.json) 1.12x at 8k and
# 2.12x at 16k on structured inputs, but 1.22x cuDNN's time at 16k on random ones (density ~0.95;
# bench/NOTES.md, "dense_below crossover and the dense path").
DEFAULT_DENSE_BELOW = 16384


# Upper bounds of the integer fields: they travel through the op schemas (int64) into int32
# kernel parameters, so block counts and token budgets stay within int32; dense_below is compared
# with sequence lengths only.
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1


def _as_float(value, name: str) -> float:
    """float(value) for an int or float, ValueError for an int too large for a float."""
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{name} must be a float, got an int too large for one: {value}") from None


def check_int(name: str, value, low: int, high: Optional[int] = None) -> int:
    """Return `value` if it is an int (not a bool) in [low, high]; else TypeError/ValueError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        rng = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {rng}, got {value}")
    return value


def check_block_size(block_size, name: str = "block_size") -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"{name} must be an int, got {type(block_size).__name__}")
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"{name} must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size}")
    return block_size


def check_gamma(gamma, name: str = "gamma") -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(gamma).__name__}")
    g = _as_float(gamma, name)
    if math.isnan(g) or not (0.0 < g <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {gamma}")
    return g


# The largest scale stage 4 takes (csrc/kernels/common/bsa_launch.h, kMaxSoftmaxScale: scale *
# log2(e) a finite float32); stages 1 and 2 take any finite scale > 0 (beyond it, each row's weights
# are its argmax limit). Below FLT_MIN the CUDA kernels raise a scale to FLT_MIN (stage 1
# csrc/kernels/estimate/proxy_scores.cu, stage 2 csrc/ops/estimate_ops.cpp, stage 4
# csrc/ops/bsa_op.cpp), since their fast math would flush a subnormal exp2 factor to 0; every logit
# is within a rounding of 0 there either way. A config's scale also reaches SDPA on the dense path,
# which does not clamp: a config holds it to [FLT_MIN, ATTENTION_MAX_SOFTMAX_SCALE].
FLT_MIN = 1.1754943508222875e-38
ATTENTION_MAX_SOFTMAX_SCALE = 2.3e38


def check_attention_scale(scale: float, name: str = "softmax_scale") -> None:
    """ValueError unless a (finite, > 0) scale is at most ATTENTION_MAX_SOFTMAX_SCALE, the attention
    kernels' range: the one statement of stage 4's bound, for ProxyAttnConfig and the stage 4
    wrapper."""
    if scale > ATTENTION_MAX_SOFTMAX_SCALE:
        raise ValueError(f"{name} must be at most {ATTENTION_MAX_SOFTMAX_SCALE:g} for attention (its product with "
                         f"log2(e) a finite float32, as the attention kernels need), got {scale}")


def check_softmax_scale(scale, name: str = "softmax_scale") -> Optional[float]:
    """None, or a finite float > 0 (csrc/ops/common.h states the same rule)."""
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{name} must be a float or None, got {type(scale).__name__}")
    s = _as_float(scale, name)
    if not math.isfinite(s) or s <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {scale}")
    return s


# Each integer field's range, the one place it is stated (the stage functions check their
# arguments of the same names through check_field).
_INT_RANGES = {
    "num_proxy_heads": (1, INT32_MAX),
    "stride": (1, MAX_STRIDE),
    "min_budget": (0, INT32_MAX),
    "sink_blocks": (0, INT32_MAX),
    "local_blocks": (0, INT32_MAX),
    "dense_below": (0, INT64_MAX),
}


def check_field(name: str, value, prefix: str = ""):
    """Validate one config field's value (TypeError/ValueError naming `prefix + name`)."""
    label = prefix + name
    if name == "block_size":
        return check_block_size(value, label)
    if name == "gamma":
        return check_gamma(value, label)
    if name == "softmax_scale":
        return check_softmax_scale(value, label)
    if name == "num_proxy_heads" and value is None:
        return None
    low, high = _INT_RANGES[name]
    return check_int(label, value, low, high)


@dataclasses.dataclass(frozen=True)
class ProxyAttnConfig:
    """Configuration of proxy_attention (docs/design.md).

    block_size: tokens per query/key block (64 or 128).
    num_proxy_heads: pooled proxy heads G. Either G divides Hkv, or Hkv divides G
        and G divides Hq (checked against the head counts at call time). None (default):
        default_proxy_heads(Hq, Hkv), two query heads per proxy where the head counts allow.
    stride: keep one query/key token in every `stride` for the proxy scores (1..16).
    gamma: cumulative attention mass each head's budget must reach, in (0, 1].
    min_budget: minimum tokens attended per query block (rounded up to blocks).
    sink_blocks: key blocks always kept at the start.
    local_blocks: every key block holding some row's own position is kept, plus
        local_blocks - 1 before the earliest of them (0: none); so a query block behind a prefix
        whose length is not a multiple of block_size keeps both key blocks on its diagonal.
    dense_below: sequences with fewer keys than this run dense attention (as do those with fewer
        queries than block_size, unless dense_below is 0: the sparse path forced).
    softmax_scale: defaults to head_dim ** -0.5; else a normal float32 of at most 2.3e38, the
        attention kernels' range (the stage 1 and 2 functions take any finite scale > 0, stage 4's
        any up to 2.3e38).
    """

    block_size: int = 128
    num_proxy_heads: Optional[int] = None
    stride: int = 4
    gamma: float = DEFAULT_GAMMA
    min_budget: int = 2048
    sink_blocks: int = 1
    local_blocks: int = 1
    dense_below: int = DEFAULT_DENSE_BELOW
    softmax_scale: Optional[float] = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check_field(f.name, getattr(self, f.name), "ProxyAttnConfig.")
        # A config's scale always reaches stage 4 or the dense path: checked here, before any stage runs.
        if self.softmax_scale is not None:
            check_attention_scale(self.softmax_scale, "ProxyAttnConfig.softmax_scale")
            if self.softmax_scale < FLT_MIN:
                raise ValueError(f"ProxyAttnConfig.softmax_scale must be at least FLT_MIN = {FLT_MIN:g} (a normal "
                                 f"float32: the dense path's SDPA would flush a smaller one to 0), "
                                 f"got {self.softmax_scale}")

    def proxy_heads(self, q_heads: int, kv_heads: int) -> int:
        """G for these head counts: num_proxy_heads, or default_proxy_heads when it is None.
        Raises ValueError if an explicit num_proxy_heads cannot group them."""
        if self.num_proxy_heads is None:
            return default_proxy_heads(q_heads, kv_heads)
        check_proxy_grouping(self.num_proxy_heads, q_heads, kv_heads)
        return self.num_proxy_heads

    def check_heads(self, q_heads: int, kv_heads: int) -> None:
        """Raise ValueError if num_proxy_heads cannot group these head counts."""
        self.proxy_heads(q_heads, kv_heads)

    def runs_dense(self, seqlen_k, seqlen_q=None):
        """Whether proxy_attention runs dense attention for a sequence of seqlen_k keys and seqlen_q
        queries (ints, or elementwise for tensors of lengths): below dense_below keys the estimate
        cannot pay off, and neither can it for fewer queries than one block (a short chunk or a
        speculative verification step behind a long prefix: stage 2's probe of those rows against
        every key alone costs what their dense attention does). dense_below=0 forces the sparse path
        at any length. The one statement of this rule (the C++ dense path, csrc/ops/dense_fast.cpp,
        runs the calls it is handed and decides nothing; a varlen call decides per sequence on the
        device)."""
        short = seqlen_k < self.dense_below
        if seqlen_q is None or self.dense_below == 0:
            return short
        return short | (seqlen_q < self.block_size)

    def scale(self, head_dim: int) -> float:
        return float(self.softmax_scale) if self.softmax_scale is not None else head_dim ** -0.5


def default_proxy_heads(q_heads: int, kv_heads: int) -> int:
    """The default G: Hq / 2 (each proxy pools two query heads) when that groups the heads
    (docs/design.md section 2: G divides Hkv, or Hkv divides G and G divides Hq), else Hq (one proxy
    per query head). Hq=32, Hkv=8 gives 16; Hq=28, Hkv=4 gives 28; Hq=Hkv=32 gives 16.

    Why not one pooled proxy (the design's G=1): on structured inputs where each head keeps a fifth of
    its mass on spans of its own, G=1 reached recall 0.83-0.84, G=Hq/2 0.95-0.98
    (bench/NOTES.md). Stage 1 costs grow with G: at 128k on an H200 the estimate is 8.0 ms of a 17.5 ms
    call at G=16 (stage 1 7.1 of them), still 13.4-14.0x faster than cuDNN's dense attention (23.6x
    at G=1, at recall 0.76)."""
    half = q_heads // 2
    return half if q_heads % 2 == 0 and proxy_grouping_ok(half, q_heads, kv_heads) else q_heads


def proxy_grouping_ok(g: int, q_heads: int, kv_heads: int) -> bool:
    """docs/design.md section 2's rule: G divides Hkv, or Hkv divides G and G divides Hq."""
    return g >= 1 and (kv_heads % g == 0 if g <= kv_heads else g % kv_heads == 0 and q_heads % g == 0)


def check_proxy_grouping(g: int, q_heads: int, kv_heads: int) -> None:
    if proxy_grouping_ok(g, q_heads, kv_heads):
        return
    if g <= kv_heads:
        raise ValueError(
            f"num_proxy_heads={g} must divide the {kv_heads} KV heads (or be a multiple of them "
            f"that divides the {q_heads} query heads)")
    raise ValueError(
        f"num_proxy_heads={g} exceeds the {kv_heads} KV heads, so it must be a multiple of {kv_heads} "
        f"that divides the {q_heads} query heads")
