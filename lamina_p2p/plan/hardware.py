"""Device catalog and planner assumptions, loaded from TOML.

`configs/hardware.toml` ships with the package; `--hardware FILE` adds or overrides
entries (a user file's `[device.X]` replaces the shipped X; its `[assumptions]` keys
override the shipped ones one by one). Units in the file are the ones datasheets use
(TFLOP/s, GB/s, GB, Gbps, $/h, with GB = 1e9 bytes); this module converts to SI once so
the cost model never sees a unit prefix.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

DEFAULT_CATALOG = Path(__file__).resolve().parents[2] / "configs" / "hardware.toml"


class HardwareError(ValueError):
    """Bad catalog entry or device spec; the message names the device or file."""


@dataclass(frozen=True)
class Device:
    key: str
    name: str
    flops: float  # peak dense FLOP/s for the arithmetic this role runs (bf16 tensor on GPUs)
    mem_bw: float  # bytes/s
    mem_bytes: float
    nic_bw: float  # bytes/s, per direction
    price_per_hour: float
    link_bw: float = 0.0  # bytes/s per direction between devices of one server (NVLink); 0: use NIC
    # Per-device efficiencies; None means "use the assumption default".
    flops_efficiency: float | None = None
    mem_efficiency: float | None = None
    attention_efficiency: float | None = None
    source: str = ""


@dataclass(frozen=True)
class Assumptions:
    """Every knob of the cost model that is a judgement, not a datasheet figure."""

    flops_efficiency: float = 0.6  # decode GEMMs at large batch: ~60 % of peak tensor FLOP/s
    mem_efficiency: float = 0.8  # weight streaming reaches ~80 % of peak HBM/DRAM bandwidth
    attention_efficiency: float = 0.7  # paged KV reads: block gathers, softmax, shorter bursts
    nic_efficiency: float = 0.8  # goodput of a NIC after headers and messaging overhead
    link_efficiency: float = 0.8  # NVLink all-reduce bus bandwidth vs peak
    collective_latency_s: float = 10e-6  # fixed cost of one TP all-reduce
    mem_usable: float = 0.9  # fraction of device memory for weights + KV (rest: runtime, fragmentation)
    rtt_s: float = 30e-6  # per-layer round trip compute -> attention -> compute, excluding transfer
    prefill: str = "amortised"  # "amortised": prompt work spread over output tokens; "excluded": decode only
    max_batch: int = 0  # 0: no cap besides memory (a serving engine's max-num-seqs, if any)
    tpot_slo_s: float = 0.0  # 0: no latency cap; else the decode step must not exceed it
    max_micro_batches: int = 8  # the range `--micro-batches auto` tries

    def validate(self) -> "Assumptions":
        for f in ("flops_efficiency", "mem_efficiency", "attention_efficiency", "nic_efficiency",
                  "link_efficiency", "mem_usable"):
            v = getattr(self, f)
            if not 0 < v <= 1:
                raise HardwareError(f"assumption {f} must be in (0, 1], got {v}")
        if self.prefill not in ("amortised", "excluded"):
            raise HardwareError(f"assumption prefill must be 'amortised' or 'excluded', got {self.prefill!r}")
        return self


@dataclass
class Catalog:
    devices: dict[str, Device] = field(default_factory=dict)
    assumptions: Assumptions = field(default_factory=Assumptions)

    def get(self, key: str) -> Device:
        d = self.devices.get(key.lower())
        if d is None:
            known = ", ".join(sorted(self.devices))
            raise HardwareError(f"unknown device {key!r} (known: {known}; add one with --hardware FILE)")
        return d

    def add_toml(self, path: str | Path) -> "Catalog":
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise HardwareError(f"cannot read hardware catalog {path}: {e}") from e
        self.add_dict(data, str(path))
        return self

    def add_dict(self, data: dict, source: str) -> None:
        for key, entry in (data.get("device") or {}).items():
            self.devices[key.lower()] = _device(key.lower(), entry, source)
        known = {f.name for f in fields(Assumptions)}
        over = data.get("assumptions") or {}
        bad = set(over) - known
        if bad:
            raise HardwareError(f"{source}: unknown assumption(s) {', '.join(sorted(bad))}")
        self.assumptions = replace(self.assumptions, **over).validate()


_REQUIRED = ("tflops", "mem_bw_gbs", "mem_gb", "nic_gbps", "price_per_hour")


def _device(key: str, e: dict, source: str) -> Device:
    missing = [k for k in _REQUIRED if k not in e]
    if missing:
        raise HardwareError(f"{source}: device {key!r} lacks {', '.join(missing)}")
    for k in _REQUIRED:
        v = e[k]
        if not isinstance(v, (int, float)) or v < 0 or (v == 0 and k != "price_per_hour"):
            raise HardwareError(f"{source}: device {key!r} has bad {k} = {v!r}")
    return Device(
        key=key,
        name=e.get("name", key),
        flops=e["tflops"] * 1e12,
        mem_bw=e["mem_bw_gbs"] * 1e9,
        mem_bytes=e["mem_gb"] * 1e9,
        nic_bw=e["nic_gbps"] * 1e9 / 8,
        price_per_hour=float(e["price_per_hour"]),
        link_bw=e.get("link_gbs", 0) * 1e9,
        flops_efficiency=e.get("flops_efficiency"),
        mem_efficiency=e.get("mem_efficiency"),
        attention_efficiency=e.get("attention_efficiency"),
        source=e.get("source", ""),
    )


def load_catalog(extra: list[str | Path] = ()) -> Catalog:
    cat = Catalog().add_toml(DEFAULT_CATALOG)
    for p in extra:
        cat.add_toml(p)
    return cat


@dataclass(frozen=True)
class DevicePool:
    """`count` identical devices acting as one role (tensor-parallel compute devices, or attention peers)."""

    device: Device
    count: int

    @property
    def price_per_hour(self) -> float:
        return self.device.price_per_hour * self.count

    def __str__(self) -> str:
        return f"{self.count}x {self.device.key}"


def parse_device_spec(spec: str) -> tuple[str, int | None]:
    """'h100:2' -> ('h100', 2); 'h100' -> ('h100', None)."""
    name, _, n = spec.strip().partition(":")
    if not name:
        raise HardwareError(f"bad device spec {spec!r}: expected DEVICE[:N]")
    if not n:
        return name.lower(), None
    try:
        count = int(n)
    except ValueError:
        raise HardwareError(f"bad device spec {spec!r}: count {n!r} is not an integer") from None
    if count < 1:
        raise HardwareError(f"bad device spec {spec!r}: count must be at least 1")
    return name.lower(), count


def parse_rate(text: str) -> float:
    """'400Gbps' / '25GB/s' / '10gbit' -> bytes/s."""
    t = text.strip().lower().replace(" ", "")
    units = [("gb/s", 1e9), ("mb/s", 1e6), ("gbps", 1e9 / 8), ("gbit", 1e9 / 8), ("mbps", 1e6 / 8),
             ("mbit", 1e6 / 8), ("tbps", 1e12 / 8)]
    for suffix, scale in units:
        if t.endswith(suffix):
            return _positive(t[: -len(suffix)], text) * scale
    raise HardwareError(f"bad network rate {text!r}: use e.g. 400Gbps, 100Mbps or 25GB/s")


def parse_duration(text: str) -> float:
    """'30us' / '1.5ms' / '0.2s' -> seconds."""
    t = text.strip().lower().replace(" ", "")
    for suffix, scale in (("us", 1e-6), ("µs", 1e-6), ("ms", 1e-3), ("ns", 1e-9), ("s", 1.0)):
        if t.endswith(suffix):
            return _positive(t[: -len(suffix)], text, allow_zero=True) * scale
    raise HardwareError(f"bad duration {text!r}: use e.g. 30us, 2ms")


def _positive(num: str, text: str, allow_zero: bool = False) -> float:
    try:
        v = float(num)
    except ValueError:
        raise HardwareError(f"bad value {text!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise HardwareError(f"bad value {text!r}")
    return v
