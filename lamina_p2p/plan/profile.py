"""Measured timings that replace the roofline terms of the cost model.

A profile is the JSON that `tools/profile_peers.py` writes after timing the real model
code and the real attention kernel on real peers. Layout (version 1):

    {
      "version": 1,
      "model": {...Geometry fields...},          # what was measured (informative)
      "dense": {"batch": [1, 2, 4, ...],          # decode tokens in one forward
                "seconds_per_layer": [...],       # pre + post of one layer, one compute device
                "head_seconds": [...]},           # embedding + final norm + LM head, per step
      "attention": {"kv_bytes_per_s": 1.2e10},    # one attention peer, decode, KV bytes read/s
      "baseline_attention": {"kv_bytes_per_s": ...},  # optional: attention on the compute device
      "round_trip_s": 1.5e-4,                     # per layer, wire + messaging, excluding compute
      "engine_overhead_s_per_layer": 8e-4,        # optional: the engine's per-layer host work beyond
                                                  # matmuls and kernel (cutting q/k/v, merging, thread hops)
      "wire_bytes_per_s": 2.0e9,                  # optional: measured transfer rate
      "devices": {"local": {...hardware.toml device entry...}}  # optional catalog additions
    }

Dense time is interpolated piecewise-linearly in the number of tokens; outside the
measured range it is held at the first point below (weights are read regardless) and
extended along the last segment's slope above (compute-bound growth).
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass
from pathlib import Path


class ProfileError(ValueError):
    pass


@dataclass(frozen=True)
class Curve:
    xs: tuple[float, ...]
    ys: tuple[float, ...]

    @classmethod
    def make(cls, xs, ys, what: str) -> "Curve":
        if not xs or len(xs) != len(ys):
            raise ProfileError(f"profile {what}: need equal-length, non-empty batch and time lists")
        pts = sorted(zip(map(float, xs), map(float, ys)))
        for x, y in pts:
            if not (math.isfinite(x) and math.isfinite(y)) or x <= 0 or y < 0:
                raise ProfileError(f"profile {what}: bad point ({x}, {y})")
        if len({x for x, _ in pts}) != len(pts):
            raise ProfileError(f"profile {what}: repeated batch size")
        return cls(tuple(x for x, _ in pts), tuple(y for _, y in pts))

    def __call__(self, x: float) -> float:
        xs, ys = self.xs, self.ys
        if x <= xs[0]:
            return ys[0]
        if len(xs) == 1:
            return ys[0] * x / xs[0]  # one point: assume proportional above it
        i = min(bisect.bisect_left(xs, x), len(xs) - 1)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


@dataclass(frozen=True)
class Profile:
    dense_layer: Curve  # tokens -> seconds, one compute device
    head: Curve | None  # tokens -> seconds per step
    attention_kv_bytes_per_s: float  # per attention peer
    baseline_kv_bytes_per_s: float | None
    round_trip_s: float
    wire_bytes_per_s: float | None
    model: dict
    devices: dict
    path: str = ""
    engine_overhead_s_per_layer: float = 0.0


def load_profile(path: str | Path) -> Profile:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ProfileError(f"cannot read profile {path}: {e}") from e
    return parse_profile(data, str(path))


def parse_profile(data: dict, source: str = "profile") -> Profile:
    if not isinstance(data, dict) or data.get("version") != 1:
        raise ProfileError(f"{source}: not a version-1 profile")
    try:
        dense = data["dense"]
        batch = dense["batch"]
        curve = Curve.make(batch, dense["seconds_per_layer"], "dense")
        head = Curve.make(batch, dense["head_seconds"], "head") if "head_seconds" in dense else None
        att = float(data["attention"]["kv_bytes_per_s"])
        rtt = float(data["round_trip_s"])
    except (KeyError, TypeError, ValueError) as e:
        raise ProfileError(f"{source}: missing or bad field: {e}") from e
    try:
        overhead = float(data.get("engine_overhead_s_per_layer", 0.0))
    except (TypeError, ValueError) as e:
        raise ProfileError(f"{source}: bad engine_overhead_s_per_layer: {e}") from e
    if att <= 0 or rtt < 0 or not 0 <= overhead < 1:
        raise ProfileError(f"{source}: attention rate must be > 0, round trip >= 0 and engine overhead in [0, 1) s")
    base = (data.get("baseline_attention") or {}).get("kv_bytes_per_s")
    wire = data.get("wire_bytes_per_s")
    return Profile(curve, head, att, float(base) if base else None, rtt,
                   float(wire) if wire else None, data.get("model") or {},
                   data.get("devices") or {}, source, overhead)
