"""Write docs/results.md and the README's headline table from the benchmark records in bench/results.

    python3 tools/results_table.py [--results bench/results] [--doc docs/results.md]
                                   [--readme README.md] [--check]

Records are the JSON files of docs/design.md section 6 (`{"card", "torch", "cuda", "commit",
"cases": [...]}`), named `<card>-<yyyymmdd>[-<tag>].json`; files without a `cases` list of timed
entries are listed as not tabulated (and noted on stderr). bench_estimate.py's older records are
read under the current names of its totals (OLD_ESTIMATE_NAMES).

Suites. A suite file has the tag `suite` or `suite-<anything>` (a split sweep, e.g.
`suite-512k`), except `suite-quick`. A suite run is the suite files of one card with the same
date and commit (one sweep may be several invocations, one file each; of a tag rerun the same day,
`<tag>-2`, `<tag>-3` as benchlib names them, only the last counts). Per card the newest run
wins: the latest date; on one date, a run whose proxy_attention cases all use the current default
configuration (proxyattn/config.py) before one that does not; then the later file name. So a new
full suite replaces the old one in the docs without any edit.

docs/results.md (whole file, generated): per card, the newest suite run (its plots and one
table per file), then every other record (older suites, kernel and quality records) under
"Other records". The README's text between `<!-- results:begin -->` and `<!-- results:end -->`
becomes a short headline per card: proxy_attention of the newest suite at one head dim (128
where measured), fixed-length layout, against cuDNN and FA2 in the same file (and, where the run
measured them, against FlashAttention-4's dense kernel, with the attention stage against Flex
FLASH and FA4's block-sparse kernel on the same selection), and the speedup plot of the run's file
holding most of those rows.

Tables: name, variant (proxy heads, selection, layout, and where the record says so that its output
disagreed with another kernel's), N, B, heads, D, dtype, density, ms,
TFLOP/s, and for every anchor the file holds (sdpa_cudnn, sdpa_flash, flex) the ratio
anchor ms / ms on the same shape (> 1: faster than the anchor); flex, flex_flash and fa4_sparse
only on the same block mask too (_mask_key). Under each suite run, its varlen
proxy_attention batches beside their sequences run alone (the run's fixed-length rows at each
length, summed), the measure of whether packing costs anything. The output depends only on the
files and the defaults in proxyattn/config.py. --check exits 1 (and writes nothing) when either
output is out of date.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import importlib.util
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
ANCHORS = ("sdpa_cudnn", "sdpa_flash", "fa4", "flex", "flex_flash", "fa4_sparse")
DENSE_ANCHORS = ("sdpa_cudnn", "sdpa_flash", "fa4")  # matched on shape; the others on the mask
NAME_RE = re.compile(r"^(?P<card>.+?)-(?P<date>\d{8})(?:-(?P<tag>.+))?\.json$")


def _fmt_n(n):
    if n is None:
        return "-"
    n = int(n)
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _fmt_ms(ms):
    if ms is None:
        return "-"
    ms = float(ms)
    if ms >= 100:
        return f"{ms:.1f}"
    if ms >= 10:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def _proxy_heads(c):
    """The proxy heads of a case (bench_estimate.py records them as num_proxy_heads)."""
    return c.get("proxy_heads", c.get("num_proxy_heads"))


def _variant(c):
    """Short description of what distinguishes a case beyond its shape."""
    parts = []
    g = _proxy_heads(c)
    if g is not None:
        parts.append(f"G={g}")
    if c.get("selection"):
        parts.append(f"{c['selection']} sel.")
    if c.get("inputs"):
        parts.append(f"{c['inputs']} inputs")
    for field, label in (("page_size", "pages of"), ("backend", "backend")):
        if c.get(field) is not None:
            parts.append(f"{label} {c[field]}")
    if c.get("layout") == "varlen":
        lens = c.get("seq_lens")
        parts.append(f"varlen {'+'.join(_fmt_n(n) for n in lens)}" if lens else "varlen")
    if c.get("disagrees"):
        parts.append(_disagrees(c))
    return ", ".join(parts) if parts else "-"


def _disagrees(c):
    """What a case whose output disagreed with another kernel's (benchlib.record_comparison) says in a table."""
    return "output disagrees with " + "/".join(c.get("disagrees_with") or ["another kernel"])


