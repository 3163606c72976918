"""Model geometry read from a Hugging Face `config.json`.

One frozen dataclass describes every supported architecture (Llama 2/3, Mistral,
Qwen2, Qwen3): they differ only in a few switches (QKV bias, q/k RMSNorm, rope
scaling). Everything that sizes buffers elsewhere in the system (KV pools, wire
messages, the planner) reads this object, never the raw JSON: the planner's
`plan.geometry.Geometry` is built from it, the attention peers get its KV part
(`kv_geometry`), and `kv_bytes_per_token` here is the one formula for KV size.

transformers 4.x and 5.x spell some keys differently, so both are read:
`rope_theta`/`rope_scaling` (4.x) vs `rope_parameters` (5.x), and `torch_dtype`
(4.x) vs `dtype` (5.x).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lamina_kernels import STORAGES, storage_itemsize


class ModelError(Exception):
    """A model directory cannot be used. The message is one line naming the file and key/tensor."""


# model_type -> the architecture name used here. HF class names map the same way.
_ARCHITECTURES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
}
_CLASS_NAMES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
# Checkpoint dtypes served: exactly the KV storage encodings the kernels have.
DTYPES = STORAGES
# Rope types whose frequencies we compute (see transformer.rope_inv_freq).
ROPE_TYPES = ("default", "llama3", "linear")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # "llama" | "mistral" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    # None for plain rope; otherwise the HF scaling dict with "rope_type" set
    # ("llama3" or "linear") and without "rope_theta".
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    dtype: str  # "float32" | "float16" | "bfloat16"
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    # Mistral-style sliding-window attention (None: full attention). The dense
    # part ignores it; it is here so an attention backend can honour it.
    sliding_window: int | None = None

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA group)."""
        return self.num_heads // self.num_kv_heads

    def kv_bytes_per_token(self, itemsize: int) -> int:
        """Bytes of K and V one token occupies across all layers, at `itemsize` bytes per element."""
        return kv_bytes_per_token(self.num_layers, self.num_kv_heads, self.head_dim, itemsize)

    def kv_geometry(self, storage: str) -> dict:
        """What an attention peer needs to hold this model's KV in `storage` (one of STORAGES):
        the fields of the register message (AttentionService.register's arguments)."""
        return {"num_layers": self.num_layers, "num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim, "storage": storage, "max_positions": self.max_position_embeddings}

    def num_params(self) -> int:
        """Parameters of the checkpoint: the planner's count (plan.geometry.Geometry.num_params)."""
        from lamina_p2p.plan.geometry import Geometry  # the planner imports this module

        return Geometry.from_model_config(self).num_params()

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        """Build from a parsed HF config dict. `source` names the file in error messages."""
        arch = _architecture(d, source)

        def need(key: str) -> Any:
            if d.get(key) is None:
                raise ModelError(f"{source}: missing key {key!r}")
            return d[key]

        def positive_int(key: str, value: Any) -> int:
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ModelError(f"{source}: {key!r} must be a positive integer, got {value!r}")
            return value

        hidden = positive_int("hidden_size", need("hidden_size"))
        heads = positive_int("num_attention_heads", need("num_attention_heads"))
        kv_heads = positive_int("num_key_value_heads", d.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise ModelError(
                f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
            )
        head_dim = positive_int("head_dim", d.get("head_dim") or hidden // heads)
        if head_dim % 2:
            raise ModelError(f"{source}: 'head_dim' must be even for rotary embeddings, got {head_dim}")

        act = d.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ModelError(f"{source}: unsupported 'hidden_act' {act!r} (only silu)")
        if d.get("mlp_bias"):
            raise ModelError(f"{source}: unsupported 'mlp_bias'=true")
        # Qwen2 always has a QKV bias; Llama/Mistral/Qwen3 `attention_bias` would
        # also put a bias on o_proj, which no supported checkpoint uses.
        if arch != "qwen2" and d.get("attention_bias"):
            raise ModelError(f"{source}: unsupported 'attention_bias'=true for {arch}")

        rope_theta, rope_scaling = _rope(d, source)
        dtype = d.get("dtype") or d.get("torch_dtype") or "float32"
        if dtype not in DTYPES:
            raise ModelError(f"{source}: unsupported dtype {dtype!r} (expected one of {', '.join(DTYPES)})")

        sliding_window = None
        if arch == "mistral" or d.get("use_sliding_window"):
            sliding_window = d.get("sliding_window")

        return cls(
            architecture=arch,
            vocab_size=positive_int("vocab_size", need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=positive_int("intermediate_size", need("intermediate_size")),
            num_layers=positive_int("num_hidden_layers", need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=positive_int(
                "max_position_embeddings", d.get("max_position_embeddings") or 4096
            ),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=arch == "qwen2",
            qk_norm=arch == "qwen3",
            dtype=dtype,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=_id_tuple(d.get("eos_token_id")),
            sliding_window=sliding_window,
        )

    @classmethod
    def from_dir(cls, path) -> "ModelConfig":
        """Read `config.json`; EOS ids from `generation_config.json` are added when present
        (Llama 3 instruct lists its end-of-turn ids only there)."""
        path = Path(path)
        d = read_json(path / "config.json")
        config = cls.from_hf(d, source=str(path / "config.json"))
        gen_file = path / "generation_config.json"
        if gen_file.is_file():
            extra = _id_tuple(read_json(gen_file).get("eos_token_id"))
            merged = config.eos_token_ids + tuple(i for i in extra if i not in config.eos_token_ids)
            if merged != config.eos_token_ids:
                config = replace(config, eos_token_ids=merged)
        return config


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, itemsize: int) -> int:
    """Bytes one token's K and V take over `num_layers` layers and `num_kv_heads` KV heads of
    `head_dim` elements of `itemsize` bytes. The one formula: the model, the planner, the
    attention peers' blocks and the scheduler's admission all size KV with it."""
    return 2 * num_layers * num_kv_heads * head_dim * itemsize


def geometry_kv_bytes_per_token(geometry: dict) -> int:
    """kv_bytes_per_token of a register message's geometry (ModelConfig.kv_geometry)."""
    return kv_bytes_per_token(geometry["num_layers"], geometry["num_kv_heads"], geometry["head_dim"],
                              storage_itemsize(geometry["storage"]))


def read_json(path: Path) -> dict:
    """Load a JSON object; any failure is a one-line ModelError naming the file."""
    if not path.is_file():
        raise ModelError(f"{path}: file not found")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: cannot parse JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return d


def _architecture(d: dict, source: str) -> str:
    model_type = d.get("model_type")
    if model_type in _ARCHITECTURES:
        return _ARCHITECTURES[model_type]
    for name in d.get("architectures") or ():
        if name in _CLASS_NAMES:
            return _CLASS_NAMES[name]
    found = model_type or ",".join(d.get("architectures") or ()) or "none given"
    raise ModelError(
        f"{source}: unsupported architecture {found!r} (supported: {', '.join(_ARCHITECTURES)})"
    )


def _rope(d: dict, source: str) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from either the 5.x or the 4.x spelling."""
    params = d.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise ModelError(f"{source}: 'rope_parameters' must be an object")
    scaling = dict(params or d.get("rope_scaling") or {})
    theta = scaling.pop("rope_theta", None) or d.get("rope_theta") or 10000.0
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    if rope_type not in ROPE_TYPES:
        raise ModelError(f"{source}: unsupported rope type {rope_type!r} (supported: {', '.join(ROPE_TYPES)})")
    if scaling.get("partial_rotary_factor", 1.0) != 1.0 or d.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelError(f"{source}: unsupported 'partial_rotary_factor' != 1")
    if rope_type == "default":
        return float(theta), None
    required = {"llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                "linear": ("factor",)}[rope_type]
    for key in required:
        if key not in scaling:
            raise ModelError(f"{source}: rope type {rope_type!r} needs key {key!r}")
    return float(theta), {"rope_type": rope_type, **scaling}


def _id_tuple(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)

