"""End-to-end decode throughput: llama.cpp, transformers, lamina single process, local clusters.

    python tools/bench_e2e.py [--model DIR] [--quick] [--json [FILE]] [--plot DIR] [--contexts 512 2048]
                              [--batch 1 16] [--llama-cpp BIN_DIR --gguf FILE] [--trace-steps N]

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
  * --llama-cpp BIN_DIR --gguf FILE (the same weights as GGUF, e.g. from ../shared/tools/llama_cpp.sh):
    `llama-batched-bench` is one more system of the rotation, run once per round (decode only:
    its S_TG figure, same threads, the round's context as a shared prompt `-pps`, `-fa on -no-kvu`).
    Without the binary or the file the column is skipped (said on stderr), never an error.
  * After the timed rounds each lamina system decodes --trace-steps more steps with the engine's
    tracer on; the per-layer medians (dense, attention wait, kernel, messaging = wait minus the
    kernel spans inside it, LM head + sampling per step) come from those spans.
Prefill on 2 cores is slow (16 x 2048 tokens is about a minute per backend, 16 x 8192
several minutes): --quick runs context 256 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402

# system name -> (backend, micro-batches)
SYSTEMS = {
    "llama.cpp": ("llama.cpp", 1),
    "transformers": ("transformers", 1),
    "single": ("single", 1),
    "cluster1_mb1": ("cluster1", 1),
    "cluster1_mb2": ("cluster1", 2),
    "cluster1_mb3": ("cluster1", 3),
    "cluster2_mb1": ("cluster2", 1),
    "cluster2_mb2": ("cluster2", 2),
    "cluster2_mb3": ("cluster2", 3),
}
REQUIRED = ["llama.cpp", "transformers", "single", "cluster1_mb1", "cluster1_mb2", "cluster1_mb3", "cluster2_mb2"]


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
        from lamina_p2p.model.source import resolve

        path = resolve(model_dir)  # a directory, or a .gguf file (transformers' GGUF loader)
        src, kw = (path.parent, dict(gguf_file=path.name)) if path.is_file() else (path, {})
        self.model = AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, dtype), **kw).eval()
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


class LlamaCppBackend:
    """llama.cpp's `llama-batched-bench` on the same weights (GGUF), one invocation per round.

    Decode only: each run prefills one shared prompt of `context` tokens (-pps: copied to every
    sequence, which then attends its own full context) and reports S_TG, the generation tokens/s
    over all sequences. Flags as the issue's reference run: -fa on -no-kvu, same threads.
    """

    def __init__(self, bin_dir: str, gguf: str, threads: int):
        self.exe = str(Path(bin_dir) / "llama-batched-bench")
        self.gguf, self.threads = gguf, threads
        self.ctx_len, self.batch, self.cached = 0, 1, 0.0

    @staticmethod
    def available(bin_dir: str | None, gguf: str | None) -> str | None:
        """None if usable, else why not."""
        if not bin_dir or not gguf:
            return "no --llama-cpp/--gguf given"
        exe = Path(bin_dir) / "llama-batched-bench"
        if not (exe.is_file() and os.access(exe, os.X_OK)):
            return f"{exe}: not found or not executable"
        if not Path(gguf).is_file():
            return f"{gguf}: file not found"
        return None

    def prefill(self, ctx_len: int, batch: int) -> None:
        self.ctx_len, self.batch, self.cached = ctx_len, batch, float(ctx_len)

    def context(self) -> float:
        return self.cached

    def decode(self, steps: int) -> float:
        """Seconds for `steps` decode steps of the whole batch (from llama.cpp's own S_TG)."""
        per_seq = -(-(self.ctx_len + steps + 8) // 256) * 256  # -no-kvu gives each sequence n_ctx / n_seq
        cmd = [self.exe, "-m", self.gguf, "-c", str(per_seq * self.batch), "-npp", str(self.ctx_len),
               "-ntg", str(steps), "-npl", str(self.batch), "-pps", "-t", str(self.threads), "-tb", str(self.threads),
               "-fa", "on", "-no-kvu", "--output-format", "jsonl"]
        # llama.cpp runs as its users run it: OpenMP settings this tool sets for our processes
        # (--omp-wait-policy) are ours, not its. Passive waiting halved its batch-1 decode here
        # (llama-bench -n 64 -t 2: 24 tok/s with OMP_WAIT_POLICY=PASSIVE, 49 without).
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=env)
        rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not rows:
            raise RuntimeError(f"llama-batched-bench failed (rc {proc.returncode}): {proc.stderr.strip()[-500:]}")
        self.cached = float(self.ctx_len + steps / 2)
        return self.batch * steps / rows[-1]["speed_tg"]

    def close(self) -> None:
        pass


# -- traces --------------------------------------------------------------------------------------
def chrome_spans(trace: dict) -> list[tuple]:
    """A Chrome trace (Tracer.chrome()) back to (process, row, name, t0 s, t1 s, args) tuples."""
    events = trace.get("traceEvents", [])
    procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e["name"] == "process_name"}
    rows = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
            if e.get("ph") == "M" and e["name"] == "thread_name"}
    return [(procs.get(e["pid"], ""), rows.get((e["pid"], e["tid"]), ""), e["name"], e["ts"] / 1e6,
             (e["ts"] + e["dur"]) / 1e6, e.get("args")) for e in events if e.get("ph") == "X"]