def _shape_key(c):
    return (c.get("layout", "fixed"), c.get("seq_len"), tuple(c.get("seq_lens") or ()), c.get("batch"),
            c.get("q_heads"), c.get("kv_heads"), c.get("head_dim"), c.get("dtype"), c.get("inputs"))


def _round_of(c):
    """The density of the round a case ran in: a dense anchor timed beside a selection carries it
    as paired_density (bench_bsa --interleave); None where the record does not say."""
    d = c.get("paired_density", c.get("density"))
    return None if d is None else round(float(d), 4)


def _mask_key(c):
    """What a block-sparse anchor (flex, flex_flash, fa4_sparse) shares with the cases that ran on
    its block mask: the shape, the density and what made the mask: the selection (proxy, random),
    a proxy selection's proxy heads, gamma and min_budget, a random one's target density, and
    bench_bsa.py's mask (window, split<k>: made from the random selection the anchors ran on, at its
    density)."""
    dens = c.get("density")
    made_by = (c.get("selection"), _proxy_heads(c), c.get("gamma"), c.get("min_budget"), c.get("target_density"),
               c.get("mask"))
    return _shape_key(c) + (None if dens is None else round(float(dens), 3),) + made_by


def _timed(rec):
    return [c for c in rec["cases"] if isinstance(c, dict) and "name" in c and c.get("ms") is not None]


# bench_estimate.py's older records (up to *-20261207-estimate.json) name the sum of the stages timed
# alone `estimate` and the stages chained in one timed call `estimate_chain`; every record now names
# the chain `estimate` (as suite.py and bench_e2e.py always have) and the sum `estimate_sum`. A
# record with an `estimate_chain` case is such an older one, and is read under the current names.
OLD_ESTIMATE_NAMES = {"estimate": "estimate_sum", "estimate_chain": "estimate"}


def _current_names(rec):
    cases = rec["cases"]
    if not any(isinstance(c, dict) and c.get("name") == "estimate_chain" for c in cases):
        return rec
    return dict(rec, cases=[dict(c, name=OLD_ESTIMATE_NAMES[c["name"]])
                            if isinstance(c, dict) and c.get("name") in OLD_ESTIMATE_NAMES else c for c in cases])


class Record:
    """One usable results file: its path, parsed name and JSON object."""

    def __init__(self, path, rec):
        self.path, self.rec = path, rec
        self.base = os.path.basename(path)
        m = NAME_RE.match(self.base)
        self.date = m.group("date") if m else ""
        self.tag = (m.group("tag") or "") if m else ""
        self.card = str(rec.get("card") or "unknown card")
        self.commit = str(rec.get("commit") or "unknown")

    @property
    def is_suite(self):
        return (self.tag == "suite" or self.tag.startswith("suite-")) and self.tag != "suite-quick"

    @property
    def rel(self):
        return f"bench/results/{self.base}"

    @property
    def short_commit(self):
        """The commit as the docs name it: the hash cut to 7 characters, with any patch suffix that
        names a variant measured on top of it (``23767da+cand2``) kept."""
        head, plus, rest = self.commit.partition("+")
        return head[:7] + plus + rest


def load_records(results_dir):
    """(records sorted by file name, names of files that are not tabulated, notes for stderr)."""
    out, skipped, notes = [], [], []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        base = os.path.basename(path)
        try:
            with open(path) as f:
                rec = json.load(f)
        except (OSError, ValueError) as e:
            notes.append(f"{base}: unreadable ({e})")
            skipped.append(base)
            continue
        cases = rec.get("cases") if isinstance(rec, dict) else None
        if not isinstance(cases, list) or not any(isinstance(c, dict) and "name" in c and c.get("ms") is not None
                                                  for c in cases):
            notes.append(f"{base}: no docs/design.md section 6 cases, not tabulated")
            skipped.append(base)
            continue
        out.append(Record(path, _current_names(rec)))
    return out, skipped, notes


