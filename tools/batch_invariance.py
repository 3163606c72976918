"""How often does greedy output depend on the batch? Each prompt alone vs all prompts in one batch.

    python tools/batch_invariance.py ~/.cache/lamina-dev/smollm2/hf --dtype bfloat16 --prompts 16 --tokens 32

Runs the real engine (in-process attention, the serving path's Engine) twice per dtype: every
prompt alone, then all together as one continuous batch. Reports the prompts whose greedy tokens
differ, where they first differ, and the top-2 logit gap of the alone run at that position
(a near tie flipped by the batch's different matmul blocking). Also reports whether one linear
layer's rows already differ with the batch size, which is where the dependence comes from.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import torch

from lamina_p2p.compute.engine import Engine
from lamina_p2p.compute.local import LocalTransport
from lamina_p2p.compute.sequence import SamplingParams
from lamina_p2p.model.loader import load_model
from lamina_p2p.model.tokenizer import load_tokenizer

TEXTS = [
    "The capital of France is", "Write a haiku about the sea.", "def fibonacci(n):", "Once upon a time",
    "The three laws of motion are", "Explain photosynthesis in one sentence.", "List five prime numbers:",
    "What is the boiling point of water?", "The quick brown fox", "In 1969, humans first",
    "A good cup of tea needs", "Translate 'good morning' into Spanish:", "The best way to learn a language is",
    "SELECT name FROM users WHERE", "My favourite colour is", "The meaning of life is",
    "Rain in the desert", "import numpy as np\n", "Dear diary, today", "The stock market fell because",
    "How do airplanes fly?", "A recipe for pancakes:", "The largest planet is", "Roses are red,",
]


async def run(model, prompts, tokens, together: bool):
    """Greedy outputs and, per prompt, the logits rows seen (alone runs only)."""
    transport = LocalTransport(1 << 30)
    engine = Engine(model, transport)
    rows: dict[int, list[torch.Tensor]] = {}

    def sink(seqs, logits):
        for s, row in zip(seqs, logits):
            rows.setdefault(s.seq_id, []).append(row.float().clone())

    engine.logits_sink = sink
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    try:
        if together:
            seqs, _ = await engine.generate(prompts, params)
            return [s.output for s in seqs], None
        outs, logits = [], []
        for p in prompts:
            seqs, _ = await engine.generate([p], params)
            outs.append(seqs[0].output)
            logits.append(rows[seqs[0].seq_id])
        return outs, logits
    finally:
        engine.close()
        transport.close()


def row_dependence(model) -> str:
    """Does one row of the LM head (model.logits) change with the number of rows? (max abs difference)"""
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        x = torch.randn(64, model.config.hidden_size, generator=g).to(model.dtype)
        alone = model.logits(x[:1]).float()
        diffs = {b: float((model.logits(x[:b]).float()[:1] - alone).abs().max()) for b in (2, 4, 8, 16, 64)}
    return ", ".join(f"B={b}: {d:.3g}" for b, d in diffs.items())


def float32_head(model) -> None:
    """model.logits in float32: the final norm's output rounded to the model dtype as usual, then
    a float32 matmul with the (bf16) weights widened once."""
    from lamina_p2p.model.transformer import rms_norm

    w = model.lm_head_weight
    w = (w.to_dense() if w.is_mkldnn else w).float()
    norm, eps = model.final_norm, model.config.rms_norm_eps
    model.logits = lambda x: torch.nn.functional.linear(rms_norm(x, norm, eps).float(), w)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--dtype", action="append", help="repeatable (default: bfloat16 and float32)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--float32-head", action="store_true",
                    help="LM head accumulating and returning float32 from the model's weights (what the "
                         "float32-logits change does), to measure what dependence is left")
    args = ap.parse_args()
    tok = load_tokenizer(args.model_dir)
    prompts = [tok.encode(t) for t in (TEXTS * 4)[: args.prompts]]
    for dtype in args.dtype or ["bfloat16", "float32"]:
        model = load_model(args.model_dir, dtype=dtype)
        if args.float32_head:
            float32_head(model)
        t0 = time.perf_counter()
        alone, logits = asyncio.run(run(model, prompts, args.tokens, together=False))
        t1 = time.perf_counter()
        together, _ = asyncio.run(run(model, prompts, args.tokens, together=True))
        t2 = time.perf_counter()
        changed = []
        for i, (a, b) in enumerate(zip(alone, together)):
            if a != b:
                pos = next(j for j, (x, y) in enumerate(zip(a, b)) if x != y)
                top2 = torch.topk(logits[i][pos], 2).values
                changed.append(f"prompt {i} at token {pos} (alone: top-2 gap {float(top2[0] - top2[1]):.3g})")
        print(f"{dtype}{' (float32 LM head)' if args.float32_head else ''}: {len(changed)}/{len(prompts)} prompts' greedy output depends on the batch "
              f"({args.tokens} tokens each, batch of {len(prompts)})")
        for c in changed:
            print("   ", c)
        # One sequence at a time is what a per-sequence (batch-invariant by construction) dense path
        # would cost at most: every step reads every weight once per sequence.
        print(f"    time: one by one {t1 - t0:.1f} s, together {t2 - t1:.1f} s (ratio {(t1 - t0) / (t2 - t1):.1f})")
        print(f"    LM head row 0, max |difference| vs alone: {row_dependence(model)}")


if __name__ == "__main__":
    main()
