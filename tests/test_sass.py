"""The sm_90a code of the compiled extension, read with cuobjdump (no GPU needed; runs in CI).

Stage 1 of the estimate has one Hopper kernel per head dim and key-block width (scores_sm90_kernel:
wgmma, no local memory). The extension holds exactly the persistent Hopper attention kernel bsa_fwd_sm90_persistent_kernel
for bf16/fp16 x D = 64/128 x contiguous/paged K/V (csrc/kernels/bsa_sm90/; the two differ only in
the loader). Each
must use wgmma (HGMMA) and TMA loads (UTMALDG), and keep an instruction order that ptxas chooses:
at D = 128 the softmax of key tile j (64 MUFU.EX2 per thread at block size 128) has to sit between the wait
for S_j = Q K_j^T (WARPGROUP.DEPBAR.LE gsb0, 0x1) and the wait for the P V wgmma of tile j - 1 (the
next WARPGROUP.DEPBAR), or it runs after that P V instead of beside it. ptxas once moved the
kernel's second wait above all the exponentials, with every other test still passing (bench/NOTES.md,
"Fence fix: the softmax back beside P V"); this test catches it. At D = 64 (two CTAs per SM,
64 x 64 score tiles, each P V done before the next S) no wgmma may be left in flight by a wait.

Fails when the extension was built for sm_90a (PROXYATTN_ARCHS, default "80;90a", the variable the
build reads) but holds no sm_90a code or not exactly the expected kernels. Skips, printing why, only
when no cuobjdump is found (PATH, CUDA_HOME/bin, or the copy Triton ships), when the extension is not
built, or when PROXYATTN_ARCHS excludes 90a and the build holds no sm_90a code.
"""
import importlib.util
import os
import re
import shutil
import subprocess

import pytest

EXP_PER_TILE = 64  # exponentials per consumer thread per 64 x 128 score tile
EXPECTED_KERNELS = {(dtype, d, paged) for dtype in ("bfloat16_t", "half_t") for d in (64, 128) for paged in (0, 1)}


def _skip(reason):
    print(f"test_sass skipped: {reason}")
    pytest.skip(reason)


def _cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "cuobjdump")):
        return os.path.join(home, "bin", "cuobjdump")
    spec = importlib.util.find_spec("triton")
    if spec and spec.origin:
        path = os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(path):
            return path
    return None


def _build_wants_sm90a():
    archs = [a.strip() for a in os.environ.get("PROXYATTN_ARCHS", "80;90a").split(";") if a.strip()]
    return "90a" in archs


def _kernel_key(name):
    """(dtype, head dim, paged) of a mangled bsa_fwd_sm90_persistent_kernel name, e.g.
    ..._persistent_kernelINS0_10Sm90TraitsIN7cutlass10bfloat16_tELi128EEELb0EEEv..."""
    m = re.search(r"Sm90TraitsIN7cutlass\d+(bfloat16_t|half_t)ELi(\d+)EEELb([01])E", name)
    return (m.group(1), int(m.group(2)), int(m.group(3))) if m else None


