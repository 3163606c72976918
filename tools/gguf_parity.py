"""Greedy tokens and tokenization of a GGUF file: lamina-p2p against transformers' own GGUF loading.

    python tools/gguf_parity.py FILE.gguf [FILE.gguf ...] --steps 24

For each file: the same prompts (plain text, and one chat turn through the file's chat template)
encoded by both, greedy-decoded by both in float32, and compared token by token. Prints one line per
prompt and a summary; exit status 1 when anything differs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

PROMPTS = ["The capital of France is", "def fibonacci(n):", "In 2024, 12345 people  said: \"héllo\" 😀"]
CHAT = "What is the capital of France?"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--json", default=None)
    ap.add_argument("--cluster", action="store_true", help="also run every file's prompts together through "
                    "`lamina-node generate` on 2 local attention peers (head placement, M=2) and compare")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lamina_p2p.model.loader import load_model
    from lamina_p2p.model.tokenizer import load_tokenizer
    from lamina_p2p.model.torch_attention import generate_greedy
    from lamina_p2p.serve.chat import encode_chat, template_for

    torch.set_grad_enabled(False)
    results, ok = [], True
    for f in map(Path, args.files):
        t0 = time.time()
        ours = load_model(f, dtype="float32")
        tok = load_tokenizer(f)
        t_ours = time.time() - t0
        t0 = time.time()
        hf_tok = AutoTokenizer.from_pretrained(f.parent, gguf_file=f.name)
        hf = AutoModelForCausalLM.from_pretrained(f.parent, gguf_file=f.name, dtype=torch.float32).eval()
        t_hf = time.time() - t0
        messages = [{"role": "user", "content": CHAT}]
        cases = [(p, tok.encode(p), hf_tok(p)["input_ids"]) for p in PROMPTS]
        hf_chat = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        hf_chat = hf_chat["input_ids"] if isinstance(hf_chat, dict) or hasattr(hf_chat, "keys") else hf_chat
        cases.append((f"chat: {CHAT}", encode_chat(tok, template_for(tok), messages), list(hf_chat)))
        for text, ids, hf_ids in cases:
            same_tok = ids == list(hf_ids)
            mine = generate_greedy(ours, [ids], args.steps)[0][0]
            out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=args.steps, do_sample=False, eos_token_id=None, pad_token_id=0)
            theirs = out[0, len(ids):].tolist()
            same = mine == theirs
            ok &= same and same_tok
            first = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), None)
            print(f"{f.name}: {text[:40]!r}: tokenization {'equal' if same_tok else 'DIFFERS'} ({len(ids)} tokens), "
                  f"greedy {args.steps} tokens {'equal' if same else f'DIFFER at {first}'}: "
                  f"{tok.decode(mine)[:60]!r}", flush=True)
            results.append({"file": str(f), "prompt": text, "tokenization_equal": same_tok, "greedy_equal": same,
                            "first_difference": first, "tokens": mine, "transformers_tokens": theirs})
        print(f"{f.name}: load {t_ours:.1f} s lamina-p2p, {t_hf:.1f} s transformers", flush=True)
        if args.cluster:
            ok &= _cluster(f, cases, results[-len(cases):], args.steps)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print("ALL EQUAL" if ok else "DIFFERENCES FOUND")
    return 0 if ok else 1


def _cluster(f, cases, rows, steps) -> bool:
    """The same prompts as one batch on a real local cluster; tokens against transformers'."""
    import subprocess

    from lamina_p2p.launch import node_command

    cmd = ["generate", "--model", str(f), "--dtype", "float32", "--max-tokens", str(steps), "--ignore-eos",
           "--attention-peers", "2", "--placement", "head", "--micro-batches", "2", "--json"]
    for _, ids, _ in cases:
        cmd += ["--prompt-ids", ",".join(map(str, ids))]
    r = subprocess.run(node_command(*cmd), capture_output=True, text=True)
    if r.returncode != 0:
        print(f"{f.name}: cluster run failed: {r.stderr.strip().splitlines()[-1:]}")
        return False
    got = json.loads(r.stdout.strip().splitlines()[-1])["token_ids"]
    ok = True
    for row, tokens in zip(rows, got):
        same = tokens == row["transformers_tokens"]
        row["cluster_equal"] = same
        ok &= same
        print(f"{f.name}: cluster (2 attention peers, head, M=2): {row['prompt'][:40]!r}: greedy "
              f"{'equal' if same else 'DIFFERS'}", flush=True)
    return ok


if __name__ == "__main__":
    sys.exit(main())