def trace_medians(spans) -> dict:
    """Per-layer medians in ms from the engine tracer's spans (process, row, name, t0, t1, args).

    dense: the compute peer's dense spans (post of one layer + pre of the next); attention_wait:
    the compute side's "attention L<i>" spans; kernel: the attention kernel spans (in process or
    reported by the peer); messaging: per wait span, its length minus the kernel spans of that
    layer inside it (what the path between the two costs); exposed_wait: the part of each wait span
    the dense thread really waited (at M >= 2 the rest overlaps other micro-batches' dense work);
    lm_head: the step's logits+sample span.
    """
    dense, waits, kernels, head, exposed = [], [], [], [], []
    for process, row, name, t0, t1, args in spans:
        if process == "compute" and name.startswith("dense"):
            dense.append((t0, t1))
        elif process == "compute" and name.startswith("attention L"):
            waits.append((name.split("L", 1)[1], t0, t1))
            if args and "exposed_ms" in args:
                exposed.append((t1 - args["exposed_ms"] / 1e3, t1))
        elif row == "kernel":
            kernels.append((name.lstrip("L"), t0, t1))
        elif process == "compute" and name.startswith("logits"):
            head.append((t0, t1))
    by_layer: dict[str, list[tuple[float, float]]] = {}
    for layer, t0, t1 in kernels:
        by_layer.setdefault(layer, []).append((t0, t1))
    messaging = []
    for layer, t0, t1 in waits:
        inside = [k1 - k0 for k0, k1 in by_layer.get(layer, []) if k0 >= t0 - 1e-4 and k1 <= t1 + 1e-4]
        if inside:
            messaging.append((t1 - t0) - max(inside))  # kernels of one layer's peers run side by side

    def med(xs):
        return 1e3 * benchlib.median(xs) if xs else None

    return {"dense_ms": med([b - a for a, b in dense]), "attention_wait_ms": med([b - a for _, a, b in waits]),
            "kernel_ms": med([b - a for _, a, b in kernels]), "messaging_ms": med(messaging),
            "exposed_wait_ms": med([b - a for a, b in exposed]),
            "lm_head_and_sample_ms": med([b - a for a, b in head]), "spans": len(spans),
            "step_budget_ms": step_budget(dense, exposed, head)}


