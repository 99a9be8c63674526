"""The vLLM backend (proxyattn.integrations.vllm) on the CPU with vLLM's real objects: its
metadata builder (ProxyAttnMetadataBuilder extends FlashAttentionMetadataBuilder) builds from
CommonAttentionMetadata, the KV cache is a view that create_kv_cache_views makes of a raw buffer
(NaN in every slot nothing writes, shuffled blocks), and the impl's forward runs on it. Batches
go through two rounds of chunked prefill (the second behind prefixes whose lengths are not
multiples of the block), and a decode request in front of them in the second round.
FlashAttention's kernels need a GPU, so FlashAttentionImpl.forward (where the decode rows go) is
replaced by a dense reference that reads exactly the metadata it is given. Skipped without vLLM
(tested with 0.33.0, which pins torch 2.14.0):

    python3 -m venv /tmp/venv-vllm && /tmp/venv-vllm/bin/pip install vllm==0.33.0 pytest
    PYTHONPATH=$PWD /tmp/venv-vllm/bin/python -m pytest -q tests/test_vllm.py
"""
import dataclasses
import json
import math
import types

import pytest
import torch

import proxyattn as pa
from proxyattn.integrations import vllm as pa_vllm
from proxyattn.paged import PAGE_SIZES
from lazy_import import assert_imports_lazily

HQ, HKV, D = 4, 2, 64
SCALE = 0.11  # not D ** -0.5: the impl's scale must reach the call
MAX_MODEL_LEN = 2048
EXACT = pa.ProxyAttnConfig(block_size=64, gamma=1.0, min_budget=64, dense_below=0, num_proxy_heads=2)
SPARSE = dataclasses.replace(EXACT, gamma=0.5)
# Per request and round: request 0 prefills 100 tokens, then decodes one; requests 1 and 2 prefill
# in two chunks, the second behind prefixes of 300 and 170 tokens.
ROUNDS = ((100, 300, 170), (1, 250, 333))


@pytest.fixture(scope="module")
def vllm():
    return pytest.importorskip("vllm", reason="vLLM is not installed (tested with 0.33.0)")


@pytest.fixture(scope="module")
def model_dir(vllm, tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    (path / "config.json").write_text(json.dumps(dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=HQ * D, num_attention_heads=HQ,
        num_key_value_heads=HKV, head_dim=D, num_hidden_layers=2, intermediate_size=512, vocab_size=1000,
        max_position_embeddings=MAX_MODEL_LEN, torch_dtype="float32", rms_norm_eps=1e-5)))
    return str(path)


def test_import_does_not_import_vllm():
    assert_imports_lazily("proxyattn.integrations.vllm", "vllm", "PROXYATTN")


def test_paged_prefill_split_and_padding():
    """The mapping on plain tensors: requests after the decodes, query offsets from 0, trailing
    requests without query tokens (batch padding) left out; None when nothing is left."""
    qsl = torch.tensor([0, 1, 2, 42, 50, 50, 50], dtype=torch.int32)
    seq = torch.tensor([9, 7, 140, 8, 0, 0], dtype=torch.int32)
    table = torch.arange(6 * 4, dtype=torch.int32).view(6, 4)
    p = pa_vllm.paged_prefill(qsl, qsl.clone(), seq, table, 140, 2, 6)
    assert (p.token_start, p.token_end, p.req_start, p.max_seqlen_q, p.max_seqlen_k) == (2, 50, 2, 40, 140)
    assert p.cu_seqlens_q.tolist() == [0, 40, 48] and p.seqlens_k.tolist() == [140, 8]
    assert torch.equal(p.page_table, table[2:4])
    # With the host bound of each request's length, the keys are bounded by the prefill requests'
    # (a long decode, request 0 here, does not size the call).
    seq2 = torch.tensor([5000, 7, 140, 8, 0, 0], dtype=torch.int32)
    p = pa_vllm.paged_prefill(qsl, qsl.clone(), seq2, table, 5000, 2, 6, seq2.clone())
    assert (p.max_seqlen_q, p.max_seqlen_k) == (40, 140)
    assert pa_vllm.paged_prefill(qsl, qsl.clone(), seq2, table, 5000, 2, 6).max_seqlen_k == 5000
    assert pa_vllm.paged_prefill(qsl[:3], qsl[:3], seq[:2], table[:2], 9, 2, 2) is None
    assert pa_vllm.paged_prefill(qsl[[0, 1, 2, 2]], qsl[[0, 1, 2, 2]], seq[:3], table[:3], 9, 2, 3) is None