def load_default_config(root=ROOT):
    """proxyattn/config.py's defaults as a predicate on a proxy_attention case (gamma, min_budget and
    proxy heads), read from the file without importing the package (so without torch); None if the
    file cannot be read."""
    path = os.path.join(root, "proxyattn", "config.py")
    name = "_results_table_proxyattn_config"
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses look their module up while the class is made
        spec.loader.exec_module(mod)
        cfg = mod.ProxyAttnConfig()
    except Exception:  # noqa: BLE001 - a broken or moved config only loses the tie-break
        return None
    finally:
        sys.modules.pop(name, None)

    def is_default(c):
        try:
            return (c.get("gamma") == cfg.gamma and c.get("min_budget") == cfg.min_budget
                    and c.get("proxy_heads") == cfg.proxy_heads(int(c["q_heads"]), int(c["kv_heads"])))
        except Exception:  # noqa: BLE001 - missing or odd fields: not the default
            return False

    return is_default


def _at_default(files, is_default):
    pa = [c for f in files for c in _timed(f.rec) if c["name"] == "proxy_attention"]
    return bool(pa) and is_default is not None and all(is_default(c) for c in pa)


def _rerun(tag):
    """(the tag without a rerun's suffix, the rerun's number): benchlib names a second run of the
    same tag on one day <tag>-2, a third <tag>-3."""
    m = re.match(r"^(?P<base>.+)-(?P<n>\d+)$", tag)
    return (m.group("base"), int(m.group("n"))) if m else (tag, 1)


def newest_suites(records, is_default=None):
    """{card: [records of the newest suite run]}, each list in file-name order. Of the files of one
    run with the same tag but for a rerun's suffix, the last rerun alone counts."""
    runs = {}
    for r in records:
        if r.is_suite:
            base, n = _rerun(r.tag)
            files = runs.setdefault((r.card, r.date, r.commit), {})
            if base not in files or n > _rerun(files[base].tag)[1]:
                files[base] = r
    runs = {key: list(files.values()) for key, files in runs.items()}
    best = {}
    for (card, date, _), files in runs.items():
        key = (date, _at_default(files, is_default), max(f.base for f in files))
        if card not in best or key > best[card][0]:
            best[card] = (key, files)
    return {card: sorted(files, key=lambda f: f.base) for card, (_, files) in best.items()}


def file_table(rec):
    cases = _timed(rec)
    present = [a for a in ANCHORS if any(c["name"] == a for c in cases)]
    anchor_ms = {}
    for c in cases:  # first record of an anchor per key wins
        if c["name"] in DENSE_ANCHORS:  # by shape, and by shape and round where the record pairs them
            if "paired_density" in c:
                anchor_ms.setdefault((c["name"], _shape_key(c), _round_of(c)), float(c["ms"]))
            anchor_ms.setdefault((c["name"], _shape_key(c), None), float(c["ms"]))
        elif c["name"] in ANCHORS:
            anchor_ms.setdefault((c["name"], _mask_key(c)), float(c["ms"]))
    head = ["name", "variant", "N", "B", "Hq/Hkv", "D", "dtype", "density", "ms", "TFLOP/s"]
    head += [f"vs {a}" for a in present]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for c in cases:
        row = [c["name"], _variant(c), _fmt_n(c.get("seq_len")), _fmt(c.get("batch"), "d"),
               f"{c.get('q_heads', '-')}/{c.get('kv_heads', '-')}", _fmt(c.get("head_dim"), "d"),
               str(c.get("dtype", "-")), _fmt(c.get("density"), ".3f"), _fmt_ms(c["ms"]),
               _fmt(c.get("tflops"), ".1f")]
        for a in present:
            if a in DENSE_ANCHORS:  # the same round's anchor where there is one
                ref = anchor_ms.get((a, _shape_key(c), _round_of(c)), anchor_ms.get((a, _shape_key(c), None)))
            else:
                ref = anchor_ms.get((a, _mask_key(c)))
            row.append(f"{ref / float(c['ms']):.2f}x" if ref and c["name"] != a and float(c["ms"]) > 0
                       and not c["name"].startswith("estimate") else "-")  # an estimate computes no attention
        lines.append("| " + " | ".join(row) + " |")
    return lines


