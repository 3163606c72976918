"""Choosing the next token from logits, one row per sequence.

Order, per row: logit_bias, the grammar's mask, penalties, then greedy (temperature 0) or
temperature, top_k, softmax, min_p, top_p and a draw. Every choice that can tie is broken
by the lowest token id (argmax, the top_k cut, the top_p order), so a row's token depends
on its logits only, never on how a sort happened to order equal values.

A row whose sampling fails (its own parameters or grammar) ends that sequence alone with
`seq.error`; the rest of the batch samples as usual. Reported log-probabilities are those
of the model's distribution (before bias, mask, penalties and temperature), as OpenAI's are.
"""

from __future__ import annotations

import numpy as np
import torch

from lamina_p2p.compute.sequence import Sequence

MAX_TOP_LOGPROBS = 20


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[float]]:
    """Next token and its log-probability for each row.

    logits: [rows, vocab] (any float dtype; sampled in float32). Rows with `params.top_logprobs`
    also get their alternatives appended to `seq.top_logprobs`; a row that fails gets
    `seq.error` and a placeholder token 0 that the caller must not deliver.
    """
    logits = logits.float()
    if all(_plain_greedy(s) and not s.params.top_logprobs for s in seqs):
        fast = _greedy(logits)
        if fast is not None:
            return fast
    if all(_plain_greedy(s) for s in seqs):
        # max over the row returns the first maximal index (ties go to the lowest token id, as
        # argmax) and its value, the chosen logit, in one pass.
        chosen, ids = logits.max(dim=-1)
        out = ids.tolist()
    else:
        out = [_sample_row_isolated(logits[i], seq) for i, seq in enumerate(seqs)]
        chosen = logits.gather(1, torch.tensor(out, dtype=torch.long)[:, None])[:, 0]
    # log p(token) = logit - logsumexp(row): one reduction a row instead of a full-vocabulary
    # log_softmax (a [rows, vocab] float32 write, ~1-2 ms a step at batch 16 on 2 cores).
    lps = (chosen - torch.logsumexp(logits, dim=-1)).tolist()
    for i, seq in enumerate(seqs):
        if seq.params.logprobs and seq.params.top_logprobs and seq.error is None:
            row = torch.log_softmax(logits[i], dim=-1)
            lps[i] = float(row[out[i]])  # the same float as its entry among the alternatives
            seq.top_logprobs.append(top_logprobs(row, seq.params.top_logprobs))
    return out, lps


def _greedy(logits: torch.Tensor) -> tuple[list[int], list[float]] | None:
    """Plain greedy rows on the CPU without torch's reductions (argmax_lse.py): numpy's argmax (the first
    maximal index, as torch's max) and one compiled pass for the log-probabilities. None (take the torch path)
    off the CPU, for a non-contiguous input, or when a row's maximum is NaN or infinite."""
    if logits.device.type != "cpu":
        return None
    from .argmax_lse import greedy_logprobs

    x = logits.numpy()
    if x.ndim != 2 or x.shape[1] == 0 or not x.flags.c_contiguous:
        return None
    ids = x.argmax(axis=1)  # NaN wins numpy's argmax; +inf or an all -inf row: greedy_logprobs refuses them
    lps = np.empty(len(ids), np.float32)
    if not greedy_logprobs(x, ids, lps):
        return None
    return ids.tolist(), lps.tolist()


def top_logprobs(row: torch.Tensor, n: int) -> list[tuple[int, float]]:
    """The n most likely tokens of a log-probability row, ties by lowest id."""
    n = min(n, MAX_TOP_LOGPROBS, row.shape[0])
    values, ids = torch.sort(row, descending=True, stable=True)
    return list(zip(ids[:n].tolist(), values[:n].tolist()))


def _plain_greedy(seq: Sequence) -> bool:
    p = seq.params
    return p.greedy and _no_penalty(seq) and not p.logit_bias and seq.matcher is None


def _no_penalty(seq: Sequence) -> bool:
    p = seq.params
    return p.repetition_penalty == 1.0 and p.frequency_penalty == 0.0 and p.presence_penalty == 0.0


def _sample_row_isolated(row: torch.Tensor, seq: Sequence) -> int:
    try:
        tok = _sample_row(row, seq)
        if seq.matcher is not None:
            done = seq.matcher.done  # the grammar was complete: this token ends the sequence
            seq.matcher.consume(tok)
            if done:
                seq.finish_reason = "stop"
        return tok
    except Exception as e:  # noqa: BLE001 - whatever went wrong belongs to this sequence alone
        seq.error = f"sampling failed: {type(e).__name__}: {e}"
        seq.finish_reason = "error"
        return 0


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


def _apply_bias_and_mask(row: torch.Tensor, seq: Sequence) -> torch.Tensor:
    p = seq.params
    if p.logit_bias:
        row = row.clone()
        ids = torch.tensor(list(p.logit_bias), dtype=torch.long)
        row[ids] += torch.tensor(list(p.logit_bias.values()), dtype=row.dtype)
    if seq.matcher is not None:
        allowed = seq.matcher.allowed(row.shape[0])
        if not bool(allowed.any()):
            raise RuntimeError("the grammar allows no token here")
        row = row.masked_fill(~allowed, float("-inf"))
    return row


def _sample_row(row: torch.Tensor, seq: Sequence) -> int:
    p = seq.params
    row = _apply_penalties(_apply_bias_and_mask(row, seq), seq)
    if p.greedy:
        return int(torch.argmax(row))  # first maximal index: the lowest id among ties
    # Subtract the maximum before dividing: the largest entries become exactly 0, so however small
    # the temperature (1e-40 overflows a plain logits / T to inf and softmax to NaN), the scaled
    # row is finite or -inf and softmax is a distribution over the maximal entries at worst.
    # Float64, because a temperature below float32's range (5e-324) would round to 0 and give 0/0.
    row = (row.double() - row.max()) / p.temperature
    if 0 < p.top_k < row.shape[0]:
        # Exactly k tokens survive; among equal values at the cut the lowest ids do.
        keep = torch.sort(row, descending=True, stable=True).indices[: p.top_k]
        row = torch.full_like(row, float("-inf")).scatter(0, keep, row[keep])
    probs = torch.softmax(row, dim=-1)
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    if p.top_p < 1.0:
        # Stable descending sort: equal probabilities keep id order, so the cut keeps the lowest ids.
        sorted_p, order = torch.sort(probs, descending=True, stable=True)
        cum = torch.cumsum(sorted_p, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = cum - sorted_p >= p.top_p * cum[-1]
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=seq.generator))
