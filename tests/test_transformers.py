"""proxyattn.integrations.transformers on tiny random Llama/Qwen2 models (CPU, float32, no download).

Sparse calls run the pure-PyTorch reference here. Exactness uses a config that selects every
candidate block (gamma=1, huge min_budget, dense_below=0): logits must equal SDPA's. Real
sparsity is checked against SDPA with the block mask the integration reported it used.
"""
import dataclasses
import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")

from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402
from transformers.modeling_utils import AttentionInterface  # noqa: E402

from proxyattn import ProxyAttnConfig  # noqa: E402
from proxyattn.integrations import transformers as pa_hf  # noqa: E402

VOCAB = 1000
EXACT = ProxyAttnConfig(block_size=64, gamma=1.0, min_budget=1 << 30, dense_below=0)
SPARSE = ProxyAttnConfig(block_size=64, gamma=0.5, min_budget=128, dense_below=0)


def _tiny_config(cls, layers=2):
    return cls(hidden_size=256, intermediate_size=512, num_hidden_layers=layers, num_attention_heads=4,
               num_key_value_heads=2, head_dim=64, vocab_size=VOCAB, max_position_embeddings=4096)


def _model(cls_model, cls_config, layers=2, seed=0):
    torch.manual_seed(seed)
    model = cls_model(_tiny_config(cls_config, layers)).eval()
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module")
def llama():
    return _model(LlamaForCausalLM, LlamaConfig)


def _logits(model, impl, input_ids, **kw):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(input_ids, **kw).logits


def _stats(name):
    """{route: {layer_idx: calls}} from get_stats."""
    out = {}
    for (layer, route), n in pa_hf.get_stats(name).items():
        out.setdefault(route, {})[layer] = n
    return out


def _register(name, config=EXACT, **kw):
    pa_hf.register(config, name=name, **kw)
    pa_hf.reset_stats(name)
    return name


# ------------------------------------------------------------------ models


def test_exact_config_matches_sdpa_llama(llama):
    name = _register("pa_exact")
    ids = torch.randint(0, VOCAB, (2, 300))
    ref = _logits(llama, "sdpa", ids)
    out = _logits(llama, name, ids)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert _stats(name) == {"proxyattn": {0: 1, 1: 1}}


def test_exact_config_matches_sdpa_qwen2():
    qwen2 = pytest.importorskip("transformers.models.qwen2", reason="this transformers has no Qwen2")
    model = _model(qwen2.Qwen2ForCausalLM, qwen2.Qwen2Config)
    name = _register("pa_exact_qwen2")
    ids = torch.randint(0, VOCAB, (2, 200))
    torch.testing.assert_close(_logits(model, name, ids), _logits(model, "sdpa", ids), atol=1e-4, rtol=1e-4)
    assert _stats(name) == {"proxyattn": {0: 1, 1: 1}}


def test_sliding_window_longer_than_the_keys_runs_proxyattn():
    """A sliding-window model (Mistral) below its window: the window changes nothing, the mask is
    plain causal, and the layers run proxyattn (equal to sdpa at the exact config); past the window
    they run SDPA with the window's mask."""
    mistral = pytest.importorskip("transformers.models.mistral", reason="this transformers has no Mistral")
    torch.manual_seed(0)
    cfg = _tiny_config(mistral.MistralConfig)
    cfg.sliding_window = 256
    model = mistral.MistralForCausalLM(cfg).eval()
    name = _register("pa_mistral_window")
    ids = torch.randint(0, VOCAB, (1, 200))
    torch.testing.assert_close(_logits(model, name, ids), _logits(model, "sdpa", ids), atol=1e-4, rtol=1e-4)
    assert _stats(name) == {"proxyattn": {0: 1, 1: 1}}
    pa_hf.reset_stats(name)
    ids = torch.randint(0, VOCAB, (1, 300))
    torch.testing.assert_close(_logits(model, name, ids), _logits(model, "sdpa", ids), atol=1e-4, rtol=1e-4)
    assert _stats(name) == {"sdpa:mask": {0: 1, 1: 1}}


