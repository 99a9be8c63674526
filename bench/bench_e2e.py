"""proxy_attention end to end beside cuDNN SDPA, on structured inputs, across lengths.

    python3 bench/bench_e2e.py [--seq-lens 1024 ... 131072] [--proxy-heads default 1] [--gammas 0.95] [--strides 4]
                              [--quality-at 32768 131072] [--inputs structured random]

For each length and input kind: structured inputs (synthetic.make_structured_inputs, generated on
the GPU: sink, RoPE recency, shared hubs, needles) and, with --inputs random, standard normal q, k,
v (the worst case: the selection comes out nearly dense and the estimate is pure overhead; no
quality metrics, since they have no needles), cuDNN SDPA dense causal (KV expanded to Hq heads), and
proxy_attention on its sparse path (dense_below=0) for each (proxy heads, gamma, stride), timed
whole, and as estimation (stages 1-3) and attention (stage 4) apart (a breakdown, timed alone);
the density of the selection it made. At the --quality-at lengths also attention recall, needle
retrieval and output error against dense attention. Also, per length, proxy_attention with the
full default config (`proxy_attention_default`: dense SDPA below config.dense_below) and plain
SDPA with GQA and the backend torch picks (`sdpa_default`), so the default's ratio to cuDNN is
measured at every length. cuDNN, sdpa_default, proxy_attention_default and the whole sparse calls
are timed together in shuffled interleaved rounds (benchlib.time_cold_interleaved, --reps >= 10
runs, --dense-reps at N <= 16k), so that neither clock drift nor the heat a 250 ms dense call
leaves on the card decides a comparison; every ratio to cuDNN comes from those rounds. Prints
the smallest length from which the sparse path is never more than 5% slower than cuDNN (the
dense crossover, config.dense_below) per input kind, and writes the docs/design.md section 6 JSON (tag e2e).
"""
import argparse
import dataclasses
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import proxyattn as pa
from benchlib import (add_head_args, causal_tflops, l2_flush_buffer, proxy_heads_arg, time_cold,
                      time_cold_interleaved, write_record)
from proxyattn import metrics
from proxyattn.attention import dense_attention
from synthetic import make_structured_inputs

