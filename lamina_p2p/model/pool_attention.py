"""Attention (lamina_kernels.append_attend) with its items split over the spin pool's threads.

Why: a decode call at batch 1 is 20-250 us of work. On Numba's OpenMP threads it either
runs inline on one thread (waking the passive second thread costs more than it saves) or
wakes a thread that then competes with the spin pool's worker for the second CPU; the
pool's worker is already awake (it spins between the dense ops around attention) and
would otherwise idle or read ahead through the call. One pool for dense work and
attention: the call's planned items (lamina_kernels.pooled) are claimed by the caller
from the front and by the workers from the back of one atomic counter (spin_pool's
OP_ATTEND), each computed wholly by one thread with the kernel's item code; the caller
merges split groups after the op closes. Results are bit-identical to the kernel run
with the same plan, whoever computed which item, and whether a worker helped at all
(a parked or absent worker leaves every item to the caller).
"""

from __future__ import annotations

import threading

import numpy as np
from numba import njit, types

import lamina_kernels as lk
from lamina_kernels import pooled as KP
from lamina_kernels.checks import DT
from lamina_kernels.drivers import SIGNATURES
from lamina_kernels.pointers import address

from ..jit import CACHED
from .spin_pool import A_AFTER, A_FN, A_OP, A_REC, OP_ATTEND, OP_PREFETCH, SEQ, _drive, reopen_prefetch


@njit(**CACHED, error_model="numpy")
def pool_attend(ctl, fn, align, read_ahead, q, k_new, v_new, k_pool, v_pool, block_table, table_rows, q_start,
                kv_start, context_lens, layer, scale, bf16, n_threads, min_split, out, lse):
    """attend_body, compiled for the kernel driver's two signatures only (see _compile)."""
    return attend_body(ctl, fn, align, read_ahead, q, k_new, v_new, k_pool, v_pool, block_table, table_rows,
                       q_start, kv_start, context_lens, layer, scale, bf16, n_threads, min_split, out, lse)


@njit(**CACHED, error_model="numpy")
def attend_body(ctl, fn, align, read_ahead, q, k_new, v_new, k_pool, v_pool, block_table, table_rows, q_start,
                kv_start, context_lens, layer, scale, bf16, n_threads, min_split, out, lse):
    """Check, plan and append (pooled.setup: nothing posted or written when the call is malformed),
    run the items on the pool (fn: pooled.item_fn()), merge. With read_ahead, an OP_PREFETCH left open
    (pool_pre's) goes on: on the workers once no unit is left, then reopened after the op until the next
    (the post's first). Returns (error, sequence, wake mask); error as drivers.append_attend's. Also
    called by fused_step.decode_layers, with the inputs the kernel only reads typed read-only as here."""
    err, seq, rec, keep = KP.setup(q, k_new, v_new, k_pool, v_pool, block_table, table_rows, q_start,
                                   kv_start, context_lens, layer, scale, bf16, n_threads, min_split,
                                   align, out, lse)
    if err != 0:
        return err, seq, np.int64(0)
    ahead = read_ahead and ctl[SEQ] % 2 == 0 and ctl[A_OP] == OP_PREFETCH  # only the caller writes them
    ctl[A_OP] = OP_ATTEND
    ctl[A_FN] = fn
    ctl[A_REC] = address(rec)
    ctl[A_AFTER] = ahead
    wake = _drive(ctl, rec[KP.R_NITEMS])  # closes a read-ahead pool_pre left open first
    KP.finish(rec, q_start, keep, out, lse)
    if ahead:
        wake |= reopen_prefetch(ctl)
    return np.int64(0), np.int64(0), wake


_CTL = types.Array(types.int64, 1, "C")
_COMPILED = None
_FN = 0
_LOCK = threading.Lock()


def compile_now() -> None:
    """Compile (or load from Numba's cache) what `attend` runs, if not done yet: an engine warming up."""
    if _COMPILED is None:
        _compile()


def _compile() -> None:
    """pool_attend's two specializations (the kernel driver's argument types, so that read-only
    arrays from the wire and writable ones share them), then closed to new types as the driver is."""
    global _COMPILED, _FN
    with _LOCK:
        if _COMPILED is None:
            for sig in SIGNATURES:
                a = sig.args  # inline_work's int64 slot carries min_split
                pool_attend.compile((_CTL, types.int64, types.int64, types.boolean) + a)
            pool_attend.disable_compile()
            _FN = KP.item_fn()
            _COMPILED = True


def attend(pool, q, k_new, v_new, k_pool, v_pool, block_table, table_rows, q_start, kv_start, context_lens,
           layer, scale, storage, *, out=None, lse=None, min_split: int | None = None, align: int | None = None):
    """lamina_kernels.append_attend (same arguments, results and errors) with its items run by `pool`
    (a spin_pool.SpinPool whose lock the caller holds) and the calling thread.

    min_split, align: the plan's smallest item and key multiple (default pooled.MIN_SPLIT, ALIGN).
    A call whose arguments the fast path does not take (wrong types, unaligned or int64 index arrays,
    a malformed call) goes to lamina_kernels.append_attend as it is: it raises the kernel's own one-line
    errors, or computes the call; nothing was posted to the pool nor written to the KV pool before."""
    if _COMPILED is None:
        _compile()
    dt = DT.get(storage) if type(storage) is str else None
    err = -1
    if dt is not None and type(q) is np.ndarray and q.dtype is dt and q.ndim == 3:
        if out is None:
            out = np.empty(q.shape, np.float32)
        if lse is None:
            lse = np.empty(q.shape[:2], np.float32)
        try:
            err, _, wake = pool_attend(pool.ctl, _FN, KP.ALIGN if align is None else align, pool.attend_read_ahead,
                                       q, k_new, v_new, k_pool, v_pool, block_table, table_rows, q_start, kv_start,
                                       context_lens, layer, float(scale), storage == "bfloat16", pool.workers + 1,
                                       KP.MIN_SPLIT if min_split is None else min_split, out, lse)
        except TypeError:
            err = -1
    if err:
        return lk.append_attend(q, k_new, v_new, k_pool, v_pool, block_table, table_rows, q_start, kv_start,
                                context_lens, layer, scale, storage, out=out, lse=lse)
    if pool.ctl[SEQ] % 2:
        pool._kept = None  # no read-ahead open any more: its arrays may go
    if wake:
        pool.wake(wake)
    return out, lse
