"""Peers leaving on purpose (SIGTERM) and compute peers dying: nothing hangs, nothing is lost."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from pathlib import Path

import openai
import pytest
from helpers import GREEDY, JOBS, aclient, free_port, metric, stream_all
from waiting import peer_stats, wait_until

from lamina_p2p.launch import node_command

pytestmark = [pytest.mark.cluster, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

FAST = ["--heartbeat", "0.1", "--dead-after", "1.0"]


@pytest.fixture
def attention(attention_peers):
    """Factory: attention(*extra) -> one attention peer with fast failure detection; stopped at teardown."""

    def start(*extra):
        return attention_peers(1, *FAST, *extra, kv_memory="32MiB", threads=1)[0]

    return start


@pytest.fixture
def compute(launch_peer):
    """Factory: compute(model_dir, seed, *extra) -> (a compute peer joined to seed, its URL); stopped at teardown."""

    def start(model_dir, seed, *extra):
        port = free_port()
        proc = launch_peer(["start", "--role", "compute", "--model", str(model_dir), "--listen", "tcp://127.0.0.1:0",
                            "--join", seed, "--http", f"127.0.0.1:{port}", "--threads", "1", *FAST, *extra])
        return proc, f"http://127.0.0.1:{port}"

    return start


def kv_used(address) -> int:
    return peer_stats(address)["kv_used_bytes"]


def test_sigterm_on_an_attention_peer_hands_its_shards_back(tiny, attention, compute):
    a = attention()
    b = attention("--join", a.address, "--drain-timeout", "60")
    comp, url = compute(tiny, a.address)
    wait_until(lambda: metric(url, "lamina_kv_free_bytes", peer=b.peer_id) is not None, 30, "b registered")
    reference = asyncio.run(stream_all(url))
    sent = []

    def leave_when_started(counts):
        if not sent and all(c >= 5 for c in counts):
            b.proc.send_signal(signal.SIGTERM)
            sent.append(time.monotonic())

    after = asyncio.run(stream_all(url, leave_when_started))
    assert sent and after == reference
    # It left as soon as its shards were moved, well before its 60 s drain timeout ran out.
    assert b.proc.wait(timeout=30) == 0
    assert metric(url, "lamina_recomputed_sequences_total") > 0
    assert metric(url, "lamina_requests_finished_total", reason="error") in (None, 0.0)


def test_sigterm_on_a_compute_peer_finishes_running_requests_and_refuses_new_ones(tiny, attention, compute):
    a = attention()
    comp, url = compute(tiny, a.address)

    async def run():
        client = aclient(url)
        stream = await client.completions.create(model="tiny", prompt=JOBS[0], max_tokens=200, stream=True,
                                                 **GREEDY)
        chunks = [await stream.__anext__()]
        comp.proc.send_signal(signal.SIGTERM)
        refused = None
        deadline = time.monotonic() + 20
        while refused is None and time.monotonic() < deadline:  # the signal lands asynchronously
            try:
                await client.completions.create(model="tiny", prompt=[5, 6], max_tokens=2, **GREEDY)
            except openai.APIStatusError as e:
                refused = e.status_code
        async for chunk in stream:
            chunks.append(chunk)
        await client.close()
        return chunks, refused

    chunks, refused = asyncio.run(run())
    assert refused == 503
    assert chunks[-1].choices[0].finish_reason == "length"  # the running request finished normally
    assert comp.proc.wait(timeout=30) == 0
    wait_until(lambda: kv_used(a.address) == 0, 10, "its KV freed on the attention peer")


def test_a_dead_compute_peer_gives_clients_an_error_and_its_kv_is_freed(tiny, attention, compute):
    a = attention("--owner-timeout", "1")
    comp, url = compute(tiny, a.address)

    async def run():
        client = aclient(url)
        stream = await client.completions.create(model="tiny", prompt=JOBS[1], max_tokens=400, stream=True,
                                                 **GREEDY)
        await stream.__anext__()
        await asyncio.to_thread(wait_until, lambda: kv_used(a.address) > 0, 10, "KV in use")
        comp.proc.send_signal(signal.SIGKILL)
        with pytest.raises((openai.APIError, ConnectionError)):
            async with asyncio.timeout(20):  # an error, not a hang
                async for _ in stream:
                    pass
        await client.close()

    asyncio.run(run())
    wait_until(lambda: kv_used(a.address) == 0, 30, "the dead owner's KV freed after --owner-timeout")


def _children(pid: int, marker: str) -> list[int]:
    """Live child processes of pid whose command line contains marker."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and marker in cmd:
            out.append(int(d.name))
    return out


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"  # a zombie has exited


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_sigterm_on_generate_stops_the_peers_it_started(tiny):
    gen = subprocess.Popen(node_command("generate", "--model", str(tiny), "--attention-peers", "1",
                                        "--random-prompt-len", "8", "--max-tokens", "4000", "--ignore-eos"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        peer = wait_until(lambda: _children(gen.pid, "--role attention"), 120, "the attention peer to start")[0]
        gen.send_signal(signal.SIGTERM)
        _, err = gen.communicate(timeout=60)
        assert gen.returncode == 143, err[-2000:]
        assert "stopped by SIGTERM" in err
        wait_until(lambda: _gone(peer), 30, "the attention peer to exit")
    finally:
        if gen.poll() is None:
            gen.kill()
