"""Timeline of a `generate --trace FILE` Chrome trace: one row per micro-batch and per attention peer.

    python tools/plot_trace.py trace.json --out timeline.png [--last-ms 300]

Dense work, attention round trips, peer queueing and kernels get their own colours,
so whether the pipeline overlaps (one micro-batch's dense work under another's
attention) is visible at a glance. Also prints where each row spent its time.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

COLOURS = {"dense": "#1f77b4", "attention": "#ff7f0e", "queue": "#d62728", "kernel": "#2ca02c"}


def kind(name: str, row: str) -> str:
    if row in ("queue", "kernel"):
        return row
    return "dense" if name.startswith("dense") else "attention"


def load(path: str):
    data = json.load(open(path))
    names = {}
    procs = {}
    for e in data["traceEvents"]:
        if e["ph"] == "M" and e["name"] == "thread_name":
            names[(e["pid"], e["tid"])] = e["args"]["name"]
        if e["ph"] == "M" and e["name"] == "process_name":
            procs[e["pid"]] = e["args"]["name"]
    rows = defaultdict(list)
    for e in data["traceEvents"]:
        if e["ph"] == "X":
            row = names.get((e["pid"], e["tid"]), str(e["tid"]))
            label = f"{procs.get(e['pid'], e['pid'])}: {row}"
            rows[label].append((e["ts"] / 1e3, e["dur"] / 1e3, kind(e["name"], row)))
    return rows


def summarise(rows) -> str:
    lines = []
    for label, spans in rows.items():
        by = defaultdict(float)
        for _, dur, k in spans:
            by[k] += dur
        lines.append(f"{label:40s} " + "  ".join(f"{k} {v:8.1f} ms" for k, v in sorted(by.items())))
    return "\n".join(lines)


def plot(rows, out: str, last_ms: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = max(t + d for spans in rows.values() for t, d, _ in spans)
    start = end - last_ms if last_ms else 0.0
    labels = sorted(rows, key=lambda s: (not s.startswith("compute"), s))
    fig, ax = plt.subplots(figsize=(14, 0.6 * len(labels) + 1.5))
    for y, label in enumerate(labels):
        for k, colour in COLOURS.items():
            bars = [(t, d) for t, d, kk in rows[label] if kk == k and t + d >= start]
            if bars:
                ax.broken_barh(bars, (y - 0.4, 0.8), facecolors=colour, label=k)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlim(start, end)
    ax.set_xlabel("ms")
    handles, names = ax.get_legend_handles_labels()
    unique = dict(zip(names, handles))
    ax.legend(unique.values(), unique.keys(), loc="upper right", ncol=4)
    ax.set_title("lamina-p2p pipeline: dense work vs attention per micro-batch")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace")
    ap.add_argument("--out", default="timeline.png")
    ap.add_argument("--last-ms", type=float, default=None, help="Plot only the last N ms (steady state).")
    args = ap.parse_args()
    rows = load(args.trace)
    print(summarise(rows))
    plot(rows, args.out, args.last_ms)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
