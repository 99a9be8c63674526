"""Which dense attention proxy_attention should run below dense_below, measured per length.

    python3 bench/bench_dense_path.py [--seq-lens 1024 2048 4096 8192 16384 32768]

B=1, Hq=32, Hkv=8, D=128 (and --head-dim), bf16, causal, fresh random inputs. Times, in one
process with cold L2:
  sdpa_cudnn            cuDNN SDPA on KV expanded to Hq heads (expansion not timed; the anchor)
  sdpa_cudnn_expand     the same with the KV expansion inside the timed region
  sdpa_cudnn_gqa        cuDNN SDPA with enable_gqa=True (skipped if this torch refuses it)
  sdpa_default          SDPA with enable_gqa=True and the backend torch picks
  bsa_full              block_sparse_attention on every causal block (our kernel, dense)
Writes the DESIGN section 6 JSON (tag dense-path).
"""
import argparse
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import proxyattn  # noqa: F401  (registers torch.ops.proxyattn)
from benchlib import causal_tflops, l2_flush_buffer, time_cold, write_record
from proxyattn.attention import full_selection


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=20)
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

        def cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(qt, ke, ve, is_causal=True)

        def cudnn_expand():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(qt, kt.repeat_interleave(hq // hkv, 1),
                                                      vt.repeat_interleave(hq // hkv, 1), is_causal=True)

        def cudnn_gqa():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)

        def default():
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)

        nq = torch.full((1,), n, device="cuda", dtype=torch.int64)
        counts, idx = full_selection(nq, nq, -(-n // 128), -(-n // 128), hq, 128, True)

        def bsa_full():
            return torch.ops.proxyattn.block_sparse_attention(q, k, v, counts, idx, None, None, n, n, 128, d ** -0.5,
                                                              True)

        for name, fn in (("sdpa_cudnn", cudnn), ("sdpa_cudnn_expand", cudnn_expand), ("sdpa_cudnn_gqa", cudnn_gqa),
                         ("sdpa_default", default), ("bsa_full", bsa_full)):
            try:
                ms = time_cold(fn, a.reps, 3, flush)
            except RuntimeError as e:
                print(f"N={n:6d} {name}: refused ({str(e).splitlines()[0][:100]})")
                continue
            res[name] = ms
            cases.append(dict(name=name, **common, ms=ms, tflops=flops / ms / 1e9))
        print(f"N={n:6d} " + "  ".join(f"{k_} {v_:.3f} ms ({v_ / res['sdpa_cudnn']:.2f}x)" for k_, v_ in res.items()),
              flush=True)
    print("wrote", write_record(cases, "dense-path", a.out))


if __name__ == "__main__":
    main()