def _vllm_config(model_dir, block_size):
    from vllm.config import CacheConfig, DeviceConfig, ModelConfig, VllmConfig

    mc = ModelConfig(model=model_dir, dtype="float32", skip_tokenizer_init=True, max_model_len=MAX_MODEL_LEN)
    return VllmConfig(model_config=mc, device_config=DeviceConfig("cpu"), cache_config=CacheConfig(block_size=block_size))


def _spec(block_size):
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    return FullAttentionSpec(block_size=block_size, num_kv_heads=HKV, head_size=D, dtype=torch.float32)


def _builder(model_dir, block_size):
    return pa_vllm.ProxyAttnMetadataBuilder(_spec(block_size), ["model.layers.0.self_attn.attn"],
                                            _vllm_config(model_dir, block_size), torch.device("cpu"))


def _impl(**kwargs):
    args = dict(num_heads=HQ, head_size=D, scale=SCALE, num_kv_heads=HKV, alibi_slopes=None, sliding_window=None,
                kv_cache_dtype="auto")
    args.update(kwargs)
    return pa_vllm.ProxyAttnImpl(**args)


class Engine:
    """vLLM's KV cache views on the CPU and the bookkeeping of its scheduler and model runner:
    each request takes blocks from a shuffled free list (block 0, vLLM's null block, is never
    handed out), the block table lists them in order, and the chunk's K/V are written to slot
    (block, offset) of its tokens before attention runs, as do_kv_cache_update does."""

    def __init__(self, block_size, requests=3, layers=2, gen=None):
        from vllm.v1.kv_cache_interface import KVCacheTensor, create_kv_cache_views
        from vllm.v1.kv_cache_layout import KVCacheLayout

        self.bs = block_size
        self.max_blocks = MAX_MODEL_LEN // block_size
        num_blocks = requests * self.max_blocks + 4
        page = 2 * block_size * HKV * D * 4  # bytes of one block of one layer (K and V, float32)
        raw = torch.zeros(page * num_blocks * layers, dtype=torch.int8)
        names = [f"model.layers.{i}.self_attn.attn" for i in range(layers)]
        tensor = KVCacheTensor(size=raw.numel(), layers=names, layer_stride=page * num_blocks, block_stride=page)
        self.kv_caches = create_kv_cache_views(raw, _spec(block_size), num_blocks, KVCacheLayout.LBNHC, tensor)
        for cache in self.kv_caches:
            cache.fill_(math.nan)
        self.free = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
        self.lens = [0] * requests
        self.blocks = [[] for _ in range(requests)]
        self.keys = [[torch.empty(0, HKV, D)] * layers for _ in range(requests)]
        self.values = [[torch.empty(0, HKV, D)] * layers for _ in range(requests)]
        self.lengths = ()

    def schedule(self, lengths):
        """CommonAttentionMetadata of a batch that adds lengths[i] tokens to request i."""
        from vllm.v1.attention.backend import CommonAttentionMetadata

        slots = []
        for i, n in enumerate(lengths):
            for pos in range(self.lens[i], self.lens[i] + n):
                if pos % self.bs == 0:
                    self.blocks[i].append(self.free.pop())
                slots.append(self.blocks[i][pos // self.bs] * self.bs + pos % self.bs)
            self.lens[i] += n
        self.lengths = tuple(lengths)
        table = torch.zeros(len(lengths), self.max_blocks, dtype=torch.int32)
        for i, blocks in enumerate(self.blocks):
            table[i, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        qsl = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0).to(torch.int32)
        return CommonAttentionMetadata(
            query_start_loc=qsl, query_start_loc_cpu=qsl.clone(), seq_lens=torch.tensor(self.lens, dtype=torch.int32),
            num_reqs=len(lengths), num_actual_tokens=sum(lengths), max_query_len=max(lengths),
            max_seq_len=max(self.lens), block_table_tensor=table, slot_mapping=torch.tensor(slots, dtype=torch.int64),
            seq_lens_cpu_upper_bound=torch.tensor(self.lens, dtype=torch.int32))

    def chunk(self, layer_id, meta, gen):
        """Random q [T, Hq, D], k, v [T, Hkv, D] for the scheduled tokens; K/V written into the
        cache at meta.slot_mapping and recorded per request for the contiguous calls."""
        t = sum(self.lengths)
        q = torch.randn(t, HQ, D, generator=gen) * 4  # sharp attention: sparse budgets
        k, v = torch.randn(t, HKV, D, generator=gen), torch.randn(t, HKV, D, generator=gen)
        k_cache, v_cache = pa_vllm.kv_cache_views(self.kv_caches[layer_id], D)
        slots = meta.slot_mapping
        k_cache[slots // self.bs, slots % self.bs] = k
        v_cache[slots // self.bs, slots % self.bs] = v
        start = 0
        for i, n in enumerate(self.lengths):
            self.keys[i][layer_id] = torch.cat([self.keys[i][layer_id], k[start:start + n]])
            self.values[i][layer_id] = torch.cat([self.values[i][layer_id], v[start:start + n]])
            start += n
        return q, k, v

    def dense(self, layer_id, q):
        """Dense causal attention (bottom-right per request) on the recorded keys, float64."""
        out, start = [], 0
        for i, n in enumerate(self.lengths):
            out.append(_dense(q[start:start + n], self.keys[i][layer_id], self.values[i][layer_id]))
            start += n
        return torch.cat(out)


def _dense(q, k, v):
    nq, nk = q.shape[0], k.shape[0]
    k = k.double().repeat_interleave(HQ // HKV, dim=1)
    v = v.double().repeat_interleave(HQ // HKV, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.double(), k) * SCALE
    mask = torch.arange(nk)[None, :] > torch.arange(nq)[:, None] + (nk - nq)
    p = torch.softmax(s.masked_fill(mask, -math.inf), dim=-1)
    return torch.einsum("hqk,khd->qhd", p, v).float()


def _paged_dense(query, kv_cache, meta, output):
    """What FlashAttentionImpl.forward computes, read from exactly the metadata it is given:
    causal attention of the first meta.num_actual_tokens rows through meta.block_table."""
    k_cache, v_cache = pa_vllm.kv_cache_views(kv_cache, D)
    qsl, bs = meta.query_start_loc.tolist(), k_cache.shape[1]
    assert qsl[-1] == meta.num_actual_tokens and meta.max_query_len >= max(b - a for a, b in zip(qsl, qsl[1:]))
    for b in range(len(qsl) - 1):
        n = int(meta.seq_lens[b])
        assert n <= meta.max_seq_len
        pos = torch.arange(n)
        pages = meta.block_table[b, pos // bs].long()
        out = _dense(query[qsl[b]:qsl[b + 1]], k_cache[pages, pos % bs], v_cache[pages, pos % bs])
        output[qsl[b]:qsl[b + 1]] = out
    return output


@pytest.fixture
def fake_flash(vllm, monkeypatch):
    """FlashAttentionImpl.forward replaced by _paged_dense; records the metadata of each call."""
    from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl

    calls = []

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        calls.append(attn_metadata)
        return _paged_dense(query, kv_cache, attn_metadata, output)

    monkeypatch.setattr(FlashAttentionImpl, "forward", forward)
    return calls


def _poisoned(q):
    """The output buffer a forward call fills: NaN, so a row it leaves unwritten shows."""
    return torch.full_like(q, float("nan"))


def _layer(i):
    return types.SimpleNamespace(layer_name=f"model.layers.{i}.self_attn.attn")


@pytest.mark.parametrize("block_size", PAGE_SIZES)
def test_backend_matches_dense_and_varlen(vllm, model_dir, fake_flash, block_size):
    """Two rounds through two layers. The builder's split: round 1 is all prefill, round 2 has the
    decode request in front (FlashAttention metadata of its own) and two chunks behind unaligned
    prefixes (proxy_attention_paged's arguments: the requests' blocks, seq_lens, query_start_loc
    from 0). At gamma = 1 every output row matches dense attention; at a sparse config with
    dense_layers=1, layer 0 still matches it and layer 1's prefill rows equal
    proxy_attention_varlen on the contiguous keys bit for bit, on a selection that is sparse."""
    gen = torch.Generator().manual_seed(block_size)
    eng = Engine(block_size, gen=gen)
    builder = _builder(model_dir, block_size)
    assert builder.reorder_batch_threshold == 1
    pa_vllm.register(EXACT)
    exact = _impl()
    pa_vllm.register(SPARSE, dense_layers=1)
    sparse = _impl()
    assert (exact.settings.config, sparse.settings.dense_layers) == (EXACT, 1)
    for lengths in ROUNDS:
        meta = builder.build(0, eng.schedule(lengths))
        num_decodes = 1 if lengths[0] == 1 else 0
        first = sum(lengths[:num_decodes])
        p = meta.prefill
        assert (meta.decode_reqs, meta.decode_tokens) == (num_decodes, first)
        assert (p.req_start, p.token_start, p.token_end) == (num_decodes, first, sum(lengths))
        for j, i in enumerate(range(num_decodes, 3)):
            assert p.page_table[j, :len(eng.blocks[i])].tolist() == eng.blocks[i]
        assert p.page_table.dtype == torch.int32 and p.seqlens_k.tolist() == eng.lens[num_decodes:]
        assert p.cu_seqlens_q.tolist() == [0, *torch.tensor(lengths[num_decodes:]).cumsum(0).tolist()]
        assert (p.max_seqlen_q, p.max_seqlen_k) == (max(lengths[num_decodes:]), max(eng.lens))
        if num_decodes:
            d = meta.decode
            assert (d.num_actual_tokens, d.max_query_len, d.seq_lens.tolist()) == (1, 1, eng.lens[:1])
            assert d.block_table[0, :len(eng.blocks[0])].tolist() == eng.blocks[0]
        else:
            assert meta.decode is None
        for layer_id in range(2):
            q, k, v = eng.chunk(layer_id, meta, gen)
            want = eng.dense(layer_id, q)
            fake_flash.clear()
            out = exact.forward(_layer(layer_id), q, k, v, eng.kv_caches[layer_id], meta, _poisoned(q))
            assert [c is meta.decode for c in fake_flash] == [True] * num_decodes  # decode rows only
            assert torch.isfinite(out).all() and (out - want).abs().max() < 1e-5, (lengths, layer_id)
            got = sparse.forward(_layer(layer_id), q, k, v, eng.kv_caches[layer_id], meta, _poisoned(q))
            if layer_id == 0:  # dense by dense_layers=1
                assert (got - want).abs().max() < 1e-5, lengths
                continue
            if first:  # the decode row, through FlashAttention
                assert (got[:first] - want[:first]).abs().max() < 1e-5
            kk = torch.cat([ks[layer_id] for ks in eng.keys[num_decodes:]])
            vv = torch.cat([vs[layer_id] for vs in eng.values[num_decodes:]])
            cu_k = torch.tensor([0, *eng.lens[num_decodes:]]).cumsum(0).to(torch.int32)
            ref, sel = pa.proxy_attention_varlen(q[first:], kk, vv, p.cu_seqlens_q, cu_k, p.max_seqlen_q,
                                                 p.max_seqlen_k, dataclasses.replace(SPARSE, softmax_scale=SCALE),
                                                 return_selection=True)
            assert torch.equal(got[first:], ref), lengths
            assert float(sel.density.min()) < 1.0, "the test needs a sparse selection"
            assert (got - want).abs().max() > 1e-3, "the sparse layer should differ from dense attention"


def test_fallbacks_run_on_flash_attention(vllm, model_dir, fake_flash):
    """A decode-only batch and a sliding-window layer go to FlashAttention whole, with the
    batch's own metadata; a layer of a head size the kernels do not take, or whose cache is FP8 or
    another dtype than the model's, is left to it (the rules by which SGLang's backend refuses such
    a model)."""
    eng = Engine(64)
    builder = _builder(model_dir, 64)
    pa_vllm.register(SPARSE)
    meta = builder.build(0, eng.schedule((100, 90, 80)))
    q, k, v = eng.chunk(0, meta, None)
    windowed = _impl(sliding_window=128)
    assert windowed.fallback_reason == "sliding window" and _impl().fallback_reason is None
    assert _impl(head_size=96).fallback_reason == "head dim: expected one of (64, 128), got 96"
    from vllm.config import set_current_vllm_config
    with set_current_vllm_config(_vllm_config(model_dir, 64)):  # as vLLM builds the model's layers: float32
        assert _impl().fallback_reason is None
        for cache in ("bfloat16", "float16"):
            assert _impl(kv_cache_dtype=cache).fallback_reason == (
                f"KV cache dtype: expected the queries' dtype (no quantized, e.g. FP8, cache), got {cache}")
    windowed.forward(_layer(0), q, k, v, eng.kv_caches[0], meta, _poisoned(q))
    assert fake_flash == [meta]
    meta = builder.build(0, eng.schedule((1, 1, 1)))
    assert meta.prefill is None and meta.decode is None and meta.decode_reqs == 3
    q, k, v = eng.chunk(0, meta, None)
    fake_flash.clear()
    out = _impl().forward(_layer(0), q, k, v, eng.kv_caches[0], meta, _poisoned(q))
    assert fake_flash == [meta] and (out - eng.dense(0, q)).abs().max() < 1e-5


@pytest.mark.parametrize("block_size", [8, 48, 512])
def test_unsupported_block_size_refused(vllm, model_dir, block_size):
    with pytest.raises(ValueError, match=rf"block size in .*blocks of {block_size} tokens.*--block-size 64"):
        _builder(model_dir, block_size)


def test_registration_and_plugin(vllm, model_dir, monkeypatch):
    from vllm.config import AttentionConfig
    from vllm.v1.attention.backend import AttentionCGSupport
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    assert pa_vllm.register(SPARSE, dense_layers=1) == "PROXYATTN"
    member = AttentionBackendEnum["PROXYATTN"]
    assert AttentionConfig(backend="PROXYATTN").backend is member  # what --attention-backend parses
    backend = member.get_class()
    assert backend is pa_vllm.ProxyAttnBackend and backend.get_name() == "PROXYATTN"
    assert backend.get_impl_cls() is pa_vllm.ProxyAttnImpl
    assert backend.get_builder_cls() is pa_vllm.ProxyAttnMetadataBuilder
    assert backend.get_supported_kernel_block_sizes(_spec(64)) == list(PAGE_SIZES)
    assert not backend.supports_block_size(8) and backend.supports_block_size(512)  # 512: split into kernel blocks
    support = pa_vllm.ProxyAttnMetadataBuilder.get_cudagraph_support(_vllm_config(model_dir, 64), _spec(64))
    assert support.value <= AttentionCGSupport.UNIFORM_BATCH.value
    impl = _impl()
    assert impl.layer_config(_layer(0)).runs_dense(10 ** 9)
    layer1 = _impl().layer_config(_layer(1))
    assert not layer1.runs_dense(1) and layer1.softmax_scale == SCALE and layer1.gamma == SPARSE.gamma
    monkeypatch.setenv(pa_vllm.CONFIG_ENV, '{"gamma": 0.93, "block_size": 64}')
    monkeypatch.setenv(pa_vllm.DENSE_LAYERS_ENV, "3")
    pa_vllm.plugin()
    assert pa_vllm.get_settings() == pa_vllm.BackendSettings(pa.ProxyAttnConfig(gamma=0.93, block_size=64), 3)
    with pytest.raises(ValueError, match="dense_layers"):
        pa_vllm.register(dense_layers=-1)
    register_backend(member, "somewhere.Else")
    try:
        with pytest.raises(ValueError, match="already a vLLM attention backend"):
            pa_vllm.register()
    finally:
        register_backend(member, pa_vllm.BACKEND_PATH)
