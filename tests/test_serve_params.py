"""Issue 14's kinds against a real `serve` process, in process and on a 2-peer cluster.

Each test is a kind, not one input: one request's sampling never fails another, a stop string
completed by the last allowed token is "stop", logprobs carry the alternatives and the tokens'
own bytes, every accepted parameter is honoured (logit_bias, response_format) or refused with a
400 naming it, malformed requests get 4xx in OpenAI's shape, streamed chunks carry "usage": null.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lamina_p2p.launch import start_peer
from tests.test_serve import aclient, client

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

PROMPT = [0, 75, 301, 42, 260, 17]  # token ids: no tokenizer ambiguity
MODEL = "tiny"
GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})
SPECIAL = ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>")
NO_SPECIAL = {str(i): -100 for i in range(5)}  # the tiny tokenizer's special tokens are ids 0..4
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["n"], "additionalProperties": False}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from lamina_p2p.model.presets import write_preset

    return write_preset("tiny", tmp_path_factory.mktemp("m") / "tiny")


# The cluster path differs where it matters here: attention in two peer processes over ZeroMQ,
# sequences split across them, two micro-batches sampled together from one LM head.
CLUSTER = ["--attention-peers", "2", "--placement", "sequence", "--shard-tokens", "32", "--micro-batches", "2"]


@pytest.fixture(scope="module", params=["inprocess", "cluster"])
def url(request, model_dir):
    extra = CLUSTER if request.param == "cluster" else []
    peer = start_peer(["serve", "--model", str(model_dir), "--http", "127.0.0.1:0", "--kv-memory", "32MiB", *extra])
    yield peer.address
    peer.stop()


def post(url, path, body, content_type="application/json", raw: bytes | None = None):
    """(status, parsed JSON body) of a POST, whatever the status."""
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(f"{url}{path}", data=data, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def sse(url, path, body) -> list[dict]:
    """The JSON events of a streamed response, in order ([DONE] left out)."""
    req = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(req, timeout=120) as r:
        for line in r:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    return events


def assert_openai_error(status, body, expect_status=None, param=None):
    assert 400 <= status < 500 if expect_status is None else status == expect_status, (status, body)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body


def greedy_tokens(url, prompt, n, **kw):
    r = client(url).completions.create(model=MODEL, prompt=prompt, max_tokens=n, logprobs=0, **GREEDY, **kw)
    return r.choices[0].text, r.choices[0].logprobs.tokens


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


# -- 4: parameters honoured or refused -----------------------------------------------------------

def test_logit_bias_is_applied_and_validated(url):
    from lamina_p2p.model.preset_tokenizer import build_tokenizer

    c = client(url)
    first = greedy_tokens(url, PROMPT, 1, logit_bias=NO_SPECIAL)[1][0]
    ban = {str(token_id(first)): -100, **NO_SPECIAL}
    assert greedy_tokens(url, PROMPT, 1, logit_bias=ban)[1][0] != first
    forced = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, logit_bias={"300": 100}, **GREEDY)
    assert forced.choices[0].text == build_tokenizer(512).decode([300] * 4)
    for lb in ({"512": 1}, {"-1": 1}, {"x": 1}, {"5": 101}, {"5": "high"}, ["5"]):
        status, body = post(url, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "logit_bias": lb})
        assert_openai_error(status, body, 400, "logit_bias")


def test_response_format_json_schema_and_json_object(url):
    c = client(url)
    msgs = [{"role": "user", "content": "A digit, as JSON."}]
    rf = {"type": "json_schema", "json_schema": {"name": "digit", "schema": SCHEMA, "strict": True}}
    r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=40, response_format=rf, temperature=0.8,
                                  seed=1)
    assert r.choices[0].finish_reason == "stop"
    value = json.loads(r.choices[0].message.content)
    assert set(value) == {"n"} and isinstance(value["n"], int) and 0 <= value["n"] <= 9
    streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=40, response_format=rf, temperature=0.8, seed=1, stream=True))
    assert streamed == r.choices[0].message.content
    # Any JSON object; logit_bias on '}' makes it short, and shows the two compose.
    closing = build_id("}")
    obj = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=40, temperature=0,
                                    response_format={"type": "json_object"}, logit_bias={str(closing): 100})
    assert json.loads(obj.choices[0].message.content) == {} and obj.choices[0].finish_reason == "stop"
    plain = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=3, response_format={"type": "text"},
                                      **GREEDY)
    assert plain.choices[0].finish_reason == "length"
    for rf_bad in ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}},
                   {"type": "xml"}, {"type": "json_schema"}, "json"):
        status, body = post(url, "/v1/chat/completions", {"model": MODEL, "messages": msgs, "response_format": rf_bad})
        assert_openai_error(status, body, 400, "response_format")


def token_id(label: str) -> int:
    """The tiny tokenizer's id of a token as the server labels it in logprobs (text, or "bytes:\\xNN")."""
    from lamina_p2p.compute.constrain import TokenSpace
    from lamina_p2p.model.preset_tokenizer import build_tokenizer

    tok = build_tokenizer(512)
    space = TokenSpace(tok.to_str(), 512, [1, 2])
    for i in range(512):
        raw = space.token_bytes(i)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        if text == label:
            return i
    raise AssertionError(f"no token {label!r}")


