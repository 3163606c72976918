"""Decode tokens/s against emulated network delay: compute peer -> relay -> attention peer.

    python tools/netem.py [--quick] [--json [FILE]] [--plot DIR] [--delays-ms 0 0.2 1 5] [--rate-gbit 1]

Topology (loopback only; nothing to clean up but our own processes):

    compute (this process) --tcp--> relay (tools/relay.py, own process) --tcp--> attention peer
                                    127.0.0.1:R  delay + rate, both ways        127.0.0.1:P

The attention peer listens on P and advertises R (`--advertise`), so membership gossip hands the
compute peer R; its per-layer data path listens on a second port D and advertises a second relay's
port (`--data-port`, `--data-advertise`, which also withholds the ipc:// shortcut) and its TCP stream
a third (`--data-stream-port`, `--data-stream-advertise`: the decode path between hosts), so every
attend request and reply crosses a relay with the same delay and rate. The kernels here have no
`netem` qdisc, hence the user-space relay (checked by `tools/relay.py check`; the same ping-pong
runs first here and is reported). One attention peer is prefilled once; the relay's delay is then
changed between rounds (a command on its stdin), and every (delay, micro-batches) pair decodes
`--steps` steps per round, interleaved, so machine noise hits all of them alike. Reported: tokens/s
per pair (median over rounds) and each pair's ratio to the zero-delay figure at the same
micro-batch count. Target (issue 5): at 1 ms one-way, micro-batches 3 keeps >= 0.7x.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402
import relay as relay_mod  # noqa: E402
from bench_e2e import LaminaBackend, kv_bytes_per_context_token  # noqa: E402

TOOLS = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RelayProcess:
    def __init__(self, target_port: int, rate_gbit: float):
        self.proc = subprocess.Popen(
            [sys.executable, str(TOOLS / "relay.py"), "serve", "--target", f"127.0.0.1:{target_port}",
             "--rate-gbit", str(rate_gbit)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().split()
        if not line or line[0] != "READY":
            self.proc.kill()
            raise RuntimeError(f"relay did not start: {line}")
        self.port = int(line[1])

    def command(self, cmd: str) -> list[str]:
        """Send one command; returns the reply's words after "OK <cmd>"."""
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        if not reply.startswith("OK"):
            raise RuntimeError(f"relay: {cmd!r} -> {reply!r}")
        return reply.split()[2:]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