@pytest.fixture(scope="module")
def sass_functions():
    """{mangled name: SASS text} of every kernel in the extension's sm_90a code."""
    try:
        spec = importlib.util.find_spec("proxyattn._C")
    except ImportError:
        spec = None
    if spec is None or not spec.origin:
        _skip("the extension proxyattn._C is not built: nothing to read")
    tool = _cuobjdump()
    if tool is None:
        _skip("no cuobjdump (PATH, CUDA_HOME/bin or Triton's copy)")
    elf = subprocess.run([tool, "-lelf", spec.origin], capture_output=True, text=True, timeout=600)
    assert elf.returncode == 0, f"cuobjdump -lelf failed: {elf.stderr[-2000:]}"
    archs = set(re.findall(r"\bsm_(\d+a?)\b", elf.stdout))
    if "90a" not in archs:
        if not _build_wants_sm90a():
            _skip(f"the build excluded 90a (PROXYATTN_ARCHS={os.environ.get('PROXYATTN_ARCHS')}; "
                  f"device code for sm_{', sm_'.join(sorted(archs))})")
        pytest.fail(f"the extension holds no sm_90a code (device code for: {sorted(archs)}), but "
                    f"PROXYATTN_ARCHS={os.environ.get('PROXYATTN_ARCHS', '80;90a (default)')} asks for 90a; "
                    "rebuild, or set PROXYATTN_ARCHS to what the build used")
    run = subprocess.run([tool, "-sass", "-arch", "sm_90a", spec.origin], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, f"cuobjdump -sass failed: {run.stderr[-2000:]}"
    functions = {}
    for part in re.split(r"\n\s*Function : ", run.stdout)[1:]:
        name, _, body = part.partition("\n")
        functions[name.strip()] = body
    return functions


@pytest.fixture(scope="module")
def sm90_sass(sass_functions):
    """{mangled name: SASS text} of the extension's sm_90a Hopper kernels (attention, stages 1 and 2)."""
    return {n: b for n, b in sass_functions.items()
            if "bsa_fwd_sm90" in n or "scores_sm90" in n or "probe_sm90" in n}


@pytest.fixture(scope="module")
def sm90_functions(sm90_sass):
    """{mangled name: SASS text} of the Hopper attention kernels."""
    return {n: b for n, b in sm90_sass.items() if "bsa_fwd_sm90" in n}


def _opcodes(body):
    """The instructions of a SASS listing, one string each, predicate and address stripped."""
    out = []
    for line in body.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(.*?)\s*;", line)
        if m:
            out.append(re.sub(r"^@!?U?P\w+\s+", "", m.group(1)))
    return out


def _exp_between_waits(ops):
    """For each wait for all but one wgmma group: the MUFU.EX2 count up to the next wgmma wait."""
    counts = []
    for i, op in enumerate(ops):
        if re.fullmatch(r"WARPGROUP\.DEPBAR\.LE gsb0, 0x1", op):
            n = 0
            for nxt in ops[i + 1:]:
                if nxt.startswith("WARPGROUP.DEPBAR"):
                    break
                n += nxt.startswith("MUFU.EX2")
            counts.append(n)
    return counts


def test_parser_on_a_known_listing():
    """The helpers on hand-written listings: one overlapped tile, one whose wait was hoisted, and
    the kernel names of the instantiations."""
    good = "\n".join(["        /*0010*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;",
                      "        /*0020*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;"]
                     + [f"        /*{0x30 + 16 * i:04x}*/                   MUFU.EX2 R{i}, R{i} ;" for i in range(64)]
                     + ["        /*0500*/              @!P0 WARPGROUP.DEPBAR.LE gsb0, 0x0 ;"])
    hoisted = good.replace("WARPGROUP.DEPBAR.LE gsb0, 0x0", "FADD R1, R1, R2").replace(
        "WARPGROUP.DEPBAR.LE gsb0, 0x1 ;", "WARPGROUP.DEPBAR.LE gsb0, 0x1 ;\n        /*0025*/   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;")
    assert _exp_between_waits(_opcodes(good)) == [64]
    assert _exp_between_waits(_opcodes(hoisted)) == [0]
    name = ("_ZN9proxyattn8bsa_sm9030bsa_fwd_sm90_persistent_kernelINS0_10Sm90TraitsIN7cutlass10bfloat16_t"
            "ELi128EEELb0EEEvNS0_12KernelParamsIT_EE")
    assert _kernel_key(name) == ("bfloat16_t", 128, 0)
    assert _kernel_key(name.replace("10bfloat16_tELi128EEELb0", "6half_tELi64EEELb1")) == ("half_t", 64, 1)


# Instructions that reach global memory: loads, stores, atomics and reductions (global or generic
# addressing), cp.async and the TMA / bulk copies.
_GLOBAL_ACCESS = re.compile(r"(LDG|STG|ATOMG?|RED|LDGSTS|UTMA\w*|UBLKCP|LD|ST)\b")


def _first_global_access_after_wait(ops):
    """None if the dependent-launch wait (griddepcontrol.wait, SASS ACQBULK) comes before the first
    global memory access in listing order, or the kernel has none; else that access."""
    for op in ops:
        if op.startswith("ACQBULK"):
            return None
        if _GLOBAL_ACCESS.match(op):
            return op
    return None


def test_parser_of_the_dependent_launch_wait():
    ok = ["LDC R1, c[0x0][0x28]", "ACQBULK", "LDG.E R2, desc[UR4][R2.64]"]
    assert _first_global_access_after_wait(ok) is None
    assert _first_global_access_after_wait(["STG.E desc[UR4][R2.64], R0", "ACQBULK"]) == "STG.E desc[UR4][R2.64], R0"
    assert _first_global_access_after_wait(["LDS R0, [R1]", "LDSM.16.M88.4 R4, [R2]", "ST.E [R2.64], R0"]) == \
        "ST.E [R2.64], R0"
    assert _first_global_access_after_wait(["LDS R0, [R1]", "STS [R1], R0", "LDC R2, c[0x0][0x0]"]) is None


def test_every_kernel_waits_for_its_predecessor(sass_functions):
    """Each kernel is launched chained to the one before it (programmatic dependent launch,
    csrc/kernels/common/chained_launch.cuh), so in the sm_90a code of every kernel that touches
    global memory the wait for the previous grid comes first in the listing: ptxas may not hoist a
    load of the previous kernel's output above it."""
    kernels = {n: _opcodes(b) for n, b in sass_functions.items()}
    touching = {n: ops for n, ops in kernels.items() if any(_GLOBAL_ACCESS.match(op) for op in ops)}
    assert len(touching) >= len(EXPECTED_KERNELS) + 10, sorted(touching)
    early = {n: _first_global_access_after_wait(ops) for n, ops in touching.items()}
    early = {n: op for n, op in early.items() if op is not None}
    assert not early, f"global memory access before the dependent-launch wait: {early}"


def test_exactly_the_persistent_kernels(sm90_functions):
    """The persistent kernel per (dtype, head dim) and K/V layout (contiguous, paged), nothing else."""
    others = sorted(n for n in sm90_functions if "bsa_fwd_sm90_persistent_kernel" not in n)
    assert not others, f"Hopper attention kernels other than the persistent one: {others}"
    keys = sorted((_kernel_key(n) for n in sm90_functions), key=str)  # None (a name that does not parse) sorts too
    assert None not in keys and len(keys) == len(set(keys)), f"unexpected kernels: {sorted(sm90_functions)}"
    assert set(keys) == EXPECTED_KERNELS, f"expected {sorted(EXPECTED_KERNELS)}, found {keys}"


def test_hopper_kernels_use_hgmma(sm90_functions):
    assert sm90_functions, "no Hopper attention kernel in the sm_90a code"
    for name, body in sm90_functions.items():
        assert "HGMMA" in body, f"{name}: no HGMMA in its sm_90a code"
        assert "UTMALDG" in body, f"{name}: no TMA load (UTMALDG) in its sm_90a code"


def test_softmax_overlaps_the_pv_wgmma(sm90_functions):
    """D = 128 (one CTA per SM): each tile's softmax beside the previous tile's P V. D = 64 (two CTAs
    per SM, 64 x 64 score tiles, P V done before the next S): no wait that leaves a wgmma in flight,
    and a tile's 32 exponentials per thread after the wait for its S."""
    assert len(sm90_functions) == len(EXPECTED_KERNELS), f"found {sorted(sm90_functions)}"
    for name, body in sm90_functions.items():
        if _kernel_key(name)[1] == 64:
            ops = _opcodes(body)
            assert not any(re.fullmatch(r"WARPGROUP\.DEPBAR\.LE gsb0, 0x1", op) for op in ops), name
            waits = [i for i, op in enumerate(ops) if op.startswith("WARPGROUP.DEPBAR")]
            after = [sum(op.startswith("MUFU.EX2") for op in ops[w:min([j for j in waits if j > w], default=len(ops))])
                     for w in waits]
            assert sum(n >= EXP_PER_TILE // 2 for n in after) >= 3, (name, after)
            continue
        counts = _exp_between_waits(_opcodes(body))
        # the steady-state loop and the item-boundary branch each overlap one tile's softmax
        assert len(counts) >= 2, f"{name}: expected two overlapped loops, found waits {counts}"
        for n in counts:
            assert n >= EXP_PER_TILE, (f"{name}: only {n} MUFU.EX2 between the wait for S and the wait for "
                                       f"the previous P V (expected >= {EXP_PER_TILE}; waits: {counts})")


def test_stage1_hopper_kernel(sm90_sass):
    """Stage 1's Hopper kernel (csrc/kernels/estimate/proxy_scores_sm90.cuh), one per (head dim, kept
    keys per key block S/s in 8 .. 128): its logits on wgmma in both 16-bit types (64 x 128 x 16
    HGMMA, fp16 and bf16: the type is chosen per (b, group) at run time, and the tile loop is
    instantiated per type), D / 16 of each per 128-key tile, no local memory (a spill would sit in the
    per-tile loop), one wgmma wait per type, and after each wait the tile's exponentials (64 logits
    per thread, taken ahead of the tile's maxima and again in each of online_rows' two frames)
    before the next wgmma."""
    kernels = {}
    for name, body in sm90_sass.items():
        m = re.search(r"scores_sm90_kernelILi(\d+)ELi(\d+)E", name)
        if m:
            kernels[(int(m.group(1)), int(m.group(2)))] = _opcodes(body)
    want = sorted((d, kb) for d in (64, 128) for kb in (8, 16, 32, 64, 128))
    assert sorted(kernels) == want, f"expected scores_sm90_kernel<D, S/s> for {want}, found {sorted(kernels)}"
    for (d, kb), ops in kernels.items():
        what = f"scores_sm90_kernel<{d}, {kb}>"
        fp16 = [op for op in ops if re.match(r"HGMMA\.64x128x16\.F32 ", op)]
        bf16 = [op for op in ops if re.match(r"HGMMA\.64x128x16\.F32\.BF16 ", op)]
        assert len(fp16) == len(bf16) == d // 16, (what, len(fp16), len(bf16))
        _check_math_beside_wgmma(ops, what, waits=2, math_waits=0)
        _check_math_after_waits(ops, what, 128)
        _check_weights_before_vote(ops, what, 64)


def _check_weights_before_vote(ops, what, exps_min):
    """After each wgmma wait, at least exps_min exponentials before the branch on the warp's vote
    (the tile's weights taken ahead of its maxima in the rows' lazy frames): not sunk into the
    branch that keeps them, behind the maxima."""
    for w in (i for i, op in enumerate(ops) if op.startswith("WARPGROUP.DEPBAR")):
        vote = next((i for i in range(w, len(ops)) if ops[i].startswith("VOTE.ANY")), None)
        assert vote is not None, f"{what}: no warp vote after a wgmma wait"
        bra = next((i for i in range(vote, len(ops)) if ops[i].startswith("BRA")), len(ops))
        exps = sum(op.startswith("MUFU.EX2") for op in ops[w:bra])
        assert exps >= exps_min, (f"{what}: {exps} exponentials before the branch on the frame vote, expected "
                                  f"the {exps_min} taken ahead of the tile's maxima")


def _check_math_after_waits(ops, what, exps_min):
    """After each wgmma wait, at least exps_min exponentials before the next wgmma: the tile's own
    (64 logits per thread) in each of the row work's frames."""
    hgmma = [i for i, op in enumerate(ops) if op.startswith("HGMMA")]
    for w in (i for i, op in enumerate(ops) if op.startswith("WARPGROUP.DEPBAR")):
        nxt = min([i for i in hgmma if i > w], default=len(ops))
        exps = sum(op.startswith("MUFU.EX2") for op in ops[w:nxt])
        assert exps >= exps_min, (f"{what}: {exps} exponentials after a wgmma wait, expected the tile's 64 "
                                  "in each of the row work's frames")


def _check_math_beside_wgmma(ops, what, waits=1, math_waits=1):
    """A kernel of the estimate's Hopper loop: no local memory (a spill would sit in the per-tile
    loop), `waits` wgmma waits, and at `math_waits` of them the previous tile's exponentials (32
    logits per thread) between the last wgmma before the wait and the wait."""
    local = [op for op in ops if op.split()[0] in ("STL", "LDL") or op.startswith(("STL.", "LDL."))]
    assert not local, f"{what} uses local memory: {local[:4]}"
    at = [i for i, op in enumerate(ops) if op.startswith("WARPGROUP.DEPBAR")]
    assert len(at) == waits, f"{what}: {len(at)} wgmma waits, expected {waits}"
    beside = []
    for w in at:
        issue = max(i for i in range(w) if ops[i].startswith("HGMMA"))
        beside.append(sum(op.startswith("MUFU.EX2") for op in ops[issue:w]))
    assert sum(n >= 32 for n in beside) == math_waits, (
        f"{what}: exponentials beside each wgmma {beside}, expected >= 32 at {math_waits} of the waits")


def test_stage2_hopper_probe(sm90_sass):
    """Stage 2's Hopper probe (csrc/kernels/estimate/head_budgets_sm90.cuh), one per (16-bit type, head
    dim, key copy: TMA for contiguous keys, cp.async for paged ones): D / 16 wgmma of 64 x 128 x 16
    per 128-key tile, no local memory, one wgmma wait, and after it the tile's exponentials (64 logits
    per thread, in each of probe_tile's two frames) before the next wgmma; the TMA kernels copy by
    UTMALDG with no CTA barrier in the tile loop, the paged ones by LDGSTS."""
    kernels = {}
    for name, body in sm90_sass.items():
        m = re.search(r"probe_sm90_kernelI(13__nv_bfloat16|6__half)Li(\d+)ELb([01])E", name)
        if m:
            kernels[(m.group(1), int(m.group(2)), int(m.group(3)))] = _opcodes(body)
    want = sorted((t, d, tma) for t in ("13__nv_bfloat16", "6__half") for d in (64, 128) for tma in (0, 1))
    assert sorted(kernels) == want, f"expected probe_sm90_kernel<T, D, kTma> for {want}, found {sorted(kernels)}"
    for (t, d, tma), ops in kernels.items():
        what = f"probe_sm90_kernel<{t}, {d}, {bool(tma)}>"
        hgmma = [op for op in ops if re.match(r"HGMMA\.64x128x16\.F32(\.BF16)? ", op)]
        assert len(hgmma) == d // 16, (what, len(hgmma))
        if tma:
            assert any(op.startswith("UTMALDG") for op in ops), (what, "no TMA copy")
            # one CTA barrier, for Q before the loop
            assert sum(op.startswith("BAR.SYNC") for op in ops) == 1, (what, "a CTA barrier in the tile loop")
        else:
            assert any(op.startswith("LDGSTS") for op in ops) and not any(op.startswith("UTMALDG") for op in ops), what
        _check_math_beside_wgmma(ops, what, waits=1, math_waits=0)
        _check_math_after_waits(ops, what, 128)