def step_budget(dense, exposed, head) -> dict | None:
    """Where the compute thread's time goes, in ms per step (means over the traced steps): dense spans,
    exposed attention waits, the LM head and sampling, and the rest (sends, receives, the step's Python
    around them): the sum is the step. A step runs from the end of one logits span to the end of the next
    (the traced steps run back to back; the scheduler's work between them is in "other")."""
    if len(head) < 2:
        return None
    t0, t1 = head[0][1], head[-1][1]
    steps = len(head) - 1

    def inside(spans):
        return sum(b - a for a, b in spans if a >= t0 and b <= t1)

    total = t1 - t0
    d, e, h = inside(dense), inside(exposed), inside(head[1:])
    return {k: round(v * 1e3 / steps, 3) for k, v in
            (("step", total), ("dense", d), ("exposed_wait", e), ("lm_head_and_sample", h),
             ("other", total - d - e - h))}


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
        from lamina_p2p.launch import open_transport
        from lamina_p2p.options import GenerateOptions
        from lamina_p2p.runtime import freeze_heap

        split = getattr(self.args, "split_cores", None) if self.peers else None
        opts = GenerateOptions(model_dir=self.model_dir, attention_peers=self.peers, kv_bytes=kv_bytes,
                               join=self.join, attention_threads=split[3] if split else self.args.attention_threads,
                               attention_cpus=[split[1]] if split else [], cluster=self.cluster,
                               placement=self.args.placement, busy_poll_us=getattr(self.args, "busy_poll_us", 0))
        transport = await self.stack.enter_async_context(open_transport(opts))
        self.engine = Engine(self.model, transport, placement=self.args.placement, micro_batches=1)
        self.stack.callback(self.engine.close)
        if hasattr(transport, "wait_for_peers"):
            await transport.wait_for_peers(transport.expected_peers, timeout=60.0)
        freeze_heap()  # as `lamina-node` does once ready: no full collection mid-measurement

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

    async def traced(self, steps: int, micro_batches: int) -> dict:
        """Decode `steps` more steps with the tracer on; per-layer medians (trace_medians)."""
        from lamina_p2p.trace import Tracer

        tracer = Tracer()
        self.engine.tracer = self.engine.transport.tracer = tracer
        try:
            await self.decode(steps, micro_batches)
        finally:
            self.engine.tracer = self.engine.transport.tracer = None
        return trace_medians(chrome_spans(tracer.chrome()))

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
    from lamina_p2p.runtime import pin_cpus, set_threads

    compute, _, threads, _ = args.split_cores
    pin_cpus(compute if clustered else args.all_cpus)
    set_threads(threads if clustered else args.threads)


# -- bytes per token ---------------------------------------------------------------------------
def weight_bytes_per_step(cfg, dtype: str) -> int:
    """Bytes of weights a decode step reads at the run's dtype (the engine converts to it): every
    tensor but the embedding table (a row lookup), unless the LM head is tied to it. cfg: the
    loaded model's ModelConfig."""
    from lamina_kernels import storage_itemsize
    from lamina_p2p.plan.geometry import Geometry

    n = Geometry.from_model_config(cfg).num_params()
    if not cfg.tie_word_embeddings:
        n -= cfg.vocab_size * cfg.hidden_size
    return n * storage_itemsize(dtype)


def kv_bytes_per_context_token(cfg, dtype: str) -> int:
    """K and V bytes of one cached token over all layers at the run's dtype (cfg: a ModelConfig)."""
    from lamina_kernels import storage_itemsize

    return cfg.kv_bytes_per_token(storage_itemsize(dtype))


