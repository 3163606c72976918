"""What a compute process is asked to run: the engine's options, once, and what `generate` and a serving
compute peer add to them.

`EngineOptions` is the model, the engine's knobs (placement, micro-batches, replicas) and where attention
runs (in process, K local attention peer processes, or a cluster to join); `generate`, `serve`, `start
--role compute` and the Python façade all fill it. `GenerateOptions` adds the prompts and the sampling of
one offline run; `ComputeOptions` adds a compute peer's own address, gossip timing and HTTP API. Plain
dataclasses: the command line (lamina_p2p/cli/) parses into them and nothing here imports click.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EngineOptions:
    """The model, the engine and where its attention runs.

    Attention runs in this process when `join` is empty and `attention_peers` is 0, on that many local
    attention peer processes started for the run otherwise, or on the cluster of a `join` address.
    """

    model_dir: str  # a checkpoint directory, a .gguf file or org/name in the local HF cache
    dtype: str | None = None  # None: the checkpoint's own
    placement: str = "request"  # request | head | sequence
    shard_tokens: int | None = None  # sequence placement: tokens per shard
    micro_batches: int = 1
    kv_replicas: int = 1  # copies of every KV shard on distinct attention peers
    max_step_tokens: int = 4096  # prefill tokens one engine step takes at most
    peer_wait_timeout_s: float = 60.0  # requests wait for an attention peer when none is left
    threads: int | None = None  # torch threads of the compute side
    dense_cpus: set[int] | None = None  # the dense thread (and its torch pool) on these CPUs only
    # Where attention runs.
    join: list[str] = field(default_factory=list)  # seed addresses of a cluster
    cluster: str = "lamina"  # cluster name (of the peers started or joined)
    attention_peers: int = 0  # 0: in process; K: start K local attention peer processes
    kv_bytes: int = 2 << 30  # KV budget in process, or of each attention peer started here
    attention_threads: int | None = None  # threads of in-process attention or of each peer started here
    attention_cpus: list[str] = field(default_factory=list)  # per started peer, reused in turn
    security: object = None  # net.security.Security (--secret): CURVE on every ZeroMQ connection
    busy_poll_us: int = 0  # the stream data path's busy-poll window, both sides (0: off; net/busypoll.py)

    def engine_kwargs(self) -> dict:
        """The keyword arguments of `compute.engine.Engine` these options set (peer_wait_timeout_s is the
        scheduler's: a serving compute peer passes it there)."""
        return dict(placement=self.placement, micro_batches=self.micro_batches, shard_tokens=self.shard_tokens,
                    max_step_tokens=self.max_step_tokens, kv_replicas=self.kv_replicas, dense_cpus=self.dense_cpus)


@dataclass
class GenerateOptions(EngineOptions):
    """One offline run (`lamina-node generate`): prompts and sampling on top of the engine's options."""

    prompts: list[str] = field(default_factory=list)  # text, encoded as the model's tokenizer encodes it
    chats: list[list[dict]] = field(default_factory=list)  # conversations, through the model's chat template
    allow_special_in_content: bool = False  # chat content: special-token strings become tokens (default: text)
    prompt_ids: list[list[int]] = field(default_factory=list)
    random_prompt_len: int | None = None  # seeded random prompts of this many tokens
    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    batch: int | None = None  # None: one sequence per prompt
    trace: str | None = None  # write a Chrome trace JSON here


@dataclass
class ComputeOptions(EngineOptions):
    """A compute peer (`start --role compute`, `serve`): its place in the cluster and its HTTP API."""

    listen: str = "tcp://127.0.0.1:0"
    heartbeat_interval_s: float = 0.5  # between gossip heartbeats
    dead_after_s: float = 5.0  # without a heartbeat before a peer is declared dead
    advertise: str | None = None
    discover: bool = False
    discover_port: int = 47474
    discover_broadcast: str = "255.255.255.255"
    insecure_listen: bool = False
    drain_timeout_s: float = 30.0  # on SIGTERM: time to let running requests finish before failing them
    http: str | None = None  # HOST:PORT of the OpenAI-compatible API
    max_batch: int = 64
    api_key: str | None = None
    model_name: str | None = None
    reserve: str = "full"
    announce_http: bool = False  # READY names the HTTP URL (serve) instead of the peer's ZeroMQ address
    allow_special_in_content: bool = False  # chat content: special-token strings become tokens (default: text)
