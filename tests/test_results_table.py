"""CPU tests of tools/results_table.py: docs/results.md and the README's headline (the text between the
results markers) are rebuilt from bench/results-style JSON, deterministically; the newest suite run per
card is picked by itself; the rest of the README stays untouched."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "results_table.py")

README = """# project

intro text

## Results

<!-- results:begin -->
stale table that must go
<!-- results:end -->

## Test

tail text
"""


def _case(name, n, ms, density=1.0, tflops=None, **extra):
    c = dict(name=name, seq_len=n, batch=1, q_heads=32, kv_heads=8, head_dim=128, dtype="bf16",
             density=density, ms=ms, tflops=tflops)
    c.update(extra)
    return c


def _rec(card, commit, cases):
    return {"card": card, "torch": "2.11.0+cu130", "cuda": "13.0", "commit": commit, "cases": cases}


def _write(tmp_path, readme=README):
    res = tmp_path / "results"
    res.mkdir()
    suite = _rec("NVIDIA H200", "0123456789abcdef0123456789abcdef01234567",
                 [_case("sdpa_cudnn", 32768, 10.0, tflops=600.0),
                  _case("sdpa_flash", 32768, 20.0, tflops=300.0),
                  _case("bsa", 32768, 4.0, density=0.1, tflops=150.0, selection="random"),
                  _case("flex", 32768, 5.0, density=0.1, tflops=120.0, selection="random"),
                  _case("proxy_attention", 32768, 2.5, density=0.125, tflops=300.0, proxy_heads=16,
                        selection="proxy", layout="fixed", estimate_ms=1.0),
                  _case("proxy_attention", 131072, 16.5, density=0.0312, tflops=262.7, proxy_heads=16,
                        selection="proxy", estimate_ms=3.823),
                  _case("estimate", 131072, 3.823, density=None, proxy_heads=16),
                  _case("sdpa_cudnn", 131072, 237.5, tflops=592.6),
                  _case("proxy_attention", 32768, 2.0, head_dim=64, proxy_heads=16),
                  _case("sdpa_cudnn", 32768, 12.0, tflops=500.0, layout="varlen", seq_lens=[16384, 16384]),
                  _case("proxy_attention", 32768, 3.0, layout="varlen", seq_lens=[16384, 16384], proxy_heads=16)])
    (res / "NVIDIA_H200-20261201-suite.json").write_text(json.dumps(suite))
    (res / "NVIDIA_H200-20261201-suite-speedup.png").write_bytes(b"png")
    # same run, second invocation (same date and commit): part of the newest suite
    split = _rec("NVIDIA H200", "0123456789abcdef0123456789abcdef01234567",
                 [_case("sdpa_cudnn", 524288, 4000.0), _case("proxy_attention", 524288, 80.0, proxy_heads=16)])
    (res / "NVIDIA_H200-20261201-suite-512k.json").write_text(json.dumps(split))
    # an older suite and a quick run: not the newest suite
    old = _rec("NVIDIA H200", "fedcba9", [_case("sdpa_cudnn", 32768, 11.0), _case("proxy_attention", 32768, 9.0)])
    (res / "NVIDIA_H200-20261128-suite.json").write_text(json.dumps(old))
    quick = _rec("NVIDIA H200", "abcdef1", [_case("sdpa_cudnn", 4096, 0.3), _case("proxy_attention", 4096, 0.2)])
    (res / "NVIDIA_H200-20261205-suite-quick.json").write_text(json.dumps(quick))
    # a variant measured as a patch on a commit: the docs keep its suffix
    kernel = _rec("NVIDIA H200", "4e16bce0123456789abcdef0123456789abcdef0+cand2",
                  [_case("bsa", 131072, 24.0, density=0.1, tflops=580.0)])
    (res / "NVIDIA_H200-20261128-bsa-v8.json").write_text(json.dumps(kernel))
    other = _rec("NVIDIA H100 80GB HBM3", "abc", [_case("bsa", 4096, 0.3, density=0.5, tflops=100.0)])
    (res / "NVIDIA_H100_80GB_HBM3-20261127.json").write_text(json.dumps(other))
    (res / "quality-cpu.json").write_text(json.dumps({"rows": [1, 2]}))  # not a section 6 record
    path = tmp_path / "README.md"
    path.write_text(readme)
    return path, res, tmp_path / "docs" / "results.md"


def _run(path, res, doc, *extra):
    return subprocess.run([sys.executable, SCRIPT, "--readme", str(path), "--results", str(res), "--doc", str(doc),
                           *extra], capture_output=True, text=True)


def _render(tmp_path, records):
    """Run the script on records {file name: record} with the stock README: (README path, results.md
    path), after checking it succeeded."""
    res = tmp_path / "results"
    res.mkdir()
    for name, rec in records.items():
        (res / name).write_text(json.dumps(rec))
    path, doc = tmp_path / "README.md", tmp_path / "docs" / "results.md"
    path.write_text(README)
    assert _run(path, res, doc).returncode == 0
    return path, doc


def _section(text):
    return text.split("<!-- results:begin -->")[1].split("<!-- results:end -->")[0]


def _lines(text):
    return [ln for ln in text.splitlines() if ln.startswith("|")]


def test_readme_headline_from_newest_suite(tmp_path):
    path, res, doc = _write(tmp_path)
    # the split file sorts first and has a plot too; the headline shows the plot of the file with most rows
    (res / "NVIDIA_H200-20261201-suite-512k-speedup.png").write_bytes(b"png")
    r = _run(path, res, doc)
    assert r.returncode == 0, r.stderr
    assert "quality-cpu.json: no docs/design.md section 6 cases, not tabulated" in r.stderr
    text = path.read_text()
    head, rest = README.split("<!-- results:begin -->")
    assert text.startswith(head + "<!-- results:begin -->\n")
    assert text.endswith("<!-- results:end -->" + rest.split("<!-- results:end -->")[1])
    assert "stale table" not in text
    sec = _section(text)
    # only the newest suite run (both files of 2026-12-01), fixed layout, D=128; no kernel records
    assert "**NVIDIA H200**, B=1, Hq=32, Hkv=8, D=128, bf16" in sec
    assert "`bench/results/NVIDIA_H200-20261201-suite-512k.json`, `bench/results/NVIDIA_H200-20261201-suite.json`" in sec
    assert "H100" not in sec and "20261128" not in sec and "suite-quick" not in sec
    lines = _lines(sec)
    assert lines[0] == ("| N | proxy heads | density | proxy_attention ms | of which estimate | cuDNN ms | vs cuDNN "
                        "| vs FA2 |")
    assert "| 32k | 16 | 0.125 | 2.500 | 1.000 | 10.00 | 4.00x | 8.00x |" in lines
    assert "| 128k | 16 | 0.031 | 16.50 | 3.823 | 237.5 | 14.39x | - |" in lines
    assert "| 512k | 16 | 1.000 | 80.00 | - | 4000.0 | 50.00x | - |" in lines
    assert len(lines) == 2 + 3  # D=64 and varlen rows stay in docs/results.md
    assert "![NVIDIA_H200-20261201-suite speedup](bench/results/NVIDIA_H200-20261201-suite-speedup.png)" in sec
    assert "suite-512k-speedup" not in sec
    assert "[docs/results.md](docs/results.md)" in sec


def test_doc_tables(tmp_path):
    path, res, doc = _write(tmp_path)
    assert _run(path, res, doc).returncode == 0
    text = doc.read_text()
    assert text.startswith("# Results\n")
    # the newest suite first, then every other record by card
    i_new = text.index("## NVIDIA H200: suite of 2026-12-01, commit 0123456")
    i_other = text.index("## Other records")
    assert i_new < i_other
    assert text.index("### NVIDIA_H200-20261201-suite.json") < i_other
    assert text.index("### NVIDIA_H200-20261201-suite-512k.json") < i_other
    assert "![NVIDIA_H200-20261201-suite speedup](../bench/results/NVIDIA_H200-20261201-suite-speedup.png)" in text
    for old in ("NVIDIA_H200-20261128-suite.json", "NVIDIA_H200-20261205-suite-quick.json",
                "NVIDIA_H200-20261128-bsa-v8.json", "NVIDIA_H100_80GB_HBM3-20261127.json"):
        assert text.index(f"#### {old}") > i_other
    assert text.index("### NVIDIA H100 80GB HBM3") < text.index("### NVIDIA H200", i_other)
    assert "`bench/results/NVIDIA_H200-20261201-suite.json`: commit 0123456, torch 2.11.0+cu130, CUDA 13.0." in text
    assert "`bench/results/NVIDIA_H200-20261128-bsa-v8.json`: commit 4e16bce+cand2, torch" in text
    assert "Not tabulated (no timed cases; read the JSON): `quality-cpu.json`." in text
    lines = _lines(text)
    assert ("| name | variant | N | B | Hq/Hkv | D | dtype | density | ms | TFLOP/s | vs sdpa_cudnn | vs sdpa_flash"
            " | vs flex |") in lines
    # ratios are anchor ms / ms on the same shape; flex only on the same mask (density, selection)
    assert "| sdpa_cudnn | - | 32k | 1 | 32/8 | 128 | bf16 | 1.000 | 10.00 | 600.0 | - | 2.00x | - |" in lines
    assert "| sdpa_flash | - | 32k | 1 | 32/8 | 128 | bf16 | 1.000 | 20.00 | 300.0 | 0.50x | - | - |" in lines
    assert "| bsa | random sel. | 32k | 1 | 32/8 | 128 | bf16 | 0.100 | 4.000 | 150.0 | 2.50x | 5.00x | 1.25x |" in lines
    assert "| flex | random sel. | 32k | 1 | 32/8 | 128 | bf16 | 0.100 | 5.000 | 120.0 | 2.00x | 4.00x | - |" in lines
    assert ("| proxy_attention | G=16, proxy sel. | 128k | 1 | 32/8 | 128 | bf16 | 0.031 | 16.50 | 262.7 | 14.39x "
            "| - | - |") in lines
    # no ratio for the estimate's rows (they compute no attention)
    assert "| estimate | G=16 | 128k | 1 | 32/8 | 128 | bf16 | - | 3.823 | - | - | - | - |" in lines
    # varlen rows are not matched with fixed-length anchors of the same total length
    assert "| sdpa_cudnn | varlen 16k+16k | 32k | 1 | 32/8 | 128 | bf16 | 1.000 | 12.00 | 500.0 | - | - | - |" in lines
    assert ("| proxy_attention | G=16, varlen 16k+16k | 32k | 1 | 32/8 | 128 | bf16 | 1.000 | 3.000 | - | 4.00x "
            "| - | - |") in lines
    # a file without anchors gets no ratio columns
    assert "| bsa | - | 4k | 1 | 32/8 | 128 | bf16 | 0.500 | 0.300 | 100.0 |" in lines


def test_headline_shows_fa4_columns_when_measured(tmp_path):
    sel = dict(density=0.05, proxy_heads=16, selection="proxy")
    cases = [_case("sdpa_cudnn", 131072, 240.0), _case("sdpa_flash", 131072, 400.0), _case("fa4", 131072, 200.0),
             _case("proxy_attention", 131072, 16.0, estimate_ms=9.0, **sel),
             _case("bsa", 131072, 7.0, **sel), _case("flex_flash", 131072, 7.7, **sel),
             _case("fa4_sparse", 131072, 8.4, **sel),
             _case("bsa", 131072, 20.0, density=0.1, selection="random"),  # another mask: not matched
             _case("flex_flash", 131072, 30.0, density=0.1, selection="random"),
             _case("sdpa_cudnn", 32768, 15.0), _case("proxy_attention", 32768, 4.0, **sel)]  # no FA4 at 32k
    path, _ = _render(tmp_path, {"NVIDIA_H200-20261201-suite.json": _rec("NVIDIA H200", "0123456", cases)})
    lines = _lines(_section(path.read_text()))
    assert lines[0] == ("| N | proxy heads | density | proxy_attention ms | of which estimate | cuDNN ms | vs cuDNN "
                        "| vs FA2 | vs FA4 | attention vs Flex FLASH | attention vs FA4 sparse |")
    assert "| 128k | 16 | 0.050 | 16.00 | 9.000 | 240.0 | 15.00x | 25.00x | 12.50x | 1.10x | 1.20x |" in lines
    assert "| 32k | 16 | 0.050 | 4.000 | - | 15.00 | 3.75x | - | - | - | - |" in lines


def test_varlen_beside_its_sequences_alone(tmp_path):
    cases = [_case("sdpa_cudnn", 16384, 3.0), _case("proxy_attention", 16384, 1.5, proxy_heads=16),
             _case("proxy_attention", 16384, 1.0, proxy_heads=4),  # other proxy heads: not matched
             _case("sdpa_cudnn", 32768, 6.5, batch=2, layout="varlen", seq_lens=[16384, 16384]),
             _case("proxy_attention", 32768, 3.2, batch=2, layout="varlen", seq_lens=[16384, 16384], proxy_heads=16),
             # a length without fixed-length rows: no row
             _case("sdpa_cudnn", 40960, 8.0, batch=2, layout="varlen", seq_lens=[32768, 8192]),
             _case("proxy_attention", 40960, 4.0, batch=2, layout="varlen", seq_lens=[32768, 8192], proxy_heads=16)]
    _, doc = _render(tmp_path, {"NVIDIA_H200-20261201-suite.json": _rec("NVIDIA H200", "0123456", cases)})
    lines = _lines(doc.read_text())
    assert ("| variant | D | proxy_attention ms | vs cuDNN | alone ms | alone vs cuDNN | alone ms / varlen ms |"
            in lines)
    rows = [ln for ln in lines if ln.startswith("| G=16, varlen")]
    assert rows == ["| G=16, varlen 16k+16k | 128 | 3.200 | 2.03x | 3.000 | 2.00x | 0.94 |"]


def test_block_sparse_anchor_matches_its_own_mask(tmp_path):
    """flex (and flex_flash, fa4_sparse) is matched only to the rows on its own block mask: two proxy
    selections of one shape and density that differ in their proxy heads each get their own flex
    row, and a bench_bsa.py row on a mask made from the random selection (mask: window) none of the
    random selection's."""
    g16, g4 = dict(density=0.1, selection="proxy", proxy_heads=16), dict(density=0.1, selection="proxy", proxy_heads=4)
    cases = [_case("sdpa_cudnn", 32768, 10.0),
             _case("bsa", 32768, 2.0, **g16), _case("flex", 32768, 3.0, **g16),
             _case("bsa", 32768, 2.0, **g4), _case("flex", 32768, 5.0, **g4),
             _case("bsa", 32768, 1.0, density=0.3), _case("bsa_window", 32768, 0.5, density=0.3, mask="window"),
             _case("flex", 32768, 1.5, density=0.3)]
    _, doc = _render(tmp_path, {"NVIDIA_H200-20261201-bsa.json": _rec("NVIDIA H200", "0123456", cases)})
    lines = _lines(doc.read_text())
    assert "| bsa | G=16, proxy sel. | 32k | 1 | 32/8 | 128 | bf16 | 0.100 | 2.000 | - | 5.00x | 1.50x |" in lines
    assert "| bsa | G=4, proxy sel. | 32k | 1 | 32/8 | 128 | bf16 | 0.100 | 2.000 | - | 5.00x | 2.50x |" in lines
    assert "| bsa | - | 32k | 1 | 32/8 | 128 | bf16 | 0.300 | 1.000 | - | 10.00x | 1.50x |" in lines
    assert "| bsa_window | - | 32k | 1 | 32/8 | 128 | bf16 | 0.300 | 0.500 | - | 20.00x | - |" in lines