OPS = torch.ops.proxyattn


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-lens", type=int, nargs="+",
                    default=[1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072])
    add_head_args(ap)
    ap.add_argument("--proxy-heads", type=proxy_heads_arg, nargs="+", default=[None, 1],
                    help="num_proxy_heads values; 'default' is the config's (two query heads per proxy)")
    ap.add_argument("--gammas", type=float, nargs="+", default=[pa.ProxyAttnConfig().gamma],
                    help="budget mass targets; every (proxy heads, gamma, stride) triple is measured")
    ap.add_argument("--strides", type=int, nargs="+", default=[pa.ProxyAttnConfig().stride],
                    help="proxy token strides of stage 1")
    ap.add_argument("--share", type=float, default=0.8)
    ap.add_argument("--needle-rows-before", type=int, default=0,
                    help="needle query rows end this many rows before the end (>= 128: outside stage 2's probe, "
                         "where the budget is scaled rather than measured)")
    ap.add_argument("--quality-at", type=int, nargs="*", default=[32768, 131072])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--dense-reps", type=int, default=50,
                    help="interleaved runs of the dense contenders at N <= 16k (short kernels vary more)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--inputs", nargs="+", choices=["structured", "random"], default=["structured"],
                    help="input kinds, each measured at every length")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_e2e.py needs a CUDA GPU")
    hq, hkv, d = a.q_heads, a.kv_heads, a.head_dim
    flush = l2_flush_buffer()
    cases, base_cfg = [], pa.ProxyAttnConfig(dense_below=0)
    variants = [(g, gamma, st) for g in a.proxy_heads for gamma in a.gammas for st in a.strides]
    crossover = {(kind, *gg): None for kind in a.inputs for gg in variants}
    for kind, n in ((kind, n) for kind in a.inputs for n in a.seq_lens):
        if kind == "structured":
            q, k, v, meta = make_structured_inputs(1, n, hq, hkv, d, share=a.share, seed=a.seed + n,
                                                   needle_rows_before=a.needle_rows_before,
                                                   dtype=torch.bfloat16, device="cuda")
        else:
            gen = torch.Generator(device="cuda").manual_seed(a.seed + n)
            q, k, v = (torch.randn(1, n, h, d, generator=gen, device="cuda", dtype=torch.bfloat16)
                       for h in (hq, hkv, hkv))
            meta = None
        reps = max(10, a.reps)
        common = dict(seq_len=n, batch=1, q_heads=hq, kv_heads=hkv, head_dim=d, dtype="bf16", inputs=kind)
        qt = q.transpose(1, 2)
        ke = k.transpose(1, 2).repeat_interleave(hq // hkv, dim=1)
        ve = v.transpose(1, 2).repeat_interleave(hq // hkv, dim=1)
        kt, vt = k.transpose(1, 2), v.transpose(1, 2)
        dflt = pa.ProxyAttnConfig()
        cfgs = {v_: dataclasses.replace(base_cfg, num_proxy_heads=v_[0], gamma=v_[1], stride=v_[2]) for v_ in variants}
        # every contender in the same shuffled rounds, so neither drift nor heat favours one of them
        group = {
            "sdpa_cudnn": (lambda: F.scaled_dot_product_attention(qt, ke, ve, is_causal=True),
                           lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION)),
            "sdpa_default": (lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True,
                                                                    enable_gqa=hq != hkv), None),
            "proxy_attention_default": (lambda: pa.proxy_attention(q, k, v, dflt), None),
        }
        for v_, cfg in cfgs.items():
            group[v_] = (lambda cfg=cfg: pa.proxy_attention(q, k, v, cfg), None)
        med = time_cold_interleaved(group, reps=max(reps, a.dense_reps) if n <= 16384 else reps, warmup=2,
                                    flush=flush)
        dense_ms, sdpa_ms, dflt_ms = med["sdpa_cudnn"], med["sdpa_default"], med["proxy_attention_default"]
        flops = causal_tflops(n, n, hq, d)
        cases.append(dict(name="sdpa_cudnn", **common, density=1.0, ms=dense_ms, tflops=flops / dense_ms / 1e9))
        cases.append(dict(name="sdpa_default", **common, density=1.0, ms=sdpa_ms, tflops=flops / sdpa_ms / 1e9))
        dense_path = n < dflt.dense_below
        cases.append(dict(name="proxy_attention_default", **common, density=1.0 if dense_path else None, ms=dflt_ms,
                          tflops=flops / dflt_ms / 1e9 if dense_path else None, dense_path=dense_path,
                          dense_below=dflt.dense_below, time_vs_cudnn=dflt_ms / dense_ms))
        print(f"{kind:10s} N={n:7d} sdpa_cudnn {dense_ms:9.3f} ms  sdpa(default backend, GQA) {sdpa_ms:9.3f} ms  "
              f"proxy_attention(default config{', dense' if dense_path else ''}) {dflt_ms:9.3f} ms = "
              f"{dflt_ms / dense_ms:.2f}x cuDNN's time", flush=True)
        mass = dense_out = None
        for (g, gamma, st), cfg in cfgs.items():
            G = cfg.proxy_heads(hq, hkv)
            out, sel = pa.proxy_attention(q, k, v, cfg, return_selection=True)
            dens = float(sel.density.mean())
            total = med[g, gamma, st]
            scale = d ** -0.5
            S = cfg.block_size

            def estimate():
                sc = OPS.proxy_block_scores(q, k, None, None, n, n, S, G, cfg.stride, scale, True)
                ks = OPS.head_budgets(q, k, None, None, n, n, S, cfg.gamma, cfg.sink_blocks, cfg.local_blocks,
                                      scale, True)
                return OPS.select_blocks(sc, ks, None, None, n, n, S, cfg.sink_blocks, cfg.local_blocks,
                                         cfg.min_budget, True)

            est = time_cold(estimate, reps, 2, flush)
            attn = time_cold(lambda: OPS.block_sparse_attention(q, k, v, sel.counts, sel.indices, None, None, n, n, S,
                                                                scale, True), reps, 2, flush)
            extra = dict(proxy_heads=G, gamma=cfg.gamma, stride=st, min_budget=cfg.min_budget, share=a.share,
                         needle_rows_before=a.needle_rows_before, speedup_vs_cudnn=dense_ms / total)
            cases.append(dict(name="proxy_attention", **common, density=dens, ms=total,
                              tflops=dens * flops / total / 1e9, **extra))
            cases.append(dict(name="estimate", **common, density=dens, ms=est, tflops=None, **extra))
            cases.append(dict(name="bsa", **common, density=dens, ms=attn, tflops=dens * flops / attn / 1e9, **extra))
            line = (f"{kind:10s} N={n:7d} G={G} gamma={gamma} stride={st}: proxy_attention {total:9.3f} ms "
                    f"(estimate {est:.3f} + attention {attn:.3f}) density {dens:.3f}  {dense_ms / total:5.2f}x cuDNN")
            if n in a.quality_at and kind == "structured":
                if mass is None:  # once per length, shared by the variants
                    mass, dense_out = metrics.block_mass(q, k, S), dense_attention(q, k, v)
                res = metrics.evaluate_selection(q, k, v, sel.counts, sel.indices, S, mass=mass, dense_out=dense_out,
                                                 needles=meta)
                cases[-3].update(recall=res["recall"], recall_min_head=res["recall_min_head"],
                                 rel_error=res["rel_error"], needle_retrieval=res.get("needle_retrieval"))
                line += (f"  recall {res['recall']:.3f} (min head {res['recall_min_head']:.3f}) "
                         f"needles {res.get('needle_retrieval')} rel.err {res['rel_error']:.3f}")
            print(line, flush=True)
            if total > 1.05 * dense_ms:
                crossover[kind, g, gamma, st] = None
            elif crossover[kind, g, gamma, st] is None:
                crossover[kind, g, gamma, st] = n
            del out, sel
        del q, k, v, qt, ke, ve, mass, dense_out
        torch.cuda.empty_cache()
    for (kind, g, gamma, st), n in crossover.items():
        print(f"{kind} inputs, G={'default' if g is None else g} gamma={gamma} stride={st}: sparse path within 5% of cuDNN "
              f"from N = {n} on (of the lengths measured)")
    print("wrote", write_record(cases, "e2e", a.out))


if __name__ == "__main__":
    main()
