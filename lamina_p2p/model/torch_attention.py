"""A local dense attention backend in plain torch, and a forward pass that uses it.

This is the single-process baseline and the parity harness, not a fast path:
each sequence keeps its K/V as growing torch tensors and attends with
`scaled_dot_product_attention`. It speaks the same interface the compute peer
uses with remote attention (q/k/v token-major in, [T, Hq, D] out), so tests
compare like with like.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .transformer import Transformer


class TorchAttention:
    """Per-sequence dense KV cache: seq_id -> per layer (K, V), each [Hkv, L, D]."""

    def __init__(self, model: Transformer):
        self.model = model
        self.kv: dict[object, list[tuple[torch.Tensor, torch.Tensor] | None]] = {}

    def length(self, seq_id) -> int:
        """Tokens cached for `seq_id` (layer 0's count; all layers agree after a full step)."""
        layers = self.kv.get(seq_id)
        return 0 if not layers or layers[0] is None else layers[0][0].shape[1]

    def free(self, seq_id) -> None:
        self.kv.pop(seq_id, None)

    def attend(self, layer: int, seq_ids, counts, q, k, v) -> torch.Tensor:
        """Append each sequence's chunk of K/V, then attend causally.

        `counts[i]` tokens of the token-major q/k/v belong to `seq_ids[i]`, in order.
        Returns [T, Hq, D] in q's dtype.
        """
        out = torch.empty_like(q)
        n_layers = self.model.config.num_layers
        start = 0
        for seq_id, n in zip(seq_ids, counts):
            end = start + n
            layers = self.kv.setdefault(seq_id, [None] * n_layers)
            k_new, v_new = k[start:end].transpose(0, 1), v[start:end].transpose(0, 1)  # [Hkv, n, D]
            if layers[layer] is None:
                kc, vc = k_new.contiguous(), v_new.contiguous()
            else:
                kc = torch.cat((layers[layer][0], k_new), dim=1)
                vc = torch.cat((layers[layer][1], v_new), dim=1)
            layers[layer] = (kc, vc)
            o = F.scaled_dot_product_attention(
                q[start:end].transpose(0, 1)[None], kc[None], vc[None], enable_gqa=True, **_causal(n, kc.shape[1], q.device)
            )[0]  # [Hq, n, D]
            out[start:end] = o.transpose(0, 1)
            start = end
        return out


def _causal(n: int, total: int, device) -> dict:
    """SDPA arguments for n new queries at the end of `total` keys.

    The no-mask and is_causal forms select the same CPU kernels transformers
    uses (as does the 4-D layout above), which keeps bfloat16 results bitwise
    equal to it; an explicit mask is needed only for a chunk after a prefix.
    """
    if n == 1:
        return {}
    if n == total:
        return {"is_causal": True}
    # Query i of the chunk sits at position total - n + i and sees keys 0..that.
    rows = torch.arange(total - n, total, device=device)[:, None]
    return {"attn_mask": rows >= torch.arange(total, device=device)[None, :]}


def forward(model: Transformer, attention: TorchAttention, seq_ids, chunks, all_logits: bool = False):
    """Run one step: `chunks[i]` (list of token ids) extends sequence `seq_ids[i]`.

    Positions continue from what `attention` holds for each sequence. Returns
    float32 logits: the last token of each chunk [N, vocab], or every token
    [T, vocab] with `all_logits`.
    """
    device = model.device
    counts = [len(c) for c in chunks]
    tokens = torch.tensor([t for c in chunks for t in c], dtype=torch.long, device=device)
    positions = torch.cat([
        torch.arange(attention.length(s), attention.length(s) + n, device=device) for s, n in zip(seq_ids, counts)
    ])
    x = model.embed(tokens)
    for layer in range(model.config.num_layers):
        q, k, v = model.pre(layer, x, positions)
        x = model.post(layer, x, attention.attend(layer, seq_ids, counts, q, k, v))
    if not all_logits:
        last = torch.tensor(counts, device=device).cumsum(0) - 1
        x = x[last]
    return model.logits(x)


@torch.inference_mode()
def generate_greedy(model: Transformer, prompts: list[list[int]], steps: int):
    """Greedy decode a batch of prompts together. Returns (tokens per prompt, per-step logits).

    logits[0] is the prompt's last-token logits [N, vocab]; logits[i] the i-th decode step's.
    """
    attention = TorchAttention(model)
    seq_ids = list(range(len(prompts)))
    logits = [forward(model, attention, seq_ids, prompts)]
    generated: list[list[int]] = [[] for _ in prompts]
    for _ in range(steps):
        nxt = logits[-1].argmax(-1).tolist()
        for g, t in zip(generated, nxt):
            g.append(t)
        logits.append(forward(model, attention, seq_ids, [[t] for t in nxt]))
    return generated, logits
