"""CPU tests of the benchmarks' output checks and arguments: benchlib.compare_outputs (row by row; a
correct pair passes, zeros in late rows fail, a NaN in ours raises, a non-finite other disagrees),
record_comparison (both records marked), poisoned_outputs, allow_recompiles, write_record's meta,
bench_bsa's argument defaults (interleaved rounds, --reps >= 10), and tools/results_table.py on such records."""
import importlib.util
import json
import math
import os
import warnings

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def bench(monkeypatch):
    """The bench directory on sys.path, as the benchmarks run (python3 bench/<script>.py)."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))


@pytest.fixture
def benchlib(bench):
    import benchlib

    return benchlib


def _causal_softmax_fp32(q, k, v):
    """Causal attention on [N, H, D] in fp32, rounded to q's dtype once at the end."""
    n, d = q.shape[0], q.shape[-1]
    s = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * d ** -0.5
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, dim=-1), v.float()).to(q.dtype)


def _causal_tiled(q, k, v, block=32):
    """The same attention as a FlashAttention-style kernel computes it: key blocks in turn, an online
    softmax in fp32, P rounded to bf16 before P V, the output rounded once at the end."""
    n, h, d = q.shape
    qf, kf, vf = q.float() * d ** -0.5, k.float(), v.float()
    m = torch.full((h, n, 1), -math.inf)
    den = torch.zeros(h, n, 1)
    acc = torch.zeros(h, n, d)
    rows = torch.arange(n).view(-1, 1)
    for j in range(0, n, block):
        cols = torch.arange(j, min(n, j + block)).view(1, -1)
        s = torch.einsum("qhd,khd->hqk", qf, kf[j:j + block]).masked_fill(cols > rows, -math.inf)
        m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
        alive = torch.isfinite(m_new)
        p = torch.where(alive, torch.exp(s - torch.where(alive, m_new, 0.0)), 0.0)
        corr = torch.where(torch.isfinite(m), torch.exp(m - torch.where(alive, m_new, 0.0)), 0.0)
        den = den * corr + p.sum(dim=-1, keepdim=True)
        acc = acc * corr + torch.einsum("hqk,khd->hqd", p.to(torch.bfloat16).float(), vf[j:j + block])
        m = m_new
    return (acc / den).transpose(0, 1).to(q.dtype)


def _inputs(n=256, h=4, d=64, dtype=torch.bfloat16):
    q, k, v = (torch.randn(n, h, d).to(dtype) for _ in range(3))
    v[:, 1] *= 6  # a head whose outputs reach |out| of 4-8, like structured inputs' needle rows
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_correct_kernels_agree(benchlib, dtype):
    q, k, v = _inputs(dtype=dtype)
    ours, other = _causal_tiled(q, k, v), _causal_softmax_fp32(q, k, v)
    res = benchlib.compare_outputs(ours, other, "bsa (test)")
    assert res.agrees, res.describe()
    assert res.rows == q.shape[0] * q.shape[1]
    assert 0 < res.max_abs_diff < 0.2  # they do differ by rounding (up to two bf16 ulps on rows of size 4-8)
    # the same in the benchmarks' layouts: [B, N, H, D], and [B, H, N, D] seen through a transposed view
    assert benchlib.compare_outputs(ours.unsqueeze(0), other.unsqueeze(0), "bsa (test)").agrees
    assert benchlib.compare_outputs(ours.unsqueeze(0), other.unsqueeze(0).transpose(1, 2).contiguous()
                                    .transpose(1, 2), "bsa (test)").agrees