def varlen_table(files):
    """Each varlen proxy_attention case of a suite run beside its sequences run alone: the fixed-length
    (B = 1) proxy_attention and sdpa_cudnn cases of the same run at each of its lengths (same head
    dim, heads, dtype and proxy heads), summed. Rows only where every length was measured."""
    cases = [c for r in files for c in _timed(r.rec)]

    def same(a, b):
        return all(a.get(k) == b.get(k) for k in ("q_heads", "kv_heads", "head_dim", "dtype"))

    def fixed(name, like, n):
        for c in cases:
            if (c["name"] == name and c.get("layout", "fixed") == "fixed" and c.get("seq_len") == n
                    and c.get("batch") == 1 and same(c, like)
                    and (name != "proxy_attention" or c.get("proxy_heads") == like.get("proxy_heads"))):
                return float(c["ms"])
        return None

    lines = []
    for c in cases:
        if c["name"] != "proxy_attention" or c.get("layout") != "varlen" or not c.get("seq_lens"):
            continue
        dense = next((float(d["ms"]) for d in cases if d["name"] == "sdpa_cudnn" and _shape_key(d) == _shape_key(c)),
                     None)
        alone = [fixed("proxy_attention", c, n) for n in c["seq_lens"]]
        alone_dense = [fixed("sdpa_cudnn", c, n) for n in c["seq_lens"]]
        if dense is None or None in alone or None in alone_dense:
            continue
        ms, ms_alone, dense_alone = float(c["ms"]), sum(alone), sum(alone_dense)
        lines.append("| " + " | ".join([
            _variant(c), _fmt(c.get("head_dim"), "d"), _fmt_ms(ms), f"{dense / ms:.2f}x", _fmt_ms(ms_alone),
            f"{dense_alone / ms_alone:.2f}x", f"{ms_alone / ms:.2f}"]) + " |")
    if not lines:
        return []
    return (["", "Varlen batches against their sequences run alone (the fixed-length rows of the same run "
             "at each length, summed; cuDNN likewise):", "",
             "| variant | D | proxy_attention ms | vs cuDNN | alone ms | alone vs cuDNN | alone ms / varlen ms |",
             "|---|---|---|---|---|---|---|"] + lines)


def _source_line(r):
    return (f"`{r.rel}`: commit {r.short_commit}, torch {r.rec.get('torch', '?')}, "
            f"CUDA {r.rec.get('cuda', '?')}.")


def _plots(r, results_dir, prefix):
    stem = os.path.splitext(r.base)[0]
    out = []
    for kind in ("speedup", "tflops"):
        png = f"{stem}-{kind}.png"
        if os.path.exists(os.path.join(results_dir, png)):
            out.append(f"![{stem} {kind}]({prefix}{png})")
    return out


READING = ("Columns `vs <anchor>`: anchor ms / ms on the same shape in the same file (flex: on the same "
           "block mask); > 1 is faster than the anchor; none for the estimate's rows, which compute no attention. "
           "N in tokens (k = 1024); density: computed / causal block pairs; TFLOP/s counts computed block "
           "pairs only.")


