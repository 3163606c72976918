"""One peer process: run an attention or a compute peer until SIGTERM/SIGINT (`lamina-node start`, `serve`).

Stops on SIGTERM or SIGINT, prints where every asyncio task waits on SIGUSR1 (for a peer that seems
stuck), and announces `READY <address> <id>` on stdout once the peer is up, which launchers wait for.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from lamina_p2p.launch import READY_PREFIX


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, _dump_tasks)


def _dump_tasks() -> None:
    """SIGUSR1: print where every asyncio task is waiting (for a peer that seems stuck)."""
    lines = []
    for task in asyncio.all_tasks():
        lines.append(f"task {task.get_name()}:")
        coro = task.get_coro()
        while coro is not None:  # follow the await chain down to what it waits on
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
            if frame is not None:
                lines.append(f"    {frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
            coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
            if coro is not None and not hasattr(coro, "cr_frame") and not hasattr(coro, "ag_frame"):
                lines.append(f"    awaiting {coro!r}"[:300])
                break
    print("\n".join(lines), file=sys.stderr, flush=True)


def _announce(address: str, peer_id: str) -> None:
    from lamina_p2p.runtime import freeze_heap

    # Startup's objects (model, kernels, libraries) are never garbage: keep the collector off them.
    freeze_heap()
    # The launcher (and anyone scripting a cluster) waits for this line.
    print(f"{READY_PREFIX}{address} {peer_id}", flush=True)


async def run_attention(config) -> None:
    from lamina_p2p.attention.peer import AttentionPeer

    stop = asyncio.Event()
    _stop_on_signals(stop)
    await AttentionPeer(config).run(stop, on_ready=_announce)


async def run_compute(opts) -> None:
    """A compute peer: joins, loads the model, registers with attention peers, serves HTTP if asked."""
    from lamina_p2p.serve.server import serve_compute

    stop = asyncio.Event()
    _stop_on_signals(stop)
    await serve_compute(opts, stop, on_ready=_announce)
