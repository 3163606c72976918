"""Per-token mask cost of constrained-decoding libraries on a real tokenizer (why llguidance).

    python tools/constrain_bench.py ~/.cache/lamina-dev/smollm2/hf [--steps 200]

For each library: the time to prepare a grammar for the vocabulary (compile / index build), and
the mean and p99 time per decoded token of computing the allowed-token mask, turning it into a
bool[vocab] mask and advancing by one token. The walk is the same for every library: at each
step the allowed token with the lowest id among those a fixed-seed generator prefers (a random
permutation of the vocabulary), so each library walks the same token sequence. Ratios within one
run are the figures to compare; the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40, "pattern": "^[A-Za-z ]*$"},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
    "ok": {"type": "boolean"}}, "required": ["name", "age", "tags", "ok"], "additionalProperties": False}


def walk(first_mask, advance, steps: int, vocab: int, order: torch.Tensor):
    """Time `steps` mask+advance rounds; returns per-token seconds and the tokens taken."""
    times, tokens = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        allowed = first_mask()
        t1 = time.perf_counter()
        if not bool(allowed.any()):
            break
        tok = int(order[allowed[order]][0])  # the first allowed token in the fixed random order (not timed)
        t2 = time.perf_counter()
        if not advance(tok):
            break
        times.append(t1 - t0 + time.perf_counter() - t2)
        tokens.append(tok)
    return times, tokens


def bench_llguidance(tok_json: str, vocab: int, eos: list[int], steps: int, order):
    from lamina_p2p.compute.constrain import Grammar, TokenSpace

    t0 = time.perf_counter()
    space = TokenSpace(tok_json, vocab, eos)
    t1 = time.perf_counter()
    grammar = Grammar.json_schema(space, SCHEMA)
    m = grammar.matcher()
    t2 = time.perf_counter()

    def advance(t):
        if m.done:
            return False
        m.consume(t)
        return True

    times, tokens = walk(lambda: m.allowed(vocab), advance, steps, vocab, order)
    return {"tokenizer_s": t1 - t0, "grammar_s": t2 - t1, "times": times, "tokens": tokens}


def bench_outlines(space_bytes: list[bytes], eos: int, vocab: int, steps: int, order):
    import outlines_core
    from outlines_core.json_schema import build_regex_from_schema

    t0 = time.perf_counter()
    table: dict = {}
    for i, b in enumerate(space_bytes):
        if i != eos and b:
            table.setdefault(b, []).append(i)
    voc = outlines_core.Vocabulary(eos, table)
    t1 = time.perf_counter()
    # The same JSON layout as lamina's llguidance grammar (", " and ": ", no other whitespace).
    index = outlines_core.Index(build_regex_from_schema(json.dumps(SCHEMA), whitespace_pattern=""), voc)
    guide = outlines_core.Guide(index)
    t2 = time.perf_counter()

    def mask():
        allowed = np.zeros(vocab, dtype=bool)
        allowed[np.asarray(guide.get_tokens(), dtype=np.int64)] = True
        return torch.from_numpy(allowed)

    def advance(t):
        if guide.is_finished():
            return False
        guide.advance(t)
        return True

    times, tokens = walk(mask, advance, steps, vocab, order)
    return {"tokenizer_s": t1 - t0, "grammar_s": t2 - t1, "times": times, "tokens": tokens}


def summary(name, r):
    ts = sorted(r["times"])
    p99 = ts[min(len(ts) - 1, int(0.99 * len(ts)))] if ts else float("nan")
    mean = statistics.mean(ts) if ts else float("nan")
    print(f"{name:12s} tokenizer {r['tokenizer_s'] * 1e3:8.1f} ms  grammar {r['grammar_s'] * 1e3:9.1f} ms  "
          f"per token mean {mean * 1e6:8.1f} us  p99 {p99 * 1e6:8.1f} us  ({len(ts)} tokens)")
    return mean


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    from lamina_p2p.compute.constrain import TokenSpace
    from lamina_p2p.model.tokenizer import load_tokenizer

    tok = load_tokenizer(args.model_dir)
    vocab = tok.vocab_size
    tok_json = tok.tokenizer.to_str()
    eos = list(tok.eos_token_ids)
    order = torch.randperm(vocab, generator=torch.Generator().manual_seed(0))
    print(f"vocabulary {vocab} tokens; schema with string, integer range, array, boolean")
    llg = bench_llguidance(tok_json, vocab, eos, args.steps, order)
    space = TokenSpace(tok_json, vocab, eos)
    raw = [space.token_bytes(i) for i in range(vocab)]
    out = bench_outlines(raw, eos[0], vocab, args.steps, order)
    a = summary("llguidance", llg)
    b = summary("outlines-core", out)
    print(f"outlines-core / llguidance per token: {b / a:.2f}; grammar preparation: "
          f"{out['grammar_s'] / llg['grammar_s']:.0f}x")
    for name, r in (("llguidance", llg), ("outlines-core", out)):
        print(f"{name} walk: {b''.join(raw[t] for t in r['tokens'])[:160]!r}")


if __name__ == "__main__":
    main()
