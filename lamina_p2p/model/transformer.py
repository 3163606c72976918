"""The dense half of a Llama-family decoder, split at the attention boundary.

A decoder layer is two calls with attention in between, done by someone else
(an attention peer over the wire, or a local backend in tests):

    q, k, v = model.pre(i, x, positions)      # norm, fused QKV, q/k norm, rotary
    o       = attention(q, k, v)              # not here
    x       = model.post(i, x, o)             # O proj, residual, norm, SwiGLU, residual

A batch is ragged and token-major: T tokens from any number of sequences, each
token with its own position, so prefill chunks and decode tokens mix freely.
Dense ops are per token, so nothing here needs to know where sequences begin.

Speed notes (CPU decode is the headline number): q/k/v are one matmul and
gate/up are one matmul (rows fused at load, as gpt-fast and nano-vllm do), laid
out once for this machine's fastest library (linear.py); rotary cos/sin come
from a table built once and are gathered once per step, not per layer; weights
are buffers, not parameters, so no autograd graph is ever recorded. The LM head
returns float32 logits accumulated in float32. Numerics follow transformers op for op
(norm in float32, rounded to the model dtype before the weight; rotary in the
model dtype) so bfloat16 greedy output matches it token for token.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch
import torch.nn.functional as F

from .config import ModelConfig, ModelError
from .linear import Linear, choose_layout

_PREPARE_LOCK = threading.Lock()
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return TORCH_DTYPES[name]
    except KeyError:
        raise ModelError(f"unsupported dtype {name!r} (expected one of {', '.join(TORCH_DTYPES)})") from None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # transformers normalises in float32, rounds to the model dtype, then scales
    # in the model dtype. For float32 the casts are no-ops.
    y = F.rms_norm(x.float(), (x.shape[-1],), None, eps)
    return y.to(x.dtype) * weight


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] in float32, with HF's rope scaling rules."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    kind = scaling["rope_type"]
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        # Llama 3.1: leave high frequencies alone, divide low ones by `factor`,
        # interpolate smoothly in between (same formula as transformers).
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ModelError(f"unsupported rope type {kind!r}")


class Layer(torch.nn.Module):
    """One decoder layer's weights, fused for few large matmuls."""

    def __init__(self, c: ModelConfig, dtype: torch.dtype, device):
        super().__init__()
        d, hq, hkv, h = c.head_dim, c.num_heads, c.num_kv_heads, c.hidden_size

        def empty(*shape):
            return torch.empty(*shape, dtype=dtype, device=device)

        self.register_buffer("input_norm", empty(h))
        # Rows: q heads, then k heads, then v heads — the order of the split in pre().
        self.register_buffer("wqkv", empty((hq + 2 * hkv) * d, h))
        self.register_buffer("bqkv", empty((hq + 2 * hkv) * d) if c.qkv_bias else None)
        # Qwen3 q_norm/k_norm weights broadcast to [hq + hkv, d] so q and k are
        # normalised together.
        self.register_buffer("qk_norm", empty(hq + hkv, d) if c.qk_norm else None)
        self.register_buffer("wo", empty(h, hq * d))
        self.register_buffer("post_norm", empty(h))
        # Rows: gate, then up.
        self.register_buffer("w_gate_up", empty(2 * c.intermediate_size, h))
        self.register_buffer("w_down", empty(h, c.intermediate_size))


