"""Measure this machine as a compute peer and an attention peer; write a planner profile.

    python tools/profile_peers.py [--json OUT] [--threads N] [--dtype float32]
                                  [--context 2048] [--predict-batch 16]

What is timed, all with the project's real code on the `bench` preset model:

* dense: `Transformer.pre` + `Transformer.post` of every layer for a decode batch of
  each size in --batches (attention output is random: attention is not part of it),
  divided by the layer count; and embedding + LM head per step;
* attention: `lamina_kernels.append_attend` for one layer, decode, --predict-batch
  sequences of --context tokens in a paged pool laid out as the engine's (every layer in a
  block); reported as KV bytes read per second;
* engine: the real `Engine` step with in-process attention at --predict-batch and a short
  context; what it takes beyond the matmuls, LM head and kernel above is the engine's
  per-layer host work (cutting q/k/v, merging, thread hops), `engine_overhead_s_per_layer`;
* wire: the real message path (`lamina_p2p.net.wire` encode/decode over a ZeroMQ
  DEALER -> ROUTER on loopback): round trip of a one-token message (fixed latency) and the
  transfer rate of batch-sized q/k/v out and attention output back.

Medians, not minima: the profile predicts a run, and a run sees typical times. The JSON
is what `lamina-node plan --profile OUT` reads (layout in lamina_p2p/plan/profile.py); it
also carries a catalog entry `local` for this machine, so `--compute local --attention
local` plans it. With --predict-batch, the planner's prediction for 1 compute + 1
attention peer at that batch and context is printed, for M = 1 and M = 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def median_time(fn, reps: int, min_s: float = 0.2) -> float:
    fn()  # warm
    times, start = [], time.perf_counter()
    while len(times) < reps or time.perf_counter() - start < min_s:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def profile_dense(model, batches, reps):
    import torch

    c = model.config
    dt = model.embed_weight.dtype
    per_layer, head = [], []
    with torch.inference_mode():
        for b in batches:
            x = torch.randn(b, c.hidden_size, dtype=dt)
            pos = torch.full((b,), 1000, dtype=torch.long)
            attn = torch.randn(b, c.num_heads, c.head_dim, dtype=dt)
            ids = torch.randint(0, c.vocab_size, (b,))

            def layers():
                for layer in range(c.num_layers):
                    model.pre(layer, x, pos)
                    model.post(layer, x, attn)

            per_layer.append(median_time(layers, reps) / c.num_layers)
            head.append(median_time(lambda: model.logits(model.embed(ids)), reps))
    return per_layer, head


def profile_attention(cfg, storage, batch, ctx, reps, block_size=16):
    from lamina_kernels import append_attend, storage_itemsize, to_storage, warmup

    warmup((storage,))
    rng = np.random.default_rng(0)
    num_kv_heads, d, hq = cfg.num_kv_heads, cfg.head_dim, cfg.num_heads
    nbps = math.ceil(ctx / block_size)
    n_blocks = batch * num_kv_heads * nbps
    # The pool's real shape (every layer: the other layers' bytes are what evicts this one's) and
    # its allocation of a prompt: each (sequence, kv head)'s blocks one ascending run.
    layers = cfg.num_layers
    pool = lambda: to_storage(rng.standard_normal((layers, n_blocks, block_size, d), dtype=np.float32), storage)
    k_pool, v_pool = pool(), pool()
    bt = np.arange(n_blocks, dtype=np.int32).reshape(batch, num_kv_heads, nbps)
    new = lambda h: to_storage(rng.standard_normal((batch, h, d), dtype=np.float32), storage)
    q, k_new, v_new = new(hq), new(num_kv_heads), new(num_kv_heads)
    ar = np.arange(batch + 1, dtype=np.int32)
    context_lens = np.full(batch, ctx - 1, np.int32)  # ctx - 1 cached + the appended token = ctx read

    def call():
        append_attend(q, k_new, v_new, k_pool, v_pool, bt, np.arange(batch, dtype=np.int32), ar, ar,
                      context_lens, layers // 2, 1.0 / math.sqrt(d), storage)

    t = median_time(call, reps)
    kv_bytes = batch * ctx * num_kv_heads * d * 2 * storage_itemsize(storage)
    return kv_bytes / t, t


def profile_engine(model, batch, ctx, steps, threads):
    """Median decode step of the real engine (in-process attention, one micro-batch), batch
    sequences at a short context: mostly dense work and the engine's own per-layer cost."""
    import random

    from lamina_p2p.compute.engine import Engine
    from lamina_p2p.compute.local import LocalTransport
    from lamina_p2p.compute.sequence import SamplingParams
    from lamina_p2p.runtime import run_async

    async def run():
        transport = LocalTransport(256 << 20, threads=threads)
        engine = Engine(model, transport)
        rng = random.Random(0)
        params = SamplingParams(max_tokens=steps + 16, ignore_eos=True)
        seqs = [engine.new_sequence([rng.randrange(3, model.config.vocab_size) for _ in range(ctx)], params)
                for _ in range(batch)]
        try:
            while not all(s.output for s in seqs):
                await engine.step(seqs)
            for _ in range(2):
                await engine.step(seqs)
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                await engine.step(seqs)
                times.append(time.perf_counter() - t0)
            return statistics.median(times)
        finally:
            await engine.release(seqs)
            engine.close()
            transport.close()

    return run_async(run())


