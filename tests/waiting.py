"""Waiting for another process to reach a state, with a deadline.

Tests never sleep for a fixed time: they poll a condition until it holds or a deadline passes.
Between polls the loop backs off (1 ms, doubling up to 50 ms): a loop that polls without a
pause takes a whole core from the peer process it waits for on a two-core machine, so the
state it waits for comes later, while the first short pauses keep a condition that is already
nearly true from costing a needless 50 ms.
"""

from __future__ import annotations

import time

FIRST_PAUSE_S = 0.001
MAX_PAUSE_S = 0.05


def wait_until(predicate, timeout_s: float = 30.0, what: str = "condition"):
    """Return predicate()'s first truthy value, polling with back-off; AssertionError once
    `timeout_s` seconds have passed (predicate is always called at least once, and once more at
    the deadline)."""
    deadline = time.monotonic() + timeout_s
    pause = FIRST_PAUSE_S
    while True:
        value = predicate()
        if value:
            return value
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(min(pause, left))
        pause = min(2 * pause, MAX_PAUSE_S)


def peer_stats(address: str) -> dict:
    """An attention peer's `stats` reply (KV use, attend calls, ...), over a real RPC."""
    import zmq.asyncio

    from lamina_p2p.net.rpc import RpcClient
    from lamina_p2p.runtime import run_async

    async def ask():
        zmq_context = zmq.asyncio.Context()
        client = RpcClient(zmq_context, address)
        try:
            return (await client.call("stats", timeout_s=5.0)).fields
        finally:
            await client.close()
            zmq_context.destroy(linger=0)

    return run_async(ask())
