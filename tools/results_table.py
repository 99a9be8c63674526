"""Rewrite the README results section from the benchmark records in bench/results/*.json.

    python3 tools/results_table.py [--readme README.md] [--results bench/results] [--check]

Reads every DESIGN.md section 6 record (`{"card", "torch", "cuda", "commit", "cases": [...]}`;
files without a `cases` list of timed entries are skipped with a note on stderr) and replaces
the text between `<!-- results:begin -->` and `<!-- results:end -->` with one markdown table
per card and file: name, variant (proxy heads, selection, layout), N, B, heads, D, dtype,
density, ms, TFLOP/s, and, for every anchor the file holds (sdpa_cudnn, sdpa_flash, flex), the
ratio anchor ms / ms on the same shape (> 1: faster than the anchor). flex is matched on the same
density and selection too, since it runs on the same block mask. Cards sorted by name, files by
name, rows in file order: the output depends only on the files. --check exits 1 (and writes
nothing) when the README is not up to date.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
ANCHORS = ("sdpa_cudnn", "sdpa_flash", "flex")


def _fmt_n(n):
    if n is None:
        return "-"
    n = int(n)
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _fmt_ms(ms):
    if ms >= 100:
        return f"{ms:.1f}"
    if ms >= 10:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def _variant(c):
    """Short description of what distinguishes a case beyond its shape."""
    parts = []
    g = c.get("proxy_heads", c.get("num_proxy_heads"))
    if g is not None:
        parts.append(f"G={g}")
    if c.get("selection"):
        parts.append(f"{c['selection']} sel.")
    if c.get("layout") == "varlen":
        lens = c.get("seq_lens")
        parts.append(f"varlen {'+'.join(_fmt_n(n) for n in lens)}" if lens else "varlen")
    return ", ".join(parts) if parts else "-"


def _shape_key(c):
    return (c.get("layout", "fixed"), c.get("seq_len"), tuple(c.get("seq_lens") or ()), c.get("batch"),
            c.get("q_heads"), c.get("kv_heads"), c.get("head_dim"), c.get("dtype"))


def _mask_key(c):
    dens = c.get("density")
    return _shape_key(c) + (None if dens is None else round(float(dens), 3), c.get("selection"))


def load_records(results_dir):
    """[(path, record)] of the usable files, sorted by file name; notes for the skipped ones."""
    out, notes = [], []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        try:
            with open(path) as f:
                rec = json.load(f)
        except (OSError, ValueError) as e:
            notes.append(f"{os.path.basename(path)}: unreadable ({e})")
            continue
        cases = rec.get("cases") if isinstance(rec, dict) else None
        if not isinstance(cases, list) or not any(isinstance(c, dict) and "name" in c and c.get("ms") is not None
                                                  for c in cases):
            notes.append(f"{os.path.basename(path)}: no DESIGN section 6 cases, skipped")
            continue
        out.append((path, rec))
    return out, notes


def file_table(rec):
    cases = [c for c in rec["cases"] if isinstance(c, dict) and "name" in c and c.get("ms") is not None]
    present = [a for a in ANCHORS if any(c["name"] == a for c in cases)]
    anchor_ms = {}
    for c in cases:  # first record of an anchor per key wins
        if c["name"] in ("sdpa_cudnn", "sdpa_flash"):
            anchor_ms.setdefault((c["name"], _shape_key(c)), float(c["ms"]))
        elif c["name"] == "flex":
            anchor_ms.setdefault(("flex", _mask_key(c)), float(c["ms"]))
    head = ["name", "variant", "N", "B", "Hq/Hkv", "D", "dtype", "density", "ms", "TFLOP/s"]
    head += [f"vs {a}" for a in present]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for c in cases:
        row = [c["name"], _variant(c), _fmt_n(c.get("seq_len")), _fmt(c.get("batch"), "d"),
               f"{c.get('q_heads', '-')}/{c.get('kv_heads', '-')}", _fmt(c.get("head_dim"), "d"),
               str(c.get("dtype", "-")), _fmt(c.get("density"), ".3f"), _fmt_ms(float(c["ms"])),
               _fmt(c.get("tflops"), ".1f")]
        for a in present:
            key = (a, _mask_key(c) if a == "flex" else _shape_key(c))
            ref = anchor_ms.get(key)
            row.append(f"{ref / float(c['ms']):.2f}x" if ref and c["name"] != a and float(c["ms"]) > 0 else "-")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def render(records):
    """The markdown between the markers (without them), one section per card, then per file."""
    by_card = {}
    for path, rec in records:
        by_card.setdefault(str(rec.get("card") or "unknown card"), []).append((path, rec))
    if not by_card:
        return "\n(no benchmark records yet)\n"
    out = ["", "Columns `vs <anchor>`: anchor ms / ms on the same shape in the same file (flex: on the same "
               "block mask); > 1 is faster than the anchor. N in tokens (k = 1024); density: computed / causal "
               "block pairs."]
    for card in sorted(by_card):
        out += ["", f"### {card}"]
        for path, rec in by_card[card]:
            commit = str(rec.get("commit") or "unknown")[:7]
            out += ["", f"`bench/results/{os.path.basename(path)}`: commit {commit}, torch {rec.get('torch', '?')}, "
                        f"CUDA {rec.get('cuda', '?')}.", ""]
            out += file_table(rec)
    return "\n".join(out) + "\n"


def rewrite(text, body):
    i, j = text.find(BEGIN), text.find(END)
    if i < 0 or j < 0 or j < i:
        raise ValueError(f"README must hold {BEGIN} followed by {END}")
    return text[: i + len(BEGIN)] + "\n" + body.lstrip("\n") + text[j:]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    ap.add_argument("--results", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--check", action="store_true", help="exit 1 if the README is out of date; write nothing")
    a = ap.parse_args(argv)
    records, notes = load_records(a.results)
    for n in notes:
        print(f"results_table: {n}", file=sys.stderr)
    with open(a.readme) as f:
        text = f.read()
    try:
        new = rewrite(text, render(records))
    except ValueError as e:
        print(f"results_table: {a.readme}: {e}", file=sys.stderr)
        return 2
    if a.check:
        if new != text:
            print(f"results_table: {a.readme} is out of date; run python3 tools/results_table.py", file=sys.stderr)
            return 1
        return 0
    if new != text:
        with open(a.readme, "w") as f:
            f.write(new)
    print(f"results_table: {len(records)} files -> {a.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
