"""`lamina-node serve` as a real process, called with the official openai client."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import urllib.error
import urllib.request

import openai
import pytest
from helpers import BYTES_PER_TOKEN, GREEDY, aclient, client, metric, metrics
from waiting import wait_until

SMALL_KV = 3 * 64 * BYTES_PER_TOKEN  # three 64-token sequences


@pytest.fixture(scope="module")
def server(tiny, serve_url):
    return serve_url(tiny, "--kv-memory", "64MiB")


@pytest.fixture(scope="module")
def small_server(tiny, serve_url, tmp_path_factory):
    """Little KV, no chat template, an API key."""
    bare = tmp_path_factory.mktemp("b") / "bare"
    shutil.copytree(tiny, bare)
    cfg = json.loads((bare / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    return serve_url(bare, "--kv-memory", str(SMALL_KV), "--api-key", "sesame")


def test_models_and_health(server):
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    with urllib.request.urlopen(f"{server}/health", timeout=10) as r:
        assert r.status == 200 and json.load(r)["attention_peers"] == 1


def test_completion_streamed_equals_unstreamed(server):
    c = client(server)
    full = c.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=12, logprobs=1, **GREEDY)
    choice = full.choices[0]
    assert choice.finish_reason == "length"
    assert full.usage.completion_tokens == 12 and full.usage.prompt_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + 12
    assert len(choice.logprobs.token_logprobs) == 12 and all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    chunks = list(c.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=12, stream=True,
                                       stream_options={"include_usage": True}, **GREEDY))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == choice.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12


def test_chat_streamed_and_not(server):
    c = client(server)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"}]
    full = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, **GREEDY)
    assert full.choices[0].message.role == "assistant"
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 10
    parts = []
    for ch in c.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, stream=True, **GREEDY):
        parts += [ch.choices[0].delta.content or ""] if ch.choices else []
    assert "".join(parts) == full.choices[0].message.content


def test_stop_string_cuts_output(server):
    c = client(server)
    ref = c.completions.create(model="tiny", prompt="Once upon", max_tokens=20, **GREEDY).choices[0].text
    stop = ref[5:8]
    assert stop and ref.find(stop) >= 0
    got = c.completions.create(model="tiny", prompt="Once upon", max_tokens=20, stop=[stop], **GREEDY).choices[0]
    assert got.finish_reason == "stop" and got.text == ref[: ref.find(stop)]
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="tiny", prompt="Once upon", max_tokens=20, stop=stop, stream=True, **GREEDY))
    assert streamed == got.text


def test_seeded_sampling_repeats(server):
    c = client(server)
    kw = dict(model="tiny", prompt="Seeds", max_tokens=10, temperature=0.9, top_p=0.9, seed=7)
    assert c.completions.create(**kw).choices[0].text == c.completions.create(**kw).choices[0].text


def test_32_concurrent_streams_each_match_their_single_request_output(server):
    rng = random.Random(3)
    words = "alpha beta gamma delta lamina peer attention cache token stream".split()
    jobs = [(" ".join(rng.choice(words) for _ in range(rng.randrange(1, 30))), rng.randrange(4, 40))
            for _ in range(32)]
    c = client(server)
    alone = [c.completions.create(model="tiny", prompt=p, max_tokens=n, **GREEDY).choices[0].text for p, n in jobs]

    async def together():
        ac = aclient(server)

        async def one(p, n):
            text, finish = "", None
            async for ch in await ac.completions.create(model="tiny", prompt=p, max_tokens=n, stream=True, **GREEDY):
                text += ch.choices[0].text
                finish = ch.choices[0].finish_reason or finish
            return text, finish

        try:
            return await asyncio.gather(*(one(p, n) for p, n in jobs))
        finally:
            await ac.close()

    results = asyncio.run(together())
    assert [f for _, f in results] == ["length"] * 32
    assert [t for t, _ in results] == alone
    assert metric(server, "lamina_kv_used_bytes", peer="local") == 0


def test_cancelled_stream_frees_its_kv(server):
    c = client(server)
    stream = c.completions.create(model="tiny", prompt="A very long story", max_tokens=3000, stream=True, **GREEDY)
    it = iter(stream)
    for _ in range(3):
        next(it)
    assert metric(server, "lamina_kv_used_bytes", peer="local") > 0
    assert metric(server, "lamina_requests_running") == 1
    stream.close()  # the client goes away mid-stream
    wait_until(lambda: metric(server, "lamina_kv_used_bytes", peer="local") == 0, what="KV freed")
    wait_until(lambda: metric(server, "lamina_requests_finished_total", reason="abort") == 1, what="abort counted")
    assert metric(server, "lamina_requests_running") == 0


@pytest.mark.parametrize("kwargs,status,param", [
    (dict(model="nope", prompt="x"), 404, "model"),
    (dict(model="tiny", prompt="x", max_tokens="ten"), 400, "max_tokens"),
    (dict(model="tiny", prompt="x", temperature="hot"), 400, "temperature"),
    (dict(model="tiny", prompt={"not": "a prompt"}), 400, "prompt"),
    (dict(model="tiny", prompt="x", max_tokens=5000), 400, "max_tokens"),  # more than the context
    (dict(model="tiny", prompt=[7] * 4100, max_tokens=1), 400, "max_tokens"),  # prompt longer than the context
    (dict(model="tiny", prompt="x", top_p=3), 400, "top_p"),
])
def test_bad_requests_get_openai_errors(server, kwargs, status, param):
    with pytest.raises(openai.APIStatusError) as info:
        client(server).completions.create(**kwargs)
    e = info.value
    assert e.status_code == status
    assert set(e.body) >= {"message", "type", "param", "code"} and e.body["param"] == param
    assert e.body["type"] == "invalid_request_error" and e.body["message"]


def test_malformed_json_and_unknown_route(server):
    req = urllib.request.Request(f"{server}/v1/completions", data=b"{nope", method="POST",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=10)
    assert info.value.code == 400 and "error" in json.load(info.value)
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{server}/v1/nothing", timeout=10)
    assert info.value.code == 404 and "error" in json.load(info.value)


def test_api_key_and_missing_chat_template(small_server):
    with pytest.raises(openai.AuthenticationError):
        client(small_server, key="wrong").models.list()
    c = client(small_server, key="sesame")
    with pytest.raises(openai.BadRequestError) as info:
        c.chat.completions.create(model="bare", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert info.value.body["code"] == "no_chat_template" and "chat template" in info.value.body["message"]


def test_demand_several_times_kv_capacity_all_complete_within_budget(small_server):
    rng = random.Random(5)
    jobs = [([rng.randrange(3, 512) for _ in range(rng.randrange(8, 40))], rng.randrange(8, 24)) for _ in range(24)]
    demand = sum(len(p) + n for p, n in jobs) * BYTES_PER_TOKEN
    assert demand > 3 * SMALL_KV

    async def run():
        ac = aclient(small_server, key="sesame")

        async def one(p, n):
            tokens, finish = 0, None
            stream = await ac.completions.create(model="bare", prompt=p, max_tokens=n, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY)
            async for ch in stream:
                if ch.usage:
                    tokens = ch.usage.completion_tokens
                if ch.choices:
                    finish = ch.choices[0].finish_reason or finish
            return tokens, finish

        try:
            return await asyncio.gather(*(one(p, n) for p, n in jobs))
        finally:
            await ac.close()

    results = asyncio.run(run())
    assert results == [(n, "length") for _, n in jobs]  # every request, every token
    m = metrics(small_server)
    assert 0 < m[("lamina_kv_used_peak_bytes", frozenset({("peer", "local")}))] <= SMALL_KV
    assert m[("lamina_kv_used_bytes", frozenset({("peer", "local")}))] == 0
    assert m[("lamina_requests_waiting_peak", frozenset())] > 0  # they really queued
