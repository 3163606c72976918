"""Requests against a real `serve` process, in process and on a 2-peer cluster: every accepted
parameter is honoured (logit_bias, response_format, forced tool calls) or refused with a 400
naming it, malformed requests get a 4xx in OpenAI's error shape, streamed chunks carry
"usage": null until the usage chunk, and bounds are worded right."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest
from helpers import (GREEDY, MODEL, NO_SPECIAL, PROMPT, SCHEMA, SERVE_MODES, PeerGroup, assert_openai_error,
                     client, greedy_tokens, post, sse)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module", params=list(SERVE_MODES))
def url(request, tiny):
    with PeerGroup() as group:  # its own group: one server at a time, stopped before the next mode's starts
        yield group.serve(tiny, "--kv-memory", "32MiB", *SERVE_MODES[request.param])


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
