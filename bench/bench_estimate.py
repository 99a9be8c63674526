"""Time the estimation stages (docs/design.md section 2, stages 1-3) beside cuDNN SDPA dense causal.

    python bench/bench_estimate.py [--seq-len 131072] [--groups 1 16] [--reps 10]
                                   [--scores-backends auto portable] [--kernels] [--out PATH]

Each stage (proxy_block_scores, head_budgets, select_blocks) is timed alone with CUDA events,
median of --reps runs after warm-up, L2 flushed before every run (cold L2). The anchor is
cuDNN SDPA (torch.nn.attention.sdpa_kernel(SDPBackend.CUDNN_ATTENTION)) on the same inputs
with KV expanded to Hq heads. Prints each stage's time, its floors (exponentials over the
SFU rate, bytes over copy bandwidth) and the ratio to cuDNN (targets: stages 1+2+3 <= 1% of
cuDNN with G = 1, <= 2.5% at the default G = Hq/2), and writes the docs/design.md section 6 JSON
(default bench/results/<card>-<yyyymmdd>-estimate.json). --scores-backends times stage 1 under
each PROXYATTN_BSA_BACKEND value in the same run (auto: the Hopper kernel on sm_90; portable: the
mma.sync kernel), recorded as estimate_scores and estimate_scores_<backend>; the sum uses the
first. Two totals: `estimate_sum`, the sum of the three stages timed alone (the breakdown's
total), and `estimate`, the three run back to back as proxy_attention runs them, timed as one call
the same way (the `estimate` of bench/suite.py and bench/bench_e2e.py, which time it on structured
inputs). Older records (up to `*-20261207-estimate.json`) name the two otherwise;
tools/results_table.py (OLD_ESTIMATE_NAMES) reads them under these names. gamma and min_budget
default to ProxyAttnConfig's; the inputs are standard normal, whose selections come out nearly
dense (stage 1's cost does not depend on the values).

Importable: estimate_stage_fns() returns the three stage calls (and their chain) for one input,
used by bench/suite.py.
"""
import argparse
import os

import torch

import proxyattn  # noqa: F401  (registers torch.ops.proxyattn)
from benchlib import add_head_args, kernel_list, l2_flush_buffer, time_cold, write_record

OPS = torch.ops.proxyattn
EXP_RATE = 132 * 16 * 1.755e9  # H100 SXM: SMs x MUFU ops/clk/SM x clock ~ 3.7e12 exp/s
COPY_BW = 3.0e12               # bytes/s, device copy measured on H100


