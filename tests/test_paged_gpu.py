"""proxy_attention_paged on CUDA (bf16, 16k-64k tokens): for every page size and cache layout the
paged call, whose kernels read K/V through the page table, equals proxy_attention_varlen on the
same keys bit for bit, outputs and selections (the same kernels on the same keys: both calls on the
portable attention kernel, and both on the Hopper kernel); a 64k sequence prefilled chunk by chunk into the cache equals the contiguous chunk calls;
the paged call is captured in a CUDA graph and replayed on new caches, page tables and lengths;
no host synchronisation happens; torch.compile(fullgraph=True) equals the eager call. Pages that
no sequence reads hold NaN; the slots past a sequence's last key in its last page hold finite
values (_finite_tails), as proxy_attention_paged requires. Helpers: tests/test_paged.py (the CPU version)."""
import pytest
import torch

import chunked
import proxyattn as pa
from proxyattn.paged import PAGE_SIZES
from test_paged import LAYOUTS, PagedBatch, assert_same_selection, cu_of

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ALL_KERNELS = pa.HAS_EXTENSION and all(pa.cuda_kernel_available(n) for n in pa.ops.OP_NAMES)
need_kernels = pytest.mark.skipif(not ALL_KERNELS, reason="this build lacks a CUDA kernel for some stage")

HQ, HKV, D = 8, 2, 128
# Three sequences, 64k keys in all: a chunk of 4099 behind a prefix of 32901, a whole prefill of
# 20011 whose first pages are sequence 0's (a shared prefix), a chunk of 1500 behind 5501.
LENS_K, LENS_Q = (37000, 20011, 7001), (4099, 20011, 1500)
SHARED = 8192  # tokens of sequence 0 that sequence 1 shares (whole pages at every page size)


def _structured(n, seed):
    q, k, v, _ = chunked.synthetic.make_structured_inputs(1, n, HQ, HKV, D, seed=seed, dtype=torch.bfloat16,
                                                          device="cuda")
    return q[0], k[0], v[0]


