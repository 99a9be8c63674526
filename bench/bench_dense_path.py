"""Which dense attention proxy_attention should run below dense_below, measured per length.

    python3 bench/bench_dense_path.py [--seq-lens 1024 2048 4096 8192 16384 32768]

B=1, Hq=32, Hkv=8, D=128 (and --head-dim), bf16, causal, fresh random inputs. Times, in one
process with cold L2:
  sdpa_cudnn            cuDNN SDPA on KV expanded to Hq heads (expansion not timed; the anchor)
  sdpa_cudnn_expand     the same with the KV expansion inside the timed region
  sdpa_cudnn_gqa        cuDNN SDPA with enable_gqa=True (skipped if this torch refuses it)
  sdpa_default          SDPA with enable_gqa=True and the backend torch picks
  bsa_full              block_sparse_attention on every causal block (our kernel, dense)
  proxy_attention       proxy_attention with the default config (the dense path below dense_below)
  flash_direct, cudnn_direct   the aten flash / cuDNN SDPA ops called directly on the GQA views
                        (no backend selection; skipped if this torch refuses GQA there)
Every case also reports its host time per call (launches queued behind a GPU sleep, so the host
never waits) and, with --kernels, the kernels one call launches (torch.profiler).
Writes the docs/design.md section 6 JSON (tag dense-path).
"""
import argparse
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import proxyattn as pa
from benchlib import causal_tflops, compare_outputs, kernel_list, l2_flush_buffer, time_cold, write_record
from proxyattn.attention import full_selection


def host_us(fn, calls: int = 50) -> float:
    """Host microseconds per call, with the launches queued behind a GPU sleep (the host never waits)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # ~0.1 s on a ~2 GHz GPU: longer than the calls take to issue
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--kernels", action="store_true", help="list the kernels each case launches")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_dense_path.py needs a CUDA GPU")
    hq, hkv, d = 32, 8, a.head_dim
    flush = l2_flush_buffer()
    cases = []
    for n in a.seq_lens:
        g = torch.Generator(device="cuda").manual_seed(n)
        q = torch.randn(1, n, hq, d, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(1, n, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(1, n, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g)
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        ke, ve = kt.repeat_interleave(hq // hkv, 1), vt.repeat_interleave(hq // hkv, 1)
        common = dict(seq_len=n, batch=1, q_heads=hq, kv_heads=hkv, head_dim=d, dtype="bf16", density=1.0)
        flops = causal_tflops(n, n, hq, d)
        res = {}

        # The backend context is entered outside the timed region (timing it would add its own
        # host time, tens of microseconds, to the cuDNN numbers).
        def cudnn():
            return F.scaled_dot_product_attention(qt, ke, ve, is_causal=True)

        def cudnn_expand():
            return F.scaled_dot_product_attention(qt, kt.repeat_interleave(hq // hkv, 1),
                                                  vt.repeat_interleave(hq // hkv, 1), is_causal=True)

        def cudnn_gqa():
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)

        def default():
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)

        nq = torch.full((1,), n, device="cuda", dtype=torch.int64)
        counts, idx = full_selection(nq, nq, -(-n // 128), -(-n // 128), hq, 128, True)

        def bsa_full():
            return torch.ops.proxyattn.block_sparse_attention(q, k, v, counts, idx, None, None, n, n, 128, d ** -0.5,
                                                              True)

        cfg = pa.ProxyAttnConfig()
        scale = d ** -0.5

        def proxy():
            return pa.proxy_attention(q, k, v, cfg)

        def flash_direct():
            return torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, True, False, scale=scale)[0]

        def cudnn_direct():
            return torch.ops.aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, False, 0.0, True, False,
                                                                      scale=scale)[0]

        def cudnn_ctx():
            return sdpa_kernel(SDPBackend.CUDNN_ATTENTION)

        for name, fn, ctx in (("sdpa_cudnn", cudnn, cudnn_ctx), ("sdpa_cudnn_expand", cudnn_expand, cudnn_ctx),
                              ("sdpa_cudnn_gqa", cudnn_gqa, cudnn_ctx), ("sdpa_default", default, nullcontext),
                              ("bsa_full", bsa_full, nullcontext), ("proxy_attention", proxy, nullcontext),
                              ("flash_direct", flash_direct, nullcontext), ("cudnn_direct", cudnn_direct, nullcontext)):
            try:
                with ctx():
                    out = fn()
                    out = out[0] if isinstance(out, tuple) else out
                    if name in ("flash_direct", "cudnn_direct"):  # a refused GQA shape must not pass silently
                        ref = F.scaled_dot_product_attention(qt, ke, ve, is_causal=True)
                        res = compare_outputs(out, ref, f"{name} at N={n}")  # a NaN raises, read as refused
                        if not res.agrees:
                            raise RuntimeError(f"wrong result ({res.describe()})")
                    ms = time_cold(fn, a.reps, 3, flush)
                    host = host_us(fn)
                    kernels = kernel_list(fn) if a.kernels else None
            except RuntimeError as e:
                print(f"N={n:6d} {name}: refused ({str(e).splitlines()[0][:100]})")
                continue
            res[name] = ms
            more = {}
            if name == "proxy_attention":  # from dense_below on it runs sparse: its own density
                more["dense_path"] = cfg.runs_dense(n)
                if not more["dense_path"]:
                    more["density"] = float(pa.proxy_attention(q, k, v, cfg, return_selection=True)[1].density.mean())
            dens = more.get("density", 1.0)
            cases.append(dict(name=name, **{**common, **more}, ms=ms, tflops=dens * flops / ms / 1e9, host_us=host,
                              out_strides=list(out.stride())))
            if kernels:
                cases[-1]["kernels"] = kernels
                print(f"N={n:6d} {name}: host {host:.1f} us/call, kernels: " +
                      "; ".join(f"{kn[:70]} {us:.1f} us" for kn, us in kernels), flush=True)
        host = {c["name"]: c["host_us"] for c in cases if c["seq_len"] == n}
        print(f"N={n:6d} " + "  ".join(f"{k_} {v_:.3f} ms ({v_ / res['sdpa_cudnn']:.2f}x, host {host[k_]:.0f} us)"
                                       for k_, v_ in res.items()),
              flush=True)
    print("wrote", write_record(cases, "dense-path", a.out))


if __name__ == "__main__":
    main()