def _block_mask_oracle(selections, block):
    """Test-side attention function: SDPA with the token mask expanded from each layer's selection."""

    def forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        assert attention_mask is None
        sel = selections[module.layer_idx]
        b, hq, nq, _ = query.shape
        nk = key.shape[2]
        nqb, nkb = -(-nq // block), -(-nk // block)
        blocks = torch.zeros(b, hq, nqb, nkb + 1, dtype=torch.bool, device=query.device)
        idx = torch.where(sel.indices >= 0, sel.indices, nkb).long()
        blocks.scatter_(3, idx, True)
        tokens = blocks[..., :nkb].repeat_interleave(block, 2).repeat_interleave(block, 3)[:, :, :nq, :nk]
        causal = torch.ones(nq, nk, dtype=torch.bool, device=query.device).tril(nk - nq)
        rep = hq // key.shape[1]
        out = F.scaled_dot_product_attention(query, key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1),
                                             attn_mask=tokens & causal, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    return forward


def test_sparse_path_runs_and_matches_its_block_mask(llama):
    selections = {}
    name = _register("pa_sparse", SPARSE, on_selection=lambda layer, sel: selections.__setitem__(layer, sel))
    ids = torch.randint(0, VOCAB, (1, 640))
    out = _logits(llama, name, ids)
    assert _stats(name) == {"proxyattn": {0: 1, 1: 1}}
    assert sorted(selections) == [0, 1]
    for sel in selections.values():
        assert not sel.dense
        assert float(sel.density.max()) < 0.9  # really sparse
    AttentionInterface.register("pa_test_oracle", _block_mask_oracle(selections, SPARSE.block_size))
    AttentionMaskInterface.register("pa_test_oracle", pa_hf.proxyattn_mask)
    torch.testing.assert_close(out, _logits(llama, "pa_test_oracle", ids), atol=1e-4, rtol=1e-4)
    dense = _logits(llama, "sdpa", ids)
    assert torch.isfinite(out).all()
    assert float((out - dense).norm() / dense.norm()) < 0.5  # an approximation, not noise


def test_generate_matches_sdpa(llama):
    name = _register("pa_generate")
    ids = torch.randint(1, VOCAB, (2, 150))
    mask = torch.ones_like(ids)
    gen = {}
    for impl in ("sdpa", name):
        llama.set_attn_implementation(impl)
        with torch.no_grad():
            gen[impl] = llama.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert gen[name].shape == (2, 154)
    assert torch.equal(gen[name], gen["sdpa"])
    # Prefill through proxyattn (the all-ones 2D mask gives None), each decoding step through SDPA.
    assert _stats(name) == {"proxyattn": {0: 1, 1: 1}, "sdpa:decode": {0: 3, 1: 3}}


def test_padded_batch_falls_back_to_sdpa(llama):
    name = _register("pa_padded")
    ids = torch.randint(1, VOCAB, (2, 200))
    mask = torch.ones_like(ids)
    mask[1, :37] = 0  # left padding
    ref = _logits(llama, "sdpa", ids, attention_mask=mask)
    out = _logits(llama, name, ids, attention_mask=mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert _stats(name) == {"sdpa:mask": {0: 1, 1: 1}}


def chunked_logits(model, ids, split):
    """The logits of a prefill in two chunks through one DynamicCache. The cache argument is
    `cache` from transformers 5.24 on and `past_key_values` before, and a model ignores the other
    name, so it goes by the name this version's forward takes, and the cache must hold every
    token afterwards (the second chunk really ran behind the first)."""
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = DynamicCache(config=model.config)
    first = model(ids[:, :split], use_cache=True, **{kw: cache}).logits
    second = model(ids[:, split:], use_cache=True, **{kw: cache}).logits
    assert cache.get_seq_length() == ids.shape[1]
    return first, second


@pytest.mark.parametrize("dense_layers", [0, 1])
def test_chunked_prefill_bottom_right(llama, dense_layers):
    name = _register(f"pa_chunked_{dense_layers}", dense_layers=dense_layers)
    ids = torch.randint(0, VOCAB, (1, 330))
    ref = _logits(llama, "sdpa", ids)
    llama.set_attn_implementation(name)
    with torch.no_grad():
        first, second = chunked_logits(llama, ids, 200)
    torch.testing.assert_close(torch.cat([first, second], 1), ref, atol=1e-4, rtol=1e-4)
    expected = {"proxyattn": {1: 2}, "sdpa:dense_layer": {0: 2}} if dense_layers else {"proxyattn": {0: 2, 1: 2}}
    assert _stats(name) == expected


def test_per_layer_options(llama):
    ids = torch.randint(0, VOCAB, (1, 200))
    ref = _logits(llama, "sdpa", ids)
    cases = {
        "pa_dense1": (dict(dense_layers=1), {"sdpa:dense_layer": {0: 1}, "proxyattn": {1: 1}}),
        "pa_dict": (dict(layer_configs={1: None}), {"proxyattn": {0: 1}, "sdpa:dense_layer": {1: 1}}),
        "pa_list": (dict(layer_configs=[None, EXACT]), {"sdpa:dense_layer": {0: 1}, "proxyattn": {1: 1}}),
    }
    for name, (kw, expected) in cases.items():
        _register(name, **kw)
        torch.testing.assert_close(_logits(llama, name, ids), ref, atol=1e-4, rtol=1e-4)
        assert _stats(name) == expected, name


def test_from_config_with_attn_implementation():
    name = _register("pa_from_config")
    model = transformers.AutoModelForCausalLM.from_config(_tiny_config(LlamaConfig, layers=1), attn_implementation=name)
    assert model.config._attn_implementation == name
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (1, 130)))
    assert _stats(name) == {"proxyattn": {0: 1}}