def test_zeros_in_late_rows_fail(benchlib):
    """The late rows of long causal attention over random inputs have values of 0.006-0.05: a kernel that
    writes zeros there passed a bound relative to the whole tensor's largest value; row by row it fails."""
    q, k, v = _inputs()
    other = _causal_softmax_fp32(q, k, v)
    other[-40:] = (torch.randn(40, *other.shape[1:]) * 0.0025).to(other.dtype)  # row maxima about 0.006
    good = other.float() + torch.randn(other.shape) * 1e-5  # rounding-sized differences pass
    assert benchlib.compare_outputs(good.to(other.dtype), other, "bsa (test)").agrees
    ours = other.clone()
    ours[-40:] = 0
    res = benchlib.compare_outputs(ours, other, "bsa (test)")
    assert not res.agrees and res.bad_rows == 40 * other.shape[1]
    assert res.max_abs_diff < 0.02  # what the whole-tensor bound let through
    # the other way round (an anchor writing zeros) fails alike
    assert benchlib.compare_outputs(other, ours, "bsa (test)").bad_rows == 40 * other.shape[1]
    # one row of one head
    ours = other.clone()
    ours[100, 2] = 0
    assert benchlib.compare_outputs(ours, other, "bsa (test)").bad_rows == 1


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_in_ours_raises_naming_the_case(benchlib, bad):
    q, k, v = _inputs()
    other = _causal_softmax_fp32(q, k, v)
    ours = other.clone()
    ours[-1, 0, 3] = bad
    with pytest.raises(benchlib.NonFiniteOutput, match=r"bsa at fixed-4096-d128"):
        benchlib.compare_outputs(ours, other, "bsa at fixed-4096-d128")
    with pytest.raises(RuntimeError):  # what the benchmarks' callers see
        benchlib.require_finite(ours, "bsa at fixed-4096-d128", chunk=7)
    benchlib.require_finite(other, "bsa at fixed-4096-d128")


def test_non_finite_in_other_is_a_disagreement(benchlib):
    q, k, v = _inputs()
    ours = _causal_softmax_fp32(q, k, v)
    other = ours.clone()
    other[5, 1, 0] = math.nan
    res = benchlib.compare_outputs(ours, other, "bsa (test)")
    assert res.bad_rows == 1 and math.isnan(res.max_abs_diff)
    extras = {}
    benchlib.record_comparison(extras, "flex", "bsa", res, "N=256")
    assert extras["flex"]["max_abs_diff_vs_bsa"] is None  # JSON has no NaN
    assert extras["flex"]["disagrees"] and extras["bsa"]["disagrees"]
    json.dumps(extras, allow_nan=False)


def test_chunks_do_not_change_the_result(benchlib):
    q, k, v = _inputs(n=300)
    ours, other = _causal_tiled(q, k, v), _causal_softmax_fp32(q, k, v)
    ours[290:] = 0
    whole = benchlib.compare_outputs(ours, other, "bsa (test)")
    for chunk in (1, 7, 64):
        assert benchlib.compare_outputs(ours, other, "bsa (test)", chunk=chunk) == whole
    with pytest.raises(ValueError):
        benchlib.compare_outputs(ours, other[:-1], "bsa (test)")


def test_disagreeing_anchor_is_flagged_on_both_records(benchlib):
    q, k, v = _inputs()
    ours = _causal_softmax_fp32(q, k, v)
    anchor = ours.clone()
    anchor[-8:] = 0
    extras = {}
    line = benchlib.record_comparison(extras, "fa4_sparse", "bsa",
                                      benchlib.compare_outputs(ours, anchor, "bsa (test)"), "N=256")
    assert "DISAGREES" in line and "fa4_sparse" in line
    assert extras["fa4_sparse"]["disagrees"] is True and extras["fa4_sparse"]["disagrees_with"] == ["bsa"]
    assert extras["fa4_sparse"]["disagreeing_rows"] == 8 * q.shape[1]
    assert extras["fa4_sparse"]["max_abs_diff_vs_bsa"] > 0
    assert extras["bsa"] == {"disagrees": True, "disagrees_with": ["fa4_sparse"]}
    # a second anchor that agrees adds its difference and leaves bsa's flags as they are
    line = benchlib.record_comparison(extras, "flex", "bsa", benchlib.compare_outputs(ours, ours, "bsa (test)"),
                                      "N=256")
    assert "DISAGREES" not in line
    assert extras["flex"] == {"max_abs_diff_vs_bsa": 0.0}
    assert extras["bsa"]["disagrees_with"] == ["fa4_sparse"]


def test_poisoned_outputs_fill_and_restore(benchlib):
    import torch._inductor.config as inductor_config

    def state():
        return (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.utils.deterministic.fill_uninitialized_memory, inductor_config.deterministic)

    before = state()
    with benchlib.poisoned_outputs():
        assert torch.empty(16).isnan().all()
        assert (torch.empty(4, dtype=torch.int32) == torch.iinfo(torch.int32).max).all()
        # an op without a deterministic implementation warns instead of raising
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.zeros(4).put_(torch.tensor([0, 0]), torch.tensor([1.0, 2.0]), accumulate=False)
        assert any("deterministic" in str(w.message) for w in caught)
    assert state() == before
    with pytest.raises(KeyError):  # restored when the block raises too
        with benchlib.poisoned_outputs():
            raise KeyError("x")
    assert state() == before