async def run(args, log) -> dict:
    from lamina_p2p.launch import start_peer
    from lamina_p2p.model.loader import load_model
    from lamina_p2p.runtime import set_threads

    model_dir = args.model or benchlib.model_dir(args.preset, args.dtype)
    set_threads(args.threads)
    model = load_model(model_dir, dtype=args.dtype)
    kv_tok = kv_bytes_per_context_token(model.config, args.dtype)
    pairs = [(d, m) for d in args.delays_ms for m in args.micro_batches]
    # Room for every decode step the run takes: warm-up, each pair's settle step and timed steps, and
    # the tokens sequences decode while others still prefill in chunks (as in bench_e2e).
    decode_tokens = (8 + 2 * len(args.micro_batches) + args.rounds * len(pairs) * (args.steps + 1)
                     + (args.batch * args.context) // 1024)
    kv = int(args.batch * (args.context + decode_tokens + 16) * kv_tok * 1.25) + (64 << 20)
    loop = asyncio.get_running_loop()
    port, data_port, stream_port = free_port(), free_port(), free_port()
    relay = RelayProcess(port, args.rate_gbit)  # the control path: membership, register, free
    data_relay = RelayProcess(data_port, args.rate_gbit)  # the per-layer attends over ZeroMQ (prefill's large ones)
    stream_relay = RelayProcess(stream_port, args.rate_gbit)  # and over the TCP stream (decode's), as between hosts
    relays = (relay, data_relay, stream_relay)
    peer = None
    backend = None
    try:
        peer = await loop.run_in_executor(None, lambda: start_peer(
            ["start", "--role", "attention", "--listen", f"tcp://127.0.0.1:{port}", "--advertise",
             f"tcp://127.0.0.1:{relay.port}", "--data-port", str(data_port), "--data-advertise",
             f"tcp://127.0.0.1:{data_relay.port}", "--data-stream-port", str(stream_port),
             "--data-stream-advertise", f"tcp://127.0.0.1:{stream_relay.port}", "--kv-memory", str(kv),
             "--cluster", "netem", "--threads", str(args.attention_threads)]))
        log(f"attention peer on :{port} (data :{data_port}, stream :{stream_port}), advertised through the relays "
            f"on :{relay.port} (data :{data_relay.port}, stream :{stream_relay.port})")
        backend = LaminaBackend(model, model_dir, 0, args, "netem", join=[f"tcp://127.0.0.1:{relay.port}"],
                                cluster="netem")
        await backend.open(kv)
        rng = random.Random(args.context)
        prompts = [[rng.randrange(3, model.config.vocab_size) for _ in range(args.context)]
                   for _ in range(args.batch)]
        t0 = time.perf_counter()
        await backend.prefill(prompts, decode_tokens)
        log(f"prefill {args.batch} x {args.context} through the relay: {time.perf_counter() - t0:.1f} s")
        for m in args.micro_batches:
            await backend.decode(2, m)
        rates: dict[str, list[float]] = {f"{d}ms_mb{m}": [] for d, m in pairs}
        # The decode relay's median lateness per round (ms a chunk left after its due time): what
        # the emulator adds beyond the link, from its threads waiting for a CPU the peers use.
        late: dict[str, list[float]] = {f"{d}ms_mb{m}": [] for d, m in pairs}
        for r in range(args.rounds):
            order = pairs[r % len(pairs):] + pairs[:r % len(pairs)]
            for d, m in order:
                for rel in relays:
                    rel.command(f"delay {d}")
                await backend.decode(1, m)  # settle: chunks queued under the old delay drain
                stream_relay.command("late")
                dt = await backend.decode(args.steps, m)
                rates[f"{d}ms_mb{m}"].append(args.batch * args.steps / dt)
                late[f"{d}ms_mb{m}"].append(float(stream_relay.command("late")[1]))
            log(f"round {r + 1}/{args.rounds}: " + "  ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items()))
    finally:
        if backend is not None:
            await backend.close()
        if peer is not None:
            await loop.run_in_executor(None, peer.stop)
        for rel in relays:
            rel.close()
    tps = {k: benchlib.median(v) for k, v in rates.items()}
    d0 = args.delays_ms[0]
    rel = {f"{d}ms_mb{m}": tps[f"{d}ms_mb{m}"] / tps[f"{d0}ms_mb{m}"] for d, m in pairs}
    return {"model": model_dir, "batch": args.batch, "context": args.context, "dtype": args.dtype,
            "rate_gbit": args.rate_gbit, "delays_ms": args.delays_ms, "micro_batches": args.micro_batches,
            "threads": args.threads, "attention_threads": args.attention_threads,
            "omp_wait_policy": args.omp_wait_policy,
            "tokens_per_s": tps, "vs_zero_delay": rel, "rounds_tokens_per_s": rates,
            "relay_late_ms": {k: benchlib.median(v) for k, v in late.items()}}


def report(res: dict, file=sys.stdout) -> None:
    c = res["relay_check"]
    print(f"relay check: direct RTT {c['direct_rtt_ms']:.3f} ms; added RTT at one-way delay "
          + ", ".join(f"{r['delay_ms']} ms -> {r['added_ms']:.2f} ms" for r in c["rows"]), file=file)
    print(f"batch {res['batch']}, context {res['context']}, {res['dtype']}, {res['rate_gbit']} Gbit/s", file=file)
    mbs = res["micro_batches"]
    print(f"{'delay ms':>9} " + " ".join(f"{'mb' + str(m) + ' tok/s':>11} {'vs 0':>5}" for m in mbs), file=file)
    for d in res["delays_ms"]:
        print(f"{d:>9} " + " ".join(f"{res['tokens_per_s'][f'{d}ms_mb{m}']:>11.1f} "
                                    f"{res['vs_zero_delay'][f'{d}ms_mb{m}']:>5.2f}" for m in mbs), file=file)
    print("the decode relay's median chunk lateness (ms after its due time; the emulator's, not the link's):",
          file=file)
    for d in res["delays_ms"]:
        print(f"{d:>9} " + " ".join(f"{'mb' + str(m):>11} {res['relay_late_ms'][f'{d}ms_mb{m}']:>5.2f}"
                                    for m in mbs), file=file)
    if 1.0 in res["delays_ms"] and res["delays_ms"][0] == 0.0:
        tps = res["tokens_per_s"]
        best = max(mbs, key=lambda m: tps[f"1.0ms_mb{m}"])
        v = res["vs_zero_delay"][f"1.0ms_mb{best}"]
        best0 = max(mbs, key=lambda m: tps[f"0.0ms_mb{m}"])
        print(f"target: 1 ms one-way, the best M (here {best}) keeps >= 0.8 of its zero-delay tokens/s: {v:.2f} "
              f"[{'met' if v >= 0.8 else 'MISSED'}]; of the best at zero delay (M = {best0}): "
              f"{tps[f'1.0ms_mb{best}'] / tps[f'0.0ms_mb{best0}']:.2f}", file=file)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="context 128, 2 rounds of 3 steps")
    ap.add_argument("--json", nargs="?", const="-", default=None)
    ap.add_argument("--plot", help="directory for the PNG plot")
    ap.add_argument("--delays-ms", type=float, nargs="+", default=[0.0, 0.2, 1.0, 5.0])
    ap.add_argument("--rate-gbit", type=float, default=1.0)
    ap.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=None, help="prompt tokens per sequence (default 512)")
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--model")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attention-threads", type=int, default=2)
    ap.add_argument("--placement", default="request")
    ap.add_argument("--omp-wait-policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE", ""],
                    help="OMP_WAIT_POLICY for this process and the peers it starts ('' = leave as is)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args(argv)
    benchlib.set_omp_wait_policy(args.omp_wait_policy)
    args.context = args.context or (128 if args.quick else 512)
    args.steps = args.steps or (3 if args.quick else 8)
    args.rounds = args.rounds or (2 if args.quick else 4)
    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    check = relay_mod.check(args.delays_ms, args.rate_gbit, n=20 if args.quick else 50, throughput_bytes=0)
    log("relay check: " + ", ".join(f"{r['delay_ms']} ms -> +{r['added_ms']:.2f} ms RTT" for r in check["rows"]))
    from lamina_p2p.runtime import run_async

    res = run_async(run(args, log))
    res["relay_check"] = check
    res["wall_s"] = time.perf_counter() - t0
    if args.plot:
        p = Path(args.plot) / "netem_tokens_vs_delay.png"
        benchlib.plot_lines(p, f"decode tokens/s vs one-way delay ({args.rate_gbit} Gbit/s, batch {args.batch}, "
                               f"ctx {args.context})", "one-way delay (ms)", "tokens/s",
                            {f"micro-batches {m}": (args.delays_ms, [res["tokens_per_s"][f"{d}ms_mb{m}"]
                                                                     for d in args.delays_ms])
                             for m in args.micro_batches})
        log(f"wrote {p}")
    report(res, file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json:
        benchlib.emit_json(res, args.json)
    return res


if __name__ == "__main__":
    main()