# ------------------------------------------------------------------ attention function, directly


class _Module(torch.nn.Module):
    def __init__(self, layer_idx=0, is_causal=True, groups=2):
        super().__init__()
        self.layer_idx, self.is_causal, self.num_key_value_groups = layer_idx, is_causal, groups


def _qkv(b=1, hq=4, hkv=2, nq=150, nk=150, d=64):
    return (torch.randn(b, hq, nq, d), torch.randn(b, hkv, nk, d), torch.randn(b, hkv, nk, d))


def _sdpa_ref(q, k, v, scale, causal=True):
    nq, nk, rep = q.shape[2], k.shape[2], q.shape[1] // k.shape[1]
    mask = torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq) if causal else None
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                         attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


@pytest.mark.parametrize("nq,nk", [(150, 150), (70, 260)])
def test_function_scaling_and_chunk_alignment(nq, nk):
    name = _register("pa_fn")
    fn = AttentionInterface._global_mapping[name]
    q, k, v = _qkv(nq=nq, nk=nk)
    out, weights = fn(_Module(), q, k, v, None, scaling=0.3)
    assert weights is None and out.shape == (1, nq, 4, 64)
    torch.testing.assert_close(out, _sdpa_ref(q, k, v, 0.3), atol=1e-5, rtol=1e-5)
    assert _stats(name) == {"proxyattn": {0: 1}}


REFUSED = ("softcap", "s_aux", "sinks", "indices", "block_indices")  # what neither proxyattn nor SDPA computes


@pytest.mark.parametrize("reason", ["decode", "non_causal", "is_causal_kwarg", "dropout", "head_dim", *REFUSED,
                                    "position_bias", "sliding_window", "mask"])
