"""Helpers the benchmark tools share: the bench model on disk, the STREAM read, plots, tables.

Tools import this as a sibling module (`tools/` is on sys.path when a tool runs as a script).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))


def model_dir(preset: str = "bench", dtype: str = "float32", where: str | None = None) -> str:
    """The preset's HF directory, written once (seeded, so every run reads the same weights)."""
    from lamina_p2p.model.presets import write_preset

    root = Path(where or os.environ.get("LAMINA_BENCH_MODELS", Path(tempfile.gettempdir()) / "lamina-bench-models"))
    out = root / f"{preset}-{dtype}"
    if not (out / "config.json").exists():
        tmp = root / f".{preset}-{dtype}.{os.getpid()}"
        write_preset(preset, tmp, dtype=dtype)
        os.makedirs(root, exist_ok=True)
        try:
            os.rename(tmp, out)
        except OSError:  # another run wrote it first
            pass
    return str(out)


def stream_read_gbps(nbytes: int = 1 << 30, reps: int = 5) -> float:
    """The machine's STREAM-style read bandwidth (all threads), as bench_kernels measures it."""
    from bench_kernels import stream_read_gbps as measure

    return measure(nbytes, reps)


def set_omp_wait_policy(policy: str | None) -> None:
    """Before torch/numba load: OpenMP worker threads spin after each parallel region by default
    (ACTIVE). On 2 shared cores the compute peer's spinning torch threads then steal the core an
    attention peer's kernel needs, and the reverse. PASSIVE makes idle workers sleep. Peers started
    from this process inherit the environment, so every system compared runs with the same policy."""
    if policy:
        os.environ["OMP_WAIT_POLICY"] = policy


def emit_json(obj, dest: str | None) -> None:
    """--json: '-' (or a bare flag) prints to stdout, anything else is a file path."""
    text = json.dumps(obj, indent=2, sort_keys=False)
    if dest in (None, "-"):
        print(text)
    else:
        Path(dest).write_text(text + "\n")


def plot_lines(path: Path, title: str, xlabel: str, ylabel: str, series: dict[str, tuple[list, list]],
               logx: bool = False) -> None:
    """One PNG: a line with markers per series {name: (xs, ys)}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (xs, ys) in series.items():
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    xs_all = sorted({x for xs, _ in series.values() for x in xs})
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs_all, [f"{x:g}" for x in xs_all])
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])
