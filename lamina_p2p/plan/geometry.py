"""The slice of a model the planner needs: its shape, not its weights.

The planner never loads a checkpoint. It needs layer count, widths, head counts and the
element size, from which it derives parameter counts, KV bytes per token and wire bytes
per token. `Geometry` holds exactly that, built from a preset name or from a model's
`lamina_p2p.model.config.ModelConfig` (a directory, a GGUF file): the one model shape,
plus the element size served. Its parameter count is the one the model reports too, and
its KV size uses `model.config.kv_bytes_per_token`.

Presets use the published geometries of the models in the attention-offloading paper
(arXiv 2405.01814): LLaMA-33B/65B (Touvron et al. 2023, MHA, 32k vocabulary) and
LLaMA3-70B/8B (Meta's HF config.json, GQA with 8 KV heads, 128,256 vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lamina_kernels import storage_itemsize
from lamina_p2p.model.config import ModelConfig, kv_bytes_per_token


class GeometryError(ValueError):
    """The model argument names neither a preset nor a usable model directory."""


@dataclass(frozen=True)
class Geometry:
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    bytes_per_element: int = 2  # weights, activations and KV are served in fp16/bf16
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False

    # -- derived sizes ------------------------------------------------------------------
    @property
    def group_size(self) -> int:
        """GQA group G: query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    def params_per_layer(self) -> int:
        h, q, kv = self.hidden_size, self.q_width, self.kv_width
        n = h * (q + 2 * kv) + q * h + 3 * h * self.intermediate_size + 2 * h
        if self.qkv_bias:
            n += q + 2 * kv
        if self.qk_norm:
            n += 2 * self.head_dim
        return n

    def head_params(self) -> int:
        """Embedding, final norm and LM head: the dense work done once per step, not per layer."""
        n = self.vocab_size * self.hidden_size + self.hidden_size
        if not self.tie_word_embeddings:
            n += self.vocab_size * self.hidden_size
        return n

    def num_params(self) -> int:
        return self.num_layers * self.params_per_layer() + self.head_params()

    def weight_bytes(self) -> int:
        return self.num_params() * self.bytes_per_element

    def kv_bytes_per_token_layer(self) -> int:
        return kv_bytes_per_token(1, self.num_kv_heads, self.head_dim, self.bytes_per_element)

    def kv_bytes_per_token(self) -> int:
        return self.num_layers * self.kv_bytes_per_token_layer()

    def wire_bytes_per_token_layer(self) -> int:
        """q and the attention output (num_heads*head_dim each) plus the new k and v.

        With num_heads*head_dim == hidden this is the paper's (2 + 2/G)*d*e.
        """
        return (2 * self.q_width + 2 * self.kv_width) * self.bytes_per_element

    def activation_bytes_per_token_layer(self) -> int:
        """Bytes a decode token's activations move through memory in one layer's dense part.

        Input and residual (2h), q/k/v out, attention output in, MLP gate/up out and the
        product read back by down (3I): an estimate, small next to the weights until the
        batch is in the thousands.
        """
        h = self.hidden_size
        n = 2 * h + (self.q_width + 2 * self.kv_width) + self.q_width + 3 * self.intermediate_size
        return n * self.bytes_per_element

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, name: str | None = None) -> "Geometry":
        """From a ModelConfig, at the checkpoint's dtype."""
        return cls(
            name=name or cfg.architecture,
            num_layers=cfg.num_layers,
            hidden_size=cfg.hidden_size,
            num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            intermediate_size=cfg.intermediate_size,
            vocab_size=cfg.vocab_size,
            bytes_per_element=storage_itemsize(cfg.dtype),
            tie_word_embeddings=cfg.tie_word_embeddings,
            qkv_bias=cfg.qkv_bias,
            qk_norm=cfg.qk_norm,
        )


PRESETS: dict[str, Geometry] = {
    g.name: g
    for g in (
        Geometry("llama3-70b", 80, 8192, 64, 8, 128, 28672, 128256),
        Geometry("llama3-8b", 32, 4096, 32, 8, 128, 14336, 128256),
        Geometry("llama-65b", 80, 8192, 64, 64, 128, 22016, 32000),
        Geometry("llama-33b", 60, 6656, 52, 52, 128, 17920, 32000),
    )
}


def resolve_model(spec: str) -> Geometry:
    """A preset name, or a model as --model takes it: a directory with config.json, a .gguf file, org/name."""
    if spec.lower() in PRESETS:
        return PRESETS[spec.lower()]
    try:
        from lamina_p2p.model.source import display_name, model_config
    except ImportError as e:  # the model package is optional for planning
        raise GeometryError(f"cannot read model {spec}: {e}") from e
    try:
        cfg = model_config(spec)
    except Exception as e:  # ModelError, JSON errors, missing file: one clear line
        if Path(spec).exists():
            kind = "directory" if Path(spec).is_dir() else "file"
            raise GeometryError(f"cannot read model {kind} {spec}: {e}") from e
        raise GeometryError(
            f"unknown model {spec!r}: not a preset ({', '.join(sorted(PRESETS))}) and not a model ({e})"
        ) from e
    # Real checkpoints store float32 only for tiny test models; planning assumes the
    # served dtype, which is the checkpoint's.
    return Geometry.from_model_config(cfg, name=display_name(spec))