def test_function_fallbacks(reason):
    name = _register("pa_fallback")
    fn = AttentionInterface._global_mapping[name]
    module, kw, mask, causal = _Module(), {}, None, True
    q, k, v = _qkv(nq=1 if reason == "decode" else 100, nk=100, d=32 if reason == "head_dim" else 64)
    if reason == "non_causal":
        module.is_causal, causal = False, False
    elif reason == "is_causal_kwarg":
        kw["is_causal"], causal = False, False
    elif reason == "dropout":
        kw["dropout"] = 0.5
    elif reason == "softcap":
        kw["softcap"] = 30.0
    elif reason in ("s_aux", "sinks"):  # per head (gpt-oss) or per token (Inkling2)
        kw[reason] = torch.randn(4) if reason == "s_aux" else torch.randn(1, 4, 100, 1)
    elif reason in ("indices", "block_indices"):  # a DSA indexer's top-k keys
        kw[reason] = torch.randint(0, 100, (1, 100, 16))
    elif reason == "position_bias":
        kw["position_bias"] = torch.randn(1, 4, 100, 100)
    elif reason == "sliding_window":
        kw["sliding_window"] = 64
    elif reason == "mask":
        mask = torch.ones(1, 1, 100, 100, dtype=torch.bool).tril()
    if reason in REFUSED:  # SDPA cannot do them: refused, never dropped
        with pytest.raises(ValueError if reason == "softcap" else NotImplementedError, match=rf"\({reason}\b"):
            fn(module, q, k, v, mask, **kw)
        assert _stats(name) == {"sdpa:unsupported_kwarg": {0: 1}}
        return
    out, _ = fn(module, q, k, v, mask, scaling=0.125, **kw)
    expected_reason = {"is_causal_kwarg": "non_causal", "position_bias": "unsupported_kwarg"}.get(reason, reason)
    assert _stats(name) == {"sdpa:" + expected_reason: {0: 1}}
    if reason == "position_bias":  # SDPA adds it to the causal scores
        causal_mask = torch.ones(100, 100, dtype=torch.bool).tril()
        bias = kw["position_bias"].masked_fill(~causal_mask, float("-inf"))
        want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                                attn_mask=bias, scale=0.125).transpose(1, 2)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    elif reason != "dropout":
        torch.testing.assert_close(out, _sdpa_ref(q, k, v, 0.125, causal), atol=1e-5, rtol=1e-5)


def test_per_layer_options_and_modules_without_layer_idx():
    """With dense_layers or layer_configs, a module without a layer index (a vision tower, a
    non-causal block) still runs the calls SDPA takes anyway; a call proxyattn could take raises."""
    name = _register("pa_no_layer_idx", dense_layers=1)
    fn = AttentionInterface._global_mapping[name]
    q, k, v = _qkv(nq=100, nk=100)
    out, _ = fn(_Module(layer_idx=None, is_causal=False), q, k, v, None, scaling=0.125)
    torch.testing.assert_close(out, _sdpa_ref(q, k, v, 0.125, causal=False), atol=1e-5, rtol=1e-5)
    assert _stats(name) == {"sdpa:non_causal": {None: 1}}
    with pytest.raises(ValueError, match=r"integer `layer_idx`, got None"):
        fn(_Module(layer_idx=None), q, k, v, None, scaling=0.125)


def test_stats_start_again_when_a_name_is_registered_again():
    name = _register("pa_reregister")
    fn = AttentionInterface._global_mapping[name]
    fn(_Module(), *_qkv(nq=100, nk=100), None)
    assert _stats(name) == {"proxyattn": {0: 1}}
    pa_hf.register(EXACT, name=name, dense_layers=1)
    assert _stats(name) == {}


def test_function_bad_proxy_grouping_names_layer():
    name = _register("pa_badgroups", dataclasses.replace(EXACT, num_proxy_heads=3))
    fn = AttentionInterface._global_mapping[name]
    with pytest.raises(ValueError, match="layer 0.*num_proxy_heads=3"):
        fn(_Module(), *_qkv(nq=100, nk=100), None)


# ------------------------------------------------------------------ mask function and registration


