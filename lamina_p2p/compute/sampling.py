"""Choosing the next token from logits, one row per sequence."""

from __future__ import annotations

import torch

from lamina_p2p.compute.sequence import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[float]]:
    """Next token and its log-probability (under the unmodified distribution) for each row."""
    logits = logits.float()
    logprobs_all = torch.log_softmax(logits, dim=-1)
    if all(s.params.greedy and _no_penalty(s) for s in seqs):
        tokens = torch.argmax(logits, dim=-1)
        return tokens.tolist(), logprobs_all.gather(1, tokens[:, None])[:, 0].tolist()
    out = []
    for i, seq in enumerate(seqs):
        out.append(_sample_row(logits[i], seq))
    tokens = torch.tensor(out, dtype=torch.long)
    return out, logprobs_all.gather(1, tokens[:, None])[:, 0].tolist()


def _no_penalty(seq: Sequence) -> bool:
    p = seq.params
    return p.repetition_penalty == 1.0 and p.frequency_penalty == 0.0 and p.presence_penalty == 0.0


def _apply_penalties(row: torch.Tensor, seq: Sequence) -> torch.Tensor:
    p = seq.params
    if _no_penalty(seq):
        return row
    row = row.clone()
    if p.repetition_penalty != 1.0:
        # Over prompt and output, as in the CTRL paper and HF transformers.
        seen = torch.tensor(sorted(set(seq.tokens)), dtype=torch.long)
        vals = row[seen]
        row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.frequency_penalty or p.presence_penalty) and seq.output:
        # Over generated tokens only, as in the OpenAI API.
        ids, counts = torch.unique(torch.tensor(seq.output, dtype=torch.long), return_counts=True)
        row[ids] -= p.frequency_penalty * counts.float() + p.presence_penalty
    return row


def _sample_row(row: torch.Tensor, seq: Sequence) -> int:
    p = seq.params
    row = _apply_penalties(row, seq)
    if p.greedy:
        return int(torch.argmax(row))
    row = row / p.temperature
    if p.top_k > 0 and p.top_k < row.shape[0]:
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, dim=-1)
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    if p.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_p, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = cum - sorted_p >= p.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=seq.generator))
