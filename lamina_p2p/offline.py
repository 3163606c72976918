"""Offline inference: prompts in, tokens out, in one process that drives the engine to completion.

`run_generate` is what `lamina-node generate` runs: load the model and tokenizer, turn the prompts
(text, chats through the model's template, token ids or seeded random ones) into token ids, open the
attention (`launch.open_transport`: in process, K local attention peers started for the run, or a
cluster joined by address), make an `Engine` and generate the whole batch. `LLM` is the same for
Python callers (nano-vllm's and vLLM's name for it): load once, then `generate` as often as wanted;
each call opens and closes its attention, so local attention peers live for one call only.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal

from lamina_p2p.compute.engine import Engine
from lamina_p2p.compute.sequence import SamplingParams
from lamina_p2p.launch import STARTUP_SETTLE_S, open_transport
from lamina_p2p.options import EngineOptions, GenerateOptions
from lamina_p2p.runtime import freeze_heap, run_async, set_threads
from lamina_p2p.trace import Tracer


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


def run_generate(opts: GenerateOptions, freeze: bool = False) -> dict:
    """Generate for opts' prompts; a dict of token ids, texts, finish reasons and decode tokens/s.

    freeze: this process is the run's alone (the CLI): see _generate. Raises ValueError (no
    tokenizer or chat template for text prompts), model.config.ModelError (a model that does not
    load), TimeoutError (attention peers that do not come up within 60 s).
    """
    from lamina_p2p.model.loader import load_model
    from lamina_p2p.model.tokenizer import load_tokenizer

    set_threads(opts.threads)
    model = load_model(opts.model_dir, dtype=opts.dtype)
    tokenizer = load_tokenizer(opts.model_dir)
    prompts = build_prompts(opts, tokenizer, model.config.vocab_size)
    params = SamplingParams(max_tokens=opts.max_tokens, temperature=opts.temperature, top_k=opts.top_k,
                            top_p=opts.top_p, seed=opts.seed, ignore_eos=opts.ignore_eos)
    seqs, stats = run_async(_generate(opts, model, prompts, params, opts.trace, freeze))
    texts = [tokenizer.decode(s.output) if tokenizer else "" for s in seqs]
    return {
        "token_ids": [s.output for s in seqs],
        "text": texts,
        "finish_reason": [s.finish_reason for s in seqs],
        "prompt_tokens": [len(s.prompt) for s in seqs],
        "tokens_per_s": stats["tokens_per_s"],
        "prefill_s": stats["prefill_s"],
        "decode_s": stats["decode_s"],
        "warm_up_s": stats["warm_up_s"],  # compiling (first run) or loading the compiled code, before the prompts
        "batch": len(seqs),
        "attention_peers": opts.attention_peers if not opts.join else None,
        "placement": opts.placement,
        "micro_batches": opts.micro_batches,
    }


async def _generate(opts: EngineOptions, model, prompts: list[list[int]], params: SamplingParams,
                    trace: str | None = None, freeze: bool = False):
    """Run the prompts to completion on a fresh engine; (sequences, stats). freeze: the whole process
    is this run's (the CLI): freeze its startup heap once the engine is up (runtime.freeze_heap);
    never in a caller's process (`LLM`, tests), whose objects frozen would never be collected."""
    # SIGTERM (kill, a job scheduler) stops like Ctrl-C: unwinding stops the peers started here.
    task = asyncio.current_task()
    with contextlib.suppress(NotImplementedError, RuntimeError):  # no signal handlers off the main thread
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    async with contextlib.AsyncExitStack() as stack:
        transport = await stack.enter_async_context(open_transport(opts))
        engine = Engine(model, transport, **opts.engine_kwargs())
        stack.callback(engine.close)
        warm_up_s = await engine.warm_up()  # while any peers started here come up
        await transport.wait_for_peers(transport.expected_peers, timeout=60.0, settle_s=STARTUP_SETTLE_S)
        if freeze:
            freeze_heap()
        if trace:
            engine.tracer = transport.tracer = Tracer()
        seqs, stats = await engine.generate(prompts, params)
        if trace:
            engine.tracer.write(trace)
        return seqs, {**stats, "warm_up_s": warm_up_s}


class LLM:
    """A model loaded once, for generating from Python in this process.

    `LLM("models/tiny")` loads the model and tokenizer; keyword options are `options.EngineOptions`
    fields (`dtype`, `placement`, `micro_batches`, `attention_peers`, `join`, `kv_bytes`, ...), and
    attention runs in this process unless they say otherwise. Raises model.config.ModelError for a
    model that does not load and TypeError for an unknown option.
    """

    def __init__(self, model: str, **options):
        from lamina_p2p.model.loader import load_model
        from lamina_p2p.model.tokenizer import load_tokenizer

        self.options = EngineOptions(model_dir=str(model), **options)
        set_threads(self.options.threads)
        self.model = load_model(self.options.model_dir, dtype=self.options.dtype)
        self.tokenizer = load_tokenizer(self.options.model_dir)  # None for a checkpoint without one

    def generate(self, prompts: list[str | list[int]], sampling_params: SamplingParams | None = None) -> list[dict]:
        """One output per prompt, in order: {"text", "token_ids", "finish_reason"}.

        A prompt is text (encoded as the model's tokenizer encodes it) or a list of token ids; default
        sampling is greedy for 16 tokens. Raises ValueError for text prompts without a tokenizer.
        """
        params = sampling_params or SamplingParams()
        ids = []
        for p in prompts:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError(f"{self.options.model_dir} has no tokenizer: give prompts as token ids")
                p = self.tokenizer.encode(p)
            ids.append([int(t) for t in p])
        seqs, _ = run_async(_generate(self.options, self.model, ids, params))
        return [{"text": self.tokenizer.decode(s.output) if self.tokenizer else "", "token_ids": list(s.output),
                 "finish_reason": s.finish_reason} for s in seqs]
