"""CPU tests of tools/ab_summary.py, the table tools/gpu_ab.sh prints: medians over rounds per
variant, the change against the unpatched tree, kernel rows from bench_estimate.py --kernels."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "ab_summary.py")


def _write(d, variant, rnd, cases):
    (d / f"{variant}-r{rnd}-bench_estimate.json").write_text(json.dumps({"card": "x", "cases": cases}))


def test_medians_and_changes(tmp_path):
    (tmp_path / "variants.txt").write_text("b1 = lean.patch\nb2 = wg3.patch\n")
    est = dict(name="estimate_scores", seq_len=131072, head_dim=128, num_proxy_heads=16)
    for rnd, (a, b1, b2) in enumerate([(8.0, 7.0, 6.0), (8.4, 7.4, 6.2), (8.2, 7.1, 9.9)], start=1):
        kern = [["scores_sm90_kernel<128, 32>(params)", a * 900.0], ["pool_kernel<bf16>", 100.0],
                ["pool_kernel<bf16>", 50.0]]
        _write(tmp_path, "a", rnd, [dict(est, ms=a), dict(name="estimate", seq_len=131072, ms=a + 2, kernels=kern)])
        _write(tmp_path, "b1", rnd, [dict(est, ms=b1)])
        _write(tmp_path, "b2", rnd, [dict(est, ms=b2)])
    (tmp_path / "notes.txt").write_text("not a record")
    r = subprocess.run([sys.executable, SCRIPT, str(tmp_path), "bench_estimate"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "| measurement | a (as is) | b1 (lean.patch) | b2 (wg3.patch) |"
    # medians over the three rounds: a 8.2, b1 7.1 (-13.4%), b2 6.2 (-24.4%)
    assert ("| estimate_scores seq_len=131072 head_dim=128 num_proxy_heads=16 [ms] | 8.2 | 7.1 (-13.4%) "
            "| 6.2 (-24.4%) |") in lines
    # kernel rows: a kernel's launches summed per call, the arguments dropped; absent variants show "-"
    assert "|   estimate seq_len=131072: scores_sm90_kernel<128, 32> [us] | 7380 | - | - |" in lines
    assert "|   estimate seq_len=131072: pool_kernel<bf16> [us] | 150 | - | - |" in lines


def test_no_records(tmp_path):
    r = subprocess.run([sys.executable, SCRIPT, str(tmp_path), "bench_bsa"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "no records"
