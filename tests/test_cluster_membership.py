"""Peers joining, dying and being discovered, seen through real processes and `lamina-node status`."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time

import pytest
from hf_models import build_hf_model
from waiting import peer_stats, wait_until

from lamina_p2p.offline import GenerateOptions, run_generate
from lamina_p2p.launch import node_command

pytestmark = pytest.mark.cluster

FAST = ["--heartbeat", "0.1", "--dead-after", "1.5"]


@pytest.fixture
def attention(attention_peers):
    """Factory: attention(*extra) -> one attention peer with fast failure detection; stopped at teardown."""

    def start(*extra):
        return attention_peers(1, *FAST, *extra, kv_memory="32MiB", threads=1)[0]

    return start


def status(address) -> dict:
    out = subprocess.run(node_command("status", "--join", address, "--json"), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)



def states(address) -> dict:
    return {p["address"]: p["state"] for p in status(address)["peers"]}


def attend_calls(address) -> int:
    return peer_stats(address)["attend_calls"]


def test_a_joining_peer_is_used_and_shown_and_a_killed_peer_is_marked_dead(attention):
    model = str(build_hf_model("llama"))
    a = attention()
    opts = GenerateOptions(model_dir=model, prompt_ids=[[1, 2, 3]], batch=4, max_tokens=4, ignore_eos=True,
                           join=[a.address], placement="head")
    first = run_generate(opts)
    b = attention("--join", a.address)
    wait_until(lambda: states(a.address).get(b.address) == "alive", 10, "the new peer in a's status")
    assert states(b.address).get(a.address) == "alive"
    # New sequences are split over both peers (head placement): the newcomer does attention work.
    assert attend_calls(b.address) == 0
    second = run_generate(opts)
    assert attend_calls(b.address) > 0
    assert second["token_ids"] == first["token_ids"]
    # Killed without a goodbye: marked dead within the failure-detection bound.
    killed_at = time.monotonic()
    b.proc.send_signal(signal.SIGKILL)
    b.proc.wait()
    wait_until(lambda: states(a.address).get(b.address) == "dead", 10, "the killed peer marked dead")
    assert time.monotonic() - killed_at < 1.5 + 2.0  # dead_after plus gossip and polling slack


def test_peers_find_each_other_with_the_lan_beacon(attention):
    port = str(random.randint(30000, 60000))
    disc = ["--discover", "--discover-port", port, "--discover-broadcast", "127.255.255.255", "--cluster", "beacon"]
    peers = [attention(*disc), attention(*disc)]
    wait_until(lambda: states(peers[0].address).get(peers[1].address) == "alive", 15, "discovery")


def test_cluster_up_starts_every_peer_and_stops_them_all(tmp_path):
    model = build_hf_model("llama")
    ports = random.sample(range(30000, 60000), 3)
    config = tmp_path / "local.toml"
    config.write_text(f"""
[cluster]
name = "up-test"
heartbeat_interval = 0.1
dead_after = 1.5
[[peer]]
role = "attention"
listen = "tcp://127.0.0.1:{ports[0]}"
kv_memory = "32MiB"
threads = 1
[[peer]]
role = "attention"
listen = "tcp://127.0.0.1:{ports[1]}"
kv_memory = "32MiB"
threads = 1
[[peer]]
role = "compute"
listen = "tcp://127.0.0.1:{ports[2]}"
model = "{model}"
""")
    proc = subprocess.Popen(node_command("cluster", "up", "--config", str(config)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lines = []
        for line in proc.stdout:  # blocks until the next line; the process prints the table when ready
            lines.append(line)
            if "up:" in line:
                break
        table = "".join(lines)
        assert "cluster 'up-test' up: 3 peers" in table, table
        assert table.count("alive") == 3, table
        def peer_pids():
            return [pid for port in ports
                    for pid in subprocess.run(["pgrep", "-f", "--", f"--listen tcp://127.0.0.1:{port}"],
                                              capture_output=True, text=True).stdout.split()]

        assert len(peer_pids()) == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert peer_pids() == []  # cluster up waited for every peer to exit
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # cluster up stops its peers on SIGTERM
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        for port in ports:  # whatever is left after a failure above
            subprocess.run(["pkill", "-9", "-f", "--", f"--listen tcp://127.0.0.1:{port}"])