def test_mask_none_only_for_pure_bottom_right_causal():
    base = dict(batch_size=2, q_length=5, kv_length=12, q_offset=7, kv_offset=0)
    assert pa_hf.proxyattn_mask(**base) is None
    assert pa_hf.proxyattn_mask(**base, attention_mask=torch.ones(2, 12, dtype=torch.bool)) is None
    padded = torch.ones(2, 12, dtype=torch.bool)
    padded[0, :3] = False
    cases = [
        dict(base, attention_mask=padded),
        dict(base, q_offset=0),  # keys past the queries (StaticCache-like): not bottom-right
        dict(base, q_offset=torch.tensor(7)),
        dict(base, local_size=4),
        dict(base, allow_is_causal_skip=False),
        dict(base, q_length=12, q_offset=0, mask_function=lambda b, h, q, kv: kv <= q + 1),
    ]
    for kw in cases:
        got = pa_hf.proxyattn_mask(**kw)
        want = sdpa_mask(**{**kw, "allow_is_causal_skip": False})
        assert got is not None and torch.equal(got, want)


def test_register_validation():
    with pytest.raises(TypeError, match="config must be a ProxyAttnConfig"):
        pa_hf.register("fast")
    with pytest.raises(ValueError, match="dense_layers must be >= 0"):
        pa_hf.register(dense_layers=-1)
    with pytest.raises(TypeError, match="dense_layers must be an int, got str '2'"):
        pa_hf.register(dense_layers="2")
    with pytest.raises(TypeError, match="layer_configs must be"):
        pa_hf.register(layer_configs="all")
    with pytest.raises(TypeError, match=r"layer_configs\[2\] must be a ProxyAttnConfig"):
        pa_hf.register(layer_configs={2: 0.9})
    with pytest.raises(ValueError, match="already a transformers attention implementation"):
        pa_hf.register(name="sdpa")
    with pytest.raises(KeyError, match="no proxyattn attention registered"):
        pa_hf.get_stats("pa_never_registered")
    name = _register("pa_needs_idx", dense_layers=1)
    module = _Module()
    del module.layer_idx
    with pytest.raises(ValueError, match="layer_idx"):
        AttentionInterface._global_mapping[name](module, *_qkv(nq=100, nk=100), None)


def test_calls_that_need_a_gradient_run_sdpa(llama):
    """proxyattn is inference-only: with grad mode on and parameters that require grad (fine-tuning),
    every layer's call goes to SDPA, the first one says so with one RuntimeWarning, and the gradients
    are those of SDPA."""
    name = _register("pa_grad", SPARSE)
    ids = torch.randint(0, VOCAB, (1, 320))
    llama.set_attn_implementation(name)
    pa_hf._warned_grad = False
    with pytest.warns(RuntimeWarning, match="inference-only"):
        loss = llama(ids).logits.float().logsumexp(-1).mean()
    assert _stats(name) == {"sdpa:grad": {0: 1, 1: 1}}
    loss.backward()
    grads = {n: p.grad.clone() for n, p in llama.named_parameters() if p.grad is not None}
    llama.zero_grad(set_to_none=True)
    llama.set_attn_implementation("sdpa")
    llama(ids).logits.float().logsumexp(-1).mean().backward()
    assert grads and all(torch.equal(grads[n], p.grad) for n, p in llama.named_parameters() if n in grads)
    llama.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not again
        llama.set_attn_implementation(name)
        llama(ids)
    with torch.no_grad():  # inference: the sparse path again
        llama(ids)
    assert _stats(name) == {"sdpa:grad": {0: 2, 1: 2}, "proxyattn": {0: 1, 1: 1}}


def test_engine_backend_settings_check_like_register():
    """The SGLang and vLLM backends' settings (integrations/_common.py) refuse what register refuses,
    with the same errors; importing them needs no engine."""
    from proxyattn.integrations import _common

    with pytest.raises(ValueError, match="dense_layers must be >= 0, got -1"):
        _common.make_settings(None, -1)
    with pytest.raises(TypeError, match="dense_layers must be an int, got bool True"):
        _common.make_settings(None, True)
    with pytest.raises(TypeError, match="config must be a ProxyAttnConfig, got float"):
        _common.make_settings(0.9, 0)
    with pytest.raises(ValueError, match="the config's softmax_scale must be None, got 0.125"):
        _common.make_settings(ProxyAttnConfig(softmax_scale=0.125), 0)
    assert _common.make_settings(None, 2).dense_layers == 2

