"""The per-layer path, measured against its floors in one run (issue 11, items 1, 2 and the shard count).

Parts (each prints a table; --json collects them):
  local     in process (`--attention-peers 0`): in-engine attention per layer during decode (the
            compute side's send->receive span) next to the isolated kernel (lamina_kernels.append_attend)
            and the service call (AttentionService.attend) on the same shapes; target <= 1.2x.
  wire      1 attention peer: per-layer messaging overhead = compute-side wait minus the peer's kernel
            span (median over decode layers, M=1), next to a raw pyzmq DEALER/ROUTER round trip of
            the same request and reply bytes over the same endpoint kind; target <= 100 us. Also the
            compute side's send path for one attend and receive path for its reply, timed warm, after
            1 ms idle and after one layer's weight bytes were streamed (send_path_us, receive_path_us):
            what the pipeline does to them.
  shards    batch 1, a long prompt, 2 attention peers, --placement sequence: prefill time and decode
            tok/s with --shard-tokens 16 against 512 (--shard-sizes); target within 10 %.

    python tools/bench_layer_path.py [--model DIR] [--parts local,wire,shards] [--json out.json]

Default model: SmolLM2-135M-Instruct from ~/.cache/lamina-dev/smollm2/hf when present, else the
bench preset in bfloat16. Ratios are what to read: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

SMOLLM2 = Path.home() / ".cache/lamina-dev/smollm2/hf"


def _median_us(xs) -> float:
    return statistics.median(xs) * 1e6 if xs else float("nan")


def _decode_prompts(vocab: int, batch: int, context: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(context)] for _ in range(batch)]


async def _decode_with_trace(engine, transport, prompts, steps: int):
    """Prefill, then `steps` decode steps traced; returns the tracer's spans of those steps."""
    from lamina_p2p.compute.sequence import SamplingParams
    from lamina_p2p.trace import Tracer

    params = SamplingParams(max_tokens=steps + 4, ignore_eos=True)
    seqs = [engine.new_sequence(p, SamplingParams(**vars(params))) for p in prompts]
    try:
        while not all(s.output for s in seqs):
            await engine.step(seqs)
        await engine.step(seqs)  # one untraced decode step: buffers and connections warm
        tracer = Tracer()
        engine.tracer = transport.tracer = tracer
        t0 = time.perf_counter()
        for _ in range(steps):
            await engine.step(seqs)
        wall = (time.perf_counter() - t0) / steps
        engine.tracer = transport.tracer = None
        return list(tracer._spans), wall
    finally:
        await engine.release(seqs)


def _attention_spans(spans) -> dict[tuple[int, int], tuple[float, float]]:
    """(micro-batch row order, layer) -> (t0, t1) of the compute side's send->receive spans."""
    out = {}
    for i, (proc, row, name, t0, t1, _) in enumerate(spans):
        if proc == "compute" and name.startswith("attention L"):
            out[(i, int(name[len("attention L"):]))] = (t0, t1)
    return out


