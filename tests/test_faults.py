"""An attention peer killed (SIGKILL) in the middle of 8 streamed generations: nothing is lost.

1 compute + 3 attention peers as real processes. Every request completes with the
same greedy text as the fault-free run: by recompute (prompt + tokens so far are
prefilled again on the peers left), or with --kv-replicas 2 by failing over to a
replica with no recompute at all.
"""

from __future__ import annotations

import asyncio
import signal

import pytest
from helpers import free_port, metric, stream_all
from waiting import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

FAST = ["--heartbeat", "0.1", "--dead-after", "1.0"]


@pytest.fixture
def run_cluster(tiny, attention_peers, launch_peer):
    """Factory: run_cluster(extra) -> (3 attention peers, the compute peer, its URL), all stopped at teardown."""

    def run(extra):
        attention = attention_peers(3, *FAST, kv_memory="32MiB", threads=1)
        port = free_port()
        compute = launch_peer(["start", "--role", "compute", "--model", str(tiny), "--listen", "tcp://127.0.0.1:0",
                               "--join", attention[0].address, "--http", f"127.0.0.1:{port}", "--threads", "1",
                               "--peer-wait-timeout", "30", *FAST, *extra])
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: len([1 for p in range(3) if metric(url, "lamina_kv_free_bytes", peer=_peer(attention[p]))
                                is not None]) == 3, 30, "all three attention peers registered")
        return attention, compute, url

    return run


def _peer(proc) -> str:
    return proc.peer_id


@pytest.mark.parametrize("replicas", [1, 2])
def test_killing_an_attention_peer_mid_generation_loses_nothing(run_cluster, replicas):
    attention, compute, url = run_cluster(["--kv-replicas", str(replicas)])
    reference = asyncio.run(stream_all(url))
    assert all(len(t) > 0 for t in reference)
    victim = attention[1]
    killed = []

    def kill_when_all_started(counts):
        if not killed and all(c >= 5 for c in counts):
            victim.proc.send_signal(signal.SIGKILL)
            killed.append(True)

    after = asyncio.run(stream_all(url, kill_when_all_started))
    assert killed, "generation finished before the kill: make it longer"
    assert after == reference
    recomputed = metric(url, "lamina_recomputed_sequences_total")
    failovers = metric(url, "lamina_replica_failovers_total")
    if replicas == 1:
        assert recomputed > 0  # the victim held some of the 8 sequences
    else:
        assert recomputed == 0 and failovers > 0
    assert metric(url, "lamina_requests_finished_total", reason="error") in (None, 0.0)
