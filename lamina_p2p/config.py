"""Node and cluster configuration: sizes, addresses, and the TOML file of `cluster up`."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from lamina_p2p.runtime import parse_cpus

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class ConfigError(ValueError):
    pass


def parse_bytes(text: str | int) -> int:
    """'4GiB', '512MB', '1e9' or an int -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"not a size: {text!r} (examples: 4GiB, 512MB, 1000000)")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise ConfigError(f"size must be positive: {text!r}")
    return value


def check_address(addr: str) -> str:
    """A ZeroMQ tcp endpoint: tcp://HOST:PORT."""
    if not re.fullmatch(r"tcp://[^\s:/]+:\d{1,5}|tcp://\[[0-9a-fA-F:]+\]:\d{1,5}", addr):
        raise ConfigError(f"not a tcp endpoint: {addr!r} (expected tcp://HOST:PORT)")
    return addr


@dataclass
class PeerSpec:
    """One peer of a scripted local cluster."""

    role: str
    listen: str
    kv_memory: str = "1GiB"
    threads: int | None = None
    cpus: str | None = None  # pin to these CPUs ("0-3,6"), see `lamina-node start --cpus`
    device: str = "cpu"
    model: str | None = None
    placement: str = "request"
    micro_batches: int = 1
    http: str | None = None
    extra: list[str] = field(default_factory=list)


@dataclass
class ClusterSpec:
    name: str
    peers: list[PeerSpec]
    heartbeat_interval: float = 0.5
    dead_after: float = 5.0


def load_cluster(path: str | Path) -> ClusterSpec:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    cluster = data.get("cluster", {})
    peers = []
    for i, raw in enumerate(data.get("peer", [])):
        unknown = set(raw) - set(PeerSpec.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"{path}: peer {i}: unknown keys {sorted(unknown)}")
        if raw.get("role") not in ("attention", "compute"):
            raise ConfigError(f"{path}: peer {i}: role must be 'attention' or 'compute'")
        if "listen" not in raw:
            raise ConfigError(f"{path}: peer {i}: missing 'listen'")
        spec = PeerSpec(**raw)
        check_address(spec.listen)
        if spec.cpus is not None:
            try:
                parse_cpus(str(spec.cpus))
            except ValueError as e:
                raise ConfigError(f"{path}: peer {i}: cpus: {e}") from None
        if spec.role == "compute" and not spec.model:
            raise ConfigError(f"{path}: peer {i}: a compute peer needs 'model'")
        peers.append(spec)
    if not peers:
        raise ConfigError(f"{path}: no [[peer]] entries")
    return ClusterSpec(
        name=str(cluster.get("name", "lamina")),
        peers=peers,
        heartbeat_interval=float(cluster.get("heartbeat_interval", 0.5)),
        dead_after=float(cluster.get("dead_after", 5.0)),
    )
