"""The `generate` command: prompts in, tokens out, in process or on a cluster."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
from dataclasses import dataclass, field

from lamina_p2p.compute.engine import Engine
from lamina_p2p.compute.sequence import SamplingParams
from lamina_p2p.runtime import run_async, set_threads
from lamina_p2p.trace import Tracer


@dataclass
class GenerateOptions:
    model_dir: str
    prompts: list[str] = field(default_factory=list)
    chats: list[list[dict]] = field(default_factory=list)  # conversations, through the model's chat template
    allow_special_in_content: bool = False  # chat content: special-token strings become tokens (default: text)
    prompt_ids: list[list[int]] = field(default_factory=list)
    random_prompt_len: int | None = None
    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    batch: int | None = None  # None: one sequence per prompt
    attention_peers: int = 0
    join: list[str] = field(default_factory=list)
    placement: str = "request"
    shard_tokens: int | None = None
    micro_batches: int = 1
    kv_replicas: int = 1
    dtype: str | None = None
    kv_bytes: int = 2 << 30
    threads: int | None = None
    attention_threads: int | None = None
    attention_cpus: list[str] = field(default_factory=list)  # per started peer, reused in turn
    dense_cpus: set[int] | None = None  # the dense thread (and its torch pool) on these CPUs only
    trace: str | None = None
    cluster: str = "lamina"
    security: object = None  # net.security.Security (--secret): CURVE on every ZeroMQ connection


def build_prompts(opts: GenerateOptions, tokenizer, vocab_size: int) -> list[list[int]]:
    prompts = [list(p) for p in opts.prompt_ids]
    if (opts.prompts or opts.chats) and tokenizer is None:
        raise ValueError(f"{opts.model_dir} has no tokenizer: use --prompt-ids")
    # Exactly as the checkpoint's tokenizer encodes text (its own BOS, or none).
    prompts += [tokenizer.encode(p) for p in opts.prompts]
    if opts.chats:
        from lamina_p2p.serve.chat import encode_chat, template_for

        template = template_for(tokenizer)
        if template is None:
            raise ValueError(f"{opts.model_dir} has no chat template: use --prompt")
        prompts += [encode_chat(tokenizer, template, c, opts.allow_special_in_content) for c in opts.chats]
    batch = opts.batch or max(len(prompts), 1)
    if opts.random_prompt_len:
        rng = random.Random(opts.seed or 0)
        prompts += [[rng.randrange(vocab_size) for _ in range(opts.random_prompt_len)] for _ in range(batch)]
    return [prompts[i % len(prompts)] for i in range(batch)]


def run_generate(opts: GenerateOptions) -> dict:
    from lamina_p2p.model.loader import load_model
    from lamina_p2p.model.tokenizer import load_tokenizer

    set_threads(opts.threads)
    model = load_model(opts.model_dir, dtype=opts.dtype)
    tokenizer = load_tokenizer(opts.model_dir)
    prompts = build_prompts(opts, tokenizer, model.config.vocab_size)
    params = SamplingParams(max_tokens=opts.max_tokens, temperature=opts.temperature, top_k=opts.top_k,
                            top_p=opts.top_p, seed=opts.seed, ignore_eos=opts.ignore_eos)
    seqs, stats = run_async(_generate(opts, model, prompts, params))
    texts = [tokenizer.decode(s.output) if tokenizer else "" for s in seqs]
    return {
        "token_ids": [s.output for s in seqs],
        "text": texts,
        "finish_reason": [s.finish_reason for s in seqs],
        "prompt_tokens": [len(s.prompt) for s in seqs],
        "tokens_per_s": stats["tokens_per_s"],
        "prefill_s": stats["prefill_s"],
        "decode_s": stats["decode_s"],
        "batch": len(seqs),
        "attention_peers": opts.attention_peers if not opts.join else None,
        "placement": opts.placement,
        "micro_batches": opts.micro_batches,
    }


async def _generate(opts: GenerateOptions, model, prompts, params):
    # SIGTERM (kill, a job scheduler) stops like Ctrl-C: unwinding stops the peers started here.
    task = asyncio.current_task()
    with contextlib.suppress(NotImplementedError, RuntimeError):  # no signal handlers off the main thread
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    async with contextlib.AsyncExitStack() as stack:
        transport = await stack.enter_async_context(open_transport(opts))
        engine = Engine(model, transport, placement=opts.placement, micro_batches=opts.micro_batches,
                        shard_tokens=opts.shard_tokens, kv_replicas=opts.kv_replicas, dense_cpus=opts.dense_cpus)
        stack.callback(engine.close)
        await transport.wait_for_peers(transport.expected_peers, timeout=60.0)
        if opts.trace:
            engine.tracer = transport.tracer = Tracer()
        result = await engine.generate(prompts, params)
        if opts.trace:
            engine.tracer.write(opts.trace)
        return result


@contextlib.asynccontextmanager
async def open_transport(opts: GenerateOptions):
    """In-process attention, K freshly started local peers, or an existing cluster."""
    if opts.join or opts.attention_peers > 0:
        from lamina_p2p.compute.remote import open_cluster_transport

        async with open_cluster_transport(opts) as transport:
            yield transport
        return
    from lamina_p2p.compute.local import LocalTransport

    transport = LocalTransport(opts.kv_bytes, threads=opts.attention_threads)
    try:
        await asyncio.get_running_loop().run_in_executor(None, _warm_kernels)
        yield transport
    finally:
        transport.close()


def _warm_kernels() -> None:
    import lamina_kernels

    lamina_kernels.warmup()

