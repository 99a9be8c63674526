"""The same-run comparison that tools/gpu_ab.sh measured, as one table on stdout.

    python3 tools/ab_summary.py DIR SCRIPT_NAME

DIR holds the records <variant>-r<round>-<SCRIPT_NAME>.json (variant a = the tree as it is, b1, b2,
... = the patches, named in DIR/variants.txt as "b1 = foo.patch"). One row per measurement (the
case's name and what distinguishes it: length, head dim, density, selection, proxy heads, layout,
inputs), one column per variant: the median ms over the rounds, and for the patched variants the
change against a (negative: faster). Cases whose record carries a kernel list (bench_estimate.py
--kernels) add one row per kernel (microseconds, warm L2, summed over the kernel's launches).
"""
from __future__ import annotations

import glob
import json
import os
import re
import statistics
import sys

KEY_FIELDS = ("seq_len", "head_dim", "selection", "proxy_heads", "num_proxy_heads", "layout", "inputs", "backend",
              "page_size", "gamma", "stride")


def _key(c):
    parts = [c["name"]] + [f"{f}={c[f]}" for f in KEY_FIELDS if c.get(f) is not None]
    if c.get("density") is not None and c.get("selection") != "proxy":
        parts.append(f"density={float(c['density']):.3f}")
    if c.get("seq_lens"):
        parts.append("lens=" + "+".join(str(n) for n in c["seq_lens"]))
    return " ".join(parts)


def _kernel(name):
    name = re.sub(r"\(.*", "", name)
    return name if len(name) <= 60 else name[:57] + "..."


def collect(directory, script):
    """{variant: {row: [values over rounds]}} and the variant labels."""
    labels = {"a": "a (as is)"}
    vfile = os.path.join(directory, "variants.txt")
    if os.path.exists(vfile):
        with open(vfile) as f:
            lines = f.read().splitlines()
        for line in lines:
            if "=" in line:
                v, p = (x.strip() for x in line.split("=", 1))
                labels[v] = f"{v} ({p})"
    data = {}
    pat = re.compile(rf"^(?P<v>[ab]\d*)-r(?P<r>\d+)-{re.escape(script)}\.json$")
    for path in sorted(glob.glob(os.path.join(directory, f"*-{script}.json"))):
        m = pat.match(os.path.basename(path))
        if not m:
            continue
        try:
            with open(path) as f:
                cases = json.load(f).get("cases", [])
        except (OSError, ValueError):
            continue
        rows = data.setdefault(m.group("v"), {})
        for c in cases:
            if not isinstance(c, dict) or c.get("ms") is None or "name" not in c:
                continue
            key = _key(c)
            rows.setdefault(key + " [ms]", []).append(float(c["ms"]))
            per_kernel = {}
            for kn, us in c.get("kernels") or []:
                per_kernel[_kernel(kn)] = per_kernel.get(_kernel(kn), 0.0) + float(us)
            for kn, us in per_kernel.items():
                rows.setdefault(f"  {key}: {kn} [us]", []).append(us)
    return data, labels


def table(data, labels):
    variants = sorted(data, key=lambda v: (v != "a", int(v[1:]) if v[1:].isdigit() else 0))
    if not variants:
        return "no records"
    rows = []
    for v in variants:
        rows += [r for r in data[v] if r not in rows]
    base = data.get("a", {})
    head = ["measurement"] + [labels.get(v, v) for v in variants]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r]
        ref = statistics.median(base[r]) if base.get(r) else None
        for v in variants:
            vals = data[v].get(r)
            if not vals:
                cells.append("-")
                continue
            med = statistics.median(vals)
            cell = f"{med:.4g}"
            if v != "a" and ref:
                cell += f" ({100 * (med / ref - 1):+.1f}%)"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__.split("\n\n")[1])
        return 2
    data, labels = collect(*argv)
    print(table(data, labels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
