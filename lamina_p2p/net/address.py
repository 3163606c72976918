"""The address a peer tells others to reach it at."""

from __future__ import annotations

import re
import socket

_WILDCARDS = ("0.0.0.0", "*", "[::]", "::")


def advertise_address(bound: str, explicit: str | None = None, seeds: list[str] = ()) -> str:
    """`explicit` if given; else the bound endpoint, with a wildcard host replaced by a routable IP.

    A peer bound to tcp://0.0.0.0:5555 cannot be dialled at 0.0.0.0 from another machine: use the
    local IP of the interface that routes to the first seed (a UDP connect sends no packet), or the
    host name's address when there is no seed.
    """
    if explicit:
        return explicit
    m = re.fullmatch(r"tcp://(.+):(\d+)", bound)
    if not m or m.group(1) not in _WILDCARDS:
        return bound
    host = None
    for seed in seeds:
        s = re.fullmatch(r"tcp://(.+):(\d+)", seed)
        if not s:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect((s.group(1), int(s.group(2))))
                host = probe.getsockname()[0]
                break
        except OSError:
            continue
    if host is None:
        try:
            host = socket.gethostbyname(socket.gethostname())
        except OSError:
            host = "127.0.0.1"
    return f"tcp://{host}:{m.group(2)}"