def test_estimate_totals_under_current_names(tmp_path):
    """bench_estimate.py's totals: `estimate` is the chained stages timed as one call (as in a suite),
    `estimate_sum` the sum of the stages timed alone. An older record, which named the sum `estimate`
    and the chain `estimate_chain`, is read under those names; a current one as it is."""
    stage = dict(density=None, num_proxy_heads=16)
    old = [_case("estimate_scores", 131072, 5.2, **stage), _case("estimate", 131072, 5.8, **stage),
           _case("estimate_chain", 131072, 5.7, **stage)]
    new = [_case("estimate_scores", 131072, 5.1, **stage), _case("estimate_sum", 131072, 5.9, **stage),
           _case("estimate", 131072, 5.6, **stage)]
    _, doc = _render(tmp_path, {"NVIDIA_H100-20261207-estimate.json": _rec("NVIDIA H100", "0123456", old),
                                "NVIDIA_H100-20261208-estimate.json": _rec("NVIDIA H100", "1234567", new)})
    text = doc.read_text()
    assert "estimate_chain" not in text
    for name, old_ms, new_ms in (("estimate_sum", "5.800", "5.900"), ("estimate", "5.700", "5.600")):
        for ms in (old_ms, new_ms):
            assert f"| {name} | G=16 | 128k | 1 | 32/8 | 128 | bf16 | - | {ms} | - |" in _lines(text)


