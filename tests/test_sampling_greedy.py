"""Plain greedy sampling's fast path (sampling._greedy, argmax_lse.py) against torch's reductions."""

from __future__ import annotations

import math

import numpy as np
import torch

from lamina_p2p.compute import sampling
from lamina_p2p.compute.sampling import sample
from lamina_p2p.compute.sequence import SamplingParams, Sequence


def _seqs(n: int, **params) -> list[Sequence]:
    return [Sequence(i, [1], SamplingParams(**params)) for i in range(n)]


def _torch_greedy(logits: torch.Tensor):
    chosen, ids = logits.max(dim=-1)
    return ids.tolist(), (chosen.double() - torch.logsumexp(logits.double(), dim=-1)).tolist()


def test_tokens_equal_and_logprobs_within_float32_rounding_of_float64():
    g = torch.Generator().manual_seed(0)
    for rows, vocab, scale in ((1, 49152, 5.0), (16, 1000, 30.0), (3, 17, 1.0), (2, 1, 1.0)):
        logits = torch.randn(rows, vocab, generator=g) * scale
        want_ids, want_lps = _torch_greedy(logits)
        got = sampling._greedy(logits)
        assert got is not None
        assert got[0] == want_ids
        assert all(abs(a - b) <= 1e-5 * max(1.0, abs(b)) for a, b in zip(got[1], want_lps))
        assert sample(logits, _seqs(rows)) == got  # sample takes this path for plain greedy rows


def test_ties_go_to_the_lowest_id_and_masked_tokens_count_for_nothing():
    logits = torch.tensor([[0.0, 3.0, -math.inf, 3.0, 1.0], [-math.inf, -math.inf, 2.0, -math.inf, -math.inf]])
    ids, lps = sampling._greedy(logits)
    assert ids == [1, 2]
    assert abs(lps[0] - (3.0 - math.log(1 + 2 * math.exp(3.0) + math.e))) < 1e-5 and abs(lps[1]) < 1e-6


def test_nan_inf_and_odd_layouts_take_torch_s_path():
    for bad in (math.nan, math.inf):
        logits = torch.zeros(2, 8)
        logits[1, 5] = bad
        assert sampling._greedy(logits) is None
        tokens, _ = sample(logits, _seqs(2))
        assert tokens == logits.max(dim=-1).indices.tolist()
    assert sampling._greedy(torch.full((1, 4), -math.inf)) is None
    strided = torch.randn(8, 6)[:, ::2]
    assert sampling._greedy(strided) is None
    assert sample(strided, _seqs(8))[0] == strided.argmax(dim=-1).tolist()


def test_rows_asking_for_alternatives_keep_torch_s_log_softmax():
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(1))
    seqs = _seqs(2, logprobs=True, top_logprobs=3)
    tokens, lps = sample(logits, seqs)
    row = torch.log_softmax(logits[0], dim=-1)
    assert tokens[0] == int(row.argmax()) and lps[0] == float(row[tokens[0]])
    assert np.isclose(seqs[0].top_logprobs[-1][0][1], lps[0])
