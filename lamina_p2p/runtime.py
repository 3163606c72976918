"""Process-level settings every peer shares: the event loop, thread counts and the garbage collector."""

from __future__ import annotations

import asyncio
import gc
import os
import time


def run_async(coro):
    """Run a coroutine on uvloop where available (a much faster loop for many small messages)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


# generation -> [collections, seconds paused, longest pause in seconds], this process (track_gc_pauses)
_gc_pauses: dict[int, list] = {g: [0, 0.0, 0.0] for g in range(3)}
_gc_started = [0.0]


def _on_gc(phase: str, info: dict) -> None:
    if phase == "start":
        _gc_started[0] = time.perf_counter()
        return
    dt = time.perf_counter() - _gc_started[0]
    rec = _gc_pauses[info["generation"]]
    rec[0] += 1
    rec[1] += dt
    rec[2] = max(rec[2], dt)


def track_gc_pauses() -> None:
    """Time every collection of this process from now on (idempotent); read with `gc_pauses`."""
    if _on_gc not in gc.callbacks:
        gc.callbacks.append(_on_gc)


def gc_pauses() -> dict[int, tuple[int, float, float]]:
    """generation -> (collections, seconds paused in all, longest pause in seconds) since
    track_gc_pauses was first called. A pause holds the GIL: every Python thread of the process
    (the event loop, a peer's receive thread) waits it out."""
    return {g: tuple(rec) for g, rec in _gc_pauses.items()}


def freeze_heap() -> int:
    """Take every object alive now out of the cyclic collector's view (gc.freeze); the count frozen.

    Called once a peer is ready (model loaded, kernels compiled): torch, Numba, the model and the
    kernels are ~270k tracked objects on SmolLM2, and a full (generation 2) collection walks all of
    them with the GIL held -- 0.1 s on a 2-core Zen 5, a stall of every step in flight. Frozen, they
    are never walked again; objects created later are collected as before. `gc.collect()` first, so
    the garbage of startup is freed rather than frozen. LAMINA_GC_FREEZE=0 skips it (to find a leak
    with gc.get_objects(), which does not list frozen objects)."""
    if os.environ.get("LAMINA_GC_FREEZE", "1") == "0":
        return 0
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


_compute_threads: int | None = None  # what set_threads was last given for torch (None: never called)


def set_threads(torch_threads: int | None = None, numba_threads: int | None = None) -> None:
    """Set thread counts deliberately: peers that share cores must not oversubscribe them.

    `torch_threads` is also remembered as this process's compute thread count (`compute_threads`):
    torch's own count cannot be trusted after Numba has run on a thread (below). Numba's count is
    per calling thread; torch's is process-wide but read through OpenMP's per-thread setting."""
    global _compute_threads
    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
        _compute_threads = torch_threads
    if numba_threads:
        import numba

        numba.set_num_threads(min(numba_threads, numba.config.NUMBA_NUM_THREADS))


def compute_threads() -> int:
    """The process's compute thread count: what `set_threads` was last given, else torch's count.

    Why not torch.get_num_threads() alone: Numba's OpenMP layer sets OpenMP's thread count to
    Numba's at each parallel region, on the thread that runs it, and torch reads that count (set to
    1, it reads 2 again after one Numba region on a two-CPU machine)."""
    if _compute_threads:
        return _compute_threads
    import torch

    return torch.get_num_threads()


def use_compute_threads(threads: int) -> None:
    """Make the calling thread run torch's and Numba's parallel work on `threads` threads; Numba's
    regions then set OpenMP's count to the same value instead of to Numba's default (see
    compute_threads). For a thread that runs dense work (the engine's dense thread)."""
    import numba
    import torch

    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))


MAX_CPUS = 8192  # Linux's largest NR_CPUS: a bound before a range becomes a set


def parse_cpus(spec: str) -> set[int]:
    """A CPU list as taskset and cgroups write it, '0-3,6' -> {0, 1, 2, 3, 6}."""
    cpus: set[int] = set()
    for part in spec.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"bad CPU list {spec!r}: {part!r} is not N or N-M") from None
        if a < 0 or b < a:
            raise ValueError(f"bad CPU list {spec!r}: {part!r} is not an increasing range of CPU numbers")
        if b >= MAX_CPUS:
            raise ValueError(f"bad CPU list {spec!r}: CPU {b} is past Linux's limit of {MAX_CPUS}")
        cpus.update(range(a, b + 1))
    return cpus


def pin_cpus(spec: str | set[int]) -> set[int]:
    """Run every thread of this process, and those it starts later, on these CPUs only.

    Peers that share a machine each get their own cores this way, so one's thread pool
    never preempts the other's (the operating system would otherwise move them freely).
    Linux only; returns the CPU set.
    """
    cpus = parse_cpus(spec) if isinstance(spec, str) else set(spec)
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("pinning to CPUs needs Linux (sched_setaffinity)")
    # sched_setaffinity(0) moves only the calling thread: move every thread already running
    # (torch's and numba's pools may exist), and new threads inherit from their creator.
    tids = [int(t) for t in os.listdir("/proc/self/task")] if os.path.isdir("/proc/self/task") else [0]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
        except ProcessLookupError:  # the thread ended meanwhile
            continue
        except OSError as e:
            raise ValueError(f"cannot pin to CPUs {sorted(cpus)}: {e.strerror} "
                             f"(this machine has {os.cpu_count()} CPUs)") from None
    return cpus


def pin_this_thread(cpus: set[int]) -> None:
    """Run the calling thread, and the threads it starts later (a torch pool), on these CPUs only."""
    try:
        os.sched_setaffinity(0, cpus)  # 0 is the calling thread
    except OSError as e:
        raise ValueError(f"cannot pin to CPUs {sorted(cpus)}: {e.strerror}") from None
