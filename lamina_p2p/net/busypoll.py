"""Busy-poll on the stream data path: a bounded window of non-blocking polls before a thread blocks.

Why: a thread blocked in poll sleeps, and on a VM waking it on an idle vCPU (HLT, then an
inter-processor interrupt) costs 50-100+ us; an attend round trip has two such wake-ups (the peer's
kernel thread, the compute side's dense thread). The attention peer's kernel thread polls for a
window after each stream reply (net/kernel_thread.py); the compute side's StreamLink polls for one
before it blocks for a reply (net/datapath.py). A poll is select.poll / zmq_poll with a 0 timeout
(0.4 / 1.3 us a call here), which releases the GIL, so the event loop's thread of the same process
still runs. Spinning spends the CPU it spins on and hurts badly where another task shares that CPU,
so it is off unless asked for (`busy_poll_s`), and it backs off when it loses its CPU (`BusyPoll`).

Rehearsal: a spinning thread also re-runs, once a window, the Python that handles a message (the
stream parse and the wire decode) on the last message it handled, with no effect but on the caches.
Why: between two messages the dense thread streams a layer's weights and the peer's kernel its KV
through the caches, and the next message's Python then runs at 2-5x its warm cost (measured,
tools/bench_layer_path.py `receive_path_us`: one reply's read and decode 11.6 us warm, 28 after one
layer's weights). The window is idle time on a CPU spent anyway: re-running that path there brings
its code and data back before the message comes. Only messages of up to `REHEARSAL_MAX_BYTES`
(decode steps'; a prefill chunk's copy would itself flush the caches).
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from typing import Callable

REHEARSAL_MAX_BYTES = 256 << 10


def busy_poll_s(busy_poll_us: int) -> float:
    """The busy-poll window in seconds for `busy_poll_us` microseconds (0: off). Raises ValueError for
    a negative window.

    Off by default (measured, notes/wire.md, issue 11): on CPUs that are really the two processes'
    own, a 2000 us window took ~45 % off the messaging of an echo of the real stack (226 vs 400 us);
    with another runnable task on the peer's CPU it made it ~3x worse (~2000 vs 620-770 us), back-off
    and all: a spinner that is preempted is still runnable, so a request arriving meanwhile gets no
    wake-up preemption and waits for the other task's time slice. So: set it where the cores are
    dedicated (`--busy-poll-us 2000` with --cpus), never where processes share cores."""
    if busy_poll_us < 0:
        raise ValueError(f"busy-poll window {busy_poll_us} us is negative")
    return busy_poll_us * 1e-6


def run_queue_clock() -> Callable[[], float] | None:
    """A reader of the calling thread's time spent waiting on a run queue, in seconds (Linux
    /proc/.../schedstat, second field, ns), or None where the kernel does not expose it. The
    reader stays bound to the thread that called this; its file closes when the reader is freed."""
    try:
        fd = os.open(f"/proc/self/task/{threading.get_native_id()}/schedstat", os.O_RDONLY)
    except OSError:
        return None

    def waited_s() -> float:
        return int(os.pread(fd, 128, 0).split()[1]) * 1e-9

    try:
        waited_s()
    except (OSError, ValueError, IndexError):
        os.close(fd)
        return None
    weakref.finalize(waited_s, os.close, fd)
    return waited_s


class BusyPoll:
    """A bounded busy-poll window that backs off when its CPU is wanted by someone else.

    `start()` opens a window of `window_s` seconds; `spinning()`, called once per non-blocking
    poll, says whether to poll again (True) or block (False). A spinner never sleeps, so the
    scheduler ranks it below a thread that does: on a CPU shared with another runnable task it is
    preempted for a time slice (about a millisecond), far worse than the wake-up it saves. So when one
    poll to the next took longer than `preempted_s` and this thread spent most of that gap on this
    kernel's run queue (another task had its CPU), it stops polling for a while and blocks as without
    busy-poll: `backoff_s` seconds, doubled for each preemption that comes within one back-off of
    resuming (a CPU taken for good), up to `max_backoff_s`; a preemption later than that (this
    process's own event loop every heartbeat) starts again from `backoff_s`. A gap the thread did not spend queued is the hypervisor
    running something else on the virtual CPU (measured here: several gaps of 0.2-2 ms a second on an
    otherwise idle VM): blocking cannot give that back and makes the next wake-up slower, so the
    window goes on (`host_gaps` counts them). `run_queue_s`: the owning thread's run-queue clock
    (default `run_queue_clock()`, read on first use; where there is none every long gap backs off).
    Only the owning thread uses it."""

    def __init__(self, window_s: float, backoff_s: float = 0.02, max_backoff_s: float = 1.0,
                 preempted_s: float = 2e-4, run_queue_s: Callable[[], float] | None = None):
        self.window_s = window_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.preempted_s = preempted_s
        self._until = 0.0  # time.monotonic() when the open window ends (0: none open)
        self._last = 0.0  # the previous poll's time
        self._off_until = 0.0  # backed off until then
        self._off_s = backoff_s  # the next back-off's length
        self.backoffs = 0  # how often it backed off (for stats and tests)
        self.windows = 0  # windows opened
        self.caught = 0  # polls inside a window that found something (its owner calls `caught_one`)
        self.host_gaps = 0  # long gaps not spent on this kernel's run queue: the window went on
        self._run_queue_s = run_queue_s
        self._clock_read = run_queue_s is not None  # run_queue_clock() is called on the owner's first start()
        self._queued_at = 0.0  # the run-queue clock when the window opened or the last gap was seen

    def start(self) -> None:
        """Open a window now (unless off, or backing off)."""
        if self.window_s:
            now = time.monotonic()
            if now >= self._off_until:
                if not self._clock_read:
                    self._run_queue_s, self._clock_read = run_queue_clock(), True
                if self._run_queue_s is not None:
                    self._queued_at = self._run_queue_s()
                self._until, self._last = now + self.window_s, now
                self.windows += 1

    def stop(self) -> None:
        self._until = 0.0

    def caught_one(self) -> None:
        """Count a poll inside the window that found something (the owner decides whether to go on)."""
        self.caught += 1

    def spinning(self) -> bool:
        """Whether to poll once more without blocking (the window is open and the CPU is ours)."""
        if not self._until:
            return False
        now = time.monotonic()
        gap = now - self._last
        preempted = gap > self.preempted_s
        if preempted and self._run_queue_s is not None:
            queued_at, self._queued_at = self._queued_at, self._run_queue_s()
            if self._queued_at - queued_at <= gap / 2:  # the hypervisor's gap, not this kernel's scheduler
                self.host_gaps += 1
                preempted = False
        if preempted:
            again = now - self._off_until < self._off_s  # preempted again within a back-off of resuming
            self._off_s = min(self._off_s * 2, self.max_backoff_s) if again else self.backoff_s
            self._until, self._off_until = 0.0, now + self._off_s
            self.backoffs += 1
            return False
        self._last = now
        if now >= self._until:
            self._until = 0.0
            return False
        # Let another thread of this process that waits for the GIL have it now, on this CPU: the
        # poll releases the GIL but this thread takes it straight back, so a pinned process's event
        # loop thread would wait for the 5 ms switch interval (a stall, and a back-off here).
        os.sched_yield()
        return True
