"""Sampling parameters against a real `serve` process, in process and on a 2-peer cluster.

Each test is a kind, not one input: any valid parameter set completes and one request's sampling
never fails another (temperature -> 0 is greedy), a stop string completed by the last allowed
token is "stop", logprobs carry the alternatives and the tokens' own bytes. The request-level
kinds (parameters honoured or refused, malformed requests, streamed usage) are in
test_serve_requests.py, against the same two kinds of server (helpers.SERVE_MODES).
"""

from __future__ import annotations

import asyncio
import json

import pytest
from helpers import (GREEDY, MODEL, NO_SPECIAL, PROMPT, SCHEMA, SERVE_MODES, PeerGroup, aclient,
                     assert_openai_error, client, greedy_tokens, post)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SPECIAL = ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>")


@pytest.fixture(scope="module", params=list(SERVE_MODES))
def url(request, tiny):
    with PeerGroup() as group:  # its own group: one server at a time, stopped before the next mode's starts
        yield group.serve(tiny, "--kv-memory", "32MiB", *SERVE_MODES[request.param])


# -- 1: edge parameters; one request's failure is its own ----------------------------------------

def test_temperature_near_zero_is_greedy_and_leaves_a_concurrent_stream_alone(url):
    ref = client(url).completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, **GREEDY).choices[0].text

    async def run():
        ac = aclient(url)

        async def stream():
            text, finish = "", None
            async for ch in await ac.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, stream=True,
                                                        **GREEDY):
                text += ch.choices[0].text
                finish = ch.choices[0].finish_reason or finish
            return text, finish

        async def edge(t):
            r = await ac.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=t,
                                            extra_body={"ignore_eos": True})
            return r.choices[0].text, r.choices[0].finish_reason

        try:
            return await asyncio.gather(stream(), edge(1e-40), edge(5e-324), edge(1e-300))
        finally:
            await ac.close()

    results = asyncio.run(run())
    assert results == [(ref, "length")] * 4


SAMPLING = st.fixed_dictionaries({}, optional={
    "temperature": st.one_of(st.sampled_from([0, 5e-324, 1e-40, 1e-6, 2]), st.floats(0, 2)),
    "top_p": st.one_of(st.sampled_from([0, 1e-300, 1]), st.floats(0, 1)),
    "top_k": st.integers(-1, 600),
    "min_p": st.one_of(st.sampled_from([0, 1]), st.floats(0, 1)),
    "repetition_penalty": st.one_of(st.sampled_from([0.01, 10]), st.floats(0.01, 10)),
    "frequency_penalty": st.floats(-2, 2),
    "presence_penalty": st.floats(-2, 2),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "logit_bias": st.dictionaries(st.integers(0, 511).map(str), st.floats(-100, 100), max_size=8),
    "logprobs": st.integers(0, 20),
    "stop": st.lists(st.text(min_size=1, max_size=3), max_size=4),
    "ignore_eos": st.booleans(),
})


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(params=SAMPLING, max_tokens=st.integers(1, 6))
def test_any_valid_parameter_set_completes(url, params, max_tokens):
    status, body = post(url, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens,
                                                  **params})
    assert status == 200, body
    choice = body["choices"][0]
    assert choice["finish_reason"] in ("length", "stop")
    assert body["usage"]["completion_tokens"] <= max_tokens


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(params=SAMPLING.map(lambda p: {k: v for k, v in p.items() if k != "logprobs"}), max_tokens=st.integers(1, 6),
       top=st.one_of(st.none(), st.integers(0, 20)),
       rf=st.sampled_from([None, {"type": "text"}, {"type": "json_object"},
                           {"type": "json_schema", "json_schema": {"name": "d", "schema": SCHEMA}}]))
def test_any_valid_chat_parameter_set_completes(url, params, max_tokens, top, rf):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": max_tokens, **params}
    if top is not None:
        body.update(logprobs=True, top_logprobs=top)
    if rf is not None:
        body["response_format"] = rf
    status, reply = post(url, "/v1/chat/completions", body)
    assert status == 200, reply
    choice = reply["choices"][0]
    assert choice["finish_reason"] in ("length", "stop")
    if top is not None:
        assert all(len(e["top_logprobs"]) == top for e in choice["logprobs"]["content"])
    if rf is not None and rf["type"] != "text" and choice["finish_reason"] == "stop" and not params.get("stop"):
        json.loads(choice["message"]["content"])  # a finished structured answer is JSON


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(limit=st.sampled_from(["temperature", "top_p"]), value=st.sampled_from([0.0, 5e-324, 1e-300, 1e-40, 1e-12]),
       start=st.integers(3, 500))
