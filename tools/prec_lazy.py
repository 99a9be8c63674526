"""Output error of block_sparse_attention against an fp64 truth for lazy-rescaling thresholds.

    python3 tools/prec_lazy.py OUT.json      (on a GPU; the thresholds matter on sm_90 only)

bf16, B=1, N=4096, Hq=8, Hkv=2, D=128, block 128, every causal block selected; q scaled by 1, 2
and 4 (sharper rows). For each: (max-abs error, relative Frobenius error) of torch's bf16 SDPA, of
the op with PROXYATTN_BSA_SM90_LAZY = 0, 1, 2, 8, and of the portable kernel
(PROXYATTN_BSA_FORCE_SM80=1). Prints one line per sharpness and writes the list as JSON.
"""
import json
import os
import sys

import torch
import torch.nn.functional as F

import proxyattn  # noqa: F401  (registers the ops)

B, N, HQ, HKV, D, S = 1, 4096, 8, 2, 128, 128
GROUP = HQ // HKV
nqb = N // S
counts = torch.arange(1, nqb + 1, dtype=torch.int32, device="cuda").view(1, 1, nqb).expand(B, HQ, nqb).contiguous()
indices = torch.arange(nqb, dtype=torch.int32, device="cuda").view(1, 1, 1, nqb).expand(B, HQ, nqb, nqb).contiguous()


def run_op(q, k, v):
    return torch.ops.proxyattn.block_sparse_attention(q, k, v, counts, indices, None, None, N, N, S, D ** -0.5,
                                                      True)[0]


def error(o, truth):
    """(max-abs error, relative Frobenius error) of o against truth."""
    e = o.double() - truth
    return round(e.abs().max().item(), 6), round((e.norm() / truth.norm()).item(), 7)


res = []
for sharp in (1.0, 2.0, 4.0):
    g = torch.Generator(device="cuda").manual_seed(int(sharp * 10))
    q = (sharp * torch.randn(B, N, HQ, D, generator=g, device="cuda")).bfloat16()
    k = torch.randn(B, N, HKV, D, generator=g, device="cuda").bfloat16()
    v = torch.randn(B, N, HKV, D, generator=g, device="cuda").bfloat16()
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, N, D]
    kh, vh = kh.repeat_interleave(GROUP, 1), vh.repeat_interleave(GROUP, 1)
    truth = F.scaled_dot_product_attention(qh.double(), kh.double(), vh.double(), is_causal=True).transpose(1, 2)
    row = {"sharp": sharp}
    row["torch_sdpa_bf16"] = error(F.scaled_dot_product_attention(qh, kh, vh, is_causal=True).transpose(1, 2), truth)
    for lz in ("0", "1", "2", "8"):
        os.environ["PROXYATTN_BSA_SM90_LAZY"] = lz
        row["lazy" + lz] = error(run_op(q, k, v), truth)
    os.environ.pop("PROXYATTN_BSA_SM90_LAZY")
    os.environ["PROXYATTN_BSA_FORCE_SM80"] = "1"
    row["sm80"] = error(run_op(q, k, v), truth)
    os.environ.pop("PROXYATTN_BSA_FORCE_SM80")
    print(row, flush=True)
    res.append(row)
json.dump(res, open(sys.argv[1], "w"), indent=1)
