"""End-to-end decode throughput: transformers generate, lamina single process, local clusters.

    python tools/bench_e2e.py [--quick] [--json [FILE]] [--plot DIR] [--contexts 512 2048 8192] [--batch 16]

Method (DESIGN.md s10: every figure is a ratio measured in one run):
  * Each backend is built once per context and prefilled once through its own real path
    (transformers generate / the lamina engine's chunked prefill) to `context` tokens per
    sequence; prefill is never timed. Backends: transformers (AutoModelForCausalLM on the
    same safetensors), lamina single process (in-process attention), a cluster with 1
    attention peer and one with 2 (peers are real processes on loopback).
  * All backends stay alive together and decode in interleaved rounds: each round runs
    `--steps` decode steps of every system in turn (a "system" is a backend at a
    micro-batch count; the engine's micro-batch count is a setting, switched between
    rounds). Noise from other work on the machine hits every system alike; the figure
    per system is the median over rounds of batch*steps/elapsed.
  * transformers is timed from a StoppingCriteria called after every generated token:
    per round one generate(max_new_tokens=steps+1) continuing on its DynamicCache, and
    the `steps` intervals between consecutive calls are the decode steps (generate's
    set-up cost is left out, which favours the baseline).
  * Roofline fraction = tokens/s * (weight bytes read per step / batch + KV bytes read
    per token at the mean context of the round) / STREAM read bandwidth measured in the
    same run (tools/bench_kernels.stream_read_gbps).
Prefill on 2 cores is slow (16 x 2048 tokens is about a minute per backend, 16 x 8192
several minutes; 8192 is most of a full run): --quick runs context 256 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402

# system name -> (backend, micro-batches)
SYSTEMS = {
    "transformers": ("transformers", 1),
    "single": ("single", 1),
    "cluster1_mb1": ("cluster1", 1),
    "cluster1_mb2": ("cluster1", 2),
    "cluster1_mb3": ("cluster1", 3),
    "cluster2_mb1": ("cluster2", 1),
    "cluster2_mb2": ("cluster2", 2),
    "cluster2_mb3": ("cluster2", 3),
}
REQUIRED = ["transformers", "single", "cluster1_mb1", "cluster1_mb2", "cluster1_mb3", "cluster2_mb2"]


# -- backends ----------------------------------------------------------------------------------
class TransformersBackend:
    """HF generate on the same weights, continued round by round on one DynamicCache."""

    def __init__(self, model_dir: str, dtype: str):
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        import warnings

        transformers.logging.set_verbosity_error()
        warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
        self.ids = None
        self.cache = None

    def _generate(self, new_tokens: int) -> list[float]:
        torch = self.torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        stamps: list[float] = []

        class Stamp(StoppingCriteria):
            def __call__(self, input_ids, scores, **kw):
                stamps.append(time.perf_counter())
                return torch.zeros(input_ids.shape[0], dtype=torch.bool)

        with torch.inference_mode():
            self.ids = self.model.generate(self.ids, attention_mask=torch.ones_like(self.ids), do_sample=False,
                                           max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                           past_key_values=self.cache, pad_token_id=0,
                                           stopping_criteria=StoppingCriteriaList([Stamp()]))
        return stamps

    def prefill(self, prompts: list[list[int]]) -> None:
        from transformers import DynamicCache

        self.ids = self.torch.tensor(prompts, dtype=self.torch.long)
        self.cache = DynamicCache()
        self._generate(1)

    def context(self) -> float:
        return float(self.cache.get_seq_length())

    def decode(self, steps: int) -> float:
        """Seconds for `steps` decode steps (intervals between consecutive tokens)."""
        stamps = self._generate(steps + 1)
        return stamps[-1] - stamps[0]

    def close(self) -> None:
        self.ids = self.cache = None


class LaminaBackend:
    """One lamina engine (in-process attention or a fresh local cluster), driven step by step."""

    def __init__(self, model, model_dir: str, peers: int, args, name: str, join: list[str] | None = None,
                 cluster: str | None = None):
        self.model, self.model_dir, self.peers, self.args, self.name = model, model_dir, peers, args, name
        self.join, self.cluster = list(join or []), cluster or f"bench-{name}"
        self.stack = contextlib.AsyncExitStack()
        self.engine = None
        self.seqs = []

    async def open(self, kv_bytes: int) -> None:
        from lamina_p2p.compute.engine import Engine
        from lamina_p2p.compute.generate import GenerateOptions, open_transport

        split = getattr(self.args, "split_cores", None) if self.peers else None
        opts = GenerateOptions(model_dir=self.model_dir, attention_peers=self.peers, kv_bytes=kv_bytes,
                               join=self.join, attention_threads=split[3] if split else self.args.attention_threads,
                               attention_cpus=[split[1]] if split else [], cluster=self.cluster,
                               placement=self.args.placement)
        transport = await self.stack.enter_async_context(open_transport(opts))
        self.engine = Engine(self.model, transport, placement=self.args.placement, micro_batches=1)
        self.stack.callback(self.engine.close)
        if hasattr(transport, "wait_for_peers"):
            await transport.wait_for_peers(transport.expected_peers, timeout=60.0)

    async def prefill(self, prompts: list[list[int]], max_tokens: int) -> None:
        from lamina_p2p.compute.sequence import SamplingParams

        self.seqs = [self.engine.new_sequence(p, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
                     for p in prompts]
        while not all(s.output for s in self.seqs):
            await self.engine.step([s for s in self.seqs if not s.finished])

    def context(self) -> float:
        return sum(s.cached for s in self.seqs) / len(self.seqs)

    async def decode(self, steps: int, micro_batches: int) -> float:
        self.engine.micro_batches = micro_batches
        t0 = time.perf_counter()
        for _ in range(steps):
            running = [s for s in self.seqs if not s.finished]
            if len(running) != len(self.seqs):
                raise RuntimeError(f"{self.name}: sequences finished early (max_tokens too small)")
            await self.engine.step(running)
        return time.perf_counter() - t0

    async def close(self) -> None:
        if self.engine is not None and self.seqs:
            with contextlib.suppress(Exception):
                await self.engine.release(self.seqs)
        await self.stack.aclose()


def use_cores(args, clustered: bool) -> None:
    """--split-cores: cluster systems run this (compute) process on its CPUs and the attention
    peers on theirs (a two-machine cluster in miniature); the others get every CPU."""
    if not args.split_cores:
        return
    import torch

    from lamina_p2p.runtime import pin_cpus

    compute, _, threads, _ = args.split_cores
    pin_cpus(compute if clustered else args.all_cpus)
    torch.set_num_threads(threads if clustered else args.threads)


# -- bytes per token ---------------------------------------------------------------------------
def weight_bytes_per_step(model_dir: str) -> int:
    """Bytes of weights a decode step reads: every tensor but the embedding table (a row lookup),
    unless the LM head is tied to it."""
    import json

    from safetensors import safe_open

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    tied = cfg.get("tie_word_embeddings", False)
    total = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                if k.endswith("embed_tokens.weight") and not tied:
                    continue
                t = st.get_slice(k)
                n = math.prod(t.get_shape())
                total += n * {"F32": 4, "BF16": 2, "F16": 2}[t.get_dtype()]
    return total


def kv_bytes_per_context_token(model_dir: str, dtype: str) -> int:
    import json

    c = json.loads((Path(model_dir) / "config.json").read_text())
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * head_dim * (4 if dtype == "float32" else 2)


# -- the run -----------------------------------------------------------------------------------
async def run_context(ctx_len: int, args, model, model_dir: str, systems: list[str], wbytes: int,
                      kv_tok: int, log) -> dict:
    rng = random.Random(ctx_len)
    prompts = [[rng.randrange(3, model.config.vocab_size) for _ in range(ctx_len)]
               for _ in range(args.batch)]
    backends_needed = sorted({SYSTEMS[s][0] for s in systems}, key=lambda b: list(dict.fromkeys(
        v[0] for v in SYSTEMS.values())).index(b))
    per_backend = {b: [s for s in systems if SYSTEMS[s][0] == b] for b in backends_needed}
    # Prefill runs in chunks (the engine's step budget): sequences whose prompt is done early decode
    # while the others still prefill, so leave room for those tokens too.
    decode_tokens = (args.warmup + args.rounds * args.steps * max(len(v) for v in per_backend.values()) + 4
                     + (args.batch * ctx_len) // 1024 + 8)
    kv_need = args.batch * (ctx_len + decode_tokens + 16) * kv_tok
    backends: dict = {}
    prefill_s: dict[str, float] = {}
    loop = asyncio.get_running_loop()
    try:
        for b in backends_needed:
            t0 = time.perf_counter()
            if b == "transformers":
                use_cores(args, clustered=False)
                be = TransformersBackend(model_dir, args.dtype)
                backends[b] = be
                # In a worker thread: the cluster engines' gossip must keep running on this loop.
                await loop.run_in_executor(None, be.prefill, prompts)
                await loop.run_in_executor(None, be.decode, args.warmup)
            else:
                peers = {"single": 0, "cluster1": 1, "cluster2": 2}[b]
                use_cores(args, clustered=peers > 0)
                be = LaminaBackend(model, model_dir, peers, args, b)
                backends[b] = be
                share = 1.0 if peers <= 1 else 0.75  # request placement splits sequences between the peers
                await be.open(int(kv_need * 1.25 * share) + (64 << 20))
                await be.prefill(prompts, decode_tokens)
                for s in per_backend[b]:
                    await be.decode(max(1, args.warmup // len(per_backend[b])), SYSTEMS[s][1])
            prefill_s[b] = time.perf_counter() - t0
            log(f"  ctx {ctx_len}: {b} ready (prefill + warm-up {prefill_s[b]:.1f} s)")
        rates: dict[str, list[float]] = {s: [] for s in systems}
        bytes_tok: dict[str, list[float]] = {s: [] for s in systems}
        for r in range(args.rounds):
            order = systems[r % len(systems):] + systems[:r % len(systems)]  # rotate who goes first
            for s in order:
                b, mb = SYSTEMS[s]
                be = backends[b]
                c0 = be.context()
                use_cores(args, clustered=b.startswith("cluster"))
                if b == "transformers":
                    dt = await loop.run_in_executor(None, be.decode, args.steps)
                else:
                    dt = await be.decode(args.steps, mb)
                c_mid = 0.5 * (c0 + be.context())
                rates[s].append(args.batch * args.steps / dt)
                bytes_tok[s].append(wbytes / args.batch + kv_tok * c_mid)
            log(f"  ctx {ctx_len} round {r + 1}/{args.rounds}: "
                + "  ".join(f"{s} {rates[s][-1]:.0f}" for s in systems))
    finally:
        use_cores(args, clustered=False)
        for b, be in backends.items():
            if b == "transformers":
                be.close()
            else:
                await be.close()
    tps = {s: benchlib.median(v) for s, v in rates.items()}
    return {"tokens_per_s": tps, "bytes_per_token": {s: benchlib.median(v) for s, v in bytes_tok.items()},
            "rounds_tokens_per_s": rates, "prefill_and_warmup_s": prefill_s}


def ratios(tps: dict[str, float]) -> dict[str, float]:
    def r(a, b):
        return tps[a] / tps[b] if a in tps and b in tps and tps[b] > 0 else None

    c1 = [s for s in ("cluster1_mb1", "cluster1_mb2", "cluster1_mb3") if s in tps]
    best = max(c1, key=lambda s: tps[s]) if c1 else None
    out = {
        "single_vs_transformers": r("single", "transformers"),
        "cluster1_best": best,
        "cluster1_best_vs_transformers": r(best, "transformers") if best else None,
        "cluster1_best_vs_single": r(best, "single") if best else None,
        "cluster1_mb2_vs_mb1": r("cluster1_mb2", "cluster1_mb1"),
        "cluster1_mb3_vs_mb1": r("cluster1_mb3", "cluster1_mb1"),
        "cluster2_mb2_vs_cluster1_mb2": r("cluster2_mb2", "cluster1_mb2"),
        "cluster2_mb2_vs_mb1": r("cluster2_mb2", "cluster2_mb1"),
    }
    return {k: v for k, v in out.items() if v is not None}


TARGETS = [  # (ratio key, threshold, what the issue asks)
    ("cluster1_best_vs_transformers", 2.0, "cluster (1 attention peer) >= 2.0x transformers"),
    ("cluster1_mb2_vs_mb1", 1.3, "micro-batches 2 >= 1.3x micro-batches 1"),
    ("cluster1_best_vs_single", 1.0, "cluster >= 1.0x single process"),
]


async def main_async(args, log) -> dict:
    from lamina_p2p.model.loader import load_model
    from lamina_p2p.runtime import set_threads

    model_dir = args.model or benchlib.model_dir(args.preset, args.dtype)
    log(f"model {model_dir}, batch {args.batch}, dtype {args.dtype}, threads {args.threads}, "
        f"attention threads {args.attention_threads}")
    stream = benchlib.stream_read_gbps(args.stream_bytes, 3 if args.quick else 5)
    log(f"STREAM read {stream:.1f} GB/s")
    set_threads(args.threads)
    model = load_model(model_dir, dtype=args.dtype)
    wbytes = weight_bytes_per_step(model_dir)
    kv_tok = kv_bytes_per_context_token(model_dir, args.dtype)
    systems = [s for s in args.systems]
    out = {"stream_read_gbps": stream, "model": model_dir, "batch": args.batch, "dtype": args.dtype,
           "threads": args.threads, "attention_threads": args.attention_threads, "placement": args.placement,
           "omp_wait_policy": args.omp_wait_policy,
           "split_cores": {"compute_cpus": args.split_cores[0], "attention_cpus": args.split_cores[1]}
           if args.split_cores else None,
           "steps_per_round": args.steps, "rounds": args.rounds, "weight_bytes_per_step": wbytes,
           "kv_bytes_per_context_token": kv_tok, "contexts": {}}
    for ctx_len in args.contexts:
        res = await run_context(ctx_len, args, model, model_dir, systems, wbytes, kv_tok, log)
        res["roofline_fraction"] = {s: res["tokens_per_s"][s] * res["bytes_per_token"][s] / (stream * 1e9)
                                    for s in systems}
        res["ratios"] = ratios(res["tokens_per_s"])
        out["contexts"][str(ctx_len)] = res
    # A second STREAM figure at the end shows how much the machine's load moved during the run.
    out["stream_read_gbps_end"] = benchlib.stream_read_gbps(args.stream_bytes, 3)
    return out


def report(res: dict, file=sys.stdout) -> None:
    systems = list(next(iter(res["contexts"].values()))["tokens_per_s"]) if res["contexts"] else []
    print(f"STREAM read {res['stream_read_gbps']:.1f} GB/s (end of run {res['stream_read_gbps_end']:.1f}); "
          f"batch {res['batch']}, {res['dtype']}, compute threads {res['threads']}, attention threads "
          f"{res['attention_threads']}, OMP_WAIT_POLICY {res.get('omp_wait_policy') or 'unset'}", file=file)
    if res.get("split_cores"):
        sc = res["split_cores"]
        print(f"clusters on split cores: compute process on CPUs {sc['compute_cpus']}, attention peers on "
              f"{sc['attention_cpus']} (transformers and single on every CPU)", file=file)
    print(f"{'context':>8} {'system':<14} {'tok/s':>8} {'roofline':>9} {'vs transformers':>16} {'vs single':>10}",
          file=file)
    for ctx, c in res["contexts"].items():
        tps = c["tokens_per_s"]
        for s in systems:
            vt = tps[s] / tps["transformers"] if tps.get("transformers") else float("nan")
            vs = tps[s] / tps["single"] if tps.get("single") else float("nan")
            print(f"{ctx:>8} {s:<14} {tps[s]:>8.1f} {c['roofline_fraction'][s]:>9.3f} {vt:>15.2f}x {vs:>9.2f}x",
                  file=file)
        for k, v in c["ratios"].items():
            if isinstance(v, float):
                print(f"{'':>8} {k:<34} {v:.2f}", file=file)
    print("targets (issue 5, at context 2048 where measured):", file=file)
    key = "2048" if "2048" in res["contexts"] else next(iter(res["contexts"]), None)
    if key:
        c = res["contexts"][key]
        for rk, th, text in TARGETS:
            v = c["ratios"].get(rk)
            if v is not None:
                print(f"  [{'met' if v >= th else 'MISSED'}] {text}: {v:.2f} (context {key})", file=file)
        for s, th in (("single", 0.5), (c["ratios"].get("cluster1_best"), 0.4)):
            if s in c["roofline_fraction"]:
                v = c["roofline_fraction"][s]
                print(f"  [{'met' if v >= th else 'MISSED'}] roofline {s} >= {th}: {v:.3f} (context {key})", file=file)


def plots(res: dict, out_dir: Path) -> list[Path]:
    ctxs = [int(c) for c in res["contexts"]]
    systems = list(next(iter(res["contexts"].values()))["tokens_per_s"])
    p1 = out_dir / "e2e_tokens_vs_context.png"
    benchlib.plot_lines(p1, f"decode tokens/s vs context (batch {res['batch']}, {res['dtype']})", "context (tokens)",
                        "tokens/s", {s: (ctxs, [res["contexts"][str(c)]["tokens_per_s"][s] for c in ctxs])
                                     for s in systems}, logx=len(ctxs) > 1)
    p2 = out_dir / "e2e_tokens_vs_microbatches.png"
    series = {}
    for c in ctxs:
        tps = res["contexts"][str(c)]["tokens_per_s"]
        for cl in ("cluster1", "cluster2"):
            mbs = [m for m in (1, 2, 3) if f"{cl}_mb{m}" in tps]
            if mbs:
                series[f"{cl}, ctx {c}"] = (mbs, [tps[f"{cl}_mb{m}"] for m in mbs])
        if "single" in tps:
            series[f"single, ctx {c}"] = ([1, 2, 3], [tps["single"]] * 3)
    benchlib.plot_lines(p2, "decode tokens/s vs micro-batches (single process: flat reference)", "micro-batches",
                        "tokens/s", series)
    return [p1, p2]


def parse_split(ap, spec: str | None):
    """'0:1' -> (compute cpus, attention cpus, compute threads, attention threads)."""
    if not spec:
        return None
    from lamina_p2p.runtime import parse_cpus

    try:
        compute, attention = spec.split(":")
        c, a = parse_cpus(compute), parse_cpus(attention)
    except ValueError as e:
        ap.error(f"--split-cores {spec!r}: expected COMPUTE:ATTENTION CPU lists like 0:1 ({e})")
    if c & a:
        ap.error(f"--split-cores {spec!r}: the two CPU lists overlap")
    return compute, attention, len(c), len(a)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="context 256, 3 rounds of 4 steps (a few minutes on a quiet machine)")
    ap.add_argument("--json", nargs="?", const="-", default=None,
                    help="print one JSON object (or write it to FILE); the table goes to stderr")
    ap.add_argument("--plot", help="directory for the PNG plots")
    ap.add_argument("--contexts", type=int, nargs="+", default=None, help="default 512 2048 8192 (--quick: 512)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--model", help="model directory (default: the preset, written once to a temp dir)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the compute side (and transformers)")
    ap.add_argument("--attention-threads", type=int, default=2, help="numba threads of each attention peer")
    ap.add_argument("--placement", default="request")
    ap.add_argument("--omp-wait-policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE", ""],
                    help="OMP_WAIT_POLICY for this process and the peers it starts ('' = leave as is)")
    ap.add_argument("--steps", type=int, default=None, help="decode steps per system per round")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=4, help="decode steps per backend before timing")
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    ap.add_argument("--stream-bytes", type=int, default=None)
    ap.add_argument("--split-cores", metavar="COMPUTE:ATTENTION", default=None,
                    help="cluster systems on disjoint CPUs, e.g. 0:1 (compute process on CPU 0, attention peers "
                         "on CPU 1, one thread per CPU); transformers and single keep every CPU")
    args = ap.parse_args(argv)
    args.split_cores = parse_split(ap, args.split_cores)
    args.all_cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    benchlib.set_omp_wait_policy(args.omp_wait_policy)
    if args.contexts is None:
        args.contexts = [256] if args.quick else [512, 2048, 8192]
    args.steps = args.steps or (4 if args.quick else 10)
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.stream_bytes = args.stream_bytes or ((256 << 20) if args.quick else (1 << 30))
    for s in REQUIRED:
        if s not in args.systems:
            print(f"note: {s} not measured", file=sys.stderr)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    from lamina_p2p.runtime import run_async

    res = run_async(main_async(args, log))
    res["wall_s"] = time.perf_counter() - t0
    if args.plot:
        for p in plots(res, Path(args.plot)):
            log(f"wrote {p}")
    report(res, file=sys.stderr if args.json in ("-",) else sys.stdout)
    if args.json:
        benchlib.emit_json(res, args.json)
    return res


if __name__ == "__main__":
    main()
