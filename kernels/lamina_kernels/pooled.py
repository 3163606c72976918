"""The CPU kernel's items run by an outside pool of threads (the engine's spin pool,
lamina_p2p/model/spin_pool.py: OP_ATTEND), instead of Numba's OpenMP threads.

Why: at batch 1 a call is 20-250 us of work. Waking Numba's second thread (passive
wait) costs more than it saves below ~1M multiply-adds, so such calls ran inline on
one thread; the engine's spin pool meanwhile owns a worker that is already awake.

How: `setup` does what drivers.append_attend does before its attend pass (shape
checks, validate, plan, the append on the calling thread) and writes everything a unit
needs into an int64 *record* (addresses and shapes, `R_*`); nothing is written to the
pool when the call is malformed. Each unit is one planned item (items.attend_item),
run by `run_item` (a C callback, `item_fn()`: the pool calls it through a pointer, so
the pool's own compiled code does not link the kernel's) on the thread that claimed
it, with that thread's scratch row; `finish` merges split groups (items.merge_group)
after the pool has closed the op. Each item is computed wholly by one thread with the
kernel's item code: the result is bit-identical to drivers.append_attend run with the
same plan, whoever computed which item.

The plan: plan.make_plan for `n_threads` workers, items never shorter than `min_split`
keys and cut at multiples of `align` keys (the tiles start an item anywhere; drivers
cuts at whole blocks). Defaults measured with tools/bench_kernels.py --spin-pool.
"""

import numpy as np
from numba import carray, cfunc, njit, types
from numba.core.imputils import impl_ret_borrowed
from numba.extending import intrinsic

from . import plan as P
from .checks import shapes_ok as _shapes_ok
from .drivers import ROWS_PER_GROUP
from .items import append_rows as _append_rows
from .items import attend_item as _attend_item
from .items import make_scratch as _scratch
from .items import merge_group as _merge_group
from .items import sums_width as _sums_width
from .pointers import address as _address
from .pointers import as_voidptr as _voidptr
from .simd import dpbf16_enabled as _dpbf16_enabled

FASTMATH = {"reassoc", "contract", "arcp", "nsz", "afn"}
_JIT = dict(nogil=True, cache=True, error_model="numpy", fastmath=FASTMATH)

# Smallest key range of an item, and the key multiple items are cut at. Measured at batch 1
# on SmolLM2's 9/3/64 bf16 (tools/bench_kernels.py --spin-pool, /work/notes/pool.md): each
# extra item costs ~1 us (its query rows, normalisation, the merge), so at ctx 512 the three
# whole heads (2:1 over two threads) were as fast as six or nine even items with the worker
# helping, and 3-5 us faster when it could not (the other CPU busy); from ctx 1024 splits pay.
# 576 keeps a 513-key decode whole and cuts 1025 keys in two (528 + 497).
MIN_SPLIT = 576
ALIGN = 16

# The record's fields (int64). Arrays are (address, shape...) as rebuilt by run_item.
(R_Q, R_T, R_HQ, R_D, R_KP, R_VP, R_NBLK, R_NLAY, R_BS, R_BT, R_BTR, R_BTH, R_BTM, R_ROWS, R_QS,
 R_KVS, R_CTX, R_NSEQ, R_LAYER, R_SCALE, R_BF16, R_F32, R_GROUPS, R_NGROUPS, R_ITEMS, R_NITEMS,
 R_ORDER, R_GSZ, R_NTHR, R_RMAX, R_PO, R_PL, R_NPARTS, R_OUT, R_LSE, R_DP, R_SCR) = range(37)
N_SCRATCH = 8
N_REC = R_SCR + N_SCRATCH


@intrinsic
def _readonly(typingctx, arr):
    """The same array typed read-only: the item code then has the driver's argument types
    (the inputs the kernel only reads are read-only there), not a variant of its own."""
    if not isinstance(arr, types.Array):
        return None

    def codegen(context, builder, sig, args):
        return impl_ret_borrowed(context, builder, sig.return_type, args[0])

    return arr.copy(readonly=True)(arr), codegen


@njit(**_JIT)
def _no_keep():
    """setup's `keep` of a call that fails its checks (the same types, nothing in them)."""
    return (np.empty((0, 8), np.int64), np.empty((0, 4), np.int64), np.empty(0, np.int64),
            np.empty(1, np.float32), np.empty((0, 1, 1), np.float32), np.empty((0, 1), np.float32),
            _scratch(0, 1, 1, 1))