def test_same_date_suites_pick_one_run(tmp_path):
    """Two suite runs of one card on one date (different commits): one run is the headline, whole.
    A run at the default configuration (G = Hq/2 here, gamma and min_budget of ProxyAttnConfig) wins;
    between two that are not, the later file name."""
    from proxyattn.config import ProxyAttnConfig

    dflt = ProxyAttnConfig()
    path, res, doc = _write(tmp_path)
    g1 = _rec("NVIDIA H200", "1111111", [_case("sdpa_cudnn", 65536, 50.0),
                                         _case("proxy_attention", 65536, 5.0, proxy_heads=1, gamma=0.95,
                                               min_budget=2048)])
    (res / "NVIDIA_H200-20261201-suite-zz.json").write_text(json.dumps(g1))
    assert _run(path, res, doc).returncode == 0
    sec = _section(path.read_text())
    # neither run is at the default configuration: the later file name, "suite.json" > "suite-zz.json"
    assert "20261201-suite.json" in sec and "suite-zz" not in sec
    assert "the configuration in the file" in sec
    defaults = _rec("NVIDIA H200", "2222222", [_case("sdpa_cudnn", 65536, 50.0),
                                               _case("proxy_attention", 65536, 6.25, proxy_heads=16,
                                                     gamma=dflt.gamma, min_budget=dflt.min_budget)])
    (res / "NVIDIA_H200-20261201-suite-defaults.json").write_text(json.dumps(defaults))
    assert _run(path, res, doc).returncode == 0
    sec = _section(path.read_text())
    assert "the default configuration" in sec
    assert _lines(sec)[2:] == ["| 64k | 16 | 1.000 | 6.250 | - | 50.00 | 8.00x | - |"]
    assert "#### NVIDIA_H200-20261201-suite.json" in doc.read_text()