# -- the run -----------------------------------------------------------------------------------
async def run_context(ctx_len: int, batch: int, args, model, model_dir: str, systems: list[str], wbytes: int,
                      kv_tok: int, log) -> dict:
    from lamina_p2p.runtime import compute_threads

    rng = random.Random(ctx_len)
    prompts = [[rng.randrange(3, model.config.vocab_size) for _ in range(ctx_len)] for _ in range(batch)]
    order_all = list(dict.fromkeys(v[0] for v in SYSTEMS.values()))
    backends_needed = sorted({SYSTEMS[s][0] for s in systems}, key=order_all.index)
    per_backend = {b: [s for s in systems if SYSTEMS[s][0] == b] for b in backends_needed}
    # Prefill runs in chunks (the engine's step budget): sequences whose prompt is done early decode
    # while the others still prefill, so leave room for those tokens too.
    decode_tokens = (args.warmup + (args.rounds * (args.steps + 1) + args.trace_steps) * max(len(v) for v in per_backend.values())
                     + 4 + (batch * ctx_len) // 1024 + 8)
    kv_need = batch * (ctx_len + decode_tokens + 16) * kv_tok
    backends: dict = {}
    prefill_s: dict[str, float] = {}
    loop = asyncio.get_running_loop()
    tag = f"batch {batch} ctx {ctx_len}"
    try:
        for b in backends_needed:
            t0 = time.perf_counter()
            if b == "llama.cpp":
                be = LlamaCppBackend(args.llama_cpp, args.gguf, args.threads)
                be.prefill(ctx_len, batch)
                backends[b] = be
            elif b == "transformers":
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
            log(f"  {tag}: {b} ready (prefill + warm-up {prefill_s[b]:.1f} s)")
        model_threads = compute_threads()  # the count the shared model last ran with
        rates: dict[str, list[float]] = {s: [] for s in systems}
        bytes_tok: dict[str, list[float]] = {s: [] for s in systems}
        for r in range(args.rounds):
            order = systems[r % len(systems):] + systems[:r % len(systems)]  # rotate who goes first
            for s in order:
                b, mb = SYSTEMS[s]
                be = backends[b]
                use_cores(args, clustered=b.startswith("cluster"))
                if isinstance(be, LaminaBackend):
                    if compute_threads() != model_threads:
                        # The lamina systems share one model in this process: another torch thread count
                        # makes its fp16 weights re-pack for that count on the next step
                        # (model/linear.py), once. A serving process keeps one count: not timed.
                        await be.decode(1, mb)
                    model_threads = compute_threads()
                c0 = be.context()
                if b in ("transformers", "llama.cpp"):
                    dt = await loop.run_in_executor(None, be.decode, args.steps)
                else:
                    dt = await be.decode(args.steps, mb)
                c_mid = 0.5 * (c0 + be.context())
                rates[s].append(batch * args.steps / dt)
                bytes_tok[s].append(wbytes / batch + kv_tok * c_mid)
            log(f"  {tag} round {r + 1}/{args.rounds}: " + "  ".join(f"{s} {rates[s][-1]:.1f}" for s in systems))
        traces = {}
        if args.trace_steps:
            for s in systems:
                b, mb = SYSTEMS[s]
                if isinstance(backends[b], LaminaBackend):
                    use_cores(args, clustered=b.startswith("cluster"))
                    traces[s] = await backends[b].traced(args.trace_steps, mb)
                    log(f"  {tag} trace {s}: " + ", ".join(f"{k} {v:.3f}" for k, v in traces[s].items()
                                                          if isinstance(v, float)))
    finally:
        use_cores(args, clustered=False)
        for b, be in backends.items():
            if isinstance(be, LaminaBackend):
                await be.close()
            else:
                be.close()
    tps = {s: benchlib.median(v) for s, v in rates.items()}
    return {"tokens_per_s": tps, "bytes_per_token": {s: benchlib.median(v) for s, v in bytes_tok.items()},
            "rounds_tokens_per_s": rates, "prefill_and_warmup_s": prefill_s, "trace_per_layer": traces}


def ratios(tps: dict[str, float]) -> dict[str, float]:
    def r(a, b):
        return tps[a] / tps[b] if a in tps and b in tps and tps[b] > 0 else None

    c1 = [s for s in ("cluster1_mb1", "cluster1_mb2", "cluster1_mb3") if s in tps]
    best = max(c1, key=lambda s: tps[s]) if c1 else None
    out = {
        "single_vs_llama_cpp": r("single", "llama.cpp"),
        "single_vs_transformers": r("single", "transformers"),
        "cluster1_best": best,
        "cluster1_best_vs_llama_cpp": r(best, "llama.cpp") if best else None,
        "cluster1_best_vs_transformers": r(best, "transformers") if best else None,
        "cluster1_best_vs_single": r(best, "single") if best else None,
        "cluster1_mb2_vs_mb1": r("cluster1_mb2", "cluster1_mb1"),
        "cluster1_mb3_vs_mb1": r("cluster1_mb3", "cluster1_mb1"),
        "cluster2_mb2_vs_cluster1_mb2": r("cluster2_mb2", "cluster1_mb2"),
        "cluster2_mb2_vs_mb1": r("cluster2_mb2", "cluster2_mb1"),
    }
    return {k: v for k, v in out.items() if v is not None}


TARGETS = [  # (ratio key, threshold, batches it applies to (None: all), what issue 11 asks)
    ("single_vs_llama_cpp", 1.0, None, "single process >= 1.0x llama.cpp"),
    ("cluster1_best_vs_single", 0.9, (16,), "cluster (1 attention peer, best M) >= 0.9x single process"),
]


async def main_async(args, log) -> dict:
    from lamina_p2p.model.loader import load_model
    from lamina_p2p.runtime import set_threads

    model_dir = args.model or benchlib.model_dir(args.preset, args.dtype)
    log(f"model {model_dir}, batches {args.batch}, dtype {args.dtype}, threads {args.threads}, "
        f"attention threads {args.attention_threads}, load average {os.getloadavg()[0]:.2f}")
    systems = list(args.systems)
    why = LlamaCppBackend.available(args.llama_cpp, args.gguf)
    if why and "llama.cpp" in systems:
        log(f"llama.cpp column skipped: {why}")
        systems.remove("llama.cpp")
    stream = benchlib.stream_read_gbps(args.stream_bytes, 3 if args.quick else 5)
    log(f"STREAM read {stream:.1f} GB/s")
    set_threads(args.threads)
    model = load_model(model_dir, dtype=args.dtype)
    wbytes = weight_bytes_per_step(model.config, args.dtype)
    kv_tok = kv_bytes_per_context_token(model.config, args.dtype)
    out = {"stream_read_gbps": stream, "model": model_dir, "batches": {}, "dtype": args.dtype,
           "threads": args.threads, "attention_threads": args.attention_threads, "placement": args.placement,
           "omp_wait_policy": args.omp_wait_policy, "busy_poll_us": args.busy_poll_us,
           "load_average_start": os.getloadavg(),
           "weight_layout": getattr(model, "layout", None),
           "llama_cpp": {"bin_dir": args.llama_cpp, "gguf": args.gguf} if not why else {"skipped": why},
           "split_cores": {"compute_cpus": args.split_cores[0], "attention_cpus": args.split_cores[1]}
           if args.split_cores else None,
           "steps_per_round": args.steps, "rounds": args.rounds, "trace_steps": args.trace_steps,
           "weight_bytes_per_step": wbytes, "kv_bytes_per_context_token": kv_tok}
    for batch in args.batch:
        per_ctx = {}
        for ctx_len in args.contexts:
            res = await run_context(ctx_len, batch, args, model, model_dir, systems, wbytes, kv_tok, log)
            res["roofline_fraction"] = {s: res["tokens_per_s"][s] * res["bytes_per_token"][s] / (stream * 1e9)
                                        for s in systems}
            res["ratios"] = ratios(res["tokens_per_s"])
            per_ctx[str(ctx_len)] = res
        out["batches"][str(batch)] = {"contexts": per_ctx}
    # A second STREAM figure at the end shows how much the machine's load moved during the run.
    out["stream_read_gbps_end"] = benchlib.stream_read_gbps(args.stream_bytes, 3)
    out["load_average_end"] = os.getloadavg()
    return out


def report(res: dict, file=sys.stdout) -> None:
    print(f"STREAM read {res['stream_read_gbps']:.1f} GB/s (end of run {res['stream_read_gbps_end']:.1f}); "
          f"{res['dtype']}, weight layout {res.get('weight_layout')}, compute threads {res['threads']}, attention "
          f"threads {res['attention_threads']}, OMP_WAIT_POLICY {res.get('omp_wait_policy') or 'unset'}, load "
          f"average {res['load_average_start'][0]:.2f} -> {res['load_average_end'][0]:.2f}", file=file)
    if res.get("split_cores"):
        sc = res["split_cores"]
        print(f"clusters on split cores: compute process on CPUs {sc['compute_cpus']}, attention peers on "
              f"{sc['attention_cpus']} (llama.cpp, transformers and single on every CPU)", file=file)
    if "skipped" in res["llama_cpp"]:
        print(f"llama.cpp column skipped: {res['llama_cpp']['skipped']}", file=file)
    print(f"{'batch':>5} {'context':>8} {'system':<14} {'tok/s':>8} {'roofline':>9} {'vs llama.cpp':>13} "
          f"{'vs single':>10}", file=file)
    for batch, bres in res["batches"].items():
        for ctx, c in bres["contexts"].items():
            tps = c["tokens_per_s"]
            for s in tps:
                vl = tps[s] / tps["llama.cpp"] if tps.get("llama.cpp") else float("nan")
                vs = tps[s] / tps["single"] if tps.get("single") else float("nan")
                print(f"{batch:>5} {ctx:>8} {s:<14} {tps[s]:>8.1f} {c['roofline_fraction'][s]:>9.3f} {vl:>12.2f}x "
                      f"{vs:>9.2f}x", file=file)
    print("per-layer medians from the trace (ms): dense, attention wait (from the send), kernel, messaging "
          "(wait - kernel), exposed (the part of the wait the dense thread sat idle); LM head + sampling per step",
          file=file)
    print(f"{'batch':>5} {'context':>8} {'system':<14} {'dense':>7} {'wait':>7} {'kernel':>7} {'msg':>7} "
          f"{'exposed':>7} {'head':>7}", file=file)
    for batch, bres in res["batches"].items():
        for ctx, c in bres["contexts"].items():
            for s, t in c.get("trace_per_layer", {}).items():
                cells = [t.get(k) for k in ("dense_ms", "attention_wait_ms", "kernel_ms", "messaging_ms",
                                            "exposed_wait_ms", "lm_head_and_sample_ms")]
                print(f"{batch:>5} {ctx:>8} {s:<14} " + " ".join(f"{v:>7.3f}" if v is not None else f"{'-':>7}"
                                                             for v in cells), file=file)
    print("the compute thread's step from the trace (ms a step, means): dense spans, exposed attention waits, LM head "
          "+ sampling, and the rest (sends, receives and the Python around them; the single process's attention "
          "kernel calls too)", file=file)
    print(f"{'batch':>5} {'context':>8} {'system':<14} {'step':>7} {'dense':>7} {'exposed':>7} {'head':>7} "
          f"{'other':>7}", file=file)
    for batch, bres in res["batches"].items():
        for ctx, c in bres["contexts"].items():
            for s, t in c.get("trace_per_layer", {}).items():
                b = t.get("step_budget_ms")
                if b:
                    print(f"{batch:>5} {ctx:>8} {s:<14} " + " ".join(
                        f"{b[k]:>7.2f}" for k in ("step", "dense", "exposed_wait", "lm_head_and_sample", "other")),
                        file=file)
    print("targets (issue 11):", file=file)
    for batch, bres in res["batches"].items():
        for ctx, c in bres["contexts"].items():
            for rk, th, batches, text in TARGETS:
                v = c["ratios"].get(rk)
                if v is not None and (batches is None or int(batch) in batches):
                    print(f"  [{'met' if v >= th else 'MISSED'}] {text}: {v:.2f} (batch {batch}, context {ctx})",
                          file=file)


def plots(res: dict, out_dir: Path) -> list[Path]:
    paths = []
    for batch, bres in res["batches"].items():
        ctxs = [int(c) for c in bres["contexts"]]
        systems = list(next(iter(bres["contexts"].values()))["tokens_per_s"])
        p1 = out_dir / f"e2e_tokens_vs_context_b{batch}.png"
        benchlib.plot_lines(p1, f"decode tokens/s vs context (batch {batch}, {res['dtype']})", "context (tokens)",
                            "tokens/s", {s: (ctxs, [bres["contexts"][str(c)]["tokens_per_s"][s] for c in ctxs])
                                         for s in systems}, logx=len(ctxs) > 1)
        p2 = out_dir / f"e2e_tokens_vs_microbatches_b{batch}.png"
        series = {}
        for c in ctxs:
            tps = bres["contexts"][str(c)]["tokens_per_s"]
            for cl in ("cluster1", "cluster2"):
                mbs = [m for m in (1, 2, 3) if f"{cl}_mb{m}" in tps]
                if mbs:
                    series[f"{cl}, ctx {c}"] = (mbs, [tps[f"{cl}_mb{m}"] for m in mbs])
            for flat in ("single", "llama.cpp"):
                if flat in tps:
                    series[f"{flat}, ctx {c}"] = ([1, 2, 3], [tps[flat]] * 3)
        benchlib.plot_lines(p2, f"decode tokens/s vs micro-batches (batch {batch}; flat: references)",
                            "micro-batches", "tokens/s", series)
        paths += [p1, p2]
    return paths


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
    ap.add_argument("--contexts", type=int, nargs="+", default=None, help="default 512 2048 (--quick: 256)")
    ap.add_argument("--batch", type=int, nargs="+", default=[16], help="decode batch sizes, each a run of its own")
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--model", help="model directory or .gguf file (default: the preset, written once to a temp dir)")
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
    ap.add_argument("--llama-cpp", metavar="BIN_DIR", help="llama.cpp build/bin holding llama-batched-bench")
    ap.add_argument("--gguf", help="the same weights as GGUF for llama.cpp (e.g. BF16 from llama_cpp.sh)")
    ap.add_argument("--trace-steps", type=int, default=None,
                    help="traced decode steps per lamina system after the timed rounds (0: none; default 4, --quick 2)")
    ap.add_argument("--stream-bytes", type=int, default=None)
    ap.add_argument("--split-cores", metavar="COMPUTE:ATTENTION", default=None,
                    help="cluster systems on disjoint CPUs, e.g. 0:1 (compute process on CPU 0, attention peers "
                         "on CPU 1, one thread per CPU); transformers and single keep every CPU")
    ap.add_argument("--busy-poll-us", type=int, default=0,
                    help="cluster systems: the stream data path's busy-poll window on both sides (0: off; only "
                         "where the cores are the peers' own, e.g. with --split-cores)")
    args = ap.parse_args(argv)
    args.split_cores = parse_split(ap, args.split_cores)
    args.all_cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    benchlib.set_omp_wait_policy(args.omp_wait_policy)
    if args.contexts is None:
        args.contexts = [256] if args.quick else [512, 2048]
    if args.trace_steps is None:
        args.trace_steps = 2 if args.quick else 4
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
