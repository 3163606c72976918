"""append_attend on CPU with Numba: append a chunk's K/V into the paged pool, then attend
(DESIGN.md s4). This module is the Python entry point: one jitted dispatch
(drivers.append_attend, closed to its two signatures: the dispatch is the type check)
that checks the shapes, validates, plans and runs the call, on the calling thread when its
plan.call_work is at most _INLINE_WORK (e.g. batch 1 at a short context), else over
numba's threads; numba's thread count is read through its raw ctypes entry point
(per-call cost matters: one call per layer per micro-batch); `warmup` compiles every
variant; a call that fits no signature gets the full checks of checks.py (one-line
errors). The kernel's parts: widen16.py
(16-bit storages), scalar.py and tiles.py (the inner loops), items.py (one work item),
drivers.py (the passes), plan.py (the work list).
"""

import math
import threading

import numba
import numpy as np

from . import plan as P
from .checks import DT as _DT
from .checks import check_out as _check_out
from .checks import prepare
from .drivers import MIN_SPLIT as _MIN_SPLIT  # noqa: F401  (tests plan with it)
from .drivers import SIGNATURES
from .drivers import append_attend as _append_attend
from .storage import STORAGES

# plan.call_work up to which a whole call runs on the calling thread: below it, waking
# the second thread (and merging split groups) costs more than it saves. Measured on
# the 2-vCPU Xeon (tools/bench_kernels.py --inline-sweep): SmolLM2's 9/3/64 bf16 at
# batch 1 crosses between context 1024 (work 0.79M) and 2048 (1.57M); 32/8/128 near 256 (1.3M).
_INLINE_WORK = 1 << 20


def append_attend(q, k_new, v_new, k_pool, v_pool, block_table, table_rows, q_start, kv_start,
                  context_lens, layer, scale, storage, *, out=None, lse=None):
    """Append each sequence's new K/V rows into the paged pool, then attend (DESIGN.md s4).

    One call is one layer of one micro-batch of n_seq sequences (shards). T = q_start[-1]
    query tokens, T_kv = kv_start[-1] new K/V rows; Hq query heads, Hkv = k_new.shape[1]
    local kv heads (Hq a multiple of Hkv: GQA group Hq // Hkv), D head_dim.

    Arguments (arrays C-contiguous; "storage dtype": float32 as float32, float16 and
    bfloat16 as their uint16 bits):
      q             [T, Hq, D] storage dtype: queries, sequence i's rows at
                    q_start[i]:q_start[i+1] (its newest positions, in order).
      k_new, v_new  [T_kv, Hkv, D] storage dtype: the new rows to append, token-major;
                    sequence i's at kv_start[i]:kv_start[i+1].
      k_pool, v_pool [n_layers, n_blocks, block_size, D] storage dtype: the paged KV
                    cache (one block = block_size tokens of one kv head; a layer's blocks
                    are one array, so consecutive blocks of a sequence are consecutive in
                    memory); written by the append.
      block_table   int32 [n_table_rows, >= Hkv, max_blocks]: block_table[r, h, b] is the
                    pool block holding tokens [b * block_size, (b+1) * block_size) of kv
                    head h of the sequence in table row r (-1: none).
      table_rows    int32-like [n_seq]: each sequence's row in block_table.
      q_start       int32-like [n_seq + 1]: query-token offsets, from 0, non-decreasing.
      kv_start      int32-like [n_seq + 1]: new-K/V-row offsets; sequence i appends 0 rows
                    (attend-only) or exactly as many as it has queries.
      context_lens  int32-like [n_seq]: tokens already cached per sequence (appended rows
                    go at positions context_lens[i]...).
      layer         int: the pool layer, 0 <= layer < n_layers.
      scale         float: multiplies q.k (usually 1/sqrt(D)).
      storage       "float32" | "float16" | "bfloat16".
      out, lse      optional preallocated float32 arrays [T, Hq, D] and [T, Hq], written
                    in full and returned (a caller that reuses them allocates nothing).

    Query j of sequence i (0-based among its q rows) sees keys < context_lens[i] + j + 1
    when the sequence appends (causal over its chunk), else < context_lens[i].
    Returns (out float32 [T, Hq, D], lse float32 [T, Hq]): the softmax-weighted values
    and the natural-log sum of exp(scaled scores); a row that sees no key gets out = 0,
    lse = -inf.

    Raises TypeError (wrong array type or dtype) or ValueError (shapes that disagree,
    offsets that are not monotone, a table row, block or position outside the table or
    pool, a layer outside the pool), each with a one-line message; nothing is written
    to the pool then.
    """
    if _COMPILED is None:
        _compile()
    dt = _DT.get(storage) if type(storage) is str else None
    if dt is None or type(q) is not np.ndarray or q.dtype is not dt or q.ndim != 3:
        prepare(q, k_new, v_new, k_pool, v_pool, block_table, table_rows, q_start, kv_start,
                context_lens, layer, storage)  # raises: the storage or q is wrong
    t, n_q_heads, d = q.shape
    if out is None:
        out = np.empty((t, n_q_heads, d), np.float32)
    if lse is None:
        lse = np.empty((t, n_q_heads), np.float32)
    # Every other type check is the dispatch itself: the driver takes exactly its two
    # signatures (drivers.SIGNATURES), and whatever does not fit them raises TypeError.
    bf16 = storage == "bfloat16"
    try:
        err, seq, _ = _append_attend(q, k_new, v_new, k_pool, v_pool, block_table, table_rows,
                                     q_start, kv_start, context_lens, layer, float(scale), bf16,
                                     _num_threads(), _INLINE_WORK, out, lse)
    except TypeError:
        # The uncommon case: full checks with their one-line messages; int32 index
        # arrays made, unaligned inputs copied (read-only ones fit the signatures as
        # they are); then the call again.
        table_rows, q_start, kv_start, context_lens = prepare(
            q, k_new, v_new, k_pool, v_pool, block_table, table_rows, q_start, kv_start,
            context_lens, layer, storage)
        _check_out("out", out, (t, n_q_heads, d))
        _check_out("lse", lse, (t, n_q_heads))
        for name, a in (("k_pool", k_pool), ("v_pool", v_pool)):
            if not (a.flags.writeable and a.flags.aligned):
                raise ValueError(f"{name} must be writable and aligned")
        q, k_new, v_new, block_table = (a if a.flags.aligned else a.copy()
                                        for a in (q, k_new, v_new, block_table))
        err, seq, _ = _append_attend(q, k_new, v_new, k_pool, v_pool, block_table, table_rows,
                                     q_start, kv_start, context_lens, int(layer), float(scale),
                                     bf16, _num_threads(), _INLINE_WORK, out, lse)
    if err < 0:
        prepare(q, k_new, v_new, k_pool, v_pool, block_table, table_rows, q_start, kv_start,
                context_lens, layer, storage)  # raises, naming the shape that is wrong
        _check_out("out", out, (t, n_q_heads, d))
        _check_out("lse", lse, (t, n_q_heads))
        raise ValueError("malformed call")  # not reached: prepare and shapes_ok agree
    if err:
        raise ValueError(f"sequence {seq}: {P.ERRORS[err]}")
    return out, lse


