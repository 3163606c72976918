"""Small random GGUF checkpoints of every supported architecture, written with the `gguf` package.

    from gguf_models import build_gguf
    path = build_gguf("qwen3", tmp_path)              # F32, byte-level BPE vocabulary
    path = build_gguf("llama", tmp_path, qtype="Q4_K", geometry="k")   # K-quants need rows of 256

The writer does what llama.cpp's convert_hf_to_gguf.py does for these families: HF
tensor names to GGUF names, q/k rows permuted for Llama-family models (not Qwen),
metadata under `{arch}.*`, and the vocabulary under `tokenizer.ggml.*`. The weights
come from a random transformers model of the same geometry (saved next to the file
as an HF directory, so a test can compare both loaders). llama.cpp's own quantizers
exist in the `gguf` package for F16, BF16, Q8_0, Q4_0 and Q4_1; for the K-quants
(dequantize only there) the blocks are random bytes with sane scale fields.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from hf_models import hf_config, random_hf_model

VOCAB = 320
# Byte-level BPE from the tiny preset's trainer; an SPM vocabulary is built by hand below.
GEOMETRIES = {
    "small": {},
    # Every 2-D weight has rows of a multiple of 256 (K-quant super-blocks).
    "k": dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64),
}
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
CHAT_TEMPLATE = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                 "{{ m['content'] }}<|eot_id|>{% endfor %}"
                 "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}  # Llama 3.1's values


def build_hf(arch: str, out: Path, geometry: str = "small", seed: int = 0, llama3_rope: bool = False) -> Path:
    """A random transformers model of `arch` with VOCAB tokens, saved to `out` (float32)."""
    cfg = hf_config(arch)
    cfg.vocab_size = VOCAB
    for k, v in GEOMETRIES[geometry].items():
        setattr(cfg, k, v)
    if arch == "qwen3":  # transformers' GGUF config mapping ignores qwen3.attention.key_length and
        cfg.head_dim = 128  # takes Qwen3Config's default head_dim (128), so the oracle needs that
    if arch == "llama":  # plain rope, or Llama 3.1's (written to GGUF as rope_freqs.weight, as llama.cpp does)
        cfg.rope_scaling = None
        if hasattr(cfg, "rope_parameters"):
            cfg.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        if llama3_rope:
            cfg.rope_parameters = {**LLAMA3_ROPE, "rope_theta": 10000.0}
    model = random_hf_model(cfg, seed)
    model.save_pretrained(out)
    return out


def bpe_vocab():
    """(tokens, token types, merges) of a byte-level BPE vocabulary of exactly VOCAB tokens."""
    from lamina_p2p.model.preset_tokenizer import SPECIAL_TOKENS, build_tokenizer

    tok = build_tokenizer(VOCAB)
    import json

    model = json.loads(tok.to_str())["model"]
    vocab = model["vocab"]
    for t in SPECIAL_TOKENS:
        vocab.setdefault(t, tok.token_to_id(t))
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    assert len(tokens) == VOCAB and None not in tokens
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    types = [3 if t in SPECIAL_TOKENS else 1 for t in tokens]
    return tokens, types, merges


def spm_vocab():
    """(tokens, types, scores) of a SentencePiece-style vocabulary: <unk> <s> </s>, 256 byte pieces, words."""
    words = ["\u2581the", "\u2581a", "\u2581of", "\u2581and", "\u2581to", "\u2581in", "\u2581is", "\u2581was",
             "\u2581it", "\u2581river", "\u2581old", "\u2581mill", "\u2581The", "th", "he", "in", "er", "an", "re",
             "on", "\u2581t", "\u2581a", "\u2581o", "\u2581w", "\u2581s", "\u2581m", "\u2581r", "at", "en", "es",
             "ed", "or", "ing", "\u2581c", "\u2581b", "\u2581f", "\u2581p", "ll", "ill", "iv", "ver", "\u2581ri",
             "\u2581riv", "ol", "\u2581ol", "\u2581mi", "\u2581mil", "\u2581Th", "\u2581i", "\u2581h", "\u2581an",
             "\u2581wa", "\u2581wo", "or", "ld", "\u2581world", "\u2581he", "\u2581hel", "lo", "llo", "\u2581hello"]
    chars = sorted(set("".join(words)) | set("abcdefghijklmnopqrstuvwxyzTHW\u2581"))
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0, 0.0, 0.0] + [0.0] * 256
    for i, piece in enumerate(dict.fromkeys(chars + words)):
        if len(tokens) >= VOCAB:
            break
        tokens.append(piece)
        types.append(1)
        scores.append(-float(i))
    while len(tokens) < VOCAB:
        tokens.append(f"<extra_{len(tokens)}>")
        types.append(4)
        scores.append(-1000.0)
    return tokens, types, scores


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (convert_hf_to_gguf.py LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _k_blocks(qtype, rows: int, cols: int, rng) -> np.ndarray:
    """Random K-quant blocks whose f16 scale fields hold small sane values."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    if qtype.name == "Q6_K":  # ql, qh, int8 scales[16], then d
        data[..., -2:] = np.frombuffer(np.float16(0.0004).tobytes(), np.uint8)
    else:  # d, dmin first (Q4_K, Q5_K)
        data[..., 0:2] = np.frombuffer(np.float16(0.0015).tobytes(), np.uint8)
        data[..., 2:4] = np.frombuffer(np.float16(0.0010).tobytes(), np.uint8)
    return data.reshape(rows, -1)


