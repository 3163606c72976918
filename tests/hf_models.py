"""Tiny random Hugging Face models, one per supported architecture, for parity tests.

    from hf_models import ARCHITECTURES, build_hf_model
    path = build_hf_model("qwen3")       # a save_pretrained directory, float32

Each model is built once per process (cached) under a temporary directory that
is removed at exit; pass `root` to put it somewhere of your own (not cached).
All are GQA (4 query heads, 2 KV heads). Norm weights and biases are randomised
too — transformers initialises them to 1 and 0, which would hide a missing norm.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import torch

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")

_COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)

_cache: dict[str, Path] = {}
_tmp_root: Path | None = None


def hf_config(arch: str):
    """The transformers config for `arch` (each one exercises that family's special case)."""
    import transformers as tf

    if arch == "llama":
        # Llama 3.1 rope scaling; a small original context so positions used in
        # tests land in all three frequency bands.
        return tf.LlamaConfig(**_COMMON, rope_theta=10000.0, rope_scaling={
            "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    if arch == "mistral":
        return tf.MistralConfig(**_COMMON, rope_theta=10000.0, sliding_window=None)
    if arch == "qwen2":  # bias on q/k/v; tied embeddings as in the small Qwen2 checkpoints
        return tf.Qwen2Config(**{**_COMMON, "tie_word_embeddings": True}, rope_theta=1000000.0)
    if arch == "qwen3":  # q/k RMSNorm, head_dim not hidden/heads
        return tf.Qwen3Config(**_COMMON, head_dim=32, rope_theta=1000000.0)
    raise ValueError(f"unknown architecture {arch!r}")


def random_hf_model(config, seed: int):
    """A transformers model of `config` in float32 with seeded random weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:  # larger than the HF default (0.02) so logits are not all near zero
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
    return model


def build_hf_model(arch: str, root: Path | None = None, seed: int = 0) -> Path:
    """Build, randomise and save_pretrained a tiny float32 model; return its directory."""
    if root is None and arch in _cache:
        return _cache[arch]

    seed += 100 * ARCHITECTURES.index(arch)  # different weights per architecture
    model = random_hf_model(hf_config(arch), seed)
    out = Path(root) / arch if root is not None else _default_root() / arch
    model.save_pretrained(out)
    if root is None:
        _cache[arch] = out
    return out


def load_hf_model(path: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


@torch.no_grad()
def bf16_greedy_tokens_agree(hf, prompts: list[list[int]], tokens: list[list[int]]) -> float:
    """Check our greedy `tokens` of a bfloat16 model against transformers, teacher-forced on our tokens; returns
    the fraction of steps where ours is transformers' own argmax (a caller asserts it is high).

    transformers' bf16 logits are bf16, and its CPU kernels round differently per instruction set (the
    matmuls, the softmax weights before P@V), where ours keep float32: two candidates one bf16 ulp apart may
    swap, and after a swap free-running sequences part for good. So every step of ours is scored by
    transformers on our own prefix: our token must be within 2 bf16 ulps of its top logit at every step
    (a real error picks a token far below it), whatever happened before.
    """
    agree = total = 0
    for p, mine in zip(prompts, tokens):
        logits = hf(torch.tensor([p + mine[:-1]])).logits[0, len(p) - 1:].float()
        for step, tok in enumerate(mine):
            top = logits[step].max()
            ulp = 2.0 ** (torch.floor(torch.log2(top.abs())) - 7)
            assert logits[step, tok] >= top - 2 * ulp, (p, step, tok, int(logits[step].argmax()))
            agree += int(logits[step, tok] == top)
            total += 1
    assert total > 0
    return agree / total


def _default_root() -> Path:
    global _tmp_root
    if _tmp_root is None:
        _tmp_root = Path(tempfile.mkdtemp(prefix="lamina-hf-models-"))
        atexit.register(shutil.rmtree, _tmp_root, ignore_errors=True)
    return _tmp_root
