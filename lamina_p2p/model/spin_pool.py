"""A persistent, spinning worker pool for the fused bfloat16 layer's GEMVs at small batch.

Why: at batch 1 a layer's four dense calls each do 20-350 us of work. Split over Numba's
OpenMP threads, every call is a parallel region; with passive waiting (what the engine
runs with, so idle peers' threads cost nothing) each region wakes a sleeping vCPU through
the kernel, and on the 2-vCPU VM that wake-up cost more than the region's work (the four
calls: 0.85 ms a layer passive vs 0.45 ms spinning). A spinning OpenMP policy lost in the
whole engine (torch's and Numba's OpenMP pools both spinning on 2 vCPUs). This pool is
what llama.cpp does instead: its own workers spin (with `pause`) on a shared word for the
next op and go to sleep only after `spin_s` idle.

How: N-1 worker threads (N = the compute threads) each run one long nogil Numba loop
(`_worker_loop`) that never returns to Python per op. An op is posted in an int64 control
array `ctl`: its kind, shapes and the addresses of its arrays (rebuilt with numba.carray),
then an even sequence number (`SEQ`). Units of work (16-output-row blocks, as the serial
kernels compute them) are claimed in runs (a quarter of what is left: a few dozen claims an op,
not one contended atomic per unit) by the caller and by any worker that shows up, so a parked
or slow worker never stops progress: the caller computes every unit nobody claimed. Each unit is computed wholly by one thread with the serial kernel's
code, so results are bit-identical to it. At the end the caller waits for every claimed
unit, closes the op (odd `SEQ`) and waits until no worker is inside it (`ACTIVE` 0), so
the op's arrays may be freed. A worker idle for `spin_s` marks itself parked, returns to
Python and blocks on an Event; the caller that finds it parked at the end of an op wakes
it for the next one. One caller at a time (`lock`; a second thread uses the old path).

Memory order: see atomics.py. The two hand-offs that need a store then a load of another
word (close/ACTIVE, park/SEQ) use sequentially consistent operations on both sides.
"""

from __future__ import annotations

import atexit
import threading
import time

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.extending import intrinsic

from lamina_kernels.pointers import address, as_voidptr

from .atomics import (compare_exchange, cycles, fetch_add, load_acquire, load_seq_cst, sched_yield,
                      spin_pause, store_seq_cst)
from .fused import _load_rows, _store, _store_add, _swiglu_pair, rope_split
from .gemv import BLOCK, _JIT
from .gemv_pairs import block

# Control words, each on its own 64-byte line (the caller and a worker write them concurrently).
SEQ, STOP, NEXT, FINISHED, ACTIVE, NPARKED = 0, 8, 16, 24, 32, 40
PARKED = 48  # PARKED + w: 1 while worker w is (about to be) parked
MAX_WORKERS = 16
# The op's arguments, written by the caller before SEQ opens it.
A_OP, A_UNITS, A_XS, A_ROWS, A_KIN, A_WB, A_NB, A_BIAS, A_YF, A_OUT, A_NOUT, A_RES, A_ROUND = range(64, 77)
# An OP_ATTEND's: the address of the unit's C callback void(record, unit, thread) and of its record
# (lamina_kernels.pooled: run_item, setup).
A_FN, A_REC = 77, 78
# An OP_ATTEND's workers read ahead (the hints of the OP_PREFETCH it closed) once no unit is left: 1.
A_AFTER = 79
WORKED = 80  # units computed by workers, summed over ops (for tests and tuning)
WAITED = 81  # cycles the caller spent waiting for units workers held, summed over ops (tuning)
PREFETCHED = 82  # weight blocks workers prefetched, summed (tests and tuning)
SINK = 83  # where a prefetch leaves the sum of what it loaded (so the loads are not optimised away)
A_PAIRS = 84  # 1 when the op's weights are in gemv_pairs' layout
# An OP_PREFETCH's hints, each (address of packed blocks [nb, k_in, 16] int16, nb, k_in, blocks from the end).
A_HINTS, N_HINTS = 88, 2
CTL_SIZE = 96
OP_LINEAR, OP_ADD, OP_SWIGLU, OP_PREFETCH, OP_ATTEND = 1, 2, 3, 4, 5
# Units are claimed through NEXT: the caller takes them from the front (low 32 bits count its claims), the
# workers from the back (high 32 bits), so the blocks a worker prefetched while idle are the ones it computes.
BACK = 1 << 32
LOW = (1 << 32) - 1
# _claim's run: this fraction of the units left (with one worker, about half of each thread's share).
GUIDE = 4

