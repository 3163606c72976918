"""Waiting for another process to reach a state, with a deadline.

Each poll is a round trip to the process being watched (an HTTP request, an RPC, a
`lamina-node status`), which paces the loop: there is nothing in this process to sleep on.
"""

from __future__ import annotations

import time


def wait_until(predicate, timeout: float = 30.0, what: str = "condition"):
    """Return predicate()'s first truthy value; fail once the deadline has passed."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def peer_stats(address: str) -> dict:
    """An attention peer's `stats` reply (KV use, attend calls, ...), over a real RPC."""
    import zmq.asyncio

    from lamina_p2p.net.rpc import RpcClient
    from lamina_p2p.runtime import run_async

    async def ask():
        ctx = zmq.asyncio.Context()
        client = RpcClient(ctx, address)
        try:
            return (await client.call("stats", timeout=5.0)).fields
        finally:
            await client.close()
            ctx.destroy(linger=0)

    return run_async(ask())