def build_gguf(arch: str, root: Path, qtype: str = "F32", geometry: str = "small", vocab: str = "bpe",
               seed: int = 0, name: str | None = None, add_bos: bool = True, pre: str = "default",
               llama3_rope: bool = False) -> Path:
    """Write `root/<arch>-<qtype>.gguf` (and its source HF directory `root/<arch>-hf`); return the file."""
    import gguf
    from safetensors.torch import load_file

    root = Path(root)
    hf_dir = root / f"{arch}-{geometry}{'-llama3' if llama3_rope else ''}-hf"
    if not (hf_dir / "config.json").is_file():
        build_hf(arch, hf_dir, geometry, seed, llama3_rope)
    import json

    c = json.loads((hf_dir / "config.json").read_text())
    tensors = load_file(hf_dir / "model.safetensors")
    ga = GGUF_ARCH[arch]
    path = root / (f"{arch}-{geometry}-{qtype}-{vocab}{'' if pre == 'default' else '-' + pre}"
                   f"{'-llama3' if llama3_rope else ''}.gguf")
    w = gguf.GGUFWriter(path, ga)
    w.add_name(name or ("Mistral test" if arch == "mistral" else f"{arch} test"))
    heads, kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_block_count(c["num_hidden_layers"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(float((c.get("rope_parameters") or {}).get("rope_theta") or c.get("rope_theta")))
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(VOCAB)
    qt = gguf.GGMLQuantizationType[qtype]
    w.add_file_type({"F32": 0, "F16": 1, "BF16": 32}.get(qtype, 2))
    if vocab == "bpe":
        tokens, types, merges = bpe_vocab()
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(0)
        w.add_eos_token_id(1)
        w.add_eot_token_id(2)
        w.add_chat_template(CHAT_TEMPLATE)
    else:
        tokens, types, scores = spm_vocab()
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
    w.add_add_bos_token(add_bos)
    if llama3_rope:  # llama.cpp stores the llama3 rope as per-frequency divisors, not as parameters
        from lamina_p2p.model.config import ModelConfig
        from lamina_p2p.model.transformer import rope_inv_freq

        cfg = ModelConfig.from_dir(hf_dir)
        base = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        w.add_tensor("rope_freqs.weight", (base / rope_inv_freq(cfg)).numpy().astype(np.float32))
    rng = np.random.default_rng(seed + 7)
    for hf_name, t in tensors.items():
        gname = _gguf_name(hf_name)
        a = t.float().numpy()
        if ga == "llama" and gname.endswith(("attn_q.weight", "attn_k.weight")):
            a = permute(a, heads if "attn_q" in gname else kv_heads)
        if a.ndim == 1 or qt == gguf.GGMLQuantizationType.F32:
            w.add_tensor(gname, np.ascontiguousarray(a, dtype=np.float32))
        elif qtype == "F16":
            w.add_tensor(gname, a.astype(np.float16))
        elif qtype.endswith("_K"):
            w.add_tensor(gname, _k_blocks(qt, a.shape[0], a.shape[1], rng), raw_dtype=qt)
        else:
            w.add_tensor(gname, gguf.quants.quantize(np.ascontiguousarray(a), qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _gguf_name(hf_name: str) -> str:
    from lamina_p2p.model.gguf import hf_to_gguf_name

    return hf_to_gguf_name(hf_name)