# -- part 1: in process ---------------------------------------------------------------
class IsolatedKernel:
    """The kernel and the service call alone, on the engine's shapes (decode: one token per sequence)."""

    def __init__(self, cfg, storage: str, batch: int, context: int):
        import lamina_kernels as lk
        from lamina_p2p.attention.service import AttendRequest, AttentionService

        hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        rng = np.random.default_rng(0)

        def arr(*shape):
            a = rng.standard_normal(shape).astype(np.float32)
            return a if storage == "float32" else lk.to_storage(a, storage)

        self.lk, self.storage = lk, storage
        self.svc = svc = AttentionService(batch * (context + 64) * 2 * cfg.num_layers * hkv * d * 4)
        svc.register("bench", cfg.num_layers, hq, hkv, d, storage, cfg.max_position_embeddings)
        ids = np.arange(batch, dtype=np.int64)
        full = np.full(batch, context, np.int64)
        # Every layer holds its KV, and calls go round the layers as the engine's do: a layer's KV is
        # out of cache by the time it is read again (one layer's KV alone would stay cached).
        qp, kp = arr(batch * context, hq, d), arr(batch * context, hkv, d)
        for layer in range(cfg.num_layers):
            svc.attend(AttendRequest("bench", layer, ids, np.zeros(batch, np.int64), full, full, 0, hkv, qp, kp, kp))
        one = np.ones(batch, np.int64)
        self.layers = cfg.num_layers
        self.req = AttendRequest("bench", 0, ids, full, one, one, 0, hkv, arr(batch, hq, d), arr(batch, hkv, d),
                                 arr(batch, hkv, d))  # rewrites position `context` each call
        self.reg = svc._owners["bench"]
        self.table_rows = svc.kernel_args(self.req)[6]  # the shard-table work once, as a step's first layer
        self.starts = np.arange(batch + 1, dtype=np.int32)
        self.ctx32 = full.astype(np.int32)
        self.kernel: list[float] = []
        self.service: list[float] = []

    def run(self, reps: int) -> None:
        r, reg, L = self.req, self.reg, self.layers
        for i in range(reps):
            t0 = time.perf_counter()
            self.lk.append_attend(r.q, r.k, r.v, reg.pool.k, reg.pool.v, reg.pool.table, self.table_rows, self.starts,
                                  self.starts, self.ctx32, i % L, reg.scale, self.storage)
            t1 = time.perf_counter()
            r.layer = (i + L // 2) % L
            self.svc.attend(r)
            t2 = time.perf_counter()
            self.kernel.append(t1 - t0)
            self.service.append(t2 - t1)


async def part_local(args, model) -> dict:
    """Traced decode steps and isolated kernel calls interleaved, on the same (dense) thread."""
    from lamina_p2p.compute.engine import Engine
    from lamina_p2p.compute.local import LocalTransport
    from lamina_p2p.compute.sequence import SamplingParams
    from lamina_p2p.trace import Tracer

    cfg = model.config
    storage = str(model.dtype).removeprefix("torch.")
    kv_tok = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * (4 if storage == "float32" else 2)
    transport = LocalTransport(int(args.batch * (args.context + args.steps + 64) * kv_tok * 1.5),
                               threads=args.attention_threads)
    engine = Engine(model, transport)
    loop = asyncio.get_running_loop()
    params = SamplingParams(max_tokens=args.steps + 4, ignore_eos=True)
    seqs = [engine.new_sequence(p, SamplingParams(**vars(params)))
            for p in _decode_prompts(cfg.vocab_size, args.batch, args.context)]
    tracer = Tracer()
    walls = []
    try:
        iso = await loop.run_in_executor(engine.dense, IsolatedKernel, cfg, storage, args.batch, args.context)
        while not all(s.output for s in seqs):
            await engine.step(seqs)
        await engine.step(seqs)
        for _ in range(args.steps):
            engine.tracer = transport.tracer = tracer
            t0 = time.perf_counter()
            await engine.step(seqs)
            walls.append(time.perf_counter() - t0)
            engine.tracer = transport.tracer = None
            await loop.run_in_executor(engine.dense, iso.run, cfg.num_layers)
    finally:
        await engine.release(seqs)
        engine.close()
        transport.close()
    spans = tracer._spans
    attn = [t1 - t0 for proc, _, name, t0, t1, _ in spans if proc == "compute" and name.startswith("attention L")]
    kern = [t1 - t0 for proc, row, _, t0, t1, _ in spans if proc == "attention (in process)" and row == "kernel"]
    dense = [t1 - t0 for proc, _, name, t0, t1, _ in spans if proc == "compute" and name.startswith("dense")]
    wall = statistics.median(walls)
    res = {"batch": args.batch, "context": args.context, "storage": storage, "step_ms": wall * 1e3,
           "tok_per_s": args.batch / wall, "in_engine_attention_us": _median_us(attn),
           "in_engine_service_us": _median_us(kern), "dense_us": _median_us(dense),
           "kernel_us": _median_us(iso.kernel), "service_us": _median_us(iso.service)}
    res["ratio_vs_kernel"] = res["in_engine_attention_us"] / res["kernel_us"]
    return res


# -- part 2: messaging overhead -------------------------------------------------------------
def raw_round_trip(endpoint_kind: str, request_bytes: list[int], reply_bytes: list[int], reps: int) -> float:
    """Median seconds of a bare pyzmq DEALER -> ROUTER -> DEALER round trip with these frame sizes."""
    import tempfile

    import zmq

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    tmp = tempfile.mkdtemp()
    if endpoint_kind == "ipc":
        endpoint = f"ipc://{tmp}/raw"
        router.bind(endpoint)
    else:
        endpoint = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
    reply = [np.zeros(n, np.uint8) for n in reply_bytes]
    request = [np.ones(n, np.uint8) for n in request_bytes]

    def echo():
        while True:
            frames = router.recv_multipart(copy=False)
            if len(frames) == 2 and frames[1].bytes == b"stop":
                return
            router.send_multipart([frames[0], *reply], copy=False)

    server = threading.Thread(target=echo, daemon=True)
    server.start()
    dealer = ctx.socket(zmq.DEALER)
    dealer.linger = 0
    dealer.connect(endpoint)
    times = []
    for i in range(reps + 20):
        t0 = time.perf_counter()
        dealer.send_multipart(request, copy=False)
        dealer.recv_multipart(copy=False)
        if i >= 20:
            times.append(time.perf_counter() - t0)
    dealer.send_multipart([b"stop"])
    server.join()
    dealer.close()
    router.close()
    ctx.term()
    return statistics.median(times)


def message_path_cost(batch: int, num_heads: int, num_kv_heads: int, head_dim: int, item: int, layer_bytes: int,
                      reps: int) -> tuple[dict, dict]:
    """Why messaging costs more in the pipeline than in a loop: the compute side's send path for one
    attend (net/stream.py's pack_attend + send_buffers) and its receive path for one reply
    (FrameReader.read + net/wire.py's decode) of these shapes, over a real Unix socket pair, each timed
    warm in a loop, after 1 ms asleep, and after `layer_bytes` (one layer's weights, which the dense
    thread streams between two messages) were read through the caches. Returns (send, receive), medians
    in microseconds."""
    import select
    import socket

    from lamina_p2p.net import stream
    from lamina_p2p.net.wire import decode, encode_attend_reply

    out = np.zeros((batch, num_heads, head_dim), np.float32)
    lse = np.zeros((batch, num_heads), np.float32)
    reply = encode_attend_reply(1, out, lse, (1.0, 2.0, 3.0))
    dtype = np.float32 if item == 4 else np.uint16
    meta = np.zeros((batch, 4), np.int64)
    q = np.zeros((batch, num_heads, head_dim), dtype)
    kv = np.zeros((batch, num_kv_heads, head_dim), dtype)
    weights = np.ones(max(layer_bytes, 1), np.uint8)
    a, b = socket.socketpair()
    stream.tune(a)
    stream.tune(b)
    reader = stream.FrameReader(b)
    drain = bytearray(1 << 20)
    readable = select.poll()
    readable.register(b, select.POLLIN)
    try:
        def send() -> float:
            t0 = time.perf_counter()
            stream.send_buffers(a, stream.pack_attend(1, b"layer-path", 3, 0, num_kv_heads, meta, q, kv, kv,
                                                      time.time() + 5, False), 5.0)
            t1 = time.perf_counter()
            while readable.poll(0):  # (untimed: the peer's side)
                b.recv_into(drain)
            return t1 - t0

        def receive() -> float:
            stream.send_frames(a, reply, 5.0)
            stream.wait(b, select.POLLIN, 5.0)
            t0 = time.perf_counter()
            decode(reader.read()[0])
            return time.perf_counter() - t0

        def timed(path, before) -> float:
            times = []
            for _ in range(reps):
                before()
                times.append(path())
            return _median_us(times)

        out_ = []
        for path in (send, receive):
            timed(path, lambda: None)  # first calls: imports, allocations
            out_.append({"warm_us": timed(path, lambda: None), "after_1ms_idle_us": timed(path, lambda: time.sleep(1e-3)),
                         "after_layer_weights_us": timed(path, weights.sum), "layer_weight_bytes": layer_bytes})
        return out_[0], out_[1]
    finally:
        a.close()
        b.close()


def layer_weight_bytes(cfg, item: int) -> int:
    """Bytes of one decoder layer's projection weights (q, k, v, o, gate, up, down)."""
    h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return item * (h * (q + 2 * kv) + q * h + 3 * h * cfg.intermediate_size)


async def part_wire(args, model) -> dict:
    from lamina_p2p.compute.engine import Engine
    from lamina_p2p.launch import open_transport
    from lamina_p2p.options import GenerateOptions

    cfg = model.config
    storage = str(model.dtype).removeprefix("torch.")
    item = 4 if storage == "float32" else 2
    kv_tok = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * item
    split = args.split_cores
    opts = GenerateOptions(model_dir=args.model, attention_peers=1,
                           attention_threads=len(split[1]) if split else args.attention_threads,
                           attention_cpus=[",".join(map(str, sorted(split[1])))] if split else [],
                           cluster="layer-path", kv_bytes=int(args.batch * (args.context + args.steps + 64) * kv_tok * 1.5))
    if args.busy_poll_us is not None:  # (older builds have no such field, and no busy-poll)
        opts.busy_poll_us = args.busy_poll_us
    if split:  # this (compute) process on its CPUs, the attention peer on the others: two machines in miniature
        from lamina_p2p.runtime import pin_cpus, set_threads

        pin_cpus(split[0])
        set_threads(len(split[0]))
    async with open_transport(opts) as transport:
        if hasattr(transport, "use_stream"):  # older builds: ZeroMQ only
            transport.use_stream = args.data_path == "stream"
        engine = Engine(model, transport)
        try:
            await transport.wait_for_peers(1, 60)
            # The data path's ZeroMQ endpoint (older builds: the control path's, tcp).
            info = getattr(transport, "_info", None)
            endpoint = next(iter(info.values()))["endpoint"] if info else "tcp://"
            spans, wall = await _decode_with_trace(engine, transport, _decode_prompts(cfg.vocab_size, args.batch,
                                                                                     args.context), args.steps)
            links = getattr(transport, "_links", {})
            streams = [x for x in links.values() if type(x).__name__ == "StreamLink"]
            path = "stream" if streams else "zmq"
            poll = streams[0].busy_poll if streams else None
            busy_poll = {"window_us": round(poll.window_s * 1e6), "windows": poll.windows,
                         "caught": poll.caught, "backoffs": poll.backoffs,
                         "host_gaps": getattr(poll, "host_gaps", None)} if poll else None
        finally:
            engine.close()
    waits, kernels, queues = {}, {}, {}
    for proc, row, name, t0, t1, _ in spans:
        if proc == "compute" and name.startswith("attention L"):
            waits.setdefault(name[len("attention "):], []).append((t0, t1))
        elif proc.startswith("attention ") and row == "kernel":
            kernels.setdefault(name, []).append((t0, t1))
        elif proc.startswith("attention ") and row == "queue":
            queues.setdefault(name, []).append((t0, t1))
    overhead, wait, kern, there, before, back = [], [], [], [], [], []
    for layer, ws in waits.items():
        for (w0, w1), (k0, k1), (q0, _) in zip(ws, kernels.get(layer, []), queues.get(layer, [])):
            wait.append(w1 - w0)
            kern.append(k1 - k0)
            overhead.append((w1 - w0) - (k1 - k0))
            there.append(q0 - w0)  # send start -> the peer's kernel thread has the message
            before.append(k0 - q0)  # decode, checks, shard table on the peer
            back.append(w1 - k1)  # reply encode, transit, compute side wake-up and decode
    b, hq, hkv, d = args.batch, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    from lamina_p2p.net.wire import ATTEND, REPLY

    # The data path's fixed binary headers (owner: a 16-character peer id), then meta, q, k, v / out, lse.
    request = [ATTEND.size + 16, b * 4 * 8, b * hq * d * item, b * hkv * d * item, b * hkv * d * item]
    reply = [REPLY.size, b * hq * d * 4, b * hq * 4]
    kind = "ipc" if endpoint.startswith("ipc://") else "tcp"
    raw = raw_round_trip(kind, request, reply, args.reps)
    sent, got = message_path_cost(b, hq, hkv, d, item, layer_weight_bytes(cfg, item), min(args.reps, 200))
    return {"batch": b, "context": args.context, "endpoint": kind, "data_path": path, "compute_busy_poll": busy_poll,
            "split_cores": "%s:%s" % tuple(",".join(map(str, sorted(c))) for c in split) if split else None, "step_ms": wall * 1e3,
            "tok_per_s": b / wall, "compute_wait_us": _median_us(wait), "peer_kernel_us": _median_us(kern),
            "messaging_overhead_us": _median_us(overhead), "raw_pyzmq_round_trip_us": raw * 1e6,
            "send_to_peer_us": _median_us(there), "peer_before_kernel_us": _median_us(before),
            "kernel_end_to_compute_us": _median_us(back),
            "request_bytes": sum(request), "reply_bytes": sum(reply),
            "send_path_us": {k: round(v, 1) if k != "layer_weight_bytes" else v for k, v in sent.items()},
            "receive_path_us": {k: round(v, 1) if k != "layer_weight_bytes" else v for k, v in got.items()}}


# -- part 3: shards ---------------------------------------------------------------------
async def part_shards(args, model) -> dict:
    from lamina_p2p.compute.engine import Engine
    from lamina_p2p.launch import open_transport
    from lamina_p2p.options import GenerateOptions

    cfg = model.config
    prompt = _decode_prompts(cfg.vocab_size, 1, args.shard_prompt)
    storage = str(model.dtype).removeprefix("torch.")
    kv_tok = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * (4 if storage == "float32" else 2)
    opts = GenerateOptions(model_dir=args.model, attention_peers=2, attention_threads=args.attention_threads,
                           cluster="layer-path-shards", kv_bytes=int((args.shard_prompt + 512) * kv_tok * 4))
    from lamina_p2p.compute.sequence import SamplingParams

    res = {"prompt": args.shard_prompt, "decode_tokens": args.shard_decode}
    async with open_transport(opts) as transport:
        small, large = args.shard_sizes
        for shard in (large, small, large, small):  # twice each, interleaved: the machine drifts
            engine = Engine(model, transport, placement="sequence", shard_tokens=shard)
            try:
                await transport.wait_for_peers(2, 60)  # registration starts when the engine binds
                _, stats = await engine.generate(prompt, SamplingParams(max_tokens=args.shard_decode, ignore_eos=True))
            finally:
                engine.close()
            row = res.setdefault(f"shard_{shard}", {"prefill_s": [], "decode_tok_per_s": []})
            row["prefill_s"].append(stats["prefill_s"])
            row["decode_tok_per_s"].append(stats["tokens_per_s"])
    for shard in (small, large):
        row = res[f"shard_{shard}"]
        row["prefill_s"] = min(row["prefill_s"])
        row["decode_tok_per_s"] = max(row["decode_tok_per_s"])
    res["prefill_ratio_small_vs_large"] = res[f"shard_{small}"]["prefill_s"] / res[f"shard_{large}"]["prefill_s"]
    res["decode_ratio_small_vs_large"] = (res[f"shard_{small}"]["decode_tok_per_s"]
                                          / res[f"shard_{large}"]["decode_tok_per_s"])
    return res


async def main(args) -> dict:
    from lamina_p2p.model.loader import load_model
    from lamina_p2p.runtime import set_threads

    set_threads(args.threads, args.attention_threads)
    model = load_model(args.model)
    out = {"model": args.model, "load_average": os.getloadavg()}
    parts = args.parts.split(",")
    if "local" in parts:
        out["local"] = await part_local(args, model)
        print_part("local", out["local"])
    if "wire" in parts:
        out["wire"] = await part_wire(args, model)
        print_part("wire", out["wire"])
    if "shards" in parts:
        out["shards"] = await part_shards(args, model)
        print_part("shards", out["shards"])
    return out


def print_part(name: str, res: dict) -> None:
    out = sys.stderr if TABLES_TO_STDERR else sys.stdout  # stdout carries the JSON with --json -
    print(f"== {name}", file=out)
    for k, v in res.items():
        print(f"  {k:28} {v:.4g}" if isinstance(v, float) else f"  {k:28} {v}", file=out)
    out.flush()


TABLES_TO_STDERR = False


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF model directory (default: SmolLM2 if present, else bench bf16)")
    ap.add_argument("--parts", default="local,wire,shards")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=16, help="traced decode steps")
    ap.add_argument("--reps", type=int, default=300, help="isolated kernel / raw round trip repetitions")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--attention-threads", type=int, default=2, help="Numba threads")
    ap.add_argument("--shard-prompt", type=int, default=1024)
    ap.add_argument("--shard-decode", type=int, default=32)
    ap.add_argument("--shard-sizes", default="16,512", help="SMALL,LARGE --shard-tokens compared")
    ap.add_argument("--data-path", choices=("stream", "zmq"), default="stream",
                    help="wire part: the Unix-domain stream socket where the peer offers one, or ZeroMQ only")
    ap.add_argument("--busy-poll-us", type=int, default=None,
                    help="wire part: the stream data path's busy-poll window on both sides (default: the engine's)")
    ap.add_argument("--split-cores", default=None, metavar="COMPUTE:ATTENTION",
                    help="wire part: pin this process and the attention peer to disjoint CPU lists, e.g. 0:1")
    ap.add_argument("--omp-wait-policy", default=None, help="OMP_WAIT_POLICY for this run and its peers")
    ap.add_argument("--json", nargs="?", const="-", default=None,
                    help="write results to this file (no file: the JSON on stdout, tables on stderr)")
    args = ap.parse_args()
    args.shard_sizes = tuple(int(x) for x in args.shard_sizes.split(","))
    if args.split_cores:
        from lamina_p2p.runtime import parse_cpus

        compute_spec, sep, attention_spec = args.split_cores.partition(":")
        try:
            args.split_cores = (parse_cpus(compute_spec), parse_cpus(attention_spec))
        except ValueError as e:
            ap.error(f"--split-cores: {e}")
        if not sep or args.split_cores[0] & args.split_cores[1]:
            ap.error(f"--split-cores {compute_spec}{sep}{attention_spec}: expected two disjoint CPU lists, e.g. 0:1")
    TABLES_TO_STDERR = args.json == "-"
    benchlib.set_omp_wait_policy(args.omp_wait_policy)
    if args.model is None:
        args.model = str(SMOLLM2) if (SMOLLM2 / "config.json").exists() else benchlib.model_dir("bench", "bfloat16")
    from lamina_p2p.runtime import run_async

    result = run_async(main(args))
    if args.json:
        benchlib.emit_json(result, args.json)