def _num_threads():
    """numba.get_num_threads() of this thread without its Python-level checks (~3 us)."""
    if _RAW is None:
        _bind_raw()
    return _RAW()


def _bind_raw():
    """The ctypes getter numba binds once its threads are up."""
    global _RAW
    numba.set_parallel_chunksize(numba.get_parallel_chunksize())  # launches the threads
    from numba.np.ufunc import parallel

    _RAW = parallel._get_num_threads


_RAW = None
_COMPILED = None
_COMPILE_LOCK = threading.Lock()


def _compile():
    """Compile (or load from numba's cache) the driver's two specializations, then close
    it to new types: one compiled variant per storage dtype whoever calls (a read-only
    array from the wire or a writable one), and a type error instead of a compile of
    minutes for a call of other types."""
    global _COMPILED
    with _COMPILE_LOCK:  # two first calls at once: the second waits, then finds it done
        if _COMPILED is None:
            for sig in SIGNATURES:
                _append_attend.compile(sig)
            _append_attend.disable_compile()
            _COMPILED = True


def warmup(storages=STORAGES):
    """Compile (or load from cache) every kernel variant (float32; both 16-bit storages
    share one) and run it inline and over the threads, on tiny shapes."""
    from .storage import to_storage

    if _COMPILED is None:
        _compile()
    rng = np.random.default_rng(0)
    for storage in storages:
        num_kv_heads, g, d, bs = 1, 2, 8, 4
        pool_shape = (1, 4, bs, d)
        k_pool = to_storage(np.zeros(pool_shape, np.float32), storage)
        v_pool = to_storage(np.zeros(pool_shape, np.float32), storage)
        bt = np.arange(4, dtype=np.int32).reshape(1, 1, 4)
        q = to_storage(rng.standard_normal((2, num_kv_heads * g, d)).astype(np.float32), storage)
        kv = to_storage(rng.standard_normal((2, num_kv_heads, d)).astype(np.float32), storage)
        idx = (np.array([0], np.int32), np.array([0, 2], np.int32), np.array([0, 2], np.int32),
               np.array([5], np.int32))
        for inline_work in (1 << 62, -1):  # inline, then the same call over the threads
            _append_attend(q, kv, kv, k_pool, v_pool, bt, *idx, 0, 1.0 / math.sqrt(d),
                           storage == "bfloat16", _num_threads(), inline_work,
                           np.empty((2, g, d), np.float32), np.empty((2, g), np.float32))
