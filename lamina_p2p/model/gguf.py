"""GGUF checkpoints (llama.cpp's format, what Ollama, LM Studio and llama.cpp users hold).

Read with the `gguf` package (llama.cpp's own Python reader); nothing here parses
the binary layout. The file's metadata becomes a `ModelConfig` (through the same
HF-dict path and checks as config.json), and its tensors are dequantized to the
run's dtype at load, into the same `Transformer` the safetensors loader fills.

llama.cpp stores the q/k projection rows of Llama-family models permuted (its
rotary kernel pairs neighbouring dimensions, HF's pairs the two halves); that
permutation is undone here, as transformers' `LlamaTensorProcessor` does. Qwen2
and Qwen3 use the NEOX rope layout in llama.cpp and are stored unpermuted.

Every problem -- not a GGUF, truncated, an architecture or quantization type we
do not run, a missing tensor -- is a one-line `ModelError` naming the file, and
all of them are found before any tensor is dequantized.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np

from .config import ModelConfig, ModelError

# GGUF's general.architecture -> ours. Mistral files say "llama" (llama.cpp converts
# them as Llama); transformers tells them apart by general.name, and so do we.
ARCHITECTURES = ("llama", "qwen2", "qwen3")
QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
# llama.cpp's general.file_type (LlamaFileType) -> the dtype a run uses by default.
# Quantized files run in float32: the numbers were rounded once already.
_FILE_TYPE_DTYPES = {0: "float32", 1: "float16", 32: "bfloat16"}

_LAYER = re.compile(r"blk\.(\d+)\.(.+)$")
# GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N.").
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_HF_TO_GGUF = {v: k for k, v in _TOP_NAMES.items()}
_HF_LAYER_TO_GGUF = {v: k for k, v in _LAYER_NAMES.items()}


def is_gguf(path) -> bool:
    return Path(path).suffix.lower() == ".gguf"


# The last file opened. GGUFReader parses every metadata array item into numpy views, which for a
# 49k-token vocabulary takes seconds and ~150 MB; the model and then its tokenizer are loaded from
# the same file, so they share one reader, and load_tokenizer lets it go (release_gguf).
_last: tuple | None = None


def open_gguf(path):
    """A `gguf.GGUFReader` over `path` (memory-mapped); ModelError when it is not a readable GGUF."""
    global _last
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: file not found")
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if _last is not None and _last[0] == key:
        return _last[1]
    _last = None
    reader = _read(path)
    _last = (key, reader)
    return reader


def release_gguf() -> None:
    """Drop the cached reader (and its memory map)."""
    global _last
    _last = None


def _read(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, KeyError, struct errors... on a bad file
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "magic" in msg.lower():
            raise ModelError(f"{path}: not a GGUF file (no GGUF magic number at its start)") from None
        raise ModelError(f"{path}: truncated or corrupt GGUF file ({path.stat().st_size} bytes; "
                         f"the gguf reader says: {msg})") from None


def field(reader, key: str, default=None):
    """A metadata value as Python (str, int, float, bool or list), or `default` when absent."""
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def gguf_config(path, reader=None) -> ModelConfig:
    """The model geometry from the file's metadata (`{arch}.*` keys, as llama.cpp writes them)."""
    reader = reader or open_gguf(path)
    source = str(path)
    arch = field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelError(f"{source}: unsupported architecture {arch!r} (supported: llama, mistral (as llama), "
                         "qwen2, qwen3)")
    name = str(field(reader, "general.name", "") or "")
    model_type = "mistral" if arch == "llama" and "mistral" in name.lower() else arch
    tensors = {t.name: t for t in reader.tensors}

    def key(k, default=None):
        return field(reader, f"{arch}.{k}", default)

    def need(k):
        v = key(k)
        if v is None:
            raise ModelError(f"{source}: missing metadata key '{arch}.{k}'")
        if isinstance(v, list):  # per-layer values (llama.cpp allows them): we need them all equal
            if len(set(v)) != 1:
                raise ModelError(f"{source}: '{arch}.{k}' differs between layers, not supported")
            v = v[0]
        return v

    heads = need("attention.head_count")
    kv_heads = key("attention.head_count_kv") or heads
    if isinstance(kv_heads, list):
        kv_heads = need("attention.head_count_kv")
    hidden = need("embedding_length")
    head_dim = key("attention.key_length") or hidden // heads
    rot = key("rope.dimension_count")
    if rot is not None and rot != head_dim:
        raise ModelError(f"{source}: partial rotary ('{arch}.rope.dimension_count'={rot}, head_dim={head_dim}) "
                         "is not supported")
    vocab = key("vocab_size") or len(field(reader, "tokenizer.ggml.tokens", []) or []) or None
    if vocab is None and "token_embd.weight" in tensors:
        vocab = int(tensors["token_embd.weight"].shape[-1])
    d = {
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length"),
        "num_hidden_layers": need("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": key("rope.freq_base", 10000.0),
        "rope_scaling": _rope_scaling(reader, arch, tensors, head_dim, source),
        "max_position_embeddings": key("context_length") or 4096,
        "tie_word_embeddings": "output.weight" not in tensors,
        "dtype": _FILE_TYPE_DTYPES.get(field(reader, "general.file_type"), "float32"),
        "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos_ids(reader),
        "sliding_window": key("attention.sliding_window"),
    }
    if model_type == "mistral" and d["sliding_window"] is None:
        d.pop("sliding_window")
    return ModelConfig.from_hf(d, source=source)


def eos_ids(reader) -> list[int]:
    """End-of-sequence, end-of-turn and end-of-message ids: generation stops at any of them."""
    out = []
    for k in ("eos_token_id", "eot_token_id", "eom_token_id"):
        v = field(reader, f"tokenizer.ggml.{k}")
        if v is not None and int(v) not in out:
            out.append(int(v))
    return out


def _rope_scaling(reader, arch, tensors, head_dim, source) -> dict | None:
    kind = field(reader, f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        if "rope_freqs.weight" in tensors:
            return _llama3_scaling(reader, arch, tensors["rope_freqs.weight"], head_dim, source)
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(field(reader, f"{arch}.rope.scaling.factor", 1.0))}
    raise ModelError(f"{source}: unsupported rope scaling {kind!r} (supported: none, linear, llama3)")


def _llama3_scaling(reader, arch, t, head_dim, source) -> dict:
    """Llama 3.1+ files carry the llama3 rope as per-frequency divisors (rope_freqs.weight), not as
    parameters. Those divisors come from four numbers; find the ones that reproduce them exactly."""
    import gguf
    import torch

    from .transformer import rope_inv_freq  # the same formula the model will use

    freqs = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)).reshape(-1)
    theta = float(field(reader, f"{arch}.rope.freq_base", 10000.0))
    base = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    orig = int(field(reader, f"{arch}.rope.scaling.original_context_length", 8192) or 8192)
    factor = float(field(reader, f"{arch}.rope.scaling.factor", 0) or 0)
    for f in ([factor] if factor else []) + [8.0, 32.0, 16.0, 4.0]:
        for lo, hi in ((1.0, 4.0), (1.0, 2.0)):
            for o in dict.fromkeys([orig, 8192, 2048, 4096]):
                cand = {"rope_type": "llama3", "factor": f, "low_freq_factor": lo, "high_freq_factor": hi,
                        "original_max_position_embeddings": o}
                cfg = ModelConfig(architecture="llama", vocab_size=1, hidden_size=head_dim, intermediate_size=1,
                                  num_layers=1, num_heads=1, num_kv_heads=1, head_dim=head_dim, rms_norm_eps=1e-6,
                                  rope_theta=theta, rope_scaling=cand, max_position_embeddings=1,
                                  tie_word_embeddings=True, qkv_bias=False, qk_norm=False, dtype="float32",
                                  bos_token_id=None, eos_token_ids=())
                if freqs.shape == base.shape and torch.allclose(base / rope_inv_freq(cfg), freqs, rtol=1e-4):
                    return cand
    raise ModelError(f"{source}: rope_freqs.weight does not match any llama3 rope scaling we know")