def test_deterministic_and_idempotent(tmp_path):
    path, res, doc = _write(tmp_path)
    assert _run(path, res, doc).returncode == 0
    first, first_doc = path.read_text(), doc.read_text()
    assert _run(path, res, doc).returncode == 0
    assert path.read_text() == first and doc.read_text() == first_doc
    assert _run(path, res, doc, "--check").returncode == 0


def test_check_reports_stale_outputs_without_writing(tmp_path):
    path, res, doc = _write(tmp_path)
    r = _run(path, res, doc, "--check")
    assert r.returncode == 1 and "out of date" in r.stderr
    assert path.read_text() == README and not doc.exists()
    assert _run(path, res, doc).returncode == 0
    doc.write_text(doc.read_text() + "hand edit\n")
    r = _run(path, res, doc, "--check")
    assert r.returncode == 1 and str(doc) in r.stderr and str(path) not in r.stderr


def test_missing_markers_is_an_error(tmp_path):
    path, res, doc = _write(tmp_path, readme="# no markers here\n")
    r = _run(path, res, doc)
    assert r.returncode == 2 and "results:begin" in r.stderr
    assert path.read_text() == "# no markers here\n" and not doc.exists()


@pytest.mark.parametrize("files", [0, 1])
def test_empty_results_dir(tmp_path, files):
    res = tmp_path / "results"
    res.mkdir()
    if files:
        (res / "x.json").write_text("{not json")
    path = tmp_path / "README.md"
    path.write_text(README)
    doc = tmp_path / "results.md"
    r = _run(path, res, doc)
    assert r.returncode == 0
    assert "(no benchmark suite yet; see docs/results.md)" in _section(path.read_text())
    assert "(no benchmark records yet)" in doc.read_text()


