"""proxy_attention_paged and gather_paged_kv on the CPU (the reference): a paged cache with
shuffled, non-contiguous pages, pages shared between sequences as a common prefix, and every page
that no sequence reads (and every slot past a sequence's last key) filled with NaN, so that a
wrong read shows. For every page size the paged call equals proxy_attention_varlen on the same
keys bit for bit (the same reference path runs), outputs and selections; at gamma = 1 it is dense
attention; a sequence prefilled chunk by chunk into the cache matches one call over the whole
sequence; empty sequences select nothing and leave the others as they are without them; on fake
CUDA tensors nothing is read on the host and torch.compile traces one graph.
Refusals name the argument. The GPU version at 16k-64k tokens, with CUDA graph capture,
is tests/test_paged_gpu.py; the helpers below serve both."""
import dataclasses
import math

import pytest
import torch

import proxyattn as pa
from proxyattn import reference as ref
from proxyattn.paged import PAGE_SIZES

LAYOUTS = ("nhd", "hnd", "kv_split")  # contiguous pages; [pages, H, page, D] seen as NHD; K and V halves of one row
# Sparse enough that selections differ from dense ones (checked in the tests).
SPARSE = pa.ProxyAttnConfig(block_size=64, gamma=0.8, min_budget=64, dense_below=0, num_proxy_heads=2)


