"""The candidate and forced key blocks of a query block, written from the words of the design's
stage 3 (docs/design.md), independently of proxyattn.reference, so that tests check the library
against the rule rather than against itself.

Causal attention is aligned bottom-right: query row r of a sequence with Nq queries and Nk keys
sits at position Nk - Nq + r and sees the keys 0 .. Nk - Nq + r.
"""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def rows(m: int, nq: int, S: int) -> range:
    return range(m * S, min((m + 1) * S, nq))


def candidates(m: int, nq: int, nk: int, S: int, causal: bool = True) -> int:
    """c_m: the key blocks holding a key that some row of query block m may see are [0, c_m)."""
    nkb = cdiv(nk, S)
    if not causal:
        return nkb
    seen = [nk - nq + r for r in rows(m, nq, S) if nk - nq + r >= 0]
    return min(nkb, max(seen) // S + 1) if seen else 0


def forced(m: int, nq: int, nk: int, S: int, sink: int, local: int, causal: bool = True) -> set:
    """The sink blocks 0 .. sink-1, and the local blocks: every key block holding the own position
    of some row of block m, plus local - 1 blocks before the earliest of them (non-causal: the last
    `local` candidates); all clipped to the candidates."""
    c = candidates(m, nq, nk, S, causal)
    out = set(range(min(sink, c)))
    if local > 0:
        if causal:
            own = {(nk - nq + r) // S for r in rows(m, nq, S) if nk - nq + r >= 0}
            if own:
                out |= set(range(max(0, min(own) - (local - 1)), max(own) + 1))
        else:
            out |= set(range(max(0, c - local), c))
    return {n for n in out if n < c}


def budget(m: int, last: int, nq: int, nk: int, S: int, sink: int, local: int, kstar: int, min_budget: int,
           causal: bool = True) -> int:
    """k_m: min(c_m, max(f_m + ceil(kstar' (c_m - f_m) / (c_last - f_last)), ceil(min_budget / S))),
    kstar' = kstar clamped into [0, c_last - f_last]; the second term 0 when c_last == f_last."""
    c, f = candidates(m, nq, nk, S, causal), len(forced(m, nq, nk, S, sink, local, causal))
    cl, fl = candidates(last, nq, nk, S, causal), len(forced(last, nq, nk, S, sink, local, causal))
    ks = min(max(kstar, 0), cl - fl)
    extra = cdiv(ks * (c - f), cl - fl) if cl > fl else 0
    return min(c, max(f + extra, cdiv(min_budget, S)))