def cdiv(a, b):
    return -(-a // b)


def estimate_stage_fns(q, k, cu_q, cu_k, max_q, max_k, block_size, num_proxy_heads, stride, gamma, min_budget,
                       scale, sink_blocks=1, local_blocks=1, causal=True):
    """Callables timing stages 1-3 on (q, k): {"estimate_scores", "estimate_budgets", "estimate_select",
    "estimate"} (the last chains the three, as proxy_attention does). The select call reuses one
    scores / kstar computed here, so each stage runs alone."""
    S, G = block_size, num_proxy_heads

    def scores():
        return OPS.proxy_block_scores(q, k, cu_q, cu_k, max_q, max_k, S, G, stride, scale, causal)

    def budgets():
        return OPS.head_budgets(q, k, cu_q, cu_k, max_q, max_k, S, gamma, sink_blocks, local_blocks, scale, causal)

    sc, ks = scores(), budgets()

    def select(sc_=sc, ks_=ks):
        return OPS.select_blocks(sc_, ks_, cu_q, cu_k, max_q, max_k, S, sink_blocks, local_blocks, min_budget, causal)

    def chain():  # in proxy_attention's order: stage 2, stage 1, stage 3
        ks_ = budgets()
        return select(scores(), ks_)

    return {"estimate_scores": scores, "estimate_budgets": budgets, "estimate_select": select, "estimate": chain}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=131072)
    add_head_args(ap)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--stride", type=int, default=4)
    ap.add_argument("--groups", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--gamma", type=float, default=proxyattn.ProxyAttnConfig().gamma)
    ap.add_argument("--min-budget", type=int, default=proxyattn.ProxyAttnConfig().min_budget)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--no-sdpa", action="store_true", help="skip the cuDNN anchor")
    ap.add_argument("--scores-backends", nargs="+", default=["auto"], choices=["auto", "portable"],
                    help="PROXYATTN_BSA_BACKEND values to time stage 1 under (the first feeds the total)")
    ap.add_argument("--kernels", action="store_true",
                    help="also list the kernels of one estimate chain per G with their device times (torch.profiler)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    assert a.reps >= 10, "use at least 10 timed runs"
    if not torch.cuda.is_available():
        raise SystemExit("bench_estimate.py needs a CUDA GPU")

    n, hq, hkv, d, S, s = a.seq_len, a.q_heads, a.kv_heads, a.head_dim, a.block_size, a.stride
    dev = "cuda"
    card = torch.cuda.get_device_name()
    q = torch.randn(1, n, hq, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, n, hkv, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(1, n, hkv, d, device=dev, dtype=torch.bfloat16)
    scale = d ** -0.5
    flush = l2_flush_buffer()
    nqb, nkb = cdiv(n, S), cdiv(n, S)
    base = dict(seq_len=n, batch=1, q_heads=hq, kv_heads=hkv, head_dim=d, dtype="bf16")
    cases = []

    sdpa_ms = None
    if not a.no_sdpa:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        qt = q.transpose(1, 2)
        kt = k.repeat_interleave(hq // hkv, dim=2).transpose(1, 2)
        vt = v.repeat_interleave(hq // hkv, dim=2).transpose(1, 2)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            sdpa_ms = time_cold(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True),
                                a.reps, 3, flush)
        del qt, kt, vt
        flops = 4 * d * hq * n * n / 2
        cases.append(dict(name="sdpa_cudnn", **base, density=1.0, ms=sdpa_ms, tflops=flops / sdpa_ms / 1e9))
        print(f"{card}  N={n} Hq={hq} Hkv={hkv} D={d} bf16 causal")
        print(f"  sdpa_cudnn            {sdpa_ms:9.3f} ms  {flops / sdpa_ms / 1e9:7.1f} TFLOP/s")

    budgets_ms = None
    rows = min(S, n)
    b_exp = 2 * hq * rows * n
    b_bytes = n * hkv * d * 2 + rows * hq * d * 2
    for G in a.groups:
        fns = estimate_stage_fns(q, k, None, None, n, n, S, G, s, a.gamma, a.min_budget, scale)
        if budgets_ms is None:  # independent of G
            budgets_ms = time_cold(fns["estimate_budgets"], a.reps, 3, flush)
        by_backend, prior = {}, os.environ.get("PROXYATTN_BSA_BACKEND")
        for backend in a.scores_backends:
            os.environ["PROXYATTN_BSA_BACKEND"] = backend
            by_backend[backend] = time_cold(fns["estimate_scores"], a.reps, 3, flush)
        if prior is None:  # stages 2 and 3 run under the caller's setting: leave it as it was
            os.environ.pop("PROXYATTN_BSA_BACKEND")
        else:
            os.environ["PROXYATTN_BSA_BACKEND"] = prior
        scores_ms = by_backend[a.scores_backends[0]]
        select_ms = time_cold(fns["estimate_select"], a.reps, 3, flush)
        counts, _ = fns["estimate_select"]()
        causal_pairs = nqb * (nqb + 1) / 2
        density = float(counts.double().sum() / (hq * causal_pairs))
        total = scores_ms + budgets_ms + select_ms
        kept = cdiv(n, s)
        s_exp = G * kept * kept / 2  # one exponential per causal kept pair (the end of a unit adds ~1/S of that)
        s_bytes = n * hq * d * 2 + n * hkv * d * 2 + 2 * G * kept * d * 2 + G * nqb * nkb * 4  # 16-bit pooled rows
        sel_bytes = hq * nqb * nkb * 4 + hq * nqb * 4 + hq * causal_pairs * 4
        extra = dict(num_proxy_heads=G, stride=s, block_size=S, gamma=a.gamma, selected_density=density)
        print(f"  G={G}: selected density {density:.3f} (min_budget {a.min_budget}, gamma {a.gamma})")
        stages = [("estimate_scores", scores_ms, s_exp, s_bytes)]
        stages += [(f"estimate_scores_{b}", ms, s_exp, s_bytes) for b, ms in list(by_backend.items())[1:]]
        stages += [("estimate_budgets", budgets_ms, b_exp, b_bytes), ("estimate_select", select_ms, 0, sel_bytes)]
        for name, ms, nexp, nbytes in stages:
            fexp, fbytes = nexp / EXP_RATE * 1e3, nbytes / COPY_BW * 1e3
            ratio = f"  {100 * ms / sdpa_ms:6.2f}% of cuDNN" if sdpa_ms else ""
            print(f"    {name:18s} {ms:9.3f} ms   floors: exp {fexp:7.3f} ms, bytes {fbytes:7.3f} ms{ratio}")
            cases.append(dict(name=name, **base, density=None, ms=ms, tflops=None, floor_exp_ms=fexp,
                              floor_bytes_ms=fbytes, **extra))
        target = 1.0 if G == 1 else 2.5
        ratio = f"  {100 * total / sdpa_ms:6.2f}% of cuDNN (target <= {target}%)" if sdpa_ms else ""
        print(f"    {'estimate_sum 1+2+3':18s} {total:9.3f} ms{ratio}")
        cases.append(dict(name="estimate_sum", **base, density=None, ms=total, tflops=None,
                          ratio_to_sdpa_cudnn=(total / sdpa_ms if sdpa_ms else None), **extra))
        chain_ms = time_cold(fns["estimate"], a.reps, 3, flush)
        ratio = f"  {100 * chain_ms / sdpa_ms:6.2f}% of cuDNN" if sdpa_ms else ""
        print(f"    {'estimate (chained)':18s} {chain_ms:9.3f} ms{ratio}")
        cases.append(dict(name="estimate", **base, density=None, ms=chain_ms, tflops=None,
                          ratio_to_sdpa_cudnn=(chain_ms / sdpa_ms if sdpa_ms else None), **extra))
        if a.kernels:  # warm L2, one chain: where the stages' time goes, kernel by kernel
            cases[-1]["kernels"] = kernel_list(fns["estimate"])
            for kn, us in cases[-1]["kernels"]:
                print(f"      {kn[:80]:80s} {us:9.1f} us")

    print(f"wrote {write_record(cases, 'estimate', a.out)}")


if __name__ == "__main__":
    main()