def test_allow_recompiles(benchlib, monkeypatch):
    import torch._dynamo.config as dynamo_config

    knobs = [x for x in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                         "accumulated_recompile_limit") if hasattr(dynamo_config, x)]
    assert knobs
    for knob in knobs:
        monkeypatch.setattr(dynamo_config, knob, 8)
    benchlib.allow_recompiles()
    assert all(getattr(dynamo_config, knob) >= 256 for knob in knobs)


def test_bench_modules_import_without_a_gpu(bench):
    import bench_bsa
    import bench_dense_path
    import suite

    assert all(callable(m.main) for m in (bench_bsa, bench_dense_path, suite))


def test_bench_bsa_arguments(bench, capsys):
    import bench_bsa

    a = bench_bsa.parse_args([])
    assert a.interleave is True and a.reps == 10
    assert bench_bsa.parse_args(["--interleave", "--seqlens", "131072"]).interleave is True  # tools/ scripts
    assert bench_bsa.parse_args(["--no-interleave"]).interleave is False
    with pytest.raises(SystemExit):
        bench_bsa.parse_args(["--reps", "9"])
    assert "--reps must be >= 10" in capsys.readouterr().err
    assert bench_bsa.parse_args(["--reps", "30"]).reps == 30


def test_suite_refuses_few_reps(bench):
    import suite

    with pytest.raises(SystemExit):
        suite.parse_args(["--reps", "5"])


def test_suite_table_shows_disagreement(bench, capsys):
    import suite

    base = dict(layout="fixed", seq_len=32768, head_dim=128, density=0.1, tflops=500.0)
    suite.print_table([dict(name="bsa", ms=2.0, disagrees=True, disagrees_with=["flex"], **base),
                       dict(name="flex", ms=2.5, max_abs_diff_vs_bsa=0.3, disagrees=True, disagrees_with=["bsa"],
                            **base)])
    out = capsys.readouterr().out
    assert "DISAGREES with flex" in out and "DISAGREES with bsa" in out and "max|out-bsa| 0.3" in out


def test_record_meta(benchlib, monkeypatch, tmp_path):
    """write_record's meta lands beside the cases, and only where given."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Test Card")
    cases = [dict(name="bsa", seq_len=32768, ms=2.0)]
    meta = {"reps": 10, "warmup": {"32768": 2}, "interleave": True}
    rec = json.loads(open(benchlib.write_record(cases, "bsa", str(tmp_path / "a.json"), meta=meta)).read())
    assert rec["meta"] == meta and rec["cases"] == cases and "skipped" not in rec
    assert "meta" not in json.loads(open(benchlib.write_record(cases, "bsa", str(tmp_path / "b.json"))).read())


def test_results_table_shows_disagreement(benchlib, monkeypatch, tmp_path):
    """tools/results_table.py tabulates a record with meta and disagreeing cases, saying so in the variant column."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Test Card")
    res_dir = tmp_path / "results"
    case = dict(seq_len=32768, batch=1, q_heads=32, kv_heads=8, head_dim=128, dtype="bf16", density=0.1, tflops=1.0)
    cases = [dict(name="bsa", ms=2.0, disagrees=True, disagrees_with=["flex"], **case),
             dict(name="flex", ms=2.5, max_abs_diff_vs_bsa=0.3, disagreeing_rows=12, disagrees=True,
                  disagrees_with=["bsa"], **case),
             dict(name="fa4_sparse", ms=2.2, max_abs_diff_vs_bsa=0.002, **case)]
    benchlib.write_record(cases, "bsa", str(res_dir / "Test_Card-20261201-bsa.json"),
                          meta={"reps": 10, "warmup": {"32768": 2}, "interleave": True})
    spec = importlib.util.spec_from_file_location("results_table_under_test",
                                                  os.path.join(ROOT, "tools", "results_table.py"))
    rt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rt)
    records, skipped, _ = rt.load_records(str(res_dir))
    assert [r.base for r in records] == ["Test_Card-20261201-bsa.json"] and not skipped
    rows = rt.file_table(records[0].rec)[2:]
    assert "output disagrees with flex" in rows[0] and "output disagrees with bsa" in rows[1]
    assert "disagrees" not in rows[2]
