"""`serve --attention-peers 2`: the same API with attention in two peer processes over ZeroMQ."""

from __future__ import annotations

import asyncio
import random

import openai
import pytest
from helpers import GREEDY, aclient, client, metrics
from waiting import wait_until

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_cluster_serving_matches_in_process(tiny, launch_peer):
    rng = random.Random(11)
    jobs = [([rng.randrange(3, 512) for _ in range(rng.randrange(3, 30))], rng.randrange(4, 20)) for _ in range(8)]
    local = launch_peer(["serve", "--model", str(tiny), "--http", "127.0.0.1:0", "--kv-memory", "16MiB"])
    alone = [client(local.address).completions.create(model="tiny", prompt=p, max_tokens=n, **GREEDY)
             .choices[0].text for p, n in jobs]
    local.stop()  # before the cluster starts: the two would only compete for the cores

    cluster = launch_peer(["serve", "--model", str(tiny), "--http", "127.0.0.1:0", "--attention-peers", "2",
                           "--kv-memory", "16MiB"])
    url = cluster.address

    async def together():
        ac = aclient(url)

        async def one(p, n):
            text = ""
            async for ch in await ac.completions.create(model="tiny", prompt=p, max_tokens=n, stream=True,
                                                        **GREEDY):
                text += ch.choices[0].text
            return text

        try:
            return await asyncio.gather(*(one(p, n) for p, n in jobs))
        finally:
            await ac.close()

    assert asyncio.run(together()) == alone
    m = metrics(url)
    peers = [dict(labels)["peer"] for name, labels in m if name == "lamina_kv_free_bytes"]
    assert len(peers) == 2
    assert m[("lamina_wire_sent_bytes_total", frozenset())] > 0
    assert m[("lamina_wire_received_bytes_total", frozenset())] > 0
    # KV usage comes from gossip: it reaches zero within a few heartbeats.
    wait_until(lambda: all(v == 0 for (name, _), v in metrics(url).items() if name == "lamina_kv_used_bytes"),
               what="KV freed on both attention peers")
    with pytest.raises(openai.NotFoundError):
        client(url).completions.create(model="other", prompt="x")
