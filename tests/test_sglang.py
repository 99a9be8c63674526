"""The SGLang backend (proxyattn.integrations.sglang) on the CPU with SGLang's real objects:
ReqToTokenPool and MHATokenToKVPool on the CPU (shuffled pages, NaN in every slot nothing writes),
ForwardBatch in EXTEND mode over two chunks (the second behind prefixes whose lengths are not
multiples of the page or the block), RadixAttention layers. The backend writes the chunk's K/V into
the pool and attends through proxy_attention_paged; at gamma = 1 and in a dense layer it matches
SGLang's own TorchNativeAttnBackend, at a sparse config it equals proxy_attention_varlen on the
contiguous keys bit for bit. Skipped without SGLang (tested with 0.5.23, which pins this torch):

    python3 -m venv /tmp/venv-sgl && /tmp/venv-sgl/bin/pip install sglang==0.5.23
    PYTHONPATH=$PWD /tmp/venv-sgl/bin/python -m pytest -q tests/test_sglang.py
"""
import dataclasses
import math
import types

import pytest
import torch

import proxyattn as pa
from proxyattn.integrations import sglang as pa_sgl
from proxyattn.paged import PAGE_SIZES
from lazy_import import assert_imports_lazily

HQ, HKV, D = 4, 2, 64
SCALE = 0.11  # not D ** -0.5: the layer's scaling must reach the call
EXACT = pa.ProxyAttnConfig(block_size=64, gamma=1.0, min_budget=64, dense_below=0, num_proxy_heads=2)
SPARSE = dataclasses.replace(EXACT, gamma=0.5)
CHUNKS = ((300, 170), (250, 333))  # per request; the second chunk sits behind prefixes 300 and 170


@pytest.fixture(scope="module")
def sgl():
    return pytest.importorskip("sglang", reason="SGLang is not installed (tested with 0.5.23)")


def test_import_does_not_import_sglang():
    assert_imports_lazily("proxyattn.integrations.sglang", "sglang", "proxyattn")


def test_cache_pages_views():
    nhd = torch.arange(40 * 2 * 4.0).view(40, 2, 4)
    pages = pa_sgl.cache_pages(nhd, 16)  # 40 slots: two whole pages, the rest cut
    assert pages.shape == (2, 16, 2, 4) and pages.data_ptr() == nhd.data_ptr()
    assert torch.equal(pages[1, 3], nhd[19])
    hnd = torch.randn(3, 2, 16, 4)  # [pages, H, page, D]
    assert torch.equal(pa_sgl.cache_pages(hnd, 16)[2, 5], hnd[2, :, 5])