def build_id(text: str) -> int:
    from lamina_p2p.model.preset_tokenizer import build_tokenizer

    ids = build_tokenizer(512).encode(text, add_special_tokens=False).ids
    assert len(ids) == 1
    return ids[0]


@pytest.mark.parametrize("extra,param", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tool_choice"),  # auto
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),  # without tools
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}], "tool_choice": "required"}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required",
      "response_format": {"type": "json_object"}}, "response_format"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"reasoning_effort": "high"}, "reasoning_effort"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
])
def test_parameters_not_honoured_are_refused_by_name(url, extra, param):
    status, body = post(url, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                      "max_tokens": 2, **extra})
    assert_openai_error(status, body, 400, param)
    with pytest.raises(openai.BadRequestError):
        client(url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                            extra_body=extra)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"], "additionalProperties": False}}}


def test_forced_tool_calls_are_returned_as_tool_calls(url):
    c = client(url)
    msgs = [{"role": "user", "content": "Weather in Paris for 3 days?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=60, tools=[WEATHER, TIME],
                                  tool_choice=named, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    assert args["city"] in ("Paris", "Oslo") and 1 <= args["days"] <= 7 and set(args) == {"city", "days"}
    # streamed: the same call, sent whole at the end
    chunks = list(c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=60, tools=[WEATHER, TIME],
                                            tool_choice=named, temperature=0, stream=True))
    calls = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    assert [(tc.function.name, json.loads(tc.function.arguments)) for tc in calls] == [("get_weather", args)]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # "required": one or more calls of the listed functions (one only without parallel calls)
    for seed in range(3):
        r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=120, tools=[WEATHER, TIME],
                                      tool_choice="required", parallel_tool_calls=False, temperature=1.0, seed=seed)
        assert r.choices[0].finish_reason == "tool_calls"  # enums and a bounded integer: always short
        (call,) = r.choices[0].message.tool_calls
        assert call.function.name in ("get_weather", "get_time")
        assert set(json.loads(call.function.arguments)) == ({"city", "days"} if call.function.name == "get_weather"
                                                             else {"zone"})
    # "none": text, the tools only shown to the template
    r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=3, tools=[WEATHER], tool_choice="none",
                                  **GREEDY)
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.tool_calls is None


def test_completions_refuse_what_they_cannot_do(url):
    for extra, param in (({"suffix": "end"}, "suffix"), ({"best_of": 3}, "best_of"), ({"echo": True}, "echo"),
                         ({"response_format": {"type": "json_object"}}, "response_format")):
        status, body = post(url, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 2, **extra})
        assert_openai_error(status, body, 400, param)