def test_temperature_or_top_p_to_zero_returns_the_greedy_tokens(url, limit, value, start):
    prompt = [0, start, (start * 7) % 509 + 3]
    ref = greedy_tokens(url, prompt, 8)
    kw = {"temperature": value} if limit == "temperature" else {"temperature": 1.0, "top_p": value}
    r = client(url).completions.create(model=MODEL, prompt=prompt, max_tokens=8, logprobs=0,
                                       extra_body={"ignore_eos": True}, **kw)
    assert (r.choices[0].text, r.choices[0].logprobs.tokens) == ref


# -- 2: a stop string completed by the last allowed token ------------------------------------------

def test_stop_string_completed_by_the_last_token_is_stop(url):
    text, tokens = greedy_tokens(url, PROMPT, 5, logit_bias=NO_SPECIAL)
    assert len(tokens) == 5 and text
    # The shortest tail of the text that occurs nowhere earlier: it ends in the last token.
    k = next(k for k in range(1, len(text) + 1) if text.find(text[-k:]) == len(text) - k)
    stop = text[-k:]
    c = client(url)
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=5, stop=[stop], logit_bias=NO_SPECIAL, **GREEDY)
    got = c.completions.create(**kw).choices[0]
    assert (got.text, got.finish_reason) == (text[:-k], "stop")
    chunks = list(c.completions.create(stream=True, **kw))
    assert "".join(ch.choices[0].text for ch in chunks) == text[:-k]
    assert [ch.choices[0].finish_reason for ch in chunks][-1] == "stop"


# -- 3: logprobs ---------------------------------------------------------------------------------

def test_completion_logprobs_return_the_alternatives(url):
    r = client(url).completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, logprobs=3, **GREEDY).choices[0]
    lp = r.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    for tok, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 3 <= len(top) <= 4  # the 3 likeliest, plus the chosen one when it is not among them
        assert top[tok] == chosen == max(top.values())  # greedy: the chosen one is the likeliest
    status, body = post(url, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "logprobs": 21})
    assert_openai_error(status, body, 400, "logprobs")


def test_chat_top_logprobs_and_the_tokens_own_bytes(url):
    c = client(url)
    msgs = [{"role": "user", "content": "Hi"}]
    r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=5, logprobs=True, top_logprobs=4,
                                  temperature=0)
    content = r.choices[0].logprobs.content
    assert 1 <= len(content) <= 5
    for entry in content:
        assert len(entry.top_logprobs) == 4
        values = [a.logprob for a in entry.top_logprobs]
        assert values == sorted(values, reverse=True) and entry.logprob == values[0]
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].bytes == entry.bytes
    text = b"".join(bytes(e.bytes) for e in content if e.token not in SPECIAL).decode("utf-8", "replace")
    assert text == r.choices[0].message.content
    # A token holding the first byte of "é" (0xC3 0xA9), forced: its bytes are [0xC3], not U+FFFD's.
    forced = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=1, logprobs=True,
                                       logit_bias={str(half_character_token(url)): 100}, **GREEDY)
    assert forced.choices[0].logprobs.content[0].bytes == [0xC3]
    assert forced.choices[0].logprobs.content[0].token == "bytes:\\xc3"  # OpenAI's spelling of a partial token
    assert forced.choices[0].message.content == "\ufffd"  # what a full decode of that one byte shows
    for bad_body, param in (({"top_logprobs": 2}, "top_logprobs"),
                            ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                            ({"logprobs": 3}, "logprobs")):
        status, body = post(url, "/v1/chat/completions", {"model": MODEL, "messages": msgs, **bad_body})
        assert_openai_error(status, body, 400, param)


def half_character_token(url) -> int:
    """The tiny tokenizer's id of the lone byte 0xC3 (byte-level BPE writes it as 'Ã')."""
    from tokenizers import Tokenizer

    from lamina_p2p.model.preset_tokenizer import build_tokenizer

    del url
    tok: Tokenizer = build_tokenizer(512)
    return tok.token_to_id("Ã")
