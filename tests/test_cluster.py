"""Real multi-process clusters on loopback: attention peers are separate processes, the wire is real.

Greedy tokens through the cluster equal transformers' and the in-process
engine's, for every placement, micro-batch count 1-3, batch 1 and 8.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from helpers import free_port
from hf_models import build_hf_model, load_hf_model

from lamina_p2p.offline import GenerateOptions, run_generate
from lamina_p2p.launch import node_command

pytestmark = pytest.mark.cluster

PROMPTS = [[1, 5, 9, 22, 7], [3, 4, 8, 10, 11, 12, 13, 14, 2, 2, 2, 40, 41], [17, 200], [9] * 20,
           [30, 31, 32], [100, 101, 102, 103, 104, 105, 106], [4, 4], [250, 1, 250, 1, 250, 1, 250, 1, 9]]
STEPS = 12


@pytest.fixture(scope="module")
def model_dir():
    return str(build_hf_model("llama"))


@pytest.fixture(scope="module")
def reference(model_dir):
    hf = load_hf_model(model_dir)
    out = []
    with torch.no_grad():
        for p in PROMPTS:
            seq = hf.generate(torch.tensor([p]), max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
            out.append(seq[0, len(p):].tolist())
    return out


@pytest.fixture(scope="module")
def peers(module_peer_group):
    return module_peer_group.attention(2, "--heartbeat", "0.1", "--dead-after", "2", kv_memory="64MiB", threads=1)


def generate(model_dir, batch, **kw):
    opts = GenerateOptions(model_dir=model_dir, prompt_ids=PROMPTS[:batch], batch=batch, max_tokens=STEPS,
                           ignore_eos=True, **kw)
    return run_generate(opts)


def test_in_process_matches_transformers(model_dir, reference):
    assert generate(model_dir, 8)["token_ids"] == reference


@pytest.mark.parametrize("placement", ["request", "head", "sequence"])
@pytest.mark.parametrize("micro_batches", [1, 2, 3])
def test_cluster_matches_transformers(model_dir, reference, peers, placement, micro_batches):
    shard = 6 if placement == "sequence" else None  # several shards per sequence, across both peers
    for batch in (1, 8):
        result = generate(model_dir, batch, join=[peers[0].address], placement=placement,
                          micro_batches=micro_batches, shard_tokens=shard)
        assert result["token_ids"] == reference[:batch], (placement, micro_batches, batch)


def test_cluster_with_busy_poll_on_both_sides_matches_transformers(model_dir, reference, attention_peers):
    """Busy-poll on the stream data path (and its rehearsal of the last message, net/busypoll.py) on the
    compute side and the peer changes no token, whatever the micro-batch count."""
    (peer,) = attention_peers(1, "--busy-poll-us", "2000", kv_memory="64MiB", threads=1)
    for micro_batches in (1, 2):
        result = generate(model_dir, 8, join=[peer.address], micro_batches=micro_batches, busy_poll_us=2000)
        assert result["token_ids"] == reference, micro_batches


def _attention_pids(cluster: str) -> set[str]:
    out = subprocess.run(["pgrep", "-f", "--", f"--cluster {cluster}"], capture_output=True, text=True)
    return set(out.stdout.split())


def test_generate_command_starts_and_stops_its_peers(model_dir, reference):
    ids = [",".join(map(str, p)) for p in PROMPTS[:3]]
    cmd = node_command("generate", "--model", model_dir, "--max-tokens", str(STEPS), "--ignore-eos", "--batch", "3",
                       "--attention-peers", "2", "--placement", "head", "--micro-batches", "2", "--json",
                       "--kv-memory", "64MiB", "--cluster", "gen-cmd-test",
                       *[a for i in ids for a in ("--prompt-ids", i)])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["token_ids"] == reference[:3]
    assert result["tokens_per_s"] > 0
    assert _attention_pids("gen-cmd-test") == set()  # the command stopped the peers it started


@pytest.mark.parametrize("data_address", ["default", "fixed", "stream_tcp", "stream_unreachable"])
def test_block_size_and_data_path_come_from_the_register_reply(model_dir, reference, data_address,
                                                              attention_peers):
    """A peer started with --block-size 32: the transport (and so the scheduler) uses 32, not 16; every
    per-layer attend goes over the data path (the kernel thread's own sockets): ipc:// and the Unix
    stream on one host by default, or exactly the addresses given with --data-port/--data-advertise
    (firewalls, NAT, relays: then no stream unless --data-stream-advertise names one, which a compute
    peer on another host dials over TCP; where that address does not answer, ZeroMQ it is)."""
    import asyncio

    from waiting import peer_stats

    from lamina_p2p.compute.engine import Engine
    from lamina_p2p.compute.remote import join_cluster
    from lamina_p2p.compute.sequence import SamplingParams
    from lamina_p2p.model.loader import load_model

    extra, expected, expected_stream = ["--block-size", "32"], "ipc://", "unix://"
    if data_address != "default":
        port = free_port()
        expected, expected_stream = f"tcp://127.0.0.1:{port}", None
        extra += ["--data-port", str(port), "--data-advertise", expected]
    if data_address.startswith("stream"):
        stream_port, nobody = free_port(), free_port()
        expected_stream = f"tcp://127.0.0.1:{stream_port}"
        advertised = expected_stream if data_address == "stream_tcp" else f"tcp://127.0.0.1:{nobody}"
        extra += ["--data-stream-port", str(stream_port), "--data-stream-advertise", advertised]
        if data_address == "stream_unreachable":  # a firewall in front of the stream's port
            expected_stream = None
    (peer,) = attention_peers(1, *extra, kv_memory="64MiB", cluster="bs32")

    async def run():
        async with join_cluster([peer.address], cluster="bs32") as transport:
            await transport.membership.wait_for(lambda m: bool(m.peers(role="attention")), timeout=60)
            engine = Engine(load_model(model_dir), transport)
            try:
                await transport.wait_for_peers(1, 60)
                (info,) = transport._info.values()
                seqs, _ = await engine.generate(PROMPTS[:3], SamplingParams(max_tokens=STEPS, ignore_eos=True))
                kinds = sorted({type(link).__name__ for link in transport._links.values()})
                return transport.block_size(), info["endpoint"], info["stream"], kinds, [s.output for s in seqs]
            finally:
                engine.close()

    block, endpoint, stream, kinds, tokens = asyncio.run(run())
    assert block == 32
    assert endpoint == expected if data_address != "default" else endpoint.startswith(expected)
    assert stream == expected_stream if data_address != "default" else stream.startswith(expected_stream)
    assert "StreamLink" in kinds if expected_stream else kinds == ["DataLink"]
    assert tokens == reference[:3]
    stats = peer_stats(peer.address)
    assert stats["attend_calls"] > 0 and stats["data_path_requests"] == stats["attend_calls"]


def test_sequence_shards_with_replicas_match_transformers(model_dir, reference, peers):
    """Several shards per sequence on each of 2 peers, each with a copy on the other: still exact."""
    result = generate(model_dir, 8, join=[peers[0].address], placement="sequence", micro_batches=2,
                      shard_tokens=4, kv_replicas=2)
    assert result["token_ids"] == reference[:8]