def test_repository_outputs_are_current():
    """README.md and docs/results.md match bench/results (run tools/results_table.py after adding records)."""
    r = subprocess.run([sys.executable, SCRIPT, "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_a_rerun_of_the_day_replaces_its_tag(tmp_path):
    """benchlib names a second run of a tag on one day <tag>-2: within the run only the last rerun of
    each tag counts, so the headline holds each length once, from the rerun; other tags of the run
    (a split sweep) stay."""
    path, res, doc = _write(tmp_path)
    rerun = _rec("NVIDIA H200", "0123456789abcdef0123456789abcdef01234567",
                 [_case("sdpa_cudnn", 131072, 240.0, tflops=590.0),
                  _case("proxy_attention", 131072, 12.0, density=0.0312, proxy_heads=16, selection="proxy",
                        estimate_ms=3.0)])
    (res / "NVIDIA_H200-20261201-suite-2.json").write_text(json.dumps(rerun))
    assert _run(path, res, doc).returncode == 0
    sec = _section(path.read_text())
    lines = _lines(sec)
    assert "| 128k | 16 | 0.031 | 12.00 | 3.000 | 240.0 | 20.00x | - |" in lines
    assert not any(ln.startswith("| 32k ") or "16.50" in ln for ln in lines)  # the first run's rows
    assert "| 512k | 16 | 1.000 | 80.00 | - | 4000.0 | 50.00x | - |" in lines  # the split sweep stays
    assert "NVIDIA_H200-20261201-suite-2.json" in sec and "NVIDIA_H200-20261201-suite.json`" not in sec


def test_quick_suite_is_not_a_full_suite(monkeypatch):
    """suite.py --quick writes under the tag suite-quick, which results_table never takes for the newest suite."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import suite

    assert suite.parse_args(["--quick"]).tag == "suite-quick"
    assert suite.parse_args([]).tag == "suite"
    assert suite.parse_args(["--quick", "--tag", "suite-512k"]).tag == "suite-512k"
