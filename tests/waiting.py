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