def cdiv(a, b):
    return -(-a // b)


def empty_cache(num_pages, page_size, hkv, d, layout, dtype=torch.float32, device="cpu"):
    """NaN-filled k_cache, v_cache [num_pages, page_size, Hkv, D] in one of LAYOUTS (strided views
    for hnd, and for kv_split with head stride 2D as vLLM's cache has)."""
    nan = dict(dtype=dtype, device=device)
    if layout == "nhd":
        return (torch.full((num_pages, page_size, hkv, d), math.nan, **nan),
                torch.full((num_pages, page_size, hkv, d), math.nan, **nan))
    if layout == "hnd":
        return tuple(torch.full((num_pages, hkv, page_size, d), math.nan, **nan).transpose(1, 2) for _ in range(2))
    if layout == "kv_split":
        return torch.full((num_pages, page_size, hkv, 2 * d), math.nan, **nan).split(d, dim=-1)
    raise ValueError(layout)


class PagedBatch:
    """Sequences' keys and values in a paged cache, written through a page table.

    Physical pages come from a shuffled free list; sequence 1 reads the first `shared` pages of
    sequence 0 (a common prefix: its keys there are sequence 0's); the page-table entries past a
    sequence's last page name a page that nothing writes (NaN)."""

    def __init__(self, page_size, max_tokens, hkv, d, layout="nhd", batch=1, spare=3, dtype=torch.float32,
                 device="cpu", gen=None):
        self.ps, self.batch = page_size, batch
        self.max_pages = cdiv(max_tokens, page_size)
        num_pages = batch * self.max_pages + spare
        self.k_cache, self.v_cache = empty_cache(num_pages, page_size, hkv, d, layout, dtype, device)
        perm = torch.randperm(num_pages, generator=gen).tolist()
        self.poison = perm.pop()  # never written
        self.free = perm
        self.page_table = torch.full((batch, self.max_pages), self.poison, dtype=torch.int32, device=device)
        self.lens = [0] * batch
        self.keys = [torch.empty(0, hkv, d, dtype=dtype, device=device) for _ in range(batch)]
        self.values = [torch.empty(0, hkv, d, dtype=dtype, device=device) for _ in range(batch)]

    def share_prefix(self, src, dst, pages):
        """Sequence dst (empty) starts with the first `pages` (full) pages of sequence src."""
        n = pages * self.ps
        assert self.lens[dst] == 0 and self.lens[src] >= n
        self.page_table[dst, :pages] = self.page_table[src, :pages]
        self.lens[dst] = n
        self.keys[dst], self.values[dst] = self.keys[src][:n], self.values[src][:n]

    def append(self, b, k, v):
        """Write k, v [n, Hkv, D] after the keys of sequence b, taking new pages as needed."""
        pos, n = self.lens[b], k.shape[0]
        first, end = cdiv(pos, self.ps), cdiv(pos + n, self.ps)
        if end > first:
            self.page_table[b, first:end] = torch.tensor([self.free.pop() for _ in range(end - first)],
                                                         dtype=torch.int32)
        p = torch.arange(pos, pos + n, device=self.page_table.device)
        page = self.page_table[b, p // self.ps].long()
        self.k_cache[page, p % self.ps] = k
        self.v_cache[page, p % self.ps] = v
        self.lens[b] = pos + n
        self.keys[b] = torch.cat([self.keys[b], k])
        self.values[b] = torch.cat([self.values[b], v])

    def seqlens_k(self, rows=None):
        rows = range(self.batch) if rows is None else rows
        return torch.tensor([self.lens[b] for b in rows], dtype=torch.int32, device=self.page_table.device)

    def packed(self, rows=None):
        """The contiguous varlen form: K, V [total, Hkv, D] and cu_seqlens_k."""
        rows = list(range(self.batch)) if rows is None else rows
        cu = torch.tensor([0] + [self.lens[b] for b in rows], device=self.page_table.device).cumsum(0)
        return (torch.cat([self.keys[b] for b in rows]), torch.cat([self.values[b] for b in rows]),
                cu.to(torch.int32))


def cu_of(lengths, device="cpu"):
    return torch.tensor([0] + list(lengths), device=device).cumsum(0).to(torch.int32)


def fill_batch(page_size, lens_k, hkv, d, layout="nhd", shared_tokens=200, dtype=torch.float32, device="cpu",
               gen=None):
    """A PagedBatch holding random keys of lengths lens_k; sequence 1 shares the first
    max(1, shared_tokens // page_size) pages of sequence 0."""
    pb = PagedBatch(page_size, max(lens_k), hkv, d, layout, batch=len(lens_k), dtype=dtype, device=device, gen=gen)
    rand = lambda n: torch.randn(n, hkv, d, generator=gen).to(device=device, dtype=dtype)  # noqa: E731
    pb.append(0, rand(lens_k[0]), rand(lens_k[0]))
    shared = max(1, shared_tokens // page_size)
    pb.share_prefix(0, 1, shared)
    pb.append(1, rand(lens_k[1] - shared * page_size), rand(lens_k[1] - shared * page_size))
    for b in range(2, len(lens_k)):
        pb.append(b, rand(lens_k[b]), rand(lens_k[b]))
    return pb


# Three sequences: a chunk of 200 behind a prefix of 500 (not a multiple of the block), a whole
# prefill of 520 sharing sequence 0's first pages, a chunk of 90 behind 170.
LENS_K, LENS_Q = (700, 520, 260), (200, 520, 90)


def _inputs(page_size, layout, hq=4, hkv=2, d=64, gen=None):
    pb = fill_batch(page_size, LENS_K, hkv, d, layout, gen=gen)
    q = 2 * torch.randn(sum(LENS_Q), hq, d, generator=gen)  # sharper than unit scale: sparse budgets
    return pb, q, cu_of(LENS_Q)


def _paged(pb, q, cu_q, cfg, **kw):
    return pa.proxy_attention_paged(q, pb.k_cache, pb.v_cache, pb.page_table, pb.seqlens_k(), cu_q,
                                    int((cu_q[1:] - cu_q[:-1]).max()), max(pb.lens), cfg, **kw)


def _varlen(pb, q, cu_q, cfg, **kw):
    k, v, cu_k = pb.packed()
    return pa.proxy_attention_varlen(q, k, v, cu_q, cu_k, int((cu_q[1:] - cu_q[:-1]).max()), max(pb.lens), cfg,
                                     **kw)


def assert_same_selection(a, b):
    for name in ("counts", "indices", "kstar", "density", "budget_ratio"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.dense == b.dense


# ---------------------------------------------------------------- equality with the varlen call


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_paged_equals_varlen(page_size, layout):
    pb, q, cu_q = _inputs(page_size, layout)
    assert torch.isnan(pb.k_cache[pb.poison]).all()
    out, sel = _paged(pb, q, cu_q, SPARSE, return_selection=True)
    want, want_sel = _varlen(pb, q, cu_q, SPARSE, return_selection=True)
    assert torch.isfinite(out).all()
    assert torch.equal(out, want)
    assert_same_selection(sel, want_sel)
    assert float(sel.density.min()) < 0.9, "the test needs a sparse selection"


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_paged_gamma_one_is_dense(page_size):
    pb, q, cu_q = _inputs(page_size, "nhd")
    cfg = dataclasses.replace(SPARSE, gamma=1.0)
    out, sel = _paged(pb, q, cu_q, cfg, return_selection=True)
    k, v, cu_k = pb.packed()
    dense = ref.dense_attention(q, k, v, cu_q, cu_k, 64 ** -0.5, True)[0]
    assert not sel.dense and bool((sel.density == 1).all())
    assert (out - dense).abs().max() < 1e-5


def test_paged_non_causal():
    """causal=False, where a sequence may have fewer keys than queries, equals the varlen call."""
    pb, _, _ = _inputs(32, "kv_split")
    lens_q = (200, 600, 90)  # sequence 1: 600 queries, 520 keys
    q, cu_q = torch.randn(sum(lens_q), 4, 64), cu_of(lens_q)
    out, sel = _paged(pb, q, cu_q, SPARSE, causal=False, return_selection=True)
    want, want_sel = _varlen(pb, q, cu_q, SPARSE, causal=False, return_selection=True)
    assert torch.isfinite(out).all() and torch.equal(out, want)
    assert_same_selection(sel, want_sel)


def test_paged_dense_path():
    """Fewer keys than dense_below: the dense path, equal to the varlen call's."""
    pb, q, cu_q = _inputs(128, "hnd")
    cfg = dataclasses.replace(SPARSE, dense_below=10 ** 6)
    out, sel = _paged(pb, q, cu_q, cfg, return_selection=True)
    want, want_sel = _varlen(pb, q, cu_q, cfg, return_selection=True)
    assert sel.dense and torch.isfinite(out).all() and torch.equal(out, want)
    assert_same_selection(sel, want_sel)


def test_paged_empty_sequences():
    """Empty sequences (no queries; seqlens_k 0, or keys behind no query) first, in the middle and
    last: the paged call equals the varlen call on the same keys bit for bit, and the other
    sequences' rows and selections equal the paged call without the empty ones; the empty ones
    select nothing (counts 0, indices -1, kstar 0, density 0)."""
    gen = torch.Generator().manual_seed(5)
    lens_k, lens_q = (0, 700, 300, 0, 260, 150), (0, 200, 0, 0, 90, 0)
    pb = PagedBatch(32, max(lens_k), 2, 64, batch=len(lens_k), gen=gen)
    for b, n in enumerate(lens_k):
        if n:
            pb.append(b, torch.randn(n, 2, 64, generator=gen), torch.randn(n, 2, 64, generator=gen))
    q, cu_q = 2 * torch.randn(sum(lens_q), 4, 64, generator=gen), cu_of(lens_q)
    out, sel = _paged(pb, q, cu_q, SPARSE, return_selection=True)
    want, want_sel = _varlen(pb, q, cu_q, SPARSE, return_selection=True)
    assert torch.isfinite(out).all() and torch.equal(out, want)
    assert_same_selection(sel, want_sel)
    empty, rows = [0, 2, 3, 5], [1, 4]
    alone, alone_sel = pa.proxy_attention_paged(q, pb.k_cache, pb.v_cache, pb.page_table[rows], pb.seqlens_k(rows),
                                                cu_of([lens_q[b] for b in rows]), max(lens_q), max(lens_k), SPARSE,
                                                return_selection=True)
    assert torch.equal(out, alone)
    for name in ("counts", "indices", "kstar", "density", "budget_ratio"):
        assert torch.equal(getattr(sel, name)[rows], getattr(alone_sel, name)), name
    assert sel.counts[empty].eq(0).all() and sel.indices[empty].eq(-1).all()
    assert sel.kstar[empty].eq(0).all() and sel.density[empty].eq(0).all()
    assert float(sel.density[rows].min()) < 0.9, "the test needs a sparse selection"


# ---------------------------------------------------------------- chunked prefill


def _chunks(n, gen, lo=70, hi=250, block=64):
    out = []
    while sum(out) < n:
        ln = int(torch.randint(lo, hi + 1, (1,), generator=gen))
        ln += ln % block == 0
        out.append(min(ln, n - sum(out)))
    return out


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_chunked_prefill_into_the_cache(page_size):
    """Two sequences prefilled chunk by chunk (lengths that are not multiples of the block), each
    chunk's K/V written into the cache before its call: at gamma = 1 the outputs match one call over
    each whole sequence; at the sparse config every chunk equals the contiguous call on the same
    prefix, outputs and selections."""
    gen = torch.Generator().manual_seed(page_size)
    hq, hkv, d, n = 4, 2, 64, (600, 450)
    q = [2 * torch.randn(x, hq, d, generator=gen) for x in n]
    k = [torch.randn(x, hkv, d, generator=gen) for x in n]
    v = [torch.randn(x, hkv, d, generator=gen) for x in n]
    plans = [_chunks(x, gen) for x in n]
    assert any(c % 64 for p in plans for c in p)
    exact = dataclasses.replace(SPARSE, gamma=1.0)
    pb = PagedBatch(page_size, max(n), hkv, d, "nhd", batch=2, gen=gen)
    outs = [[], []]
    for step in range(max(len(p) for p in plans)):
        rows = [b for b in range(2) if step < len(plans[b])]
        qs = []
        for b in rows:
            pos, ln = pb.lens[b], plans[b][step]
            pb.append(b, k[b][pos:pos + ln], v[b][pos:pos + ln])
            qs.append(q[b][pos:pos + ln])
        qc, cu_q = torch.cat(qs), cu_of([x.shape[0] for x in qs])
        mq, mk = max(x.shape[0] for x in qs), max(pb.lens[b] for b in rows)
        pt, sk = pb.page_table[rows], pb.seqlens_k(rows)
        got = pa.proxy_attention_paged(qc, pb.k_cache, pb.v_cache, pt, sk, cu_q, mq, mk, exact)
        for i, b in enumerate(rows):
            outs[b].append(got[cu_q[i]:cu_q[i + 1]])
        sparse, sel = pa.proxy_attention_paged(qc, pb.k_cache, pb.v_cache, pt, sk, cu_q, mq, mk, SPARSE,
                                               return_selection=True)
        kk, vv, cu_k = pb.packed(rows)
        want, want_sel = pa.proxy_attention_varlen(qc, kk, vv, cu_q, cu_k, mq, mk, SPARSE, return_selection=True)
        assert torch.equal(sparse, want), step
        assert_same_selection(sel, want_sel)
    for b in range(2):
        whole = pa.proxy_attention(q[b][None], k[b][None], v[b][None], exact)[0]
        assert (torch.cat(outs[b]) - whole).abs().max() < 1e-5, b


# ---------------------------------------------------------------- gather and the stage functions


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("page_size", (16, 256))
def test_gather_paged_kv(page_size, layout):
    pb, _, _ = _inputs(page_size, layout)
    k, v, cu_k = pb.packed()
    kv = pa.gather_paged_kv(pb.k_cache, pb.v_cache, pb.page_table, pb.seqlens_k(), max(pb.lens))
    assert torch.equal(kv.k, k) and torch.equal(kv.v, v) and torch.equal(kv.cu_seqlens_k, cu_k)
    assert kv.max_seqlen_k == max(pb.lens) and kv.k.is_contiguous()
    room = pb.max_pages * page_size  # a max_seqlen_k above the longest sequence
    keys_only = pa.gather_paged_kv(pb.k_cache, None, pb.page_table, pb.seqlens_k(), room)
    assert keys_only.v is None and torch.equal(keys_only.k, k) and keys_only.max_seqlen_k == room


def test_stage_functions_take_gathered_keys():
    """The four stage functions on gather_paged_kv's keys equal them on the contiguous keys; the CPU
    kernels of the ops (the reference) also take packed keys with padding rows past cu_seqlens_k[-1],
    which is what the gather gives them on CUDA."""
    pb, q, cu_q = _inputs(32, "hnd")
    mq, mk = max(LENS_Q), max(LENS_K)
    k, v, cu_k = pb.packed()
    kv = pa.gather_paged_kv(pb.k_cache, pb.v_cache, pb.page_table, pb.seqlens_k(), mk)
    var = dict(cu_seqlens_q=cu_q, block_size=64)
    both = ((kv.k, kv.v, kv.cu_seqlens_k), (k, v, cu_k))
    scores = [pa.proxy_block_scores(q, kk, cu_seqlens_k=ck, max_seqlen_q=mq, max_seqlen_k=kv.max_seqlen_k,
                                    num_proxy_heads=2, **var) for kk, _, ck in both]
    kstar = [pa.head_budgets(q, kk, cu_seqlens_k=ck, max_seqlen_q=mq, max_seqlen_k=mk, gamma=0.8, **var)
             for kk, _, ck in both]
    assert torch.equal(*scores) and torch.equal(*kstar)
    sel = [pa.select_blocks(scores[0], kstar[0], seqlen_q=mq, seqlen_k=mk, min_budget=mb, cu_seqlens_k=ck, **var)
           for mb, ck in ((64, kv.cu_seqlens_k), (64, cu_k), (10 ** 6, cu_k))]
    assert torch.equal(sel[0][0], sel[1][0]) and torch.equal(sel[0][1], sel[1][1])
    counts, idx = sel[0]
    assert int(counts.sum()) < int(sel[2][0].sum()), "the test needs a sparse selection"
    out = [pa.block_sparse_attention(q, kk, vv, counts, idx, cu_seqlens_k=ck, max_seqlen_q=mq, max_seqlen_k=mk,
                                     **var) for kk, vv, ck in both]
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    # Padding rows after the last key (finite, as the gather's are) change nothing in any op.
    pad = lambda t: torch.cat([t, torch.randn(3 * mk, *t.shape[1:])])  # noqa: E731
    ops, s = (torch.ops.proxyattn if pa.HAS_EXTENSION else ref), 64 ** -0.5  # the reference is the CPU kernel
    assert torch.equal(ops.proxy_block_scores(q, pad(k), cu_q, cu_k, mq, mk, 64, 2, 4, s, True), scores[1])
    assert torch.equal(ops.head_budgets(q, pad(k), cu_q, cu_k, mq, mk, 64, 0.8, 1, 1, s, True), kstar[1])
    sel = ops.select_blocks(scores[1], kstar[1], cu_q, cu_k, mq, mk, 64, 1, 1, 64, True)
    assert torch.equal(sel[0], counts) and torch.equal(sel[1], idx)
    padded = ops.block_sparse_attention(q, pad(k), pad(v), counts, idx, cu_q, cu_k, mq, mk, 64, s, True)
    assert torch.equal(padded[0], out[1][0]) and torch.equal(padded[1], out[1][1])


@pytest.mark.parametrize("page_size", (16, 128))
def test_ops_read_the_cache_through_page_table(page_size):
    """torch.ops.proxyattn's stages 1, 2 and 4 take the caches and a page_table (their CPU kernels,
    the reference, read keys through it): equal to the packed keys, also with NaN in every unread
    page and slot, and with out-of-range page numbers past each sequence's pages (never read)."""
    pb, q, cu_q = _inputs(page_size, "kv_split")
    mq, mk = max(LENS_Q), max(LENS_K)
    k, v, cu_k = pb.packed()
    table = pb.page_table.clone()
    for b, n in enumerate(pb.lens):
        table[b, cdiv(n, page_size):] = 10 ** 6  # past the sequence: never read
    ops, s = (torch.ops.proxyattn if pa.HAS_EXTENSION else ref), 64 ** -0.5  # the reference is the CPU kernel
    assert torch.equal(ops.proxy_block_scores(q, pb.k_cache, cu_q, cu_k, mq, mk, 64, 2, 4, s, True, table),
                       ops.proxy_block_scores(q, k, cu_q, cu_k, mq, mk, 64, 2, 4, s, True))
    assert torch.equal(ops.head_budgets(q, pb.k_cache, cu_q, cu_k, mq, mk, 64, 0.8, 1, 1, s, True, table),
                       ops.head_budgets(q, k, cu_q, cu_k, mq, mk, 64, 0.8, 1, 1, s, True))
    nqb, nkb = cdiv(mq, 64), cdiv(mk, 64)
    gen = torch.Generator().manual_seed(1)
    counts = torch.randint(0, nkb + 1, (len(pb.lens), q.shape[1], nqb), generator=gen, dtype=torch.int32)
    idx = torch.randint(-1, nkb, (len(pb.lens), q.shape[1], nqb, nkb), generator=gen, dtype=torch.int32)
    got = ops.block_sparse_attention(q, pb.k_cache, pb.v_cache, counts, idx, cu_q, cu_k, mq, mk, 64, s, True, table)
    want = ops.block_sparse_attention(q, k, v, counts, idx, cu_q, cu_k, mq, mk, 64, s, True)
    assert torch.isfinite(got[0]).all()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.skipif(not pa.HAS_EXTENSION, reason=f"fake kernels come with proxyattn._C: {pa.EXTENSION_ERROR}")
def test_fake_cuda_tensors_no_host_reads():
    """Under FakeTensorMode with CUDA tensors (no GPU needed) the paged call and the gather build
    outputs of the right shapes: nothing reads a device value on the host (a fake tensor would
    refuse), and the gathered keys have the fixed B * max_seqlen_k rows."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    b, mq, mk, ps = 3, 200, 700, 64
    with FakeTensorMode():
        dev = dict(device="cuda")
        q = torch.empty(490, 4, 64, dtype=torch.bfloat16, **dev)
        kc = torch.empty(40, ps, 2, 64, dtype=torch.bfloat16, **dev)
        pt = torch.empty(b, cdiv(mk, ps), dtype=torch.int32, **dev)
        sk = torch.empty(b, dtype=torch.int32, **dev)
        cu_q = torch.empty(b + 1, dtype=torch.int32, **dev)
        out, sel = pa.proxy_attention_paged(q, kc, kc, pt, sk, cu_q, mq, mk, SPARSE, return_selection=True)
        kv = pa.gather_paged_kv(kc, kc, pt, sk, mk)
        assert out.shape == q.shape and out.dtype == q.dtype and out.device.type == "cuda"
        assert sel.indices.shape == (b, 4, cdiv(mq, 64), cdiv(mk, 64))
        assert kv.k.shape == (b * mk, 2, 64) and kv.cu_seqlens_k.shape == (b + 1,)


@pytest.mark.skipif(not pa.HAS_EXTENSION, reason=f"fake kernels come with proxyattn._C: {pa.EXTENSION_ERROR}")
def test_compile_traces_one_graph_on_fake_cuda_tensors():
    """torch.compile(fullgraph=True) traces the paged call on fake CUDA tensors into one graph
    holding the four ops (no graph break, no host read), and the gather only where the build has no
    CUDA kernels to read the pages."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    graphs = []

    def backend(gm, example_inputs):
        graphs.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        return gm.forward

    def paged(q, kc, vc, pt, sk, cu_q):
        return pa.proxy_attention_paged(q, kc, vc, pt, sk, cu_q, 200, 700, SPARSE)

    torch._dynamo.reset()
    with FakeTensorMode():
        dev = dict(device="cuda")
        q = torch.empty(490, 4, 64, dtype=torch.bfloat16, **dev)
        kc = torch.empty(40, 64, 2, 64, dtype=torch.bfloat16, **dev)
        args = (q, kc, kc.clone(), torch.empty(3, 11, dtype=torch.int32, **dev), torch.empty(3, dtype=torch.int32, **dev),
                torch.empty(4, dtype=torch.int32, **dev))
        out = torch.compile(paged, backend=backend, fullgraph=True)(*args)
    torch._dynamo.reset()
    assert out.shape == q.shape and len(graphs) == 1
    called = " ".join(graphs[0])
    for name in pa.ops.OP_NAMES:
        assert name in called, name
    # With CUDA kernels the ops read the pages (no gather in the graph); without, the keys are gathered.
    kernels = all(pa.cuda_kernel_available(n) for n in ("proxy_block_scores", "head_budgets", "block_sparse_attention"))
    assert ("searchsorted" in called) != kernels, called


# ---------------------------------------------------------------- refusals


def _valid():
    pb, q, cu_q = _inputs(16, "nhd", gen=torch.Generator().manual_seed(3))
    return dict(q=q, k_cache=pb.k_cache, v_cache=pb.v_cache, page_table=pb.page_table, seqlens_k=pb.seqlens_k(),
                cu_seqlens_q=cu_q, max_seqlen_q=max(LENS_Q), max_seqlen_k=max(LENS_K))


def _bad_page(a):
    pt = a["page_table"].clone()
    pt[2, 16] = a["k_cache"].shape[0]  # sequence 2 reads 17 pages (260 keys)
    return dict(a, page_table=pt)


def _negative_page(a):
    pt = a["page_table"].clone()
    pt[0, 3] = -1
    return dict(a, page_table=pt)


def _seqlen(a, i, n):
    sk = a["seqlens_k"].clone()
    sk[i] = n
    return dict(a, seqlens_k=sk)


def _strided_last(t):
    return torch.cat([t, t], dim=-1)[..., ::2]


REFUSALS = [
    ("k_cache rank", lambda a: dict(a, k_cache=a["k_cache"][0]), ValueError, r"k_cache must have rank 4"),
    ("v_cache shape", lambda a: dict(a, v_cache=a["v_cache"][:-1]), ValueError, r"v_cache must have the shape"),
    ("v_cache none", lambda a: dict(a, v_cache=None), TypeError, r"v_cache must be a torch.Tensor"),
    ("page size 8", lambda a: dict(a, k_cache=a["k_cache"].reshape(-1, 8, 2, 64),
                                   v_cache=a["v_cache"].reshape(-1, 8, 2, 64)), ValueError,
     r"k_cache.shape\[1\] is the page size.*got 8.*--page-size"),
    ("page size 48", lambda a: dict(a, k_cache=a["k_cache"][:48].reshape(-1, 48, 2, 64),
                                    v_cache=a["v_cache"][:48].reshape(-1, 48, 2, 64)), ValueError,
     r"page size.*\(16, 32, 64, 128, 256\), got 48.*whole number of pages"),
    ("page size 512", lambda a: dict(a, k_cache=a["k_cache"][:128].reshape(-1, 512, 2, 64),
                                     v_cache=a["v_cache"][:128].reshape(-1, 512, 2, 64)), ValueError,
     r"page size.*got 512.*over 256"),
    ("page_table dtype", lambda a: dict(a, page_table=a["page_table"].long()), TypeError, r"page_table must be int32"),
    ("page_table rank", lambda a: dict(a, page_table=a["page_table"][0]), ValueError, r"page_table must have shape"),
    ("page_table batch", lambda a: dict(a, page_table=a["page_table"][:2]), ValueError, r"page_table must have shape"),
    ("page_table capacity", lambda a: dict(a, page_table=a["page_table"][:, :40]), ValueError,
     r"page_table has room for 40 pages of 16 tokens \(640 keys\).*max_seqlen_k=700"),
    ("page number too large", _bad_page, ValueError, r"page_table\[2, 16\] = \d+ is not a page of k_cache"),
    ("page number negative", _negative_page, ValueError, r"page_table\[0, 3\] = -1 is not a page"),
    ("seqlens_k dtype", lambda a: dict(a, seqlens_k=a["seqlens_k"].long()), TypeError, r"seqlens_k must be int32"),
    ("seqlens_k shape", lambda a: dict(a, seqlens_k=a["seqlens_k"][:2]), ValueError, r"seqlens_k must have shape"),
    ("seqlens_k above max", lambda a: _seqlen(a, 1, 701), ValueError, r"seqlens_k\[1\] = 701 is outside \[0, "),
    ("seqlens_k negative", lambda a: _seqlen(a, 1, -1), ValueError, r"seqlens_k\[1\] = -1 is outside \[0, "),
    ("seqlens_k zero under queries", lambda a: _seqlen(a, 2, 0), ValueError,
     r"sequence 2 has 90 queries and 0 keys.*seqlens_k"),
    ("fewer keys than queries", lambda a: _seqlen(a, 1, 300), ValueError,
     r"sequence 1 has 520 queries and 300 keys.*seqlens_k"),
    ("max_seqlen_k type", lambda a: dict(a, max_seqlen_k=700.0), TypeError, r"max_seqlen_k must be an int"),
    ("batch * max_seqlen_k", lambda a: dict(a, max_seqlen_k=2 ** 30), ValueError,
     r"batch \* max_seqlen_k = 3 \* 1073741824 must be below 2\^31"),
    ("cache dtype", lambda a: dict(a, k_cache=a["k_cache"].half(), v_cache=a["v_cache"].half()), TypeError,
     r"q is torch.float32, k is torch.float16.*k_cache"),
    ("v_cache dtype", lambda a: dict(a, v_cache=a["v_cache"].half()), TypeError, r"v_cache must have the dtype"),
    ("head dim", lambda a: dict(a, q=a["q"][..., :32].contiguous()), ValueError, r"head_dim must be one of"),
    ("heads", lambda a: dict(a, q=a["q"][:, :3]), ValueError, r"query heads must be a positive multiple.*k_cache"),
    ("cache last dim", lambda a: dict(a, k_cache=_strided_last(a["k_cache"]), v_cache=_strided_last(a["v_cache"])),
     ValueError, r"contiguous last dimension.*k_cache"),
    ("cu_seqlens_q end", lambda a: dict(a, cu_seqlens_q=cu_of((200, 520, 80))), ValueError,
     r"cu_seqlens_q must end at the total token count 810"),
    ("cu_seqlens_q dtype", lambda a: dict(a, cu_seqlens_q=a["cu_seqlens_q"].long()), TypeError,
     r"cu_seqlens_q must be int32"),
    ("max_seqlen_q", lambda a: dict(a, max_seqlen_q=100), ValueError, r"max_seqlen for cu_seqlens_q is 100"),
    ("q type", lambda a: dict(a, q="q"), TypeError, r"q must be a torch.Tensor"),
]


@pytest.mark.parametrize("mutate,exc,match", [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_refusals_name_the_argument(mutate, exc, match):
    with pytest.raises(exc, match=match):
        pa.proxy_attention_paged(**mutate(_valid()), config=SPARSE)


def test_config_and_gradient_refusals_come_first():
    a = _valid()
    with pytest.raises(TypeError, match="config must be a ProxyAttnConfig"):
        pa.proxy_attention_paged(**a, config={"gamma": 0.9})
    with pytest.raises(ValueError, match="num_proxy_heads=3"):
        pa.proxy_attention_paged(**a, config=dataclasses.replace(SPARSE, num_proxy_heads=3))
    k = a["k_cache"].clone().requires_grad_()
    with pytest.raises(RuntimeError, match="k_cache requires grad"):
        pa.proxy_attention_paged(**dict(a, k_cache=k), config=SPARSE)
    with pytest.raises(ValueError, match="page size"):
        pa.gather_paged_kv(a["k_cache"].reshape(-1, 8, 2, 64), None, a["page_table"], a["seqlens_k"], 700)


def test_unread_page_table_entries_are_not_checked():
    """Entries past a sequence's last page are never read (engines leave anything there): out of
    range values are accepted and change nothing."""
    a = _valid()
    want = pa.proxy_attention_paged(**a, config=SPARSE)
    pt = a["page_table"].clone()
    pt[2, 17:] = 10 ** 6  # sequence 2 reads 17 pages
    pt[1, cdiv(520, 16):] = -5
    assert torch.equal(pa.proxy_attention_paged(**dict(a, page_table=pt), config=SPARSE), want)
