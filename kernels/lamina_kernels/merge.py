"""Exact merge of partial attention results (DESIGN.md s4): the one implementation.

Every shard returns (o, lse) over its own tokens; the merged result equals attention
over the union of the tokens:

    m = max_s lse_s,  w_s = exp(lse_s - m),  o = sum_s w_s o_s / sum_s w_s,
    lse = m + log(sum_s w_s)

A shard with lse = -inf saw no token and gets weight exactly 0 (exp(-inf) = 0), so
its o (zeros by contract, but not trusted) never leaks in. A row that no shard saw
is an error, never a NaN.

`merge_partials` is the general form the compute side uses: each partial covers some
rows (possibly repeated: several shards of one sequence answered in one request) and a
range of query heads. `merge` is the aligned case (every shard covers every row).
"""

import numpy as np


def merge_partials(num_rows: int, num_heads: int, head_dim: int, parts) -> tuple[np.ndarray, np.ndarray]:
    """Merge partials into (out float32 [num_rows, num_heads, head_dim], lse float32 [num_rows, num_heads]).

    parts: iterable of (rows, h0, h1, o, lse): rows int64 [R] (None: all rows 0..num_rows-1 in
    order; repeats allowed), query heads [h0, h1), o float32 [R, h1-h0, head_dim], lse float32
    [R, h1-h0] (natural log of the softmax sum). Raises ValueError on a shape mismatch, a NaN lse,
    or a (row, head) whose lse is -inf in every partial (or that no partial covers).
    """
    m = np.full((num_rows, num_heads), -np.inf, np.float32)
    checked = []
    for rows, h0, h1, o, lse in parts:
        o = np.asarray(o, dtype=np.float32)
        lse = np.asarray(lse, dtype=np.float32)
        r = num_rows if rows is None else len(rows)
        if o.shape != (r, h1 - h0, head_dim) or lse.shape != (r, h1 - h0) or not 0 <= h0 < h1 <= num_heads:
            raise ValueError(f"partial shapes: out {o.shape}, lse {lse.shape}, expected {(r, h1 - h0, head_dim)} "
                             f"and {(r, h1 - h0)} for heads [{h0}, {h1}) of {num_heads}")
        if np.isnan(lse).any():
            raise ValueError("lse contains NaN")
        rows = np.arange(num_rows) if rows is None else np.asarray(rows, np.int64)
        # ufunc.at: a row repeated inside one partial merges like rows of different partials.
        np.maximum.at(m, (rows[:, None], np.arange(h0, h1)[None, :]), lse)
        checked.append((rows, h0, h1, o, lse))
    if np.isneginf(m).any():
        t, h = np.argwhere(np.isneginf(m))[0]
        raise ValueError(f"row (token {t}, head {h}) has lse = -inf in every shard")
    num = np.zeros((num_rows, num_heads, head_dim), np.float32)
    den = np.zeros((num_rows, num_heads), np.float32)
    for rows, h0, h1, o, lse in checked:
        w = np.exp(lse - m[rows, h0:h1])  # lse = -inf (an empty shard) gives weight exactly 0
        # Skip the multiply where the weight is 0 so a garbage (even NaN) o of an empty shard
        # cannot poison the sum.
        wo = np.where(w[..., None] > 0, w[..., None] * o, np.float32(0))
        np.add.at(num[:, h0:h1], rows, wo)
        np.add.at(den[:, h0:h1], rows, w)
    return num / den[..., None], (m + np.log(den)).astype(np.float32)


def merge(outs, lses):
    """Merge aligned shards: outs list of [T, H, D] float32, lses list of [T, H] float32.

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
    t, h, d = shape
    return merge_partials(t, h, d, [(None, 0, h, o, s) for o, s in zip(outs, lses)])
