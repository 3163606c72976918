"""Both transports implement the one declared interface fully (the engine probes nothing)."""

from __future__ import annotations

import inspect

from lamina_p2p.attention.kv_pool import DEFAULT_BLOCK_SIZE
from lamina_p2p.compute.local import LocalTransport
from lamina_p2p.compute.remote import ClusterTransport
from lamina_p2p.compute.transport import Transport


def _members(cls) -> dict[str, bool]:
    """Protocol member -> is it a coroutine function."""
    names = [n for n in dir(cls) if not n.startswith("_")] + list(getattr(cls, "__annotations__", {}))
    return {n: inspect.iscoroutinefunction(getattr(cls, n, None)) for n in names}


def test_local_and_cluster_transports_implement_every_member_alike():
    wanted = _members(Transport)
    assert {"send", "receive", "bind", "peers", "free", "block_size", "wait_for_peers"} <= set(wanted)
    local = LocalTransport(1 << 20)
    assert isinstance(local, Transport)
    for cls in (LocalTransport, ClusterTransport):
        for name, is_async in wanted.items():
            if name in Transport.__annotations__:  # data attributes: set in __init__ or on the class
                continue
            member = getattr(cls, name, None)
            assert callable(member), f"{cls.__name__} lacks {name}"
            assert inspect.iscoroutinefunction(member) == is_async, f"{cls.__name__}.{name}: async differs"
    assert local.block_size() == DEFAULT_BLOCK_SIZE
    assert local.expected_peers == 1 and local.owner_id is None
