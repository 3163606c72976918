"""`lamina-node start`: run one peer process until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import signal
import sys

from lamina_p2p.launch import READY_PREFIX


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


def _announce(address: str, peer_id: str) -> None:
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


def exit_with(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
