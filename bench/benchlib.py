"""Shared benchmark plumbing: cold-L2 median timing with CUDA events, and the docs/design.md
section 6 record (card, versions, commit, cases) written to bench/results/."""
import contextlib
import datetime
import json
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


def write_record(cases: list, tag: str, out: str = None, skipped: dict = None) -> str:
    """Writes the record (to `out`, else _default_record_path); `skipped` ({anchor: reason}), when
    given, says which anchors did not run."""
    card = torch.cuda.get_device_name()
    rec = {"card": card, "torch": torch.__version__, "cuda": torch.version.cuda, "commit": git_commit(),
           "cases": cases}
    if skipped:
        rec["skipped"] = skipped
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
