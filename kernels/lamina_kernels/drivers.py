"""The jitted driver of the CPU kernel: one call = one layer of one micro-batch, in one
dispatch from Python. It checks the shapes, validates and plans (plan.py), then runs
three passes: (1) append: each (sequence, kv head) copies its new rows (token-major as
they come from the projection) into the head-major pool blocks, on the calling thread
when they are few (a decode step), else a prange; (2) attend: the planned items, each
an online softmax of one (sequence, kv head, query tile) over a key range
(items.attend_item); (3) merge: the split groups' partials (LSE merge), skipped when
there is none. A small call (plan.call_work up to `inline_work`) runs the passes on
the calling thread, planned without splits: waking the second thread costs more than
it saves there; a larger one hands the items out over numba's threads one at a time,
longest first. The inline and threaded paths are one function and both 16-bit
storages one compiled variant (a runtime `bf16` flag; bits are copied as they are;
bfloat16's QK on bfloat16 dot products when the process's flag says so, read per call:
simd.set_dpbf16),
and the inputs the kernel only reads are typed read-only (a writable array converts to
that type, a read-only one from the wire is it): `SIGNATURES` are the driver's only two
specializations (float32, uint16), compiled by cpu._compile, which then closes the
dispatcher to new types (a call of any other types raises TypeError: cpu.py's slow path
checks it and says what is wrong).
"""

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import plan as P
from .checks import shapes_ok as _shapes_ok
from .items import append_rows as _append_rows
from .items import attend_item as _attend_item
from .items import make_scratch as _scratch
from .items import merge_group as _merge_group
from .simd import dpbf16_enabled as _dpbf16_enabled

# No nnan/ninf: the running max starts at -inf and empty rows yield lse = -inf.
FASTMATH = {"reassoc", "contract", "arcp", "nsz", "afn"}
_JIT = dict(nogil=True, cache=True, error_model="numpy", fastmath=FASTMATH)

# Query positions per group for chunks (prefill). 64 rows x head_dim floats of
# accumulator stay in L1/L2 while the block is streamed.
ROWS_PER_GROUP = 64
# Smallest key range given its own item (per query position).
MIN_SPLIT = 256
# Elements (new tokens x kv heads x head_dim) up to which the append runs on the
# calling thread instead of a parallel region.
SERIAL_APPEND = 1 << 16


def _signature(storage):
    """The driver's signature for one storage dtype (see the module docstring)."""
    def arr(dtype, ndim, readonly=False):
        return types.Array(dtype, ndim, "C", readonly=readonly)

    ro3 = arr(storage, 3, True)
    idx = arr(types.int32, 1, True)
    return types.Tuple((types.int64, types.int64, types.boolean))(
        ro3, ro3, ro3, arr(storage, 4), arr(storage, 4), arr(types.int32, 3, True), idx, idx, idx,
        idx, types.int64, types.float64, types.boolean, types.int64, types.int64,
        arr(types.float32, 3), arr(types.float32, 2))


SIGNATURES = (_signature(types.float32), _signature(types.uint16))


@intrinsic
def _set_chunksize(typingctx, n):
    """numba.set_parallel_chunksize(n) for this thread from jitted code, returning the old
    size. numba's own overload calls a ctypes pointer, which makes a function uncachable;
    the symbols by name (numba's threading layer registers them) resolve at link time,
    declared as numba's parfor lowering declares them."""
    if not isinstance(n, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        get = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(cgutils.intp_t, []), "get_parallel_chunksize")
        put = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [cgutils.intp_t]),
            "set_parallel_chunksize")
        old = builder.call(get, [])
        builder.call(put, [context.cast(builder, args[0], signature.args[0], types.intp)])
        return old

    return types.intp(n), codegen


