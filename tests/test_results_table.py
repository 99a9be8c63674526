"""CPU tests of tools/results_table.py: the README section between the results markers is rebuilt
from bench/results-style JSON, deterministically, leaving the rest of the README untouched."""
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

Generated; do not edit.

<!-- results:begin -->
stale table that must go
<!-- results:end -->

## Test

tail text
"""


def _case(name, n, ms, density=1.0, tflops=None, **extra):
    return dict(name=name, seq_len=n, batch=1, q_heads=32, kv_heads=8, head_dim=128, dtype="bf16",
                density=density, ms=ms, tflops=tflops, **extra)


def _write(tmp_path, readme=README):
    res = tmp_path / "results"
    res.mkdir()
    rec = {"card": "NVIDIA H200", "torch": "2.11.0+cu130", "cuda": "13.0",
           "commit": "0123456789abcdef0123456789abcdef01234567",
           "cases": [_case("sdpa_cudnn", 32768, 10.0, tflops=600.0),
                     _case("sdpa_flash", 32768, 20.0, tflops=300.0),
                     _case("bsa", 32768, 4.0, density=0.1, tflops=150.0, selection="random"),
                     _case("flex", 32768, 5.0, density=0.1, tflops=120.0, selection="random"),
                     _case("proxy_attention", 131072, 16.5, density=0.0312, tflops=262.7, proxy_heads=1),
                     _case("estimate", 131072, 3.823, density=None, proxy_heads=1),
                     _case("sdpa_cudnn", 131072, 237.5, tflops=592.6),
                     _case("sdpa_cudnn", 32768, 12.0, tflops=500.0, layout="varlen", seq_lens=[16384, 16384])]}
    (res / "NVIDIA_H200-20261128-suite.json").write_text(json.dumps(rec))
    other = {"card": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "cuda": "13.0", "commit": "abc",
             "cases": [_case("bsa", 4096, 0.3, density=0.5, tflops=100.0)]}
    (res / "NVIDIA_H100_80GB_HBM3-20261127.json").write_text(json.dumps(other))
    (res / "quality-cpu.json").write_text(json.dumps({"rows": [1, 2]}))  # not a section 6 record
    path = tmp_path / "README.md"
    path.write_text(readme)
    return path, res


def _run(path, res, *extra):
    return subprocess.run([sys.executable, SCRIPT, "--readme", str(path), "--results", str(res), *extra],
                          capture_output=True, text=True)


def _section(text):
    return text.split("<!-- results:begin -->")[1].split("<!-- results:end -->")[0]


def test_rewrites_only_the_marked_section(tmp_path):
    path, res = _write(tmp_path)
    r = _run(path, res)
    assert r.returncode == 0, r.stderr
    assert "quality-cpu.json: no DESIGN section 6 cases, skipped" in r.stderr
    text = path.read_text()
    head, rest = README.split("<!-- results:begin -->")
    assert text.startswith(head + "<!-- results:begin -->\n")
    assert text.endswith("<!-- results:end -->" + rest.split("<!-- results:end -->")[1])
    assert "stale table" not in text
    sec = _section(text)
    # cards sorted by name, each with its file and commit
    assert sec.index("### NVIDIA H100 80GB HBM3") < sec.index("### NVIDIA H200")
    assert "`bench/results/NVIDIA_H200-20261128-suite.json`: commit 0123456, torch 2.11.0+cu130, CUDA 13.0." in sec
    lines = [ln for ln in sec.splitlines() if ln.startswith("|")]
    assert ("| name | variant | N | B | Hq/Hkv | D | dtype | density | ms | TFLOP/s | vs sdpa_cudnn | vs sdpa_flash"
            " | vs flex |") in lines
    # ratios are anchor ms / ms on the same shape; flex only on the same mask (density, selection)
    assert "| sdpa_cudnn | - | 32k | 1 | 32/8 | 128 | bf16 | 1.000 | 10.00 | 600.0 | - | 2.00x | - |" in lines
    assert "| sdpa_flash | - | 32k | 1 | 32/8 | 128 | bf16 | 1.000 | 20.00 | 300.0 | 0.50x | - | - |" in lines
    assert "| bsa | random sel. | 32k | 1 | 32/8 | 128 | bf16 | 0.100 | 4.000 | 150.0 | 2.50x | 5.00x | 1.25x |" in lines
    assert "| flex | random sel. | 32k | 1 | 32/8 | 128 | bf16 | 0.100 | 5.000 | 120.0 | 2.00x | 4.00x | - |" in lines
    assert ("| proxy_attention | G=1 | 128k | 1 | 32/8 | 128 | bf16 | 0.031 | 16.50 | 262.7 | 14.39x | - | - |"
            in lines)
    assert "| estimate | G=1 | 128k | 1 | 32/8 | 128 | bf16 | - | 3.823 | - | 62.12x | - | - |" in lines
    assert "| sdpa_cudnn | - | 128k | 1 | 32/8 | 128 | bf16 | 1.000 | 237.5 | 592.6 | - | - | - |" in lines
    # varlen rows are not matched with fixed-length anchors of the same total length
    assert "| sdpa_cudnn | varlen 16k+16k | 32k | 1 | 32/8 | 128 | bf16 | 1.000 | 12.00 | 500.0 | - | - | - |" in lines
    # a file without anchors gets no ratio columns
    assert "| bsa | - | 4k | 1 | 32/8 | 128 | bf16 | 0.500 | 0.300 | 100.0 |" in lines


def test_deterministic_and_idempotent(tmp_path):
    path, res = _write(tmp_path)
    assert _run(path, res).returncode == 0
    first = path.read_text()
    assert _run(path, res).returncode == 0
    assert path.read_text() == first
    assert _run(path, res, "--check").returncode == 0


def test_check_reports_stale_readme_without_writing(tmp_path):
    path, res = _write(tmp_path)
    r = _run(path, res, "--check")
    assert r.returncode == 1 and "out of date" in r.stderr
    assert path.read_text() == README


def test_missing_markers_is_an_error(tmp_path):
    path, res = _write(tmp_path, readme="# no markers here\n")
    r = _run(path, res)
    assert r.returncode == 2 and "results:begin" in r.stderr
    assert path.read_text() == "# no markers here\n"


@pytest.mark.parametrize("files", [0, 1])
def test_empty_results_dir(tmp_path, files):
    res = tmp_path / "results"
    res.mkdir()
    if files:
        (res / "x.json").write_text("{not json")
    path = tmp_path / "README.md"
    path.write_text(README)
    r = _run(path, res)
    assert r.returncode == 0
    assert "(no benchmark records yet)" in _section(path.read_text())
