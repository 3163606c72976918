"""Sampling properties (hypothesis): any valid parameters give a token, the limits are greedy,
ties go to the lowest token id, and one row's failure stays in that row."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lamina_p2p.compute.sampling import sample, top_logprobs
from lamina_p2p.compute.sequence import SamplingParams, Sequence

VOCAB = 64

# Logits with many exact ties (few distinct values) and -inf entries, as masks and biases make them.
# (A model's row always has a finite entry.)
ROWS = st.lists(st.sampled_from([-math.inf, -3.0, -1.0, 0.0, 0.5, 2.0, 2.0, 7.25]), min_size=VOCAB,
                max_size=VOCAB).filter(lambda r: max(r) > -math.inf)
PARAMS = st.builds(
    SamplingParams,
    max_tokens=st.just(4),
    temperature=st.one_of(st.sampled_from([0.0, 5e-324, 1e-300, 1e-40, 2.0]), st.floats(0, 2)),
    top_k=st.integers(0, VOCAB + 5),
    top_p=st.one_of(st.sampled_from([1e-300, 1e-9, 1.0]), st.floats(1e-9, 1)),
    min_p=st.floats(0, 1),
    repetition_penalty=st.one_of(st.sampled_from([0.01, 10.0]), st.floats(0.01, 10)),
    frequency_penalty=st.floats(-2, 2),
    presence_penalty=st.floats(-2, 2),
    seed=st.one_of(st.none(), st.integers(0, 2**63 - 1)),
    logit_bias=st.one_of(st.none(), st.dictionaries(st.integers(0, VOCAB - 1), st.floats(-100, 100), max_size=6)),
    logprobs=st.booleans(),
    top_logprobs=st.integers(0, 20),
)


def seq(params, prompt=(5, 9, 5), output=()):
    s = Sequence(1, list(prompt), params)
    s.output = list(output)
    return s


def lowest_argmax(row: list[float]) -> int:
    return row.index(max(row))


@settings(max_examples=300, deadline=None)
@given(rows=st.lists(ROWS, min_size=1, max_size=4), params=st.lists(PARAMS, min_size=4, max_size=4))
def test_any_valid_parameters_give_a_finite_token(rows, params):
    seqs = [seq(p, output=[3, 3, 7]) for p in params[: len(rows)]]
    logits = torch.tensor(rows)
    tokens, lps = sample(logits, seqs)
    for s, row, tok, lp in zip(seqs, rows, tokens, lps):
        assert s.error is None
        assert 0 <= tok < VOCAB and not math.isnan(lp)
        assert row[tok] > -math.inf  # never a token the row excludes
        if s.params.logprobs and s.params.top_logprobs:
            assert len(s.top_logprobs[-1]) == min(s.params.top_logprobs, VOCAB)


@settings(max_examples=300, deadline=None)
@given(row=ROWS, t=st.sampled_from([0.0, 5e-324, 1e-300, 1e-40]),
       p=st.sampled_from([1e-300, 1e-9]), k=st.integers(1, 1))
def test_limits_are_greedy_and_ties_go_to_the_lowest_id(row, t, p, k):
    want = lowest_argmax(row)
    logits = torch.tensor([row])
    assert sample(logits, [seq(SamplingParams(temperature=0.0))])[0] == [want]
    assert sample(logits, [seq(SamplingParams(temperature=1.0, top_p=p))])[0] == [want]
    assert sample(logits, [seq(SamplingParams(temperature=1.0, top_k=k))])[0] == [want]
    # temperature -> 0 keeps the maximal entries only (a tie among them stays a draw between them)
    got = sample(logits, [seq(SamplingParams(temperature=t or 1e-45, seed=3))])[0][0]
    assert row[got] == max(row)
    if row.count(max(row)) == 1:
        assert got == want
    # the same with a greedy row in the same batch: batch-mates change nothing
    assert sample(torch.tensor([row, row]), [seq(SamplingParams()), seq(SamplingParams(temperature=1.0, top_p=p))]
                  )[0] == [want, want]


def test_top_k_cut_among_ties_keeps_the_lowest_ids():
    row = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, -2.0])
    seen = set()
    for s in range(200):
        seen |= set(sample(row[None], [seq(SamplingParams(temperature=1.0, top_k=2, seed=s))])[0])
    assert seen == {1, 2}
    assert [i for i, _ in top_logprobs(torch.log_softmax(row, 0), 3)] == [1, 2, 3]


def test_one_rows_failure_stays_in_that_row():
    ok = SamplingParams(temperature=0.7, seed=1)
    # A bias outside the row (validation is the server's job; here it stands for any row-local fault).
    broken = SamplingParams(temperature=0.7, logit_bias={VOCAB + 10: 1.0})
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(0))
    seqs = [seq(ok), seq(broken), seq(SamplingParams(temperature=0.0))]
    tokens, lps = sample(logits, seqs)
    assert seqs[1].error and "IndexError" in seqs[1].error and seqs[1].finish_reason == "error"
    assert seqs[0].error is None and seqs[2].error is None
    assert tokens[2] == int(torch.argmax(logits[2]))
    assert tokens[0] == sample(logits[:1], [seq(ok)])[0][0]  # the same draw as without the broken row