def gguf_to_hf_name(name: str) -> str | None:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    m = _LAYER.match(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def hf_to_gguf_name(name: str) -> str:
    if name in _HF_TO_GGUF:
        return _HF_TO_GGUF[name]
    _, _, i, rest = name.split(".", 3)  # model.layers.N.rest
    return f"blk.{i}.{_HF_LAYER_TO_GGUF[rest]}"


def load_gguf_weights(path, model, reader=None, progress: bool | None = None) -> None:
    """Dequantize every tensor `model.hf_tensors()` expects from GGUF `path` into the model.

    All names, shapes and quantization types are checked first (ModelError naming the file and
    the tensor); `progress` (default: stderr is a terminal) shows a bar on stderr.
    """
    import gguf
    import torch

    reader = reader or open_gguf(path)
    c = model.config
    permute = c.architecture in ("llama", "mistral")
    tensors = {t.name: t for t in reader.tensors}
    expected = model.hf_tensors()
    plan = []
    for hf_name, (shape, dst) in expected.items():
        gname = hf_to_gguf_name(hf_name)
        t = tensors.get(gname)
        if t is None:
            raise ModelError(f"{path}: missing tensor {gname!r} ({hf_name})")
        qtype = gguf.GGMLQuantizationType(t.tensor_type).name
        if qtype not in QUANT_TYPES:
            raise ModelError(f"{path}: tensor {gname!r} has quantization type {qtype}, which is not supported "
                             f"(supported: {', '.join(QUANT_TYPES)})")
        got = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions fastest-first
        want = shape if not (hf_name.endswith("_norm.weight") and "self_attn" in hf_name) else (c.head_dim,)
        if got != tuple(want):
            raise ModelError(f"{path}: tensor {gname!r} has shape {list(got)}, expected {list(want)}")
        plan.append((gname, hf_name, t, got, dst))
    _check_extent(path, reader, plan)
    from tqdm import tqdm

    bar = tqdm(plan, desc=f"loading {Path(path).name}", unit="tensor", file=sys.stderr,
               disable=(not sys.stderr.isatty()) if progress is None else not progress, leave=False)
    with torch.inference_mode():
        for gname, hf_name, t, got, dst in bar:
            w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(got)
            if permute and gname.endswith(("attn_q.weight", "attn_k.weight")):
                w = unpermute(w, c.num_heads if "attn_q" in gname else c.num_kv_heads)
            if not w.flags.writeable:  # F32 data is a view of the read-only memory map
                w = w.copy()
            dst.copy_(torch.from_numpy(np.ascontiguousarray(w)))


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf.LlamaModel.permute): rows of each
    head go from interleaved pairs back to HF's two halves."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _check_extent(path, reader, plan) -> None:
    """A truncated file can still parse (the reader memory-maps it): check each tensor's bytes exist."""
    size = Path(path).stat().st_size
    for gname, _, t, _, _ in plan:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise ModelError(f"{path}: truncated: tensor {gname!r} ends at byte {end}, the file has {size}")