@njit(**_JIT)
def setup(q, k_new, v_new, k_pool, v_pool, block_table, table_rows, q_start, kv_start,
          context_lens, layer, scale, bf16, n_threads, min_split, align, out, lse):
    """Check, validate, plan and append one call (arguments as drivers.append_attend's;
    n_threads: the threads that will claim items, each needing a scratch row).
    Returns (error, sequence, record, keep): error -1 for shapes that disagree, a
    plan.ERRORS code for a malformed call (nothing written then), else 0; record the
    int64 array run_item and finish read; keep the arrays it points to (hold them
    until finish)."""
    if not _shapes_ok(q, k_new, v_new, k_pool, v_pool, block_table, table_rows, q_start,
                      kv_start, context_lens, layer):
        return -1, 0, np.zeros(N_REC, np.int64), _no_keep()
    if out.shape != q.shape or lse.shape[0] != q.shape[0] or lse.shape[1] != q.shape[1]:
        return -1, 0, np.zeros(N_REC, np.int64), _no_keep()
    n_seq = table_rows.shape[0]
    num_kv_heads = k_new.shape[1]
    n_layers, n_blocks, bs, d = k_pool.shape
    gsz = q.shape[1] // num_kv_heads
    # The driver's query tile (plan.validate_and_plan); the plan is cut at `align` keys, not
    # at whole blocks, and never inline.
    max_chunk = 1
    for i in range(n_seq):
        max_chunk = max(max_chunk, q_start[i + 1] - q_start[i])
    q_tile = max(1, min(max_chunk, ROWS_PER_GROUP // gsz))
    err, seq = P.validate(block_table, bs, n_blocks, table_rows, q_start, kv_start,
                          context_lens, num_kv_heads)
    if err != 0:
        return err, seq, np.zeros(N_REC, np.int64), _no_keep()
    groups, items, order, n_parts = P.make_plan(q_start, kv_start, context_lens, num_kv_heads,
                                                q_tile, align, n_threads, min_split)
    for w in range(n_seq * num_kv_heads):  # a decode step's rows: a few KB
        _append_rows(k_new, v_new, k_pool, v_pool, block_table, table_rows, kv_start,
                     context_lens, layer, w // num_kv_heads, w % num_kv_heads)
    rmax = q_tile * gsz
    part_o = np.empty((n_parts, rmax, d), np.float32)
    part_lse = np.empty((n_parts, rmax), np.float32)
    scratch = _scratch(n_threads, rmax, bs, d)
    scale_a = np.full(1, scale, np.float32)
    rec = np.zeros(N_REC, np.int64)
    rec[R_Q], rec[R_T], rec[R_HQ], rec[R_D] = _address(q), q.shape[0], q.shape[1], d
    rec[R_KP], rec[R_VP] = _address(k_pool), _address(v_pool)
    rec[R_NBLK], rec[R_NLAY], rec[R_BS] = n_blocks, n_layers, bs
    rec[R_BT] = _address(block_table)
    rec[R_BTR], rec[R_BTH], rec[R_BTM] = block_table.shape
    rec[R_ROWS], rec[R_QS] = _address(table_rows), _address(q_start)
    rec[R_KVS], rec[R_CTX], rec[R_NSEQ] = _address(kv_start), _address(context_lens), n_seq
    rec[R_LAYER], rec[R_SCALE], rec[R_BF16] = layer, _address(scale_a), bf16
    rec[R_F32] = q.itemsize == 4
    rec[R_DP] = bf16 and _dpbf16_enabled()  # read once per call, as the driver does
    rec[R_GROUPS], rec[R_NGROUPS] = _address(groups), groups.shape[0]
    rec[R_ITEMS], rec[R_NITEMS], rec[R_ORDER] = _address(items), items.shape[0], _address(order)
    rec[R_GSZ], rec[R_NTHR], rec[R_RMAX] = gsz, n_threads, rmax
    rec[R_PO], rec[R_PL], rec[R_NPARTS] = _address(part_o), _address(part_lse), n_parts
    rec[R_OUT], rec[R_LSE] = _address(out), _address(lse)
    qs_t, lim_t, s_t, m_t, l_t, acc_t, kw_t, vw_t = scratch  # not a loop: the tuple's types differ
    rec[R_SCR], rec[R_SCR + 1], rec[R_SCR + 2], rec[R_SCR + 3] = (_address(qs_t), _address(lim_t),
                                                                  _address(s_t), _address(m_t))
    rec[R_SCR + 4], rec[R_SCR + 5], rec[R_SCR + 6], rec[R_SCR + 7] = (_address(l_t), _address(acc_t),
                                                                      _address(kw_t), _address(vw_t))
    return 0, 0, rec, (groups, items, order, scale_a, part_o, part_lse, scratch)


@njit(**_JIT)
def finish(rec, q_start, keep, out, lse):
    """After every item ran: merge split groups and fill groups that see no key."""
    groups, part_o, part_lse = keep[0], keep[4], keep[5]
    for g in range(groups.shape[0]):
        _merge_group(g, q_start, groups, rec[R_GSZ], part_o, part_lse, out, lse)


@njit(inline="always", **_JIT)
def _arr(rec, at, shape, dtype):
    return carray(_voidptr(rec[at]), shape, dtype)


@njit(**_JIT)
def _item(rec, j, tid, dt):
    """Item order[j] on thread row tid, storage dtype dt."""
    nthr, rmax, bs, d = rec[R_NTHR], rec[R_RMAX], rec[R_BS], rec[R_D]
    pad_s = (16 + bs - 1) // bs  # make_scratch's shapes
    scratch = (_arr(rec, R_SCR, (nthr, rmax + 1, d), np.float32),
               _arr(rec, R_SCR + 1, (nthr, rmax + 8), np.int64),
               _arr(rec, R_SCR + 2, (nthr, rmax + pad_s, bs), np.float32),
               _arr(rec, R_SCR + 3, (nthr, rmax + 16), np.float32),
               _arr(rec, R_SCR + 4, (nthr, _sums_width(rmax)), np.float32),
               _arr(rec, R_SCR + 5, (nthr, rmax + 1, d), np.float32),
               _arr(rec, R_SCR + 6, (nthr, bs * d + 16), np.float32),
               _arr(rec, R_SCR + 7, (nthr, bs * d + 16), np.float32))
    n_seq, t, hq = rec[R_NSEQ], rec[R_T], rec[R_HQ]
    pool_shape = (rec[R_NLAY], rec[R_NBLK], bs, d)
    order = _arr(rec, R_ORDER, (rec[R_NITEMS],), np.int64)
    # The caller claims units from the front, the workers from the back (spin_pool._claim): the
    # unit after this one, in this thread's direction, is most likely its next.
    jn = j + 1 if tid == 0 else j - 1
    nxt = order[jn] if 0 <= jn < rec[R_NITEMS] else -1
    _attend_item(order[j], tid, _readonly(_arr(rec, R_Q, (t, hq, d), dt)),
                 _arr(rec, R_KP, pool_shape, dt), _arr(rec, R_VP, pool_shape, dt),
                 _readonly(_arr(rec, R_BT, (rec[R_BTR], rec[R_BTH], rec[R_BTM]), np.int32)),
                 _readonly(_arr(rec, R_ROWS, (n_seq,), np.int32)),
                 _readonly(_arr(rec, R_QS, (n_seq + 1,), np.int32)),
                 _readonly(_arr(rec, R_KVS, (n_seq + 1,), np.int32)),
                 _readonly(_arr(rec, R_CTX, (n_seq,), np.int32)), rec[R_LAYER],
                 _arr(rec, R_SCALE, (1,), np.float32)[0], rec[R_BF16] != 0, rec[R_DP] != 0,
                 _arr(rec, R_GROUPS, (rec[R_NGROUPS], 8), np.int64),
                 _arr(rec, R_ITEMS, (rec[R_NITEMS], 4), np.int64), rec[R_GSZ], scratch,
                 _arr(rec, R_PO, (rec[R_NPARTS], rmax, d), np.float32),
                 _arr(rec, R_PL, (rec[R_NPARTS], rmax), np.float32),
                 _arr(rec, R_OUT, (t, hq, d), np.float32), _arr(rec, R_LSE, (t, hq), np.float32), nxt)


def run_item(rec_addr, j, tid):
    """Unit j of a posted call: item order[j] of the record at rec_addr, on thread row tid
    (0 the caller, 1.. the pool's workers)."""
    rec = carray(_voidptr(rec_addr), (N_REC,), np.int64)
    if rec[R_F32] != 0:
        _item(rec, j, tid, np.float32)
    else:
        _item(rec, j, tid, np.uint16)


_ITEM_FN = None


def item_fn():
    """run_item compiled as a C callback void(int64 record, int64 unit, int64 thread):
    its address, which the pool calls (compiled, or loaded from the cache, on first use)."""
    global _ITEM_FN
    if _ITEM_FN is None:
        _ITEM_FN = cfunc(types.void(types.int64, types.int64, types.int64), **_JIT)(run_item)
    return _ITEM_FN.address

