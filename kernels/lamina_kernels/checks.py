"""Argument checks of the CPU kernel's entry point. The common case costs identity
tests in Python (`is_array`: native dtypes are singletons) and one jitted shape test
(`shapes_ok`, run inside the kernel's first dispatch); only when one fails does
`prepare` run the full checks, whose one-line TypeError/ValueError says what is wrong.
The blocks a call touches are checked by plan.validate.
"""

import numpy as np
from numba import njit

from .storage import check_storage

# No nnan/ninf: the running max starts at -inf and empty rows yield lse = -inf.
FASTMATH = {"reassoc", "contract", "arcp", "nsz", "afn"}
_JIT = dict(nogil=True, cache=True, error_model="numpy", fastmath=FASTMATH)


@njit(**_JIT)
def shapes_ok(q, k_new, v_new, k_pool, v_pool, block_table, table_rows, q_start, kv_start,
              context_lens, layer):
    """The shape checks of prepare() as one jitted test (they cost ~2 us in Python);
    prepare() says what is wrong when this is False."""
    d = k_pool.shape[3]
    num_kv_heads = k_new.shape[1]
    n_seq = table_rows.shape[0]
    if v_pool.shape != k_pool.shape or block_table.shape[1] < num_kv_heads:
        return False
    if q.shape[2] != d or k_new.shape[2] != d or v_new.shape != k_new.shape:
        return False
    if num_kv_heads == 0 or q.shape[1] % num_kv_heads != 0:
        return False
    if (q_start.shape[0] != n_seq + 1 or kv_start.shape[0] != n_seq + 1
        or context_lens.shape[0] != n_seq):
        return False
    if n_seq > 0 and (q_start[n_seq] != q.shape[0] or kv_start[n_seq] != k_new.shape[0]):
        return False
    return 0 <= layer < k_pool.shape[0]


def check_array(name, a, dtype, ndim):
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(a).__name__}")
    if a.dtype != dtype or a.ndim != ndim:
        raise TypeError(f"{name} must be {ndim}-d {np.dtype(dtype)}, got {a.ndim}-d {a.dtype}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")


DT = {"float32": np.dtype(np.float32), "float16": np.dtype(np.uint16),
      "bfloat16": np.dtype(np.uint16)}
I32 = np.dtype(np.int32)


def is_array(a, dt, ndim):
    """The common case of check_array, cheaply: native dtypes are singletons (`is`)."""
    return type(a) is np.ndarray and a.dtype is dt and a.ndim == ndim and a.flags.c_contiguous


def prepare(q, k_new, v_new, k_pool, v_pool, block_table, table_rows, q_start, kv_start,
            context_lens, layer, storage):
    """Check a call's arguments' types and shapes; return the int32 index arrays
    (table_rows, q_start, kv_start, context_lens).

    The blocks the call touches are checked by plan.validate (in append_attend).
    """
    dt = DT.get(storage) if type(storage) is str else None
    if dt is None:
        check_storage(storage)  # raises
    if not (is_array(q, dt, 3) and is_array(k_new, dt, 3) and is_array(v_new, dt, 3)
            and is_array(k_pool, dt, 4) and is_array(v_pool, dt, 4)):
        for name, a, nd in (("q", q, 3), ("k_new", k_new, 3), ("v_new", v_new, 3),
                            ("k_pool", k_pool, 4), ("v_pool", v_pool, 4)):
            check_array(name, a, dt, nd)
    table_rows, q_start, kv_start, context_lens = (
        a if type(a) is np.ndarray and a.dtype is I32 and a.flags.c_contiguous
        else np.ascontiguousarray(a, dtype=np.int32)
        for a in (table_rows, q_start, kv_start, context_lens))
    if not is_array(block_table, I32, 3):
        check_array("block_table", block_table, np.int32, 3)
    n_layers, n_blocks, bs, d = k_pool.shape
    if v_pool.shape != k_pool.shape:
        raise ValueError("k_pool and v_pool differ in shape")
    num_kv_heads = k_new.shape[1]
    n_seq = table_rows.shape[0]
    if block_table.shape[1] < num_kv_heads:
        raise ValueError(f"block table has {block_table.shape[1]} kv head rows, request has "
                         f"{num_kv_heads}")
    if q.shape[2] != d or k_new.shape[1:] != (num_kv_heads, d) or v_new.shape != k_new.shape:
        raise ValueError(f"shape mismatch: q {q.shape}, k_new {k_new.shape}, v_new "
                         f"{v_new.shape}, pool head_dim {d}, {num_kv_heads} local kv heads")
    if num_kv_heads == 0 or q.shape[1] % num_kv_heads:
        raise ValueError(f"{q.shape[1]} query heads is not a multiple of {num_kv_heads} kv heads")
    if (q_start.shape != (n_seq + 1,) or kv_start.shape != (n_seq + 1,)
        or context_lens.shape != (n_seq,)):
        raise ValueError("q_start/kv_start need n_seq+1 entries and context_lens n_seq")
    if n_seq and (q_start[-1] != q.shape[0] or kv_start[-1] != k_new.shape[0]):
        raise ValueError("q_start/kv_start must end at the token counts of q/k_new")
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} outside the pool's {n_layers} layers")
    return table_rows, q_start, kv_start, context_lens


def check_out(name, a, shape):
    check_array(name, a, np.float32, len(shape))
    if a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