@njit(parallel=True, **_JIT)
def append_attend(q, k_new, v_new, k_pool, v_pool, block_table, table_rows, q_start, kv_start,
                  context_lens, layer, scale, bf16, n_threads, inline_work, out, lse):
    """Check, plan and run one call (see the module docstring; arguments as
    cpu.append_attend's, arrays already of the right dtypes; 16-bit storages as uint16
    bits with bf16 telling which). n_threads: numba.get_num_threads() of the caller
    (read here it would make the function uncachable); inline_work: the inline
    threshold (negative: never inline). Returns (error, sequence, inline): error -1
    for shapes that disagree (cpu.prepare says which), a plan.ERRORS code for a
    malformed call (nothing is written then), 0 when out/lse are written."""
    if not _shapes_ok(q, k_new, v_new, k_pool, v_pool, block_table, table_rows, q_start,
                      kv_start, context_lens, layer):
        return -1, 0, False
    if out.shape != q.shape or lse.shape[0] != q.shape[0] or lse.shape[1] != q.shape[1]:
        return -1, 0, False
    n_seq = table_rows.shape[0]
    num_kv_heads = k_new.shape[1]  # local kv heads; the table may be wider (rows past it unused)
    d = k_pool.shape[3]
    gsz = q.shape[1] // num_kv_heads
    err, seq, inline, q_tile, groups, items, order, n_parts = P.validate_and_plan(
        block_table, k_pool.shape[1], table_rows, q_start, kv_start, context_lens, num_kv_heads,
        gsz, d, ROWS_PER_GROUP, k_pool.shape[2], n_threads, MIN_SPLIT, inline_work)
    if err != 0 or q.shape[0] == 0:
        return err, seq, inline
    scale32 = np.float32(scale)
    rmax = q_tile * gsz
    # bfloat16 dot products (simd.vdpbf16): the process's flag, read per call (cpu.py sets it).
    dp = bf16 and _dpbf16_enabled()

    # Items differ in size: the threaded path hands them out one at a time (dynamic
    # scheduling; a thread the OS delays does not hold up the others' share). The
    # setting is thread-local and restored before returning.
    chunk0 = 0 if inline else _set_chunksize(1)

    # Pass 1: append. Bits are copied as they are (same encoding in and out). A decode
    # step's rows are a few KB: copied on this thread, a parallel region would cost more.
    if inline or kv_start[n_seq] * num_kv_heads * d <= SERIAL_APPEND:
        for w in range(n_seq * num_kv_heads):
            _append_rows(k_new, v_new, k_pool, v_pool, block_table, table_rows, kv_start,
                         context_lens, layer, w // num_kv_heads, w % num_kv_heads)
    else:
        for w in prange(n_seq * num_kv_heads):
            _append_rows(k_new, v_new, k_pool, v_pool, block_table, table_rows, kv_start,
                         context_lens, layer, w // num_kv_heads, w % num_kv_heads)

    # Pass 2: attend, one item per iteration, longest items first.
    part_o = np.empty((n_parts, rmax, d), np.float32)
    part_lse = np.empty((n_parts, rmax), np.float32)
    n_groups = groups.shape[0]
    if inline:
        scratch = _scratch(1, rmax, k_pool.shape[2], d)
        for it in range(items.shape[0]):
            _attend_item(it, 0, q, k_pool, v_pool, block_table, table_rows, q_start, kv_start,
                         context_lens, layer, scale32, bf16, dp, groups, items, gsz, scratch, part_o,
                         part_lse, out, lse, it + 1 if it + 1 < items.shape[0] else -1)
        for g in range(n_groups):  # no split group: only groups that see no key
            _merge_group(g, q_start, groups, gsz, part_o, part_lse, out, lse)
        return 0, 0, True
    scratch = _scratch(n_threads, rmax, k_pool.shape[2], d)  # get_thread_id() < n_threads
    for it in prange(items.shape[0]):
        # (Items are handed out one at a time to whichever thread is free: the next one a
        # thread runs is not known, so nothing is prefetched across items. One worker runs
        # inline, above.)
        _attend_item(order[it], numba.get_thread_id(), q, k_pool, v_pool, block_table,
                     table_rows, q_start, kv_start, context_lens, layer, scale32, bf16, dp,
                     groups, items, gsz, scratch, part_o, part_lse, out, lse, -1)

    # Pass 3: merge split groups and fill groups that see no key at all (a parallel
    # region only when there is such a group).
    need = n_parts > 0
    for g in range(n_groups):
        need = need or groups[g, P.G_NITEMS] == 0
    if need:  # no parallel region at all when nothing needs merging
        for g in prange(n_groups):
            _merge_group(g, q_start, groups, gsz, part_o, part_lse, out, lse)
    _set_chunksize(chunk0)
    return 0, 0, False
