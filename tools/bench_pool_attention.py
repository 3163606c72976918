"""In-process attention on the spin pool against the kernel's own threads, in one engine, alternating.

    python tools/bench_pool_attention.py --model ~/.cache/lamina-dev/smollm2/hf --dtype bfloat16 \
        --contexts 512 2048 --batch 1 16 --steps 16 --rounds 6

One single-process engine per (batch, context), prefilled once; then rounds of `--steps` decode
steps, each round running every variant in turn (rotating who goes first), so all of them see the
same background load on a shared machine:

- kernel:  LocalTransport.pool_max_tokens = 0, lamina_kernels.append_attend as before this path
           (inline on the dense thread below cpu._INLINE_WORK, else over Numba's threads; the
           dense pool's read-ahead stays open through the call) -- main's path;
- pool:    the call's items on the spin pool (model/pool_attention.py), read-ahead kept going;
- pool-no-ra: the same with SpinPool.attend_read_ahead False (the call ends the read-ahead);
- fused:   every layer of a step in one compiled call (model/fused_step.py, Engine.fused_layers: the
           engine's default where it applies; the three above run with it off). No per-layer times: no
           Python runs between a layer's pieces to time them.

Reported per variant: median tok/s over rounds, and the median per-layer attention call and dense
time of the last round (timed around the transport's send and the fused layer's pre/post).
OMP_WAIT_POLICY is set to PASSIVE as the engine runs unless --omp-wait-policy says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402

VARIANTS = ("kernel", "pool", "pool-no-ra", "fused")


class _Timed:
    """Wraps a callable, recording each call's wall time (s) while `on`."""

    def __init__(self, fn):
        self.fn, self.times, self.on = fn, [], False

    def __call__(self, *a, **k):
        if not self.on:
            return self.fn(*a, **k)
        t0 = time.perf_counter()
        try:
            return self.fn(*a, **k)
        finally:
            self.times.append(time.perf_counter() - t0)


def _set_variant(engine, pool, variant: str) -> None:
    engine.fused_layers = variant == "fused"
    engine.transport.pool_max_tokens = 0 if variant == "kernel" else 1 << 30
    if pool is not None:
        pool.attend_read_ahead = variant != "pool-no-ra"


async def run_case(model, batch: int, ctx: int, args, log) -> dict:
    from lamina_p2p.compute.engine import Engine
    from lamina_p2p.compute.local import LocalTransport
    from lamina_p2p.compute.sequence import SamplingParams
    from lamina_p2p.model import spin_pool

    rng = random.Random(ctx)
    prompts = [[rng.randrange(3, model.config.vocab_size) for _ in range(ctx)] for _ in range(batch)]
    steps_total = (args.rounds + 1) * len(VARIANTS) * (args.steps + 1) + 16
    kv_tok = 2 * model.config.num_layers * model.config.num_kv_heads * model.config.head_dim * 2
    transport = LocalTransport(int(batch * (ctx + steps_total + 128) * kv_tok * 1.25) + (64 << 20))
    engine = Engine(model, transport)
    send = transport.send = _Timed(transport.send)
    fused = getattr(model, "_fused", None)
    pre = post = None
    if fused is not None:
        pre = fused.pre = _Timed(fused.pre)
        post = fused.post = _Timed(fused.post)
    try:
        seqs = [engine.new_sequence(p, SamplingParams(max_tokens=steps_total, ignore_eos=True)) for p in prompts]
        while not all(s.output for s in seqs):
            await engine.step([s for s in seqs if not s.finished])
        pool = spin_pool.current()
        rates = {v: [] for v in VARIANTS}
        layer = {v: {} for v in VARIANTS}
        for r in range(args.rounds + 1):  # round 0 warms every variant up, untimed
            order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
            for v in order:
                _set_variant(engine, pool, v)
                await engine.step(seqs)  # the switch settles (read-ahead state) before timing
                timers = [t for t in (send, pre, post) if t is not None]
                for t in timers:
                    t.times.clear()
                    t.on = True
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    await engine.step(seqs)
                dt = time.perf_counter() - t0
                for t in timers:
                    t.on = False
                if r:
                    rates[v].append(batch * args.steps / dt)
                    layer[v] = {"attention_ms": statistics.median(send.times) * 1e3 if send.times else None,
                                "dense_ms": (statistics.median(pre.times) + statistics.median(post.times)) * 1e3
                                if pre is not None and pre.times else None}
        row = {"batch": batch, "context": ctx, "pooled_calls": transport.pooled_calls,
               "tok_s": {v: statistics.median(x) for v, x in rates.items()}, "rounds": rates, "layer": layer}
        log(f"  B{batch} ctx {ctx}: " + "  ".join(
            f"{v} {row['tok_s'][v]:.1f} tok/s (attn {layer[v]['attention_ms'] or float('nan'):.3f} ms, dense "
            f"{layer[v]['dense_ms'] or float('nan'):.3f})" for v in VARIANTS))
        await engine.release(seqs)
        return row
    finally:
        engine.close()
        transport.close()


async def main_async(args, log) -> list[dict]:
    from lamina_p2p.model.loader import load_model
    from lamina_p2p.runtime import set_threads

    set_threads(args.threads)
    model = load_model(args.model, dtype=args.dtype)
    rows = []
    for ctx in args.contexts:
        for batch in args.batch:
            rows.append(await run_case(model, batch, ctx, args, log))
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model directory (HF layout)")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--steps", type=int, default=16, help="decode steps per variant per round")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--omp-wait-policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE", ""])
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    benchlib.set_omp_wait_policy(args.omp_wait_policy or None)
    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    load0 = os.getloadavg()
    log(f"load average {load0[0]:.2f}; OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY')}")
    rows = asyncio.run(main_async(args, log))
    log(f"load average {os.getloadavg()[0]:.2f}")
    if args.json:
        import json

        Path(args.json).write_text(json.dumps(dict(load_average=[load0, os.getloadavg()], rows=rows), indent=1))
    return rows


if __name__ == "__main__":
    main()
