"""Exact merge of partial attention results (DESIGN.md s4).

Every shard returns (o, lse) over its own tokens; the merged result equals attention
over the union of the tokens:

    m = max_s lse_s,  w_s = exp(lse_s - m),  o = sum_s w_s o_s / sum_s w_s,
    lse = m + log(sum_s w_s)

A shard with lse = -inf saw no token and gets weight exactly 0 (exp(-inf) = 0), so
its o (zeros by contract, but not trusted) never leaks in. A row that no shard saw
is an error, never a NaN.
"""

import numpy as np


def merge(outs, lses):
    """Merge shards: outs list of [T, H, D] float32, lses list of [T, H] float32.

    Returns (out [T, H, D] float32, lse [T, H] float32). Raises ValueError on shape
    mismatch, an empty list, or a row whose lse is -inf in every shard.
    """
    if len(outs) == 0 or len(outs) != len(lses):
        raise ValueError(f"need one lse per output and at least one shard "
                         f"(got {len(outs)} outputs, {len(lses)} lses)")
    shape = np.shape(outs[0])
    for o, s in zip(outs, lses):
        if np.shape(o) != shape or np.shape(s) != shape[:-1]:
            raise ValueError(f"shard shapes differ: out {np.shape(o)}, lse {np.shape(s)}, "
                             f"expected {shape} and {shape[:-1]}")
    s = np.stack([np.asarray(x, dtype=np.float32) for x in lses])  # [S, T, H]
    m = s.max(axis=0)
    if np.isneginf(m).any():
        t, h = np.argwhere(np.isneginf(m))[0]
        raise ValueError(f"row (token {t}, head {h}) has lse = -inf in every shard")
    if np.isnan(m).any():
        raise ValueError("lse contains NaN")
    w = np.exp(s - m)  # [S, T, H]; -inf shards give exactly 0
    wsum = w.sum(axis=0)
    w /= wsum  # normalise the weights once instead of dividing the [T, H, D] result
    out = np.zeros(shape, np.float32)
    for k, o in enumerate(outs):
        # Skip the multiply where the weight is 0 so a garbage (even NaN) o of an
        # empty shard cannot poison the sum.
        wk = w[k][..., None]
        out += np.where(wk > 0, wk * np.asarray(o, dtype=np.float32), np.float32(0))
    return out, (m + np.log(wsum)).astype(np.float32)