def _batch(page_size, layout, gen):
    """The sequences of LENS_K in a paged cache, and their query rows (the last LENS_Q of each)."""
    pb = PagedBatch(page_size, max(LENS_K), HKV, D, layout, batch=3, dtype=torch.bfloat16, device="cuda", gen=gen)
    qs = []
    for b, (nk, nq) in enumerate(zip(LENS_K, LENS_Q)):
        q, k, v = _structured(nk, seed=10 + b)
        if b == 1:
            pb.share_prefix(0, 1, SHARED // page_size)
            k, v = k[SHARED:], v[SHARED:]
        pb.append(b, k, v)
        qs.append(q[nk - nq:])
    _finite_tails(pb)
    return pb, torch.cat(qs), cu_of(LENS_Q, "cuda")


HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


@pytest.fixture
def portable(monkeypatch):
    """Paged and varlen calls on one attention kernel, the portable one (it reads every page size)."""
    monkeypatch.setenv("PROXYATTN_BSA_BACKEND", "portable")


def _finite_tails(pb):
    """Finite values in the slots past each sequence's last key inside its last page: the Hopper
    kernel loads whole boxes (128 or 16 slots) and masks the keys past the sequence, which needs finite
    stale values there (0 * NaN is NaN in P V), as zero-initialised engine caches hold. Pages no
    sequence reads keep their NaN. Every batch of these tests gets it, the chunked-prefill test after
    each chunk it writes."""
    for b, n in enumerate(pb.lens):
        if n % pb.ps:
            page = int(pb.page_table[b, (n - 1) // pb.ps])
            pb.k_cache[page, n % pb.ps:] = 7.0
            pb.v_cache[page, n % pb.ps:] = -7.0


@need_kernels
@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_paged_equals_varlen_hopper(page_size, monkeypatch):
    """Every page size on the Hopper kernel (one TMA box per key block from its page for pages of 128
    and 256, eight 16-slot boxes from their pages below): outputs equal to the varlen call on the
    Hopper kernel, bit for bit."""
    monkeypatch.setenv("PROXYATTN_BSA_BACKEND", "hopper")
    pb, q, cu_q = _batch(page_size, "kv_split", torch.Generator().manual_seed(page_size + 1))
    cfg = pa.ProxyAttnConfig()
    mq, mk = max(LENS_Q), max(LENS_K)
    out = pa.proxy_attention_paged(q, pb.k_cache, pb.v_cache, pb.page_table, pb.seqlens_k(), cu_q, mq, mk, cfg)
    k, v, cu_k = pb.packed()
    want = pa.proxy_attention_varlen(q, k, v, cu_q, cu_k, mq, mk, cfg)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    assert torch.equal(out, want)


@need_kernels
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_paged_equals_varlen_gpu(page_size, layout, portable):
    pb, q, cu_q = _batch(page_size, layout, torch.Generator().manual_seed(page_size))
    cfg = pa.ProxyAttnConfig()
    mq, mk = max(LENS_Q), max(LENS_K)
    out, sel = pa.proxy_attention_paged(q, pb.k_cache, pb.v_cache, pb.page_table, pb.seqlens_k(), cu_q, mq, mk, cfg,
                                        return_selection=True)
    k, v, cu_k = pb.packed()
    want, want_sel = pa.proxy_attention_varlen(q, k, v, cu_q, cu_k, mq, mk, cfg, return_selection=True)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    assert_same_selection(sel, want_sel)
    assert torch.equal(out, want)
    assert float(sel.density[0].mean()) < 0.5, "the test needs a sparse selection"


@need_kernels
def test_paged_reads_pages_and_matches_the_hopper_path():
    """The paged call allocates no gathered copy of K/V: its peak memory above what it starts with
    is that of the varlen call on already packed keys (workspaces, outputs), within 1 MiB, where a
    gather would add 2 * B * max_seqlen_k * Hkv * D elements (113 MB here). Its output equals the
    varlen call's on the default attention kernel, bit for bit."""
    pb, q, cu_q = _batch(64, "nhd", torch.Generator().manual_seed(5))
    cfg = pa.ProxyAttnConfig()
    mq, mk = max(LENS_Q), max(LENS_K)
    k, v, cu_k = pb.packed()

    def peak_delta(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        res = fn()
        torch.cuda.synchronize()
        return res, torch.cuda.max_memory_allocated() - base

    want, varlen_peak = peak_delta(lambda: pa.proxy_attention_varlen(q, k, v, cu_q, cu_k, mq, mk, cfg))
    out, paged_peak = peak_delta(lambda: pa.proxy_attention_paged(q, pb.k_cache, pb.v_cache, pb.page_table,
                                                                   pb.seqlens_k(), cu_q, mq, mk, cfg))
    assert paged_peak <= varlen_peak + (1 << 20), (paged_peak, varlen_peak)
    assert torch.isfinite(out).all() and torch.equal(out, want)


@need_kernels
@pytest.mark.parametrize("page_size", (16, 128))
@pytest.mark.parametrize("backend", ("portable", "auto"))
def test_chunked_prefill_into_the_cache_gpu(page_size, backend, monkeypatch):
    """A 64k sequence prefilled in chunks of random lengths (not multiples of 128), each chunk's
    K/V written into the cache before its call: every chunk equals the varlen call on the
    contiguous prefix, outputs and selections (so it keeps their recall: tests/test_chunked_prefill_gpu.py),
    on the portable kernel and on the default one (the Hopper kernel on sm_90: 16-slot pieces and
    128-slot boxes), the slots past the written keys finite as in an engine's cache."""
    monkeypatch.setenv("PROXYATTN_BSA_BACKEND", backend)
    n = 65536
    q, k, v = _structured(n, seed=3)
    gen = torch.Generator().manual_seed(page_size)
    lengths = chunked.random_chunks(n, 3000, 12000, 128, gen)
    cfg = pa.ProxyAttnConfig()
    pb = PagedBatch(page_size, n, HKV, D, "nhd", dtype=torch.bfloat16, device="cuda", gen=gen)
    pos = 0
    for ln in lengths:
        pb.append(0, k[pos:pos + ln], v[pos:pos + ln])
        _finite_tails(pb)
        qc, cu_q = q[pos:pos + ln], cu_of([ln], "cuda")
        got, sel = pa.proxy_attention_paged(qc, pb.k_cache, pb.v_cache, pb.page_table, pb.seqlens_k(), cu_q, ln,
                                            pos + ln, cfg, return_selection=True)
        want, want_sel = pa.proxy_attention_varlen(qc, k[:pos + ln], v[:pos + ln], cu_q, cu_of([pos + ln], "cuda"), ln,
                                                   pos + ln, cfg, return_selection=True)
        assert torch.equal(got, want), (pos, ln)
        assert_same_selection(sel, want_sel)
        pos += ln


@need_kernels
def test_paged_cuda_graph_and_no_host_sync():
    """Capture the paged call once; replays with new queries, cache contents, page tables and
    lengths (same shapes and maxima) equal eager calls bit for bit. An eager call under
    torch.cuda.set_sync_debug_mode("error") raises on any synchronising CUDA call."""
    gen = torch.Generator().manual_seed(7)
    ps, mq, mk = 64, max(LENS_Q), max(LENS_K)
    cfg = pa.ProxyAttnConfig()
    pb, q, cu_q = _batch(ps, "kv_split", gen)
    static = dict(q=q.clone(), k_cache=pb.k_cache, v_cache=pb.v_cache, page_table=pb.page_table.clone(),
                  seqlens_k=pb.seqlens_k(), cu_seqlens_q=cu_q.clone())

    def call(a):
        return pa.proxy_attention_paged(a["q"], a["k_cache"], a["v_cache"], a["page_table"], a["seqlens_k"],
                                        a["cu_seqlens_q"], mq, mk, cfg)

    call(static)  # warm-up outside the graph
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        call(static)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = call(static)
    for step, lens_q in enumerate((LENS_Q, (20011, 1500, 4099))):  # same total rows, same maxima
        lens_k = [max(nq, nk - 1000 * step) for nq, nk in zip(lens_q, LENS_K)]
        # New contents: a fresh batch's pages copied into the captured caches, its own page table.
        fresh = PagedBatch(ps, max(LENS_K), HKV, D, "nhd", batch=3, dtype=torch.bfloat16, device="cuda", gen=gen)
        qs = []
        for b, (nk, nq) in enumerate(zip(lens_k, lens_q)):
            qq, kk, vv = _structured(nk, seed=100 * step + b)
            fresh.append(b, kk, vv)
            qs.append(qq[nk - nq:])
        _finite_tails(fresh)
        static["k_cache"].copy_(fresh.k_cache)
        static["v_cache"].copy_(fresh.v_cache)
        for name, t in (("q", torch.cat(qs)), ("page_table", fresh.page_table), ("seqlens_k", fresh.seqlens_k()),
                        ("cu_seqlens_q", cu_of(lens_q, "cuda"))):
            static[name].copy_(t)
        g.replay()
        torch.cuda.synchronize()
        want = call({**static, "q": static["q"].clone()})
        torch.cuda.synchronize()
        assert torch.isfinite(out).all(), step
        assert torch.equal(out, want), step


@need_kernels
def test_compile_fullgraph_paged_gpu():
    """torch.compile(fullgraph=True) of the paged call equals the eager call bit for bit."""
    torch._dynamo.reset()
    pb, q, cu_q = _batch(32, "hnd", torch.Generator().manual_seed(5))
    mq, mk = max(LENS_Q), max(LENS_K)
    cfg = pa.ProxyAttnConfig()

    def paged(q, kc, vc, pt, sk, cu):
        return pa.proxy_attention_paged(q, kc, vc, pt, sk, cu, mq, mk, cfg)

    args = (q, pb.k_cache, pb.v_cache, pb.page_table, pb.seqlens_k(), cu_q)
    got = torch.compile(paged, fullgraph=True)(*args)
    want = paged(*args)
    torch.cuda.synchronize()
    assert torch.equal(got, want)


@need_kernels
def test_opcheck_paged_ops():
    """torch.library.opcheck of stages 1, 2 and 4 with a page_table (schemas, fake tensors, autograd
    registration) on a small paged batch."""
    pb, q, cu_q = _batch_small()
    k, v, cu_k = pb.packed()
    mq, mk, s = max(LENS_Q_SMALL), max(LENS_K_SMALL), 128 ** -0.5
    ops = torch.ops.proxyattn
    scores = ops.proxy_block_scores(q, pb.k_cache, cu_q, cu_k, mq, mk, 128, 2, 4, s, True, pb.page_table)
    kstar = ops.head_budgets(q, pb.k_cache, cu_q, cu_k, mq, mk, 128, 0.9, 1, 1, s, True, pb.page_table)
    counts, idx = ops.select_blocks(scores, kstar, cu_q, cu_k, mq, mk, 128, 1, 1, 128, True)
    for name, args in [("proxy_block_scores", (q, pb.k_cache, cu_q, cu_k, mq, mk, 128, 2, 4, s, True, pb.page_table)),
                       ("head_budgets", (q, pb.k_cache, cu_q, cu_k, mq, mk, 128, 0.9, 1, 1, s, True, pb.page_table)),
                       ("block_sparse_attention", (q, pb.k_cache, pb.v_cache, counts, idx, cu_q, cu_k, mq, mk, 128, s,
                                                   True, pb.page_table))]:
        torch.library.opcheck(getattr(ops, name), args)


LENS_K_SMALL, LENS_Q_SMALL = (900, 530), (300, 530)


def _batch_small():
    gen = torch.Generator().manual_seed(7)
    pb = PagedBatch(32, max(LENS_K_SMALL), HKV, D, "kv_split", batch=2, dtype=torch.bfloat16, device="cuda", gen=gen)
    qs = []
    for b, (nk, nq) in enumerate(zip(LENS_K_SMALL, LENS_Q_SMALL)):
        q, k, v = _structured(nk, seed=20 + b)
        pb.append(b, k, v)
        qs.append(q[nk - nq:])
    _finite_tails(pb)
    return pb, torch.cat(qs), cu_of(LENS_Q_SMALL, "cuda")



@need_kernels
def test_page_table_with_fixed_length_queries_is_refused_first():
    """A direct op call with a page_table but fixed-length q ([B, Nq, Hq, D], no cu_seqlens) is told
    that pages need packed queries, before any shape check that would name something else."""
    pb, q, _ = _batch_small()
    qf = q[None, :300]
    ops, s = torch.ops.proxyattn, 128 ** -0.5
    calls = {
        "proxy_block_scores": lambda: ops.proxy_block_scores(qf, pb.k_cache, None, None, 300, 900, 128, 2, 4, s, True,
                                                             pb.page_table[:1]),
        "head_budgets": lambda: ops.head_budgets(qf, pb.k_cache, None, None, 300, 900, 128, 0.9, 1, 1, s, True,
                                                 pb.page_table[:1]),
        "block_sparse_attention": lambda: ops.block_sparse_attention(
            qf, pb.k_cache, pb.v_cache, torch.zeros(1, HQ, 3, dtype=torch.int32, device="cuda"),
            torch.zeros(1, HQ, 3, 8, dtype=torch.int16, device="cuda"), None, None, 300, 900, 128, s, True,
            pb.page_table[:1]),
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match="page_table needs packed queries"):
            call()