def render_doc(records, skipped, results_dir, is_default):
    """The whole of docs/results.md."""
    out = ["# Results", "",
           "Generated by `python3 tools/results_table.py` from `bench/results/*.json` (do not edit by hand). "
           "Every file was measured in one process on one card, the anchors beside our kernels "
           "(docs/design.md section 5); bench/NOTES.md has the analysis.", "", READING]
    if not records:
        return "\n".join(out + ["", "(no benchmark records yet)", ""])
    suites = newest_suites(records, is_default)
    shown = set()
    for card in sorted(suites):
        files = suites[card]
        shown.update(f.base for f in files)
        date = files[0].date
        out += ["", f"## {card}: suite of {date[:4]}-{date[4:6]}-{date[6:]}, commit {files[0].short_commit}", ""]
        out += ["`python3 bench/suite.py` on structured inputs; proxy_attention with the sparse path forced "
                "(dense_below = 0) at every length."]
        for r in files:
            out += ["", f"### {r.base}", "", _source_line(r), ""]
            plots = _plots(r, results_dir, "../bench/results/")
            if plots:
                out += plots + [""]
            out += file_table(r.rec)
        out += varlen_table(files)
    others = [r for r in records if r.base not in shown]
    if others:
        out += ["", "## Other records", "",
                "Older suites and the records that kernel, configuration and quality claims rest on "
                "(docs/kernels.md, bench/NOTES.md)."]
        by_card = {}
        for r in others:
            by_card.setdefault(r.card, []).append(r)
        for card in sorted(by_card):
            out += ["", f"### {card}"]
            for r in by_card[card]:
                out += ["", f"#### {r.base}", "", _source_line(r), ""]
                out += file_table(r.rec)
    if skipped:
        out += ["", "Not tabulated (no timed cases; read the JSON): "
                + ", ".join(f"`{b}`" for b in skipped) + "."]
    return "\n".join(out) + "\n"


def _same(rows, key):
    vals = {c.get(key) for c in rows}
    return vals.pop() if len(vals) == 1 else None


def headline(records, results_dir, is_default):
    """The README text between the markers (without them)."""
    suites = newest_suites(records, is_default)
    if not suites:
        return "\n(no benchmark suite yet; see docs/results.md)\n"
    out = []
    for card in sorted(suites):
        files = suites[card]
        cases = [(r, c) for r in files for c in _timed(r.rec)]
        pa = [(r, c) for r, c in cases if c["name"] == "proxy_attention" and c.get("layout", "fixed") == "fixed"]
        if not pa:
            continue
        dims = sorted({c.get("head_dim") for _, c in pa if c.get("head_dim") is not None})
        dim = 128 if 128 in dims else (dims[-1] if dims else None)
        pa = [(r, c) for r, c in pa if c.get("head_dim") == dim]
        anchors = {}
        for r, c in cases:
            if c["name"] in DENSE_ANCHORS:
                anchors.setdefault((r.base, c["name"], _shape_key(c)), float(c["ms"]))
            elif c["name"] in ("bsa", "flex_flash", "fa4_sparse") and c.get("selection") == "proxy":
                anchors.setdefault((r.base, c["name"], _mask_key(c)), float(c["ms"]))
        rows = [c for _, c in pa]
        shape = [f"B={_same(rows, 'batch')}" if _same(rows, "batch") is not None else None,
                 f"Hq={_same(rows, 'q_heads')}, Hkv={_same(rows, 'kv_heads')}"
                 if _same(rows, "q_heads") is not None and _same(rows, "kv_heads") is not None else None,
                 f"D={dim}", _same(rows, "dtype")]
        srcs = ", ".join(f"`{r.rel}`" for r in files if any(r is rr for rr, _ in pa))
        config = "the default configuration" if _at_default(files, is_default) else "the configuration in the file"
        out += ["", f"**{card}**, {', '.join(s for s in shape if s)}, causal, structured inputs, {config}, sparse "
                    f"path at every length ({srcs}, commit {files[0].short_commit}, torch "
                    f"{files[0].rec.get('torch', '?')}):", ""]
        # FlashAttention-4 columns only where the run has them (flash-attn-4 installed): proxy_attention
        # against FA4's dense kernel, and the attention stage (bsa on proxy_attention's selection)
        # against the block-sparse kernels on the same selection.
        def ratio(r, c, name):
            if name in DENSE_ANCHORS:
                ref, ms = anchors.get((r.base, name, _shape_key(c))), float(c["ms"])
            else:
                ref, ms = anchors.get((r.base, name, _mask_key(c))), anchors.get((r.base, "bsa", _mask_key(c)))
            return f"{ref / ms:.2f}x" if ref and ms else "-"

        extra = [(name, head) for name, head in (("fa4", "vs FA4"), ("flex_flash", "attention vs Flex FLASH"),
                                                 ("fa4_sparse", "attention vs FA4 sparse"))
                 if any(ratio(r, c, name) != "-" for r, c in pa)]
        head = ["N", "proxy heads", "density", "proxy_attention ms", "of which estimate", "cuDNN ms", "vs cuDNN",
                "vs FA2"] + [h for _, h in extra]
        out += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        for r, c in sorted(pa, key=lambda rc: (-(rc[1].get("proxy_heads") or 0), rc[1].get("seq_len") or 0)):
            ms = float(c["ms"])
            cud = anchors.get((r.base, "sdpa_cudnn", _shape_key(c)))
            out.append("| " + " | ".join([
                _fmt_n(c.get("seq_len")) + (f" ({_disagrees(c)})" if c.get("disagrees") else ""),
                str(c.get("proxy_heads", "-")), _fmt(c.get("density"), ".3f"),
                _fmt_ms(ms), _fmt_ms(c.get("estimate_ms")), _fmt_ms(cud), ratio(r, c, "sdpa_cudnn"),
                ratio(r, c, "sdpa_flash")] + [ratio(r, c, name) for name, _ in extra]) + " |")
        # The plot of the file that holds most of the table's rows (a split sweep's main part).
        shown = [(sum(r is rr for rr, _ in pa), _plots(r, results_dir, "bench/results/")) for r in files]
        shown = [(n, plots) for n, plots in shown if n and plots]
        if shown:
            out += ["", max(shown, key=lambda np_: np_[0])[1][0]]
    out += ["", "All tables, the other head dim, varlen batches, random-mask sweeps and FlexAttention on the "
                "same masks: [docs/results.md](docs/results.md)."]
    return "\n".join(out) + "\n"


