"""Shared benchmark plumbing: cold-L2 median timing with CUDA events, the check of one kernel's output
against another's, and the docs/design.md section 6 record (card, versions, commit, cases) written to
bench/results/."""
import contextlib
import dataclasses
import datetime
import json
import math
import os
import random
import statistics
import subprocess

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def l2_flush_buffer(nbytes: int = 256 << 20) -> torch.Tensor:
    """A buffer larger than L2 (50-60 MB on H100/H200); zero it before a run to evict L2."""
    return torch.empty(nbytes // 4, dtype=torch.float32, device="cuda")


def cold_run(fn, flush: torch.Tensor):
    """Evict L2, run fn between two recorded events; returns the (start, end) events."""
    flush.zero_()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    return start, end


def time_cold(fn, reps: int = 10, warmup: int = 3, flush: torch.Tensor = None) -> float:
    """Median milliseconds of `fn` over `reps` runs after `warmup`, L2 evicted before each run."""
    flush = l2_flush_buffer() if flush is None else flush
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = cold_run(fn, flush)
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_cold_interleaved(fns: dict, reps: int = 30, warmup: int = 3, flush: torch.Tensor = None) -> dict:
    """Medians like time_cold for several {name: (fn, context factory or None)}, their runs
    interleaved: every round runs each once, in an order shuffled per round (fixed seed), so clock
    and thermal drift, and the lower clock a long power-hungry run leaves behind under the power
    limit, hit every one alike instead of whichever always follows it. The context (e.g. an SDPA
    backend choice) is entered before the L2 flush and left after the end event is recorded: only
    fn() is timed."""
    flush = l2_flush_buffer() if flush is None else flush
    for fn, ctx in fns.values():
        with ctx() if ctx is not None else contextlib.nullcontext():
            for _ in range(warmup):
                fn()
    torch.cuda.synchronize()
    times = {name: [] for name in fns}
    names = list(fns)
    shuffle = random.Random(0).shuffle
    for _ in range(reps):
        shuffle(names)
        for name in names:
            fn, ctx = fns[name]
            with ctx() if ctx is not None else contextlib.nullcontext():
                start, end = cold_run(fn, flush)
            end.synchronize()
            times[name].append(start.elapsed_time(end))
    return {name: statistics.median(t) for name, t in times.items()}


def allow_recompiles(limit: int = 256) -> None:
    """Raises torch._dynamo's recompile limits to at least `limit`: a compiled FlexAttention call compiles
    once per shape, and past the default limit (8) dynamo would run flex eagerly, and time that."""
    import torch._dynamo.config as dynamo_config

    for knob in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(dynamo_config, knob):
            setattr(dynamo_config, knob, max(limit, getattr(dynamo_config, knob)))


@contextlib.contextmanager
def poisoned_outputs():
    """Within the block every tensor torch hands out uninitialised (torch.empty, at::empty in the ops:
    outputs and workspaces) is filled first, floats with NaN and integers with their largest value, so an
    element a kernel leaves unwritten shows up in a comparison instead of reading whatever an earlier
    call left in the caching allocator's memory (often a correct output). The fill needs deterministic
    mode, entered with warn_only=True (an op without a deterministic implementation warns instead of
    raising); the previous settings come back after the block, inductor's `deterministic`, which
    torch.use_deterministic_algorithms sets too, included. It costs a fill per allocation: use it for
    the calls whose outputs are checked, never inside a timed region."""
    import torch._inductor.config as inductor_config

    det, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill, inductor_det = torch.utils.deterministic.fill_uninitialized_memory, inductor_config.deterministic
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill
        inductor_config.deterministic = inductor_det


# compare_outputs' bound per row of D elements: |ours - other| <= OUT_ATOL + OUT_RTOL * max |other row|.
# Two correct attention kernels on the same inputs differ by rounding: each rounds its fp32 result to
# bf16 (half an ulp; one ulp is 2^-7 = 0.0078 of the value), and they sum the keys in other orders, with
# P rounded to bf16 at other running maxima, which moves the output by well under an ulp. So they agree
# within about one bf16 ulp of the row's largest value (FA4's block-sparse kernel and ours: 0.002 on rows
# of size ~1 at 128k; an ulp is 0.03 on needle rows of size 4-8). OUT_RTOL allows 2.5 ulps of that
# value (fp16, with 3 more mantissa bits, has more room still); OUT_ATOL covers rows whose values are all
# close to 0, where the rounding of the sums is absolute. A row written as zeros, or left unwritten
# (NaN once poisoned), fails: over random inputs a row attending to n keys has a largest |value| of about
# 2.8 * sqrt(e / n), 0.07 at 4k keys, 0.013 at 128k, 0.0064 at 512k, all above OUT_ATOL.
OUT_RTOL = 0.02
OUT_ATOL = 2e-3


class NonFiniteOutput(RuntimeError):
    """Our output holds NaN or Inf: our kernel is wrong, whatever it is compared with."""


def require_finite(out: torch.Tensor, case: str, chunk: int = 8192) -> None:
    """Raises NonFiniteOutput, naming `case` (the kernel and the inputs), if `out` holds a NaN or Inf
    (checked in chunks of `chunk` rows along dim -3, the tokens of [B, N, H, D] and [total, H, D])."""
    for part in out.split(chunk, dim=-3):
        if not bool(torch.isfinite(part).all()):
            raise NonFiniteOutput(f"{case}: the output holds non-finite values (this kernel is wrong, whatever it "
                                  f"is compared with)")


@dataclasses.dataclass
class OutputDiff:
    """compare_outputs' result: the largest |ours - other| (NaN where `other` holds NaN), the rows beyond
    the bound, the rows compared, and the bound's tolerances."""
    max_abs_diff: float
    bad_rows: int
    rows: int
    rtol: float = OUT_RTOL
    atol: float = OUT_ATOL

    @property
    def agrees(self) -> bool:
        return self.bad_rows == 0

    def describe(self) -> str:
        return (f"max |diff| {self.max_abs_diff:.5g}, {self.bad_rows} of {self.rows} rows beyond "
                f"{self.atol} + {self.rtol} x max |row|")


def compare_outputs(ours: torch.Tensor, other: torch.Tensor, case: str, rtol: float = OUT_RTOL,
                    atol: float = OUT_ATOL, chunk: int = 8192) -> OutputDiff:
    """Compares our output with another kernel's on the same inputs, row by row: the row of D elements
    (last dim) of each (batch, token, head) agrees when max |ours - other| <= atol + rtol * max |other| over
    it. Layouts alike ([B, N, H, D] or [total, H, D]; views of any strides), walked in chunks of `chunk`
    rows along dim -3 so the fp32 temporaries stay small. Raises NonFiniteOutput (naming `case`) where ours
    holds a NaN or Inf; a non-finite value in `other` makes its row disagree."""
    if ours.shape != other.shape:
        raise ValueError(f"{case}: outputs of shapes {tuple(ours.shape)} and {tuple(other.shape)}")
    rows = ours.numel() // ours.shape[-1] if ours.numel() else 0
    if rows == 0:
        return OutputDiff(0.0, 0, 0, rtol, atol)
    worst, bad = None, 0
    for a, b in zip(ours.split(chunk, dim=-3), other.split(chunk, dim=-3)):
        a, b = a.float(), b.float()
        require_finite(a, case, chunk)
        err = (a - b).abs().amax(dim=-1)
        bad += int((~(err <= atol + rtol * b.abs().amax(dim=-1))).sum())  # NaN compares False: beyond
        worst = err.max() if worst is None else torch.maximum(worst, err.max())  # NaN propagates
    return OutputDiff(float(worst), bad, rows, rtol, atol)


def mark_disagreement(fields: dict, other: str) -> None:
    """Marks a case's extra record fields as disagreeing with the output of `other`."""
    fields["disagrees"] = True
    if other not in fields.setdefault("disagrees_with", []):
        fields["disagrees_with"].append(other)


def record_comparison(extras: dict, name: str, vs: str, res: OutputDiff, where: str) -> str:
    """Puts compare_outputs' result `res` (`vs`'s output as ours, `name`'s as the other) into `extras`
    ({case name: extra record fields}): max_abs_diff_vs_<vs> on name's fields (None where not finite); where
    a row disagrees, the number of such rows on name's, and disagrees: true with the other's name in
    disagrees_with on both. Neither case is dropped: both are timed and recorded, marked. Returns the line
    to print (loud on a disagreement)."""
    mine = extras.setdefault(name, {})
    mine[f"max_abs_diff_vs_{vs}"] = round(res.max_abs_diff, 5) if math.isfinite(res.max_abs_diff) else None
    if res.agrees:
        return f"{name}: max |out - {vs}| = {res.max_abs_diff:.5f} ({where})"
    mine["disagreeing_rows"] = res.bad_rows
    mark_disagreement(mine, vs)
    mark_disagreement(extras.setdefault(vs, {}), name)
    return (f"*** {name} DISAGREES with {vs} ({where}): {res.describe()}; both are timed and recorded with "
            f"disagrees: true")


def kernel_list(fn):
    """(kernel name, device microseconds) for one call."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [(e.name, e.device_time_total) for e in prof.events() if e.device_time_total > 0
            and e.device_type == torch.autograd.DeviceType.CUDA]


def git_commit() -> str:
    if os.environ.get("PROXYATTN_COMMIT"):  # copies of the tree on a device machine carry no .git
        return os.environ["PROXYATTN_COMMIT"]
    try:
        return subprocess.check_output(["git", "-C", ROOT, "rev-parse", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def causal_tflops(n_q: int, n_k: int, q_heads: int, head_dim: int, batch: int = 1, density: float = 1.0) -> float:
    """FLOPs (not rate) of causal attention over the computed pairs: density * 4 * D * Hq * N^2 / 2."""
    return density * 4 * head_dim * q_heads * n_q * (n_k - n_q / 2) * batch


_RECORD_PATHS = {}  # tag -> the default path this process writes (a record rewritten as it grows)


def _default_record_path(card: str, tag: str) -> str:
    """bench/results/<card>-<date>-<tag>.json, or with -2, -3, ... where an earlier run of the day
    wrote that name: a rerun never replaces a record the docs may cite. One name per tag and process."""
    if tag not in _RECORD_PATHS:
        stem = os.path.join(ROOT, "bench", "results", f"{card.replace(' ', '_')}-{datetime.date.today():%Y%m%d}-{tag}")
        path, i = f"{stem}.json", 1
        while os.path.exists(path):
            i += 1
            path = f"{stem}-{i}.json"
        _RECORD_PATHS[tag] = path
    return _RECORD_PATHS[tag]


def write_record(cases: list, tag: str, out: str = None, skipped: dict = None, meta: dict = None) -> str:
    """Writes the record (to `out`, else _default_record_path); `skipped` ({anchor: reason}), when
    given, says which anchors did not run; `meta`, when given, how the run measured (reps, warm-up, ...)."""
    card = torch.cuda.get_device_name()
    rec = {"card": card, "torch": torch.__version__, "cuda": torch.version.cuda, "commit": git_commit(),
           "cases": cases}
    if skipped:
        rec["skipped"] = skipped
    if meta:
        rec["meta"] = meta
    out = out or _default_record_path(card, tag)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(rec, f, indent=1)
    return out


def proxy_heads_arg(text: str):
    """argparse type of --proxy-heads: an int, or 'default' (None: the config's own choice)."""
    return None if text == "default" else int(text)


def add_head_args(ap) -> None:
    """The attention shape arguments every benchmark shares: --q-heads (32), --kv-heads (8) and
    --head-dim (128), a Llama-3-8B-like layer."""
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
