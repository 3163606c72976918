"""Process-level settings every peer shares: the event loop and thread counts."""

from __future__ import annotations

import asyncio
import os


def run_async(coro):
    """Run a coroutine on uvloop where available (a much faster loop for many small messages)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def set_threads(torch_threads: int | None = None, numba_threads: int | None = None) -> None:
    """Set thread counts deliberately: peers that share cores must not oversubscribe them."""
    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    if numba_threads:
        import numba

        numba.set_num_threads(min(numba_threads, numba.config.NUMBA_NUM_THREADS))


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