def rewrite(text, body):
    i, j = text.find(BEGIN), text.find(END)
    if i < 0 or j < 0 or j < i:
        raise ValueError(f"must hold {BEGIN} followed by {END}")
    return text[: i + len(BEGIN)] + "\n" + body.lstrip("\n") + text[j:]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--doc", default=os.path.join(ROOT, "docs", "results.md"))
    ap.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    ap.add_argument("--check", action="store_true", help="exit 1 if an output is out of date; write nothing")
    a = ap.parse_args(argv)
    records, skipped, notes = load_records(a.results)
    for n in notes:
        print(f"results_table: {n}", file=sys.stderr)
    is_default = load_default_config()
    with open(a.readme) as f:
        readme = f.read()
    try:
        new_readme = rewrite(readme, headline(records, a.results, is_default))
    except ValueError as e:
        print(f"results_table: {a.readme}: {e}", file=sys.stderr)
        return 2
    new_doc = render_doc(records, skipped, a.results, is_default)
    old_doc = None
    if os.path.exists(a.doc):
        with open(a.doc) as f:
            old_doc = f.read()
    if a.check:
        stale = [p for p, old, new in ((a.readme, readme, new_readme), (a.doc, old_doc, new_doc)) if old != new]
        for p in stale:
            print(f"results_table: {p} is out of date; run python3 tools/results_table.py", file=sys.stderr)
        return 1 if stale else 0
    if new_readme != readme:
        with open(a.readme, "w") as f:
            f.write(new_readme)
    if new_doc != old_doc:
        os.makedirs(os.path.dirname(os.path.abspath(a.doc)), exist_ok=True)
        with open(a.doc, "w") as f:
            f.write(new_doc)
    print(f"results_table: {len(records)} files -> {a.doc}, headline -> {a.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