# Idle spin before a worker parks. A decode step's ops come every 20-400 us; between steps the
# LM head, sampling and the scheduler take a few ms. Longer keeps the worker hot across steps but
# holds a vCPU the rest of the process may want.
SPIN_S = 0.002
# Rows (tokens) up to which the fused layer uses the pool; above it Numba's prange (see fused.py).
POOL_MAX_ROWS = 64
# Weight bytes a worker loads while the caller runs attention (pool_pre's OP_PREFETCH): the post's O and
# gate/up blocks it will claim first. Its L2 is 2 MB; attention at batch 1 lasts 0.1-0.3 ms, in which one
# thread reads ~1-3 MB.
PREFETCH_BYTES = 1_250_000
# Attention on the pool (pool_attention.py) keeps pool_pre's read-ahead going: on the worker once it has no
# unit left, then reopened after the call until the post's first op. False: the attention call ends it.
ATTEND_READ_AHEAD = True
PREFETCH_YIELD_BLOCKS = 4  # a prefetch gives way to other threads on its CPU every this many blocks (~70 kB)


@intrinsic
def _call_unit(typingctx, fn, rec, j, tid):
    """Call the C function at address fn as void(int64 rec, int64 j, int64 tid): an OP_ATTEND's unit
    (lamina_kernels.pooled.run_item), called through a pointer so that this module's compiled code
    does not link the attention kernel's."""
    if not all(isinstance(a, types.Integer) for a in (fn, rec, j, tid)):
        return None

    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        fnty = ir.FunctionType(ir.VoidType(), [i64, i64, i64])
        vals = [context.cast(builder, a, t, types.int64) for a, t in zip(args, sig.args)]
        builder.call(builder.inttoptr(vals[0], fnty.as_pointer()), vals[1:])
        return context.get_dummy_value()

    return types.void(fn, rec, j, tid), codegen