class Engine:
    """SGLang's pools on the CPU and the bookkeeping its scheduler does for extend batches: each
    request takes whole pages (page 0 is SGLang's padding page, never handed out) from a shuffled
    free list, and req_to_token maps its tokens to slots page * page_size + offset."""

    def __init__(self, page_size, requests=2, max_context=1024, layers=2, gen=None):
        from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool

        self.ps = page_size
        pages = requests * (max_context // page_size) + 4
        self.req_to_token_pool = ReqToTokenPool(size=requests, max_context_len=max_context, device="cpu",
                                                enable_memory_saver=False)
        self.pool = MHATokenToKVPool(size=pages * page_size, page_size=page_size, dtype=torch.float32, head_num=HKV,
                                     head_dim=D, layer_num=layers, device="cpu", enable_memory_saver=False)
        for buf in self.pool.k_buffer + self.pool.v_buffer:
            buf.fill_(math.nan)
        self.free = (torch.randperm(pages - 1, generator=gen) + 1).tolist()
        self.rows = list(range(1, requests + 1))  # ReqToTokenPool hands out rows from 1
        self.lens = [0] * requests
        self.pages = [[] for _ in range(requests)]
        self.keys = [[torch.empty(0, HKV, D)] * layers for _ in range(requests)]
        self.values = [[torch.empty(0, HKV, D)] * layers for _ in range(requests)]
        # The ModelRunner fields the backends read: the model's dtype and the pool's (kv_cache_dtype),
        # the model config's head dim.
        self.runner = types.SimpleNamespace(device="cpu", req_to_token_pool=self.req_to_token_pool,
                                            token_to_kv_pool=self.pool, page_size=page_size, use_mla_backend=False,
                                            decode_attention_backend_str="fa3", dtype=torch.float32,
                                            kv_cache_dtype=torch.float32,
                                            model_config=types.SimpleNamespace(head_dim=D))

    def extend(self, lengths):
        """A ForwardBatch (EXTEND) that adds lengths[i] tokens to request i, as the scheduler builds it."""
        from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

        locs, prefix = [], list(self.lens)
        for i, n in enumerate(lengths):
            for pos in range(self.lens[i], self.lens[i] + n):
                if pos % self.ps == 0:
                    self.pages[i].append(self.free.pop())
                slot = self.pages[i][pos // self.ps] * self.ps + pos % self.ps
                self.req_to_token_pool.req_to_token[self.rows[i], pos] = slot
                locs.append(slot)
            self.lens[i] += n
        seq = torch.tensor(self.lens, dtype=torch.int64)
        return ForwardBatch(
            forward_mode=ForwardMode.EXTEND, batch_size=len(lengths), input_ids=torch.zeros(sum(lengths), dtype=torch.int64),
            req_pool_indices=torch.tensor(self.rows, dtype=torch.int64), seq_lens=seq,
            out_cache_loc=torch.tensor(locs, dtype=torch.int64), seq_lens_sum=int(seq.sum()), seq_lens_cpu=seq.clone(),
            extend_num_tokens=sum(lengths), extend_seq_lens=torch.tensor(lengths, dtype=torch.int32),
            extend_prefix_lens=torch.tensor(prefix, dtype=torch.int32), extend_seq_lens_cpu=list(lengths),
            extend_prefix_lens_cpu=prefix, positions=torch.cat([torch.arange(p, p + n) for p, n in zip(prefix, lengths)]))

    def chunk(self, layer_id, lengths, gen):
        """Random q [T, Hq * D] (as models pass it), k, v [T, Hkv, D] for a chunk; the keys are
        recorded per request for the contiguous calls."""
        t = sum(lengths)
        q = torch.randn(t, HQ * D, generator=gen) * 4  # sharp attention: sparse budgets
        k, v = torch.randn(t, HKV, D, generator=gen), torch.randn(t, HKV, D, generator=gen)
        start = 0
        for i, n in enumerate(lengths):
            self.keys[i][layer_id] = torch.cat([self.keys[i][layer_id], k[start:start + n]])
            self.values[i][layer_id] = torch.cat([self.values[i][layer_id], v[start:start + n]])
            start += n
        return q, k, v

    def contiguous(self, layer_id):
        return (torch.cat([ks[layer_id] for ks in self.keys]), torch.cat([vs[layer_id] for vs in self.values]),
                torch.tensor([0] + self.lens).cumsum(0).to(torch.int32))


def _layers():
    from sglang.srt.layers.radix_attention import RadixAttention

    return [RadixAttention(HQ, D, SCALE, HKV, layer_id=i) for i in range(2)]


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_backend_matches_torch_native_and_varlen(sgl, page_size):
    """Two chunks of two requests through two layers: the metadata mapping gives the pages the
    requests hold; at gamma = 1 the outputs match TorchNativeAttnBackend's; at a sparse config with
    dense_layers=1, layer 0 still matches TorchNativeAttnBackend and layer 1 equals
    proxy_attention_varlen on the contiguous keys bit for bit, on a selection that is sparse."""
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    gen = torch.Generator().manual_seed(page_size)
    eng = Engine(page_size, gen=gen)
    pa_sgl.register(EXACT, name="proxyattn_exact")
    pa_sgl.register(SPARSE, dense_layers=1, name="proxyattn_sparse")
    exact = pa_sgl.ProxyAttnBackend(eng.runner, name="proxyattn_exact")
    sparse = pa_sgl.ProxyAttnBackend(eng.runner, name="proxyattn_sparse")
    native = TorchNativeAttnBackend(eng.runner)
    layers = _layers()
    for lengths in CHUNKS:
        fb = eng.extend(lengths)
        meta = pa_sgl.paged_metadata(fb, eng.req_to_token_pool.req_to_token, page_size)
        max_pages = -(-max(eng.lens) // page_size)
        assert meta.page_table.dtype == torch.int32 and meta.page_table.shape == (2, max_pages)
        for i in range(2):
            assert meta.page_table[i, :len(eng.pages[i])].tolist() == eng.pages[i]
        assert meta.seqlens_k.tolist() == eng.lens and meta.seqlens_k.dtype == torch.int32
        assert meta.cu_seqlens_q.tolist() == [0, lengths[0], sum(lengths)]
        assert (meta.max_seqlen_q, meta.max_seqlen_k) == (max(lengths), max(eng.lens))
        for backend in (exact, sparse, native):
            backend.init_forward_metadata(fb)
        for layer in layers:
            q, k, v = eng.chunk(layer.layer_id, lengths, gen)
            out = exact.forward_extend(q, k, v, layer, fb)  # writes the chunk's K/V into the pool
            want = native.forward_extend(q, k, v, layer, fb, save_kv_cache=False)
            assert out.shape == q.shape and torch.isfinite(out).all()
            assert (out - want).abs().max() < 1e-5, (lengths, layer.layer_id)
            got = sparse.forward_extend(q, k, v, layer, fb, save_kv_cache=False)
            if layer.layer_id == 0:  # dense by dense_layers=1
                assert (got - want).abs().max() < 1e-5, lengths
                continue
            kk, vv, cu_k = eng.contiguous(layer.layer_id)
            cfg = dataclasses.replace(SPARSE, softmax_scale=SCALE)
            ref, sel = pa.proxy_attention_varlen(q.view(-1, HQ, D), kk, vv, meta.cu_seqlens_q, cu_k, meta.max_seqlen_q,
                                                 meta.max_seqlen_k, cfg, return_selection=True)
            assert torch.equal(got, ref.view(-1, HQ * D)), lengths
            assert float(sel.density.min()) < 1.0, "the test needs a sparse selection"
            assert (got - want).abs().max() > 1e-3, "the sparse layer should differ from dense attention"


def test_registration_and_refusals(sgl, monkeypatch):
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    assert pa_sgl.register(SPARSE, dense_layers=1) == "proxyattn"
    assert "proxyattn" in ATTENTION_BACKEND_CHOICES  # the list --prefill-attention-backend offers
    eng = Engine(64)
    backend = ATTENTION_BACKENDS["proxyattn"](eng.runner)
    assert isinstance(backend, pa_sgl.ProxyAttnBackend) and backend.settings.dense_layers == 1
    layers = _layers()
    assert backend.layer_config(layers[0]).runs_dense(10 ** 9) and not backend.layer_config(layers[1]).runs_dense(1)
    assert backend.layer_config(layers[1]).softmax_scale == SCALE
    with pytest.raises(ValueError, match="already an SGLang attention backend"):
        pa_sgl.register(name="fa3")
    with pytest.raises(ValueError, match=r"page size 1: start it with --page-size"):
        ATTENTION_BACKENDS["proxyattn"](types.SimpleNamespace(**dict(vars(eng.runner), page_size=1)))
    with pytest.raises(ValueError, match="runs prefill only.*--decode-attention-backend"):
        ATTENTION_BACKENDS["proxyattn"](types.SimpleNamespace(**dict(vars(eng.runner),
                                                                     decode_attention_backend_str="proxyattn")))
    fb = eng.extend((100, 40))
    q, k, v = eng.chunk(0, (100, 40), None)
    with pytest.raises(NotImplementedError, match="decoding"):
        backend.forward_decode(q, k, v, layers[0], fb)
    with pytest.raises(NotImplementedError, match="forward mode DECODE"):
        backend.init_forward_metadata(dataclasses.replace(fb, forward_mode=ForwardMode.DECODE))
    backend.init_forward_metadata(fb)
    with pytest.raises(NotImplementedError, match=r"the arguments \['sinks'\]"):
        backend.forward_extend(q, k, v, layers[0], fb, sinks=torch.zeros(HQ))
    monkeypatch.setenv(pa_sgl.CONFIG_ENV, '{"gamma": 0.93, "block_size": 64}')
    monkeypatch.setenv(pa_sgl.DENSE_LAYERS_ENV, "3")
    pa_sgl.plugin()
    assert pa_sgl.get_settings() == pa_sgl.BackendSettings(pa.ProxyAttnConfig(gamma=0.93, block_size=64), 3)


def test_unsupported_model_refused_at_startup(sgl):
    """A head dim the kernels do not take and a KV cache in another dtype than the queries' (FP8,
    or bf16 beside float32 queries) are refused when SGLang builds the backend (server startup),
    naming what was expected and what the model runner has, not at the first extend."""
    pa_sgl.register(SPARSE)
    runner = Engine(64).runner
    build = pa_sgl.ProxyAttnBackend

    def with_(**fields):
        return types.SimpleNamespace(**dict(vars(runner), **fields))

    with pytest.raises(ValueError, match=r"head dim: expected one of \(64, 128\), got 96\): serve it with another "
                                         r"--prefill-attention-backend"):
        build(with_(model_config=types.SimpleNamespace(head_dim=96)))
    for kv_dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16):
        with pytest.raises(ValueError, match=rf"KV cache dtype: expected the queries' dtype .*, got {kv_dtype} with "
                                             rf"queries in torch.float32\): start SGLang with a cache in the "
                                             rf"model's dtype \(--kv-cache-dtype auto"):
            build(with_(kv_cache_dtype=kv_dtype))
    assert isinstance(build(runner), build)  # the stand-in itself is served
