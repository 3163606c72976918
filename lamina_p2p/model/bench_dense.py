"""Time the dense part of one decode step: embed, pre/post for every layer, logits.

Attention is skipped (the output is zeros), so the figure is what a compute
peer spends per step apart from waiting for attention peers:

    python -m lamina_p2p.model.bench_dense --preset bench --batch 16 --threads 2

Each dtype is timed in the same run, repeated, and the median reported.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from .loader import load_model
from .presets import write_preset
from .transformer import Transformer


def dense_step(model: Transformer, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    c = model.config
    x = model.embed(tokens)
    zeros = torch.zeros(tokens.shape[0], c.num_heads, c.head_dim, dtype=model.dtype)
    for layer in range(c.num_layers):
        model.pre(layer, x, positions)
        x = model.post(layer, x, zeros)
    return model.logits(x)


@torch.inference_mode()
def time_dense(model: Transformer, batch: int, steps: int = 30, warmup: int = 5) -> dict:
    tokens = torch.randint(0, model.config.vocab_size, (batch,))
    positions = torch.randint(0, 2048, (batch,))
    for _ in range(warmup):
        dense_step(model, tokens, positions)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        dense_step(model, tokens, positions)
        times.append(time.perf_counter() - t0)
    # Other processes share the cores: the minimum is the uncontended cost, the median what you get.
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--model", help="a model directory instead of a preset")
    ap.add_argument("--batch", type=int, nargs="+", default=[16])
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.model) if args.model else write_preset(args.preset, Path(tmp) / args.preset)
        print(f"model {path.name}, threads {torch.get_num_threads()}")
        print(f"{'dtype':>9} {'batch':>5} {'median ms':>10} {'min ms':>8} {'tok/s':>8}")
        for dtype in args.dtype:
            model = load_model(path, dtype=dtype)
            for batch in args.batch:
                r = time_dense(model, batch, steps=args.steps)
                print(f"{dtype:>9} {batch:>5} {r['median_ms']:>10.2f} {r['min_ms']:>8.2f} "
                      f"{batch / r['median_ms'] * 1e3:>8.0f}")


if __name__ == "__main__":
    main()