# -- 6: malformed requests get 4xx in OpenAI's shape -----------------------------------------------

def test_bad_charset_and_bytes_get_openai_errors(url):
    good = json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 1}).encode()
    assert_openai_error(*post(url, "/v1/completions", None, "application/json; charset=bogus-8", raw=good), 415)
    assert_openai_error(*post(url, "/v1/completions", None, "application/json; charset=base64", raw=good), 415)
    assert_openai_error(*post(url, "/v1/completions", None, raw=b'{"model": "tiny", "prompt": "\xff\xfe"}'), 400)
    assert_openai_error(*post(url, "/v1/completions", None, raw=b"[" * 100000), 400)
    assert post(url, "/v1/completions", None, "application/json; charset=latin-1", raw=good)[0] == 200


JSON = st.recursive(st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
                    | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
KEYS = sorted({"model", "prompt", "messages", "temperature", "top_p", "n", "stream", "stream_options", "stop",
               "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "seed", "user",
               "top_k", "min_p", "repetition_penalty", "stop_token_ids", "ignore_eos", "echo", "response_format",
               "tools", "tool_choice", "metadata", "best_of", "suffix"})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
       changes=st.dictionaries(st.sampled_from(KEYS), JSON, min_size=1, max_size=3))
def test_wrong_types_anywhere_get_4xx_in_openai_shape(url, path, changes):
    body = {"model": MODEL, "prompt": PROMPT, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    body.pop("messages" if path == "/v1/completions" else "prompt")
    body.update(changes)
    body["max_tokens"] = 2  # a valid body must finish quickly
    data = json.dumps(body).encode()  # infinities become Infinity, which is not JSON: a 400 too
    if body.get("stream") is True:
        req = urllib.request.Request(f"{url}{path}", data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                assert r.status == 200 and r.read().endswith(b"data: [DONE]\n\n")
            return
        except urllib.error.HTTPError as e:
            status, reply = e.code, json.load(e)
    else:
        status, reply = post(url, path, None, raw=data)
    if status != 200:
        assert_openai_error(status, reply)


TOOL = st.fixed_dictionaries({"type": st.sampled_from(["function", "tool", 1]), "function": st.one_of(
    JSON, st.fixed_dictionaries({"name": st.one_of(st.sampled_from(["f", "g", "bad name"]), JSON)},
                                optional={"parameters": JSON, "description": JSON}))})
TOOL_CHOICE = st.one_of(st.sampled_from(["none", "auto", "required", None]), JSON, st.fixed_dictionaries(
    {"type": st.sampled_from(["function", "x"]), "function": st.fixed_dictionaries({"name": st.one_of(
        st.sampled_from(["f", "g"]), JSON)})}))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tools=st.one_of(JSON, st.lists(TOOL, max_size=3)), choice=TOOL_CHOICE, parallel=st.one_of(st.none(), JSON))
def test_malformed_tools_get_4xx_in_openai_shape(url, tools, choice, parallel):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 8, "tools": tools,
            "tool_choice": choice, "parallel_tool_calls": parallel}
    status, reply = post(url, "/v1/chat/completions", body)
    if status != 200:
        assert_openai_error(status, reply)


# -- 7 and 9 ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_streamed_chunks_carry_usage_null_until_the_usage_chunk(url, path):
    body = {"model": MODEL, "max_tokens": 4, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    body.update({"prompt": PROMPT} if "chat" not in path else {"messages": [{"role": "user", "content": "Hi"}]})
    events = sse(url, path, body)
    assert len(events) >= 5
    assert all("usage" in e and e["usage"] is None for e in events[:-1])
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 4
    body.pop("stream_options")
    assert all("usage" not in e for e in sse(url, path, body))  # not asked for: absent, as OpenAI does


def test_max_tokens_error_names_its_bound(url):
    for value in (0, -3):
        status, body = post(url, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": value})
        assert_openai_error(status, body, 400, "max_tokens")
        assert "at least 1" in body["error"]["message"] and "None" not in body["error"]["message"]
