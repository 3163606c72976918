"""Can dense work and attention overlap on this machine? The question behind micro-batching.

    python tools/overlap_check.py [--cpus 0:1] [--context 1024] [--batch 16] [--seconds 4] [--json [FILE]]

Part 1, the hardware: the bench model's dense layers (batch/2 tokens, one thread) pinned to one CPU and the
attention kernel (batch/2 sequences of --context tokens in the engine's pool layout, one thread) pinned to
the other, as separate processes, each alone and then both at once. Their slowdown together is what the
memory system charges for overlap.

Part 2, the system: a real cluster on the same two CPUs (this process as the compute peer on the first, one
attention peer on the second, one thread each), prefilled to --context, decoding at M = 1 and M = 2. For each:
step time, the trace's dense and kernel span totals, and the CPU time the dense thread and the peer's
kernel thread actually got (from /proc). Span time a thread spent off its CPU is time it was blocked. It runs
twice: with the whole compute process on its CPU, and with only its dense thread there (the event loop and
ZeroMQ threads free), which separates the machine's limits from the process's own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402


# -- part 1: two processes --------------------------------------------------------------------
def worker(what: str, cpu: int, seconds: float, batch: int, context: int, model_dir: str) -> dict:
    from lamina_p2p.runtime import pin_cpus, set_threads

    pin_cpus({cpu})
    set_threads(1, 1)
    if what == "dense":
        import torch

        from lamina_p2p.model.loader import load_model

        model = load_model(model_dir)
        c = model.config
        x, pos = torch.randn(batch, c.hidden_size), torch.full((batch,), context)
        attn = torch.randn(batch, c.num_heads, c.head_dim)

        def call():
            with torch.inference_mode():
                for layer in range(c.num_layers):
                    model.pre(layer, x, pos)
                    model.post(layer, x, attn)
    else:
        import numpy as np

        from lamina_kernels import append_attend, warmup
        from lamina_p2p.model.config import ModelConfig

        warmup(("float32",))
        c = ModelConfig.from_dir(model_dir)
        rng = np.random.default_rng(0)
        nbps, bs = math.ceil(context / 16), 16
        n_blocks = batch * c.num_kv_heads * nbps
        pool = lambda: rng.standard_normal((c.num_layers, n_blocks, bs, c.head_dim), dtype=np.float32)
        k_pool, v_pool = pool(), pool()
        table = rng.permutation(n_blocks).astype(np.int32).reshape(batch, c.num_kv_heads, nbps)
        new = lambda h: rng.standard_normal((batch, h, c.head_dim), dtype=np.float32)
        q, k, v = new(c.num_heads), new(c.num_kv_heads), new(c.num_kv_heads)
        ar = np.arange(batch + 1, dtype=np.int32)
        ctx = np.full(batch, context - 1, np.int32)

        def call():
            for layer in range(c.num_layers):
                append_attend(q, k, v, k_pool, v_pool, table, np.arange(batch, dtype=np.int32), ar, ar, ctx,
                              layer, 1.0 / math.sqrt(c.head_dim), "float32")
    call()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        call()
        n += 1
    return {"what": what, "cpu": cpu, "ms_per_step": (time.perf_counter() - t0) / n * 1e3}


def run_workers(specs: list[tuple[str, int]], args) -> list[dict]:
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", what, "--worker-cpu", str(cpu),
                               "--seconds", str(args.seconds), "--batch", str(args.batch // 2),
                               "--context", str(args.context), "--model", args.model],
                              stdout=subprocess.PIPE, text=True) for what, cpu in specs]
    out = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode:
            raise RuntimeError(f"worker exited with {p.returncode}")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def part1(args, cpus) -> dict:
    dense_alone = run_workers([("dense", cpus[0])], args)[0]["ms_per_step"]
    kernel_alone = run_workers([("kernel", cpus[1])], args)[0]["ms_per_step"]
    both = {r["what"]: r["ms_per_step"] for r in run_workers([("dense", cpus[0]), ("kernel", cpus[1])], args)}
    return {"dense_alone_ms": dense_alone, "kernel_alone_ms": kernel_alone, "dense_together_ms": both["dense"],
            "kernel_together_ms": both["kernel"], "dense_slowdown": both["dense"] / dense_alone,
            "kernel_slowdown": both["kernel"] / kernel_alone}


# -- part 2: the real cluster -----------------------------------------------------------------
def thread_cpu_s(pid: int) -> dict[int, float]:
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def child_pids() -> list[int]:
    me, out = os.getpid(), []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == me:
                    out.append(int(d.name))
            except (OSError, ValueError, IndexError):
                continue
    return out


async def part2(args, cpus, isolate_dense: bool) -> dict:
    """isolate_dense False: the whole compute process on cpus[0]; True: only its dense thread there, the
    event loop and ZeroMQ threads free to run anywhere (as on a compute machine with cores to spare)."""
    from lamina_p2p.compute.engine import Engine
    from lamina_p2p.launch import open_transport
    from lamina_p2p.options import GenerateOptions
    from lamina_p2p.compute.sequence import SamplingParams
    from lamina_p2p.model.loader import load_model
    from lamina_p2p.runtime import pin_cpus, set_threads
    from lamina_p2p.trace import Tracer

    pin_cpus(set(cpus) if isolate_dense else {cpus[0]})
    set_threads(1)
    model = load_model(args.model)
    kv_tok = 2 * model.config.num_layers * model.config.num_kv_heads * model.config.head_dim * 4
    steps = args.steps
    opts = GenerateOptions(model_dir=args.model, attention_peers=1, attention_threads=1,
                           attention_cpus=[str(cpus[1])], cluster="overlap",
                           kv_bytes=int(args.batch * (args.context + 8 * steps + 64) * kv_tok * 1.3))
    res = {}
    async with open_transport(opts) as transport:
        engine = Engine(model, transport, dense_cpus={cpus[0]} if isolate_dense else None)
        await transport.wait_for_peers(1, 60)
        (peer,) = child_pids()
        loop = asyncio.get_running_loop()
        dense_tid = await loop.run_in_executor(engine.dense, threading.get_native_id)
        rng = random.Random(0)
        params = SamplingParams(max_tokens=8 * steps + 16, ignore_eos=True)
        seqs = [engine.new_sequence([rng.randrange(3, model.config.vocab_size) for _ in range(args.context)], params)
                for _ in range(args.batch)]
        try:
            while not all(s.output for s in seqs):
                await engine.step(seqs)
            for m in (1, 2):
                engine.micro_batches = m
                await engine.step(seqs)
                tracer = Tracer()
                engine.tracer = transport.tracer = tracer
                peer0, mine0 = thread_cpu_s(peer), thread_cpu_s(os.getpid())
                t0 = time.perf_counter()
                for _ in range(steps):
                    await engine.step(seqs)
                wall = (time.perf_counter() - t0) / steps
                peer1, mine1 = thread_cpu_s(peer), thread_cpu_s(os.getpid())
                engine.tracer = transport.tracer = None
                spans = tracer._spans
                kernel = sum(t1 - t0 for _, row, _, t0, t1, _ in spans if row == "kernel") / steps
                dense = sum(t1 - t0 for _, _, name, t0, t1, _ in spans if name.startswith("dense")) / steps
                busiest = max((t for t in peer1 if t != peer and t in peer0), key=lambda t: peer1[t] - peer0[t])
                res[f"mb{m}"] = {"step_ms": wall * 1e3, "dense_span_ms": dense * 1e3,
                                 "dense_thread_cpu_ms": (mine1[dense_tid] - mine0[dense_tid]) / steps * 1e3,
                                 "kernel_span_ms": kernel * 1e3,
                                 "kernel_thread_cpu_ms": (peer1[busiest] - peer0[busiest]) / steps * 1e3,
                                 "compute_loop_cpu_ms": (mine1[os.getpid()] - mine0[os.getpid()]) / steps * 1e3,
                                 "peer_loop_cpu_ms": (peer1[peer] - peer0[peer]) / steps * 1e3}
        finally:
            await engine.release(seqs)
            engine.close()
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpus", default="0:1", help="COMPUTE:ATTENTION CPU numbers")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=4.0, help="part 1: seconds per measurement")
    ap.add_argument("--steps", type=int, default=6, help="part 2: decode steps per micro-batch count")
    ap.add_argument("--model", default=None, help="model directory (default: the bench preset)")
    ap.add_argument("--json", nargs="?", const="-", default=None)
    ap.add_argument("--worker", choices=["dense", "kernel"], help=argparse.SUPPRESS)
    ap.add_argument("--worker-cpu", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.model = args.model or benchlib.model_dir("bench", "float32")
    if args.worker:
        print(json.dumps(worker(args.worker, args.worker_cpu, args.seconds, args.batch, args.context, args.model)))
        return
    if not Path("/proc/self/task").is_dir() or not hasattr(os, "sched_setaffinity"):
        sys.exit("overlap_check needs Linux (/proc and CPU affinity)")
    try:
        cpus = [int(c) for c in args.cpus.split(":")]
        assert len(cpus) == 2 and cpus[0] != cpus[1]
    except (ValueError, AssertionError):
        ap.error("--cpus takes two different CPU numbers, COMPUTE:ATTENTION")
    from lamina_p2p.runtime import run_async

    res = {"cpus": args.cpus, "context": args.context, "batch": args.batch}
    res["processes"] = part1(args, cpus)
    res["cluster"] = run_async(part2(args, cpus, isolate_dense=False))
    res["cluster_dense_thread_alone"] = run_async(part2(args, cpus, isolate_dense=True))
    out = sys.stderr if args.json == "-" else sys.stdout  # stdout carries the JSON then
    p = res["processes"]
    print(f"separate processes, {args.batch // 2} tokens / sequences each, context {args.context}: dense "
          f"{p['dense_alone_ms']:.1f} -> {p['dense_together_ms']:.1f} ms/step together ({p['dense_slowdown']:.2f}x), "
          f"kernel {p['kernel_alone_ms']:.1f} -> {p['kernel_together_ms']:.1f} ({p['kernel_slowdown']:.2f}x)", file=out)
    print(f"{'cluster, ms per step':<42} {'step':>7} {'dense span':>11} {'dense cpu':>10} {'kernel span':>12} "
          f"{'kernel cpu':>11}", file=out)
    for key, label in (("cluster", f"compute process on CPU {cpus[0]}"),
                       ("cluster_dense_thread_alone", f"only the dense thread on CPU {cpus[0]}")):
        for m, r in res[key].items():
            print(f"{label + ', ' + m:<42} {r['step_ms']:>7.1f} {r['dense_span_ms']:>11.1f} "
                  f"{r['dense_thread_cpu_ms']:>10.1f} {r['kernel_span_ms']:>12.1f} {r['kernel_thread_cpu_ms']:>11.1f}", file=out)
    if args.json:
        benchlib.emit_json(res, args.json)


if __name__ == "__main__":
    main()