class Transformer(torch.nn.Module):
    """Dense part of the model. Build with `load_model` (loader.py) or fill `hf_tensors()`.

    Weights live on one device in one dtype, chosen at construction; moving the
    module afterwards is not supported (the rotary table would stay behind).
    `layout` (linear.LAYOUTS, default "auto") says how the matmul weights are laid
    out for the machine; that happens once, in `prepare()`, after loading (or on
    the first forward call).
    """

    def __init__(self, config: ModelConfig, dtype: str | None = None, device="cpu", layout: str = "auto"):
        super().__init__()
        self.config = config
        self.dtype = torch_dtype(dtype or config.dtype)
        self.device = torch.device(device)
        self.layout = choose_layout(layout, self.dtype, self.device)
        c = config
        self.register_buffer("embed_weight", torch.empty(c.vocab_size, c.hidden_size, dtype=self.dtype, device=device))
        self.layers = torch.nn.ModuleList(Layer(c, self.dtype, device) for _ in range(c.num_layers))
        self.register_buffer("final_norm", torch.empty(c.hidden_size, dtype=self.dtype, device=device))
        # Tied checkpoints (no lm_head.weight) reuse the embedding; see lm_head_weight.
        lm_head = None if c.tie_word_embeddings else torch.empty(c.vocab_size, c.hidden_size, dtype=self.dtype, device=device)
        self.register_buffer("lm_head", lm_head)
        # A plain tuple: indexing a ModuleList costs more than the ops of a decode step's norm.
        self._layers = tuple(self.layers)
        self._nq = c.num_heads
        self._nqk = c.num_heads + c.num_kv_heads
        self._nqkv = c.num_heads + 2 * c.num_kv_heads
        # Per layer (qkv, o, gate_up, down) prepared matmuls, and the LM head; None until prepare().
        self._linears: tuple[tuple[Linear, Linear, Linear, Linear], ...] | None = None
        self._head: Linear | None = None
        # The fused bfloat16 path of layout "gemv" (fused.FusedDense), or None: then _linears is ().
        self._fused = None
        self._fused_layers = None  # fused_step.FusedLayers, made on first use
        self._dense_pool = True  # see dense_pool
        self._inv_freq = rope_inv_freq(c)
        self._build_rope_table(c.max_position_embeddings)
        # id(positions) -> (positions, (cos, sin)) of the step's micro-batches, see rope()
        self._rope_cs: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = {}

    # ---- weights in HF naming --------------------------------------------------------------

    def hf_tensors(self) -> dict[str, tuple[tuple[int, ...], torch.Tensor]]:
        """HF tensor name -> (shape in the checkpoint, destination view in this model).

        The loader copies each checkpoint tensor into its view (`dst.copy_(src)`
        converts dtype and broadcasts the Qwen3 q/k norm vectors over heads), so
        the fused layout is known only here.
        """
        if self._linears is not None:
            raise RuntimeError("hf_tensors() is for filling the model; call it before prepare() or the first forward")
        c = self.config
        d, hq, hkv, h, inter = c.head_dim, c.num_heads, c.num_kv_heads, c.hidden_size, c.intermediate_size
        q_rows, kv_rows = hq * d, hkv * d
        out = {"model.embed_tokens.weight": ((c.vocab_size, h), self.embed_weight),
               "model.norm.weight": ((h,), self.final_norm)}
        if not c.tie_word_embeddings:
            out["lm_head.weight"] = ((c.vocab_size, h), self.lm_head)
        for i, L in enumerate(self._layers):
            p = f"model.layers.{i}."
            qkv = {"q": (0, q_rows), "k": (q_rows, q_rows + kv_rows), "v": (q_rows + kv_rows, q_rows + 2 * kv_rows)}
            out[p + "input_layernorm.weight"] = ((h,), L.input_norm)
            for name, (a, b) in qkv.items():
                out[p + f"self_attn.{name}_proj.weight"] = ((b - a, h), L.wqkv[a:b])
                if c.qkv_bias:
                    out[p + f"self_attn.{name}_proj.bias"] = ((b - a,), L.bqkv[a:b])
            if c.qk_norm:
                out[p + "self_attn.q_norm.weight"] = ((d,), L.qk_norm[:hq])
                out[p + "self_attn.k_norm.weight"] = ((d,), L.qk_norm[hq:])
            out[p + "self_attn.o_proj.weight"] = ((h, q_rows), L.wo)
            out[p + "post_attention_layernorm.weight"] = ((h,), L.post_norm)
            out[p + "mlp.gate_proj.weight"] = ((inter, h), L.w_gate_up[:inter])
            out[p + "mlp.up_proj.weight"] = ((inter, h), L.w_gate_up[inter:])
            out[p + "mlp.down_proj.weight"] = ((h, inter), L.w_down)
        return out

    def prepare(self, layout: str | None = None) -> "Transformer":
        """Lay the matmul weights out once for `layout` (default: the constructor's); returns self.

        Fused q/k/v rows and gate/up rows (hf_tensors) become one prepared GEMM
        each; the plain matmul buffers are dropped when the layout copies them, so
        the weights are not held twice. The LM head gets its own float32-output
        matmul (a tied model keeps the embedding for lookups). Idempotent; raises
        ValueError for a layout this machine cannot run.
        """
        with _PREPARE_LOCK:  # the first forward may come from any thread; lay out once
            if self._linears is None:
                self._prepare(layout)
        return self

    def _prepare(self, layout: str | None) -> None:
        if layout is not None:
            self.layout = choose_layout(layout, self.dtype, self.device)
        if self.layout == "gemv":
            from .fused import FusedDense

            if FusedDense.eligible(self):
                self._fused = FusedDense(self)
                self.dense_pool = self._dense_pool
                self._head, self._linears = self._fused.logits, ()
                self._drop_plain_weights()
                return
        linears, head = self._build(self.layout)
        # Head first: a forward on another thread takes `_linears` being set as "prepared".
        self._head, self._linears = head, linears
        if self.layout != "eager":
            self._drop_plain_weights()

    def _drop_plain_weights(self) -> None:
        for L in self._layers:
            L.wqkv = L.bqkv = L.wo = L.w_gate_up = L.w_down = None
        self.lm_head = None

    def _build(self, lay: str):
        with torch.inference_mode():
            linears = tuple((Linear(L.wqkv, L.bqkv, lay), Linear(L.wo, None, lay),
                             Linear(L.w_gate_up, None, lay), Linear(L.w_down, None, lay))
                            for L in self._layers)
            # Float32 logits (issue 14): bf16 weights, float32 accumulation and output. oneDNN
            # returns the model dtype, so a oneDNN model runs its head in float32.
            head = Linear(self.lm_head_weight, None, "f32" if lay == "onednn" else lay, out_dtype=torch.float32)
        return linears, head

    @property
    def dense_pool(self) -> bool:
        """Whether the fused bfloat16 layer's small-batch calls (up to spin_pool.POOL_MAX_ROWS rows, more
        than one torch thread) run on the spinning worker pool (model/spin_pool.py) instead of Numba's
        threads. On by default; the engine turns it off when attention runs in other processes, whose
        round trips the pool's worker would spin through."""
        return self._dense_pool

    @dense_pool.setter
    def dense_pool(self, on: bool) -> None:
        self._dense_pool = bool(on)
        if self._fused is not None:
            self._fused.pool_max_rows = self._fused.default_pool_max_rows if on else 0

    @property
    def onednn(self) -> bool:
        """True once the matmul weights are laid out for a CPU library (not plain tensors)."""
        return self._linears is not None and self.layout != "eager"

    # ---- rotary ----------------------------------------------------------------------------

    def _build_rope_table(self, n: int) -> None:
        # Same arithmetic as transformers: angles in float32, cos/sin rounded to
        # the model dtype. sin carries the sign of rotate_half, so rotation is
        # x*cos + roll(x, d/2)*sin: one roll instead of slice, negate and cat.
        freqs = torch.arange(n, dtype=torch.float32)[:, None] * self._inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        half = self.config.head_dim // 2
        sin = emb.sin()
        sin[:, :half].neg_()
        self._cos = emb.cos().to(self.dtype).to(self.device)
        self._sin = sin.to(self.dtype).to(self.device)

    def rope_table(self, top: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole rotary table, cos and sin [n, D] in the model dtype (sin with rotate_half's sign), grown first
        when position `top` is past it. A grown table is a new tensor: a holder of the old one can tell."""
        if top >= self._cos.shape[0]:
            self._build_rope_table(max(top + 1, 2 * self._cos.shape[0]))
        return self._cos, self._sin

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, D] for these positions, growing the table if a position is past it."""
        # Every layer of a step passes each micro-batch's same positions tensor: gather once per
        # tensor (the bound check is a host sync on GPU), for every micro-batch of the step (with one
        # entry, micro-batches that alternate gathered again at every layer). The entry keeps its
        # tensor alive, so an id cannot match a new tensor at a recycled address.
        hit = self._rope_cs.get(id(positions))
        if hit is not None and hit[0] is positions:
            return hit[1]
        self.rope_table(int(positions.max()) if positions.numel() else 0)
        if len(self._rope_cs) >= 32:  # more than a step's micro-batches: older steps' tensors go
            self._rope_cs.clear()
        cs = self._cos[positions].unsqueeze(1), self._sin[positions].unsqueeze(1)
        self._rope_cs[id(positions)] = (positions, cs)
        return cs

    def fused_layers(self):
        """The runner of a step's layers in one compiled call (fused_step.FusedLayers) for the fused bfloat16
        layer, made once; None for any other layout."""
        if self._fused is None:
            return None
        if self._fused_layers is None:
            from .fused_step import FusedLayers

            self._fused_layers = FusedLayers(self)
        return self._fused_layers

    # ---- the four entry points -------------------------------------------------------------

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[T] token ids -> [T, hidden] residual stream in the model dtype."""
        return F.embedding(token_ids, self.embed_weight)

    def pre(self, layer: int, x: torch.Tensor, positions: torch.Tensor, wire: bool = False):
        """Residual stream [T, hidden] -> q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D], contiguous.
        With `wire`, the fused path may return them as numpy arrays in the attention storage encoding
        (uint16 bits) instead, as it wrote them; the others return tensors either way."""
        lin = self._linears if self._linears is not None else self.prepare()._linears
        if self._fused is not None:
            if x.shape[0] < self._fused.wide_min_rows:
                return self._fused.pre(layer, x, *self.rope(positions), wire=wire)
            lin = self._fused.prefill_linears
        L = self._layers[layer]
        eps = self.config.rms_norm_eps
        t = x.shape[0]
        qkv = lin[layer][0](rms_norm(x, L.input_norm, eps)).view(t, self._nqkv, -1)
        qk = qkv[:, : self._nqk]
        if L.qk_norm is not None:
            qk = rms_norm(qk, L.qk_norm, eps)
        cos, sin = self.rope(positions)
        qk = qk * cos + qk.roll(qk.shape[-1] // 2, -1) * sin
        q, k, v = qk[:, : self._nq], qk[:, self._nq :], qkv[:, self._nqk :]
        return q.contiguous(), k.contiguous(), v.contiguous()

    def post(self, layer: int, x: torch.Tensor, attn_out) -> torch.Tensor:
        """Residual stream [T, hidden] and attention output [T, Hq, D] -> next residual stream.
        attn_out: a tensor, or a float32 numpy array (rounded to the model dtype here, as .to would)."""
        lin = self._linears if self._linears is not None else self.prepare()._linears
        if self._fused is not None:
            if x.shape[0] < self._fused.wide_min_rows:
                return self._fused.post(layer, x, attn_out)
            lin = self._fused.prefill_linears
        if isinstance(attn_out, np.ndarray):
            attn_out = torch.tensor(attn_out, device=x.device).to(x.dtype)  # (a copy: frames are read-only)
        _, wo, w_gate_up, w_down = lin[layer]
        x = x + wo(attn_out.reshape(x.shape[0], -1))
        gate, up = w_gate_up(rms_norm(x, self._layers[layer].post_norm, self.config.rms_norm_eps)).chunk(2, dim=-1)
        return x + w_down(F.silu(gate) * up)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """[N, hidden] (usually each sequence's last token) -> [N, vocab] float32.

        The head reads the model-dtype weights but accumulates and returns float32, so
        near ties are not decided by bf16 rounding (which would make greedy output
        depend on the batch). The normed input is rounded to the model dtype first,
        as transformers does.
        """
        head = self._head or self.prepare()._head
        if self._fused is not None:
            return head(x)  # the fused head norms its input itself
        return head(rms_norm(x, self.final_norm, self.config.rms_norm_eps))

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The LM head's plain weights [vocab, hidden] (the embedding when tied); before prepare() only
        for an untied model."""
        return self.embed_weight if self.config.tie_word_embeddings else self.lm_head