@njit(inline="always", **_JIT)
def _unit(ctl, op, j, tid):
    """Compute unit j of the posted op on thread row tid."""
    if op == OP_ATTEND:
        _call_unit(ctl[A_FN], ctl[A_REC], j, tid)
        return
    rows, k_in, nb, n_out = ctl[A_ROWS], ctl[A_KIN], ctl[A_NB], ctl[A_NOUT]
    width = nb * BLOCK
    xs = carray(as_voidptr(ctl[A_XS]), (rows, k_in), np.float32)
    wide = BLOCK * 2 if ctl[A_PAIRS] else BLOCK  # gemv_pairs' layout: [nb, k_in / 2, 32]
    wb = carray(as_voidptr(ctl[A_WB]), (nb, k_in * BLOCK // wide, wide), np.int16)
    bias = carray(as_voidptr(ctl[A_BIAS]), (width,), np.float32)
    yf = carray(as_voidptr(ctl[A_YF]), (rows, width), np.float32)
    tail = carray(as_voidptr(ctl[A_YF]), (0, BLOCK), np.float32)  # unused: yf's rows are whole blocks
    if op == OP_SWIGLU:
        _swiglu_pair(xs, wb, bias, yf, tail, j, carray(as_voidptr(ctl[A_OUT]), (rows, n_out), np.int16))
    else:
        block(xs, wb, bias, yf, tail, j, width)
        if op == OP_ADD:
            res = carray(as_voidptr(ctl[A_RES]), (rows, n_out), np.int16)
            _store_add(yf, res, carray(as_voidptr(ctl[A_OUT]), (rows, n_out), np.int16), j, n_out)
        elif ctl[A_ROUND]:
            _store(yf, carray(as_voidptr(ctl[A_OUT]), (rows, n_out), np.int16), j, n_out, True)
        else:
            _store(yf, carray(as_voidptr(ctl[A_OUT]), (rows, n_out), np.float32), j, n_out, False)


@njit(inline="always", **_JIT)
def _claim(ctl, tid, units, guided):
    """Claim the next run of units for thread tid: (first unit, count), count 0 when none is left. The caller
    (tid 0) takes them from the front, a worker from the back. guided: a run of a GUIDE-th of what is left
    (at least one), so an op of thousands of units costs a few dozen claims, not one contended atomic each
    (a claim moves NEXT's cache line between the cores: ~10-20 % of a 1 us GEMV unit); else one unit."""
    while True:
        claims = load_acquire(ctl, NEXT)
        front, behind = claims & LOW, claims >> 32
        left = units - front - behind
        if left <= 0:
            return np.int64(0), np.int64(0)
        n = max(left // GUIDE, 1) if guided else np.int64(1)
        if compare_exchange(ctl, NEXT, claims, claims + (n << 32 if tid != 0 else n)):
            return (units - behind - n if tid != 0 else front), n


@njit(**_JIT)
def _run_op(ctl, tid):
    """Claim and compute units of the posted op until none is left (the caller, tid 0, from the front;
    worker w, tid w + 1, from the back: a run's units in that direction); returns how many this thread
    computed."""
    op, units = ctl[A_OP], ctl[A_UNITS]
    guided = op != OP_ATTEND  # attention's units are few and uneven (pooled.py plans them)
    done = 0
    while True:
        first, n = _claim(ctl, tid, units, guided)
        if n == 0:
            return done
        for i in range(n):
            _unit(ctl, op, first + n - 1 - i if tid != 0 else first + i, tid)
        fetch_add(ctl, FINISHED, n)
        done += n


@njit(**_JIT)
def _prefetch(ctl, seq):
    """OP_PREFETCH on a worker: load one word of every cache line of each hint's last blocks, last block
    first (the order this worker will claim them), until done or the caller closes the op (checked per
    block). Returns the blocks loaded."""
    total = np.int64(0)
    sink = np.int64(0)
    for h in range(N_HINTS):
        addr, nb, k_in, count = ctl[A_HINTS + 4 * h], ctl[A_HINTS + 4 * h + 1], ctl[A_HINTS + 4 * h + 2], \
            ctl[A_HINTS + 4 * h + 3]
        if addr == 0:
            continue
        words = carray(as_voidptr(addr), (nb, k_in * BLOCK // 4), np.int64)  # a block: k_in * 16 int16
        for i in range(min(count, nb)):
            if load_acquire(ctl, SEQ) != seq:
                ctl[SINK] = sink
                return total
            j = nb - 1 - i
            for e in range(0, k_in * BLOCK // 4, 8):  # 8 int64 = one 64-byte line
                sink += words[j, e]
            total += 1
            if total % PREFETCH_YIELD_BLOCKS == 0:
                # Attention may have woken Numba's second thread onto this CPU (a split call at long context):
                # let it run. A yield with nobody waiting costs well under a microsecond.
                sched_yield()
    ctl[SINK] = sink
    return total


# Spins of a wait before it also yields the CPU at each turn: a worker holding a unit may have been
# preempted onto the caller's CPU (another process busy on the other one), and pausing would then
# wait out its time slice. A pause is ~40 ns on recent Xeons: ~20 us of pure spinning first.
YIELD_AFTER_SPINS = 512


@njit(inline="always", **_JIT)
def _backoff(spins):
    spin_pause()
    if spins >= YIELD_AFTER_SPINS:
        sched_yield()
    return spins + 1


@njit(**_JIT)
def _close_prefetch(ctl):
    """Close an OP_PREFETCH left open (SEQ even) and wait until no worker is inside it; returns SEQ (odd)."""
    seq = load_acquire(ctl, SEQ)
    if (seq & 1) == 0:
        store_seq_cst(ctl, SEQ, seq + 1)
        waited = 0
        while load_seq_cst(ctl, ACTIVE) != 0:
            waited = _backoff(waited)
        seq += 1
    return seq


@njit(**_JIT)
def _drive(ctl, units):
    """Open the op written in ctl, work on it, wait for the units others claimed, close it.
    Returns a bit mask of parked workers this call claimed to wake (the caller sets their Events)."""
    seq = _close_prefetch(ctl) + 1  # odd (closed) + 1: this op's even number; only the caller writes SEQ
    ctl[A_UNITS] = units
    ctl[NEXT] = 0
    ctl[FINISHED] = 0
    store_seq_cst(ctl, SEQ, seq)  # publishes the arguments above (a seq_cst store is also a release)
    _run_op(ctl, np.int64(0))  # int64, not a literal: one compiled variant for caller and workers (tid 0)
    waited = 0
    if load_acquire(ctl, FINISHED) < units:
        t0 = cycles()
        while load_acquire(ctl, FINISHED) < units:
            waited = _backoff(waited)
        ctl[WAITED] += cycles() - t0
    store_seq_cst(ctl, SEQ, seq + 1)  # closed: a worker arriving now leaves without reading the arguments
    while load_seq_cst(ctl, ACTIVE) != 0:
        waited = _backoff(waited)
    return _claim_parked(ctl)


@njit(**_JIT)
def _claim_parked(ctl):
    """A bit mask of the parked workers this caller claimed to wake (it sets their Events)."""
    wake = 0
    if load_seq_cst(ctl, NPARKED) != 0:
        for w in range(MAX_WORKERS):
            if compare_exchange(ctl, PARKED + w, 1, 0):
                fetch_add(ctl, NPARKED, -1)
                wake |= 1 << w
    return wake


@njit(**_JIT)
def _worker_loop(ctl, w, spin_cycles):
    """Worker w: run posted ops until idle for spin_cycles (returns 0: park) or stopped (returns 1)."""
    last = np.int64(-1)
    idle_from = cycles()
    spins = 0
    while True:
        if load_acquire(ctl, STOP) != 0:
            return 1
        seq = load_acquire(ctl, SEQ)
        if (seq & 1) == 0 and seq != last:
            fetch_add(ctl, ACTIVE, 1)
            if load_seq_cst(ctl, SEQ) == seq:  # still open: the caller waits for ACTIVE before reusing ctl
                if ctl[A_OP] == OP_PREFETCH:
                    fetch_add(ctl, PREFETCHED, _prefetch(ctl, seq))
                else:
                    done = _run_op(ctl, w + 1)
                    if done:
                        fetch_add(ctl, WORKED, done)
                    if ctl[A_OP] == OP_ATTEND and ctl[A_AFTER] != 0:
                        # attention's last units are the caller's: resume pool_pre's read-ahead of the
                        # post's weights meanwhile (the caller's close stops it within a block).
                        fetch_add(ctl, PREFETCHED, _prefetch(ctl, seq))
            fetch_add(ctl, ACTIVE, -1)
            last = seq
            idle_from = cycles()
            spins = 0
            continue
        spins = _backoff(spins)  # idle: after a short spin, give way to the caller's Python work too
        if cycles() - idle_from > spin_cycles:
            store_seq_cst(ctl, PARKED + w, 1)
            fetch_add(ctl, NPARKED, 1)
            seq = load_seq_cst(ctl, SEQ)
            if ((seq & 1) == 0 and seq != last) or load_seq_cst(ctl, STOP) != 0:
                if compare_exchange(ctl, PARKED + w, 1, 0):  # not claimed by a caller: keep going
                    fetch_add(ctl, NPARKED, -1)
                    idle_from = cycles()
                    spins = 0
                    continue
            return 0  # park (a caller that claimed the flag sets this worker's Event)


# Called with int64 values only (np.int64(...)): a literal argument would compile a variant of its own.
@njit(**_JIT)
def _post(ctl, op, xs, wb, bias, yf, out_addr, n_out, res_addr, round_out, units):
    ctl[A_OP] = op
    ctl[A_XS] = address(xs)
    ctl[A_ROWS] = xs.shape[0]
    ctl[A_KIN] = xs.shape[1]
    ctl[A_WB] = address(wb)
    ctl[A_NB] = wb.shape[0]
    ctl[A_BIAS] = address(bias)
    ctl[A_YF] = address(yf)
    ctl[A_OUT] = out_addr
    ctl[A_NOUT] = n_out
    ctl[A_RES] = res_addr
    ctl[A_ROUND] = round_out
    ctl[A_PAIRS] = wb.shape[2] != BLOCK
    return _drive(ctl, units)


@njit(**_JIT)
def pool_norm_linear(ctl, x, norm_w, eps, use_norm, wb, bias, out, round_out):
    """fused.norm_linear through the pool (same arguments, ctl first); returns the wake mask."""
    rows, n_out = out.shape
    nb = wb.shape[0]
    xs = np.empty((rows, x.shape[1]), np.float32)
    _load_rows(x, xs, norm_w, eps, use_norm, wb.shape[2] != BLOCK)
    yf = np.empty((rows, nb * BLOCK), np.float32)
    return _post(ctl, np.int64(OP_LINEAR), xs, wb, bias, yf, address(out), n_out, np.int64(0), np.int64(round_out), nb)


@njit(**_JIT)
def pool_linear_add(ctl, x, wb, zero, res, out):
    """fused.linear_add through the pool; `zero` float32 [nb * 16] zeros (held by the caller)."""
    rows, n_out = out.shape
    nb = wb.shape[0]
    xs = np.empty((rows, x.shape[1]), np.float32)
    _load_rows(x, xs, x[0], np.float32(0.0), False, wb.shape[2] != BLOCK)
    yf = np.empty((rows, nb * BLOCK), np.float32)
    return _post(ctl, np.int64(OP_ADD), xs, wb, zero, yf, address(out), n_out, address(res), np.int64(0), nb)


@njit(**_JIT)
def pool_norm_swiglu(ctl, x, norm_w, eps, wb, zero, out):
    """fused.norm_swiglu through the pool; `zero` as in pool_linear_add."""
    rows, inter = out.shape
    nb = wb.shape[0]
    xs = np.empty((rows, x.shape[1]), np.float32)
    _load_rows(x, xs, norm_w, eps, True, wb.shape[2] != BLOCK)
    yf = np.empty((rows, nb * BLOCK), np.float32)
    return _post(ctl, np.int64(OP_SWIGLU), xs, wb, zero, yf, address(out), inter, np.int64(0), np.int64(0), nb // 2)


@njit(**_JIT)
def _open_prefetch(ctl, wb0, count0, wb1, count1):
    """Leave an OP_PREFETCH open for the workers: the last count0 blocks of wb0, then the last count1 of wb1
    (packed [nb, k_in, 16] int16). The next op closes it (_close_prefetch); the caller keeps the arrays
    alive until then (SpinPool.run's `keep`). Returns the wake mask (a parked worker is woken for it)."""
    seq = _close_prefetch(ctl) + 1
    ctl[A_OP] = OP_PREFETCH
    ctl[A_HINTS], ctl[A_HINTS + 1], ctl[A_HINTS + 2], ctl[A_HINTS + 3] = address(wb0), wb0.shape[0], wb0[0].size // BLOCK, count0
    ctl[A_HINTS + 4], ctl[A_HINTS + 5], ctl[A_HINTS + 6], ctl[A_HINTS + 7] = address(wb1), wb1.shape[0], wb1[0].size // BLOCK, count1
    store_seq_cst(ctl, SEQ, seq)
    return _claim_parked(ctl)


@njit(**_JIT)
def reopen_prefetch(ctl):
    """Open again the OP_PREFETCH whose hints ctl still holds (an op closed it); returns the wake mask.
    The caller still holds the hinted arrays (SpinPool.run's `keep`)."""
    seq = _close_prefetch(ctl) + 1
    ctl[A_OP] = OP_PREFETCH
    store_seq_cst(ctl, SEQ, seq)
    return _claim_parked(ctl)


@njit(**_JIT)
def pool_pre(ctl, x, norm_w, eps, wb, bias, qkv, cos, sin, nq, nk, q, k, v, next_wb0, count0, next_wb1, count1):
    """A layer's pre in one call: pool_norm_linear into qkv (bfloat16 bits), then fused.rope_split
    on the calling thread (a few us), then, when count0 + count1 > 0, an OP_PREFETCH of the post's first two
    weights (next_wb0: O, next_wb1: gate/up) left open: the worker would idle through attention, and
    loads the blocks it will claim first instead. Returns the wake mask."""
    wake = pool_norm_linear(ctl, x, norm_w, eps, True, wb, bias, qkv, True)
    rope_split(qkv, cos, sin, nq, nk, q, k, v)
    if count0 + count1 > 0:
        wake |= _open_prefetch(ctl, next_wb0, count0, next_wb1, count1)
    return wake


@njit(**_JIT)
def pool_post(ctl, attn, o_wb, zero, x, x1, norm_w, eps, gate_up, act, down_wb, x2):
    """A layer's post in one call: x1 = x + attn @ o.T; act = SiLU(g) * u of RMSNorm(x1);
    x2 = x1 + act @ down.T (all bfloat16 bits). Returns the wake mask."""
    wake = pool_linear_add(ctl, attn, o_wb, zero, x, x1)
    wake |= pool_norm_swiglu(ctl, x1, norm_w, eps, gate_up, zero, act)
    return wake | pool_linear_add(ctl, act, down_wb, zero, x1, x2)


@njit(**_JIT)
def _now_cycles():
    return cycles()


def _cycles_per_s() -> float:
    """The cycle counter's rate, measured against perf_counter over ~2 ms (busy, once a process)."""
    _now_cycles()
    t0, c0 = time.perf_counter(), _now_cycles()
    while time.perf_counter() - t0 < 0.002:
        pass
    t1, c1 = time.perf_counter(), _now_cycles()
    return (c1 - c0) / (t1 - t0)


class SpinPool:
    """`workers` spinning threads that help one caller at a time with the pool_* ops.

    `spin_s`: idle time before a worker parks. `start=False` starts no thread (the caller then
    computes every unit: for tests). Call through `run(fn, *args)`; `close()` stops the workers.
    """

    def __init__(self, workers: int, spin_s: float = SPIN_S, start: bool = True):
        if not 0 <= workers <= MAX_WORKERS:
            raise ValueError(f"a spin pool has 0 to {MAX_WORKERS} workers, not {workers}")
        self.workers = workers
        self.ctl = np.zeros(CTL_SIZE, np.int64)
        self.ctl[SEQ] = 1  # closed
        self.spin_cycles = int(max(spin_s, 0.0) * _cycles_per_s())
        self.lock = threading.Lock()
        self._kept = None  # arrays an open OP_PREFETCH reads
        self.attend_read_ahead = ATTEND_READ_AHEAD
        self._events = [threading.Event() for _ in range(workers)]
        self._threads = [threading.Thread(target=self._serve, args=(w,), name=f"lamina-spin-{w}", daemon=True)
                         for w in range(workers)] if start else []
        for t in self._threads:
            t.start()

    def _serve(self, w: int) -> None:
        ev = self._events[w]
        while not _worker_loop(self.ctl, w, self.spin_cycles):
            ev.wait()
            ev.clear()

    def run(self, fn, *args, keep=None) -> None:
        """fn(ctl, *args), one of the pool_* ops, then wake the workers it found parked. `keep`: what an
        OP_PREFETCH that fn leaves open reads (held until the next op has closed it)."""
        wake = fn(self.ctl, *args)
        self._kept = keep
        if wake:
            self.wake(wake)

    def wake(self, mask: int) -> None:
        """Set the Events of the parked workers in `mask` (an op's wake mask: they were claimed for waking)."""
        for w in range(self.workers):
            if mask >> w & 1:
                self._events[w].set()

    def close(self) -> None:
        self.ctl[STOP] = 1
        for ev in self._events:
            ev.set()
        for t in self._threads:
            t.join()
        self._threads = []
        self._kept = None


_shared: dict[int, SpinPool] = {}
_shared_lock = threading.Lock()


def shared(threads: int) -> SpinPool | None:
    """The process's pool for `threads` compute threads (threads - 1 workers), made on first use;
    None for one thread. A change of thread count closes the old pool."""
    if threads <= 1:
        return None
    pool = _shared.get(threads)
    if pool is not None:
        return pool
    with _shared_lock:
        if threads not in _shared:
            for old in _shared.values():
                old.close()
            _shared.clear()
            _shared[threads] = SpinPool(min(threads - 1, MAX_WORKERS))
        return _shared[threads]


def current() -> SpinPool | None:
    """The process's pool if `shared` made one (the fused layer's calls did), else None; never makes one."""
    for pool in list(_shared.values()):
        return pool
    return None


@atexit.register
def _close_shared() -> None:
    for pool in _shared.values():
        pool.close()