def profile_wire(cfg, batch, itemsize, reps):
    """Round trip of a tiny message, and the transfer rate of decode-sized ones."""
    import zmq

    from lamina_p2p.net import wire

    zmq_context = zmq.Context()
    router = zmq_context.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def serve():
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        while not stop.is_set():
            if not poller.poll(50):
                continue
            ident, *frames = router.recv_multipart(copy=False)
            msg = wire.decode(frames)
            out = np.zeros(msg.tensors[0].shape, msg.tensors[0].dtype)  # the attention output
            router.send_multipart([ident] + wire.encode("out", msg.rid, tensors=[out]), copy=False)

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    dealer = zmq_context.socket(zmq.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    dt = {2: np.float16, 4: np.float32}[itemsize]

    def trip(tokens):
        q = np.zeros((tokens, cfg.num_heads, cfg.head_dim), dt)
        kv = np.zeros((tokens, cfg.num_kv_heads, cfg.head_dim), dt)

        def once():
            dealer.send_multipart(wire.encode("attend", 1, tensors=[q, kv, kv]), copy=False)
            wire.decode(dealer.recv_multipart(copy=False))

        return median_time(once, reps), (2 * q.nbytes + 2 * kv.nbytes)

    try:
        t_small, _ = trip(1)
        big = max(batch, 256)  # large enough that transfer, not latency, dominates
        t_big, nbytes = trip(big)
    finally:
        stop.set()
        th.join()
        dealer.close(0)
        router.close(0)
        zmq_context.term()
    rate = nbytes / max(t_big - t_small, 1e-9)
    return t_small, rate


def stream_bandwidth(nbytes=1 << 29, reps=5):
    a = np.ones(nbytes // 8)
    return a.nbytes / median_time(lambda: a.sum(), reps, 0)


def matmul_flops(threads_dtype, reps=5):
    import torch

    n = 1024
    a = torch.randn(n, n, dtype=threads_dtype)
    return 2 * n**3 / median_time(lambda: a @ a, reps, 0)


def mem_total_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return 16.0


def main(argv=None):
    from lamina_kernels import STORAGES

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", metavar="OUT", help="write the profile here")
    ap.add_argument("--dtype", default="float32", choices=STORAGES)
    ap.add_argument("--threads", type=int, default=1, help="torch and numba threads per peer")
    ap.add_argument("--batches", default="1,2,4,8,16,32,64")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--predict-batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--preset", default="bench", help="model preset to time (bench; tiny for a smoke test)")
    ap.add_argument("--model", default=None, help="time this model instead of a preset: a checkpoint directory, "
                    "a .gguf file or org/name in the local Hugging Face cache (loaded in --dtype)")
    args = ap.parse_args(argv)

    import numba
    import torch

    torch.set_num_threads(args.threads)
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    from lamina_p2p.model.loader import load_model
    from lamina_p2p.model.presets import write_preset
    from lamina_p2p.plan.cost import CostModel, Workload, estimate_lamina
    from lamina_p2p.plan.geometry import Geometry
    from lamina_p2p.plan.hardware import DevicePool, load_catalog
    from lamina_p2p.plan.profile import parse_profile

    batches = [int(b) for b in args.batches.split(",")]
    if args.model:
        from lamina_p2p.model.source import display_name

        model = load_model(args.model, dtype=args.dtype)
        args.preset = display_name(args.model)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            model = load_model(write_preset(args.preset, tmp, dtype=args.dtype))
    cfg = model.config
    geo = Geometry.from_model_config(cfg, name=args.preset)
    print(f"{args.preset} model: {geo.num_params() / 1e6:.0f} M params, {args.dtype}, {args.threads} thread(s)",
          file=sys.stderr)

    dense, head = profile_dense(model, batches, args.reps)
    kv_rate, t_att = profile_attention(cfg, args.dtype, args.predict_batch, args.context, args.reps)
    # Calibrate the engine's per-layer host work: a real step at a short context, less what the
    # matmuls, LM head and kernel above account for (the kernel's share there is small).
    short = 64
    t_engine = profile_engine(model, args.predict_batch, short, max(args.reps, 5), args.threads)
    _, t_att_short = profile_attention(cfg, args.dtype, args.predict_batch, short, args.reps)
    from lamina_p2p.plan.profile import Curve

    dense_at = Curve.make(batches, dense, "dense")(args.predict_batch)
    head_at = Curve.make(batches, head, "head")(args.predict_batch)
    overhead = max(0.0, (t_engine - head_at) / cfg.num_layers - dense_at - t_att_short)
    rtt, wire_rate = profile_wire(cfg, args.predict_batch, geo.bytes_per_element, args.reps * 3)
    flops = matmul_flops(model.embed_weight.dtype)
    bw = stream_bandwidth()

    prof = {
        "version": 1,
        "source": "tools/profile_peers.py",
        "measured": {"host": os.uname().nodename, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                     "threads": args.threads, "dtype": args.dtype, "context": args.context,
                     "attention_batch": args.predict_batch, "attention_s_per_layer": t_att},
        "model": {k: getattr(geo, k) for k in geo.__dataclass_fields__},
        "dense": {"batch": batches, "seconds_per_layer": dense, "head_seconds": head},
        "attention": {"kv_bytes_per_s": kv_rate},
        "round_trip_s": rtt,
        "engine_overhead_s_per_layer": overhead,
        "engine_step_s": {"batch": args.predict_batch, "context": short, "seconds": t_engine},
        "wire_bytes_per_s": wire_rate,
        "devices": {"local": {
            "name": f"this machine ({os.cpu_count()} CPUs, {args.threads} thread(s) per peer)",
            "tflops": flops / 1e12, "flops_efficiency": 1.0,
            "mem_bw_gbs": bw / 1e9, "mem_efficiency": 1.0,
            "mem_gb": mem_total_gb(), "nic_gbps": wire_rate * 8 / 1e9, "price_per_hour": 0.05,
            "source": "measured by tools/profile_peers.py (matmul, numpy read, loopback ZeroMQ)",
        }},
    }
    text = json.dumps(prof, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print("dense per layer: " + ", ".join(f"B={b}: {t * 1e6:.0f} us" for b, t in zip(batches, dense)),
          file=sys.stderr)
    print(f"attention: {kv_rate / 1e9:.2f} GB/s of KV ({t_att * 1e6:.0f} us/layer at B={args.predict_batch}, "
          f"ctx {args.context}); wire: round trip {rtt * 1e6:.0f} us, {wire_rate / 1e9:.2f} GB/s; "
          f"matmul {flops / 1e9:.0f} GFLOP/s; read {bw / 1e9:.1f} GB/s", file=sys.stderr)
    print(f"engine: {t_engine * 1e3:.1f} ms/step at B={args.predict_batch}, ctx {short} -> "
          f"{overhead * 1e6:.0f} us/layer beyond matmuls and kernel", file=sys.stderr)
    if not args.json:
        print(text)

    if args.predict_batch:
        p = parse_profile(prof, args.json or "profile")
        cat = load_catalog()
        cat.add_dict({"device": prof["devices"]}, "profile")
        a = cat.assumptions.__class__(**{**cat.assumptions.__dict__, "prefill": "excluded"})
        cm = CostModel(geo, Workload(args.context, 0), a, p)
        local = DevicePool(cat.get("local"), 1)
        for m in (1, 2):
            e = estimate_lamina(cm, local, local, m, batch=args.predict_batch)
            print(f"prediction, 1 compute + 1 attention, batch {args.predict_batch}, context {args.context}, "
                  f"M={m}: {e.tokens_per_s:.1f} tokens/s (step {e.step_s * 1e3:.1f} ms, bound by {e.bound})",
                  file=sys.stderr)


if __name__ == "__main__":
    main()
