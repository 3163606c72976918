"""Pinning peers to CPUs (`--cpus`): the list syntax, bad lists, and real peers' threads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lamina_p2p.config import ConfigError, load_cluster
from lamina_p2p.launch import LaunchError, start_peer
from lamina_p2p.runtime import parse_cpus

linux_only = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux-only")


def thread_cpus(pid: int) -> dict[int, str]:
    """Cpus_allowed_list of every thread of a process."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                out[int(task.name)] = line.split(":", 1)[1].strip()
    return out


def test_parse_cpus():
    assert parse_cpus("0") == {0}
    assert parse_cpus("0-3,6") == {0, 1, 2, 3, 6}
    assert parse_cpus(" 2 , 0-1") == {0, 1, 2}
    for bad in ("", "a", "3-1", "-1", "1,,2", "0-", "0-99999999"):
        with pytest.raises(ValueError, match="bad CPU list"):
            parse_cpus(bad)


def test_cluster_config_checks_cpus(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[peer]]\nrole = "attention"\nlisten = "tcp://127.0.0.1:0"\ncpus = "1-0"\n')
    with pytest.raises(ConfigError, match="peer 0: cpus: bad CPU list"):
        load_cluster(cfg)
    cfg.write_text('[[peer]]\nrole = "attention"\nlisten = "tcp://127.0.0.1:0"\ncpus = "0"\n')
    assert load_cluster(cfg).peers[0].cpus == "0"


@linux_only
@pytest.mark.cluster
@pytest.mark.parametrize("threads", [None, 1])  # 1: as the launchers start peers (`--threads 1 --cpus 1`)
def test_attention_peer_runs_every_thread_on_its_cpus(attention_peers, threads):
    last = max(os.sched_getaffinity(0))
    peers = attention_peers(1, kv_memory="16MiB", threads=threads, cpus=str(last))
    threads = thread_cpus(peers[0].proc.pid)
    # the kernel pool is up by READY (kernels are warmed first): several threads, all pinned
    assert len(threads) > 1
    assert set(threads.values()) == {str(last)}, threads


@linux_only
@pytest.mark.cluster
def test_bad_cpus_is_a_clear_error():
    with pytest.raises(LaunchError, match="cannot pin to CPUs"):
        start_peer(["start", "--role", "attention", "--listen", "tcp://127.0.0.1:0", "--kv-memory", "16MiB",
                    "--cpus", str(os.cpu_count() + 64)], timeout=60)
    with pytest.raises(LaunchError, match="bad CPU list"):
        start_peer(["start", "--role", "attention", "--listen", "tcp://127.0.0.1:0", "--cpus", "x"], timeout=60)


@linux_only
@pytest.mark.skipif(len(getattr(os, "sched_getaffinity", lambda _: ())(0)) < 2, reason="needs 2 CPUs")
def test_dense_cpus_puts_the_dense_thread_apart_from_the_event_loop(tiny):
    import signal
    import subprocess

    from waiting import wait_until

    from lamina_p2p.launch import node_command

    model = tiny
    cpus = sorted(os.sched_getaffinity(0))
    gen = subprocess.Popen(node_command("generate", "--model", str(model), "--random-prompt-len", "8",
                                        "--max-tokens", "4000", "--ignore-eos", "--dense-cpus", str(cpus[-1])),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # The dense thread pins itself on its first job; the event loop (the main thread) keeps every CPU.
        # (Not the main thread: torch's cpuinfo moves it to each CPU in turn for a moment at import.)
        wait_until(lambda: gen.poll() is not None or any(
            tid != gen.pid and cpu_list == str(cpus[-1]) for tid, cpu_list in thread_cpus(gen.pid).items()),
            120, "a thread pinned to the dense CPU")
        assert gen.poll() is None, gen.stderr.read()
        seen = thread_cpus(gen.pid)
        assert seen[gen.pid] != str(cpus[-1]), (gen.pid, seen)
    finally:
        gen.send_signal(signal.SIGTERM)
        gen.communicate(timeout=60)
    bad = subprocess.run(node_command("generate", "--model", str(model), "--prompt-ids", "1,2",
                                      "--dense-cpus", str(os.cpu_count() + 8)), capture_output=True, text=True)
    assert bad.returncode == 2 and "does not exist" in bad.stderr


@linux_only
@pytest.mark.skipif(len(getattr(os, "sched_getaffinity", lambda _: ())(0)) < 2, reason="needs 2 CPUs")
def test_serve_pins_its_dense_thread_after_the_first_request(tiny, launch_peer):
    import json
    import urllib.request

    model = tiny
    cpu = str(sorted(os.sched_getaffinity(0))[-1])
    peer = launch_peer(["serve", "--model", str(model), "--http", "127.0.0.1:0", "--kv-memory", "16MiB",
                        "--dense-cpus", cpu])
    body = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 2}).encode()
    req = urllib.request.Request(peer.address + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 200
    seen = thread_cpus(peer.proc.pid)
    pinned = [tid for tid, cpus in seen.items() if cpus == cpu and tid != peer.proc.pid]
    assert pinned and seen[peer.proc.pid] != cpu, seen
