"""Prometheus metrics of a compute peer, in its own registry (several servers may share a process in tests).

Latencies are observed by the scheduler as tokens leave a step; KV per
attention peer and bytes on the wire are read from the transport when
/metrics is scraped, so they cost nothing between scrapes.

Per-layer network wait vs compute: `ServeMetrics` is one of the engine's step
observers (trace.StepObserver, like the tracer), called on its dense thread
with the time a micro-batch waited for a layer's attention (for a remote peer:
wire + queueing + the peer's kernel; in process: the kernel) and the time of
each dense piece (embed, a layer's post + next pre, the last post, the LM head
and sampling).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, CounterMetricFamily

from lamina_p2p.runtime import gc_pauses, track_gc_pauses
from lamina_p2p.trace import LAYER

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
LAYER_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


class ServeMetrics:
    """The compute peer's metrics: scheduler hooks, a StepObserver for per-layer times, and
    collectors that read the transport and the engine at scrape time."""

    def __init__(self, transport=None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("lamina_time_to_first_token_seconds", "Request arrival to its first token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("lamina_inter_token_latency_seconds", "Time between a request's tokens.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("lamina_request_latency_seconds", "Request arrival to its last token.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.generated = Counter("lamina_generated_tokens", "Tokens generated.", registry=r)
        self.prompt_tokens = Counter("lamina_prompt_tokens", "Prompt tokens of admitted requests.", registry=r)
        self.requests = Counter("lamina_requests_finished", "Finished requests by reason.", ["reason"], registry=r)
        self.running = Gauge("lamina_requests_running", "Requests in the running batch.", registry=r)
        self.waiting = Gauge("lamina_requests_waiting", "Requests queued for KV capacity or a place in the batch.",
                             registry=r)
        self.attend = Histogram("lamina_layer_attention_wait_seconds",
                                "Per layer: time a micro-batch waits for attention (network + remote kernel).",
                                ["layer"], buckets=LAYER_BUCKETS, registry=r)
        self.dense = Histogram("lamina_layer_dense_seconds",
                               "Per layer: dense compute of a micro-batch (merge, post, next pre).",
                               ["layer"], buckets=LAYER_BUCKETS, registry=r)
        self.kv_peak = Gauge("lamina_kv_used_peak_bytes", "Most KV bytes in use seen at a step boundary.",
                             ["peer"], registry=r)
        self.waiting_peak = Gauge("lamina_requests_waiting_peak", "Longest waiting queue seen.", registry=r)
        self._peaks: dict[str, int] = {}
        self._waiting_peak = 0
        self.transport = transport
        if transport is not None:
            r.register(_TransportCollector(transport))
        track_gc_pauses()
        r.register(_GcCollector())

    # -- StepObserver (the engine's dense thread) ----------------------------------
    def on_dense(self, piece: str, layer: int, micro_batch: int, tokens: int, t0: float, t1: float) -> None:
        """A dense piece, labelled by its layer ("0".."L-2": post + next pre) or its name (embed, last, sample)."""
        self.dense.labels(str(layer) if piece == LAYER else piece).observe(t1 - t0)

    def on_attention(self, layer: int, micro_batch: int, tokens: int, requests: int, sent_at: float,
                     wait_from: float, t1: float) -> None:
        """The time the dense thread waited for the layer's attention (not the overlapped part)."""
        self.attend.labels(str(layer)).observe(t1 - wait_from)

    # -- scheduler hooks --------------------------------------------------------
    def first_token(self, req, now: float) -> None:
        self.ttft.observe(now - req.submitted_at)
        self.prompt_tokens.inc(len(req.seq.prompt))

    def next_tokens(self, req, n: int, now: float) -> None:
        # n tokens arrived together (one per step normally); spread the gap over them.
        gap = (now - req.last_token_at) / n
        for _ in range(n):
            self.itl.observe(gap)

    def tokens(self, n: int) -> None:
        self.generated.inc(n)

    def finished(self, req, reason: str, now: float) -> None:
        self.requests.labels(reason).inc()
        if req.first_token_at is not None:
            self.e2e.observe(now - req.submitted_at)

    def queue(self, running: int, waiting: int) -> None:
        """Called by the scheduler at every step boundary."""
        self.running.set(running)
        self.waiting.set(waiting)
        if waiting > self._waiting_peak:
            self._waiting_peak = waiting
            self.waiting_peak.set(waiting)
        if self.transport is not None:
            for peer, (total, free) in self.transport.kv_capacity().items():
                if total - free > self._peaks.get(peer, -1):
                    self._peaks[peer] = total - free
                    self.kv_peak.labels(peer).set(total - free)

    def watch_engine(self, engine) -> None:
        self.registry.register(_EngineCollector(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Fault-handling counters of the engine, read at scrape time."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        yield CounterMetricFamily("lamina_recomputed_sequences", "Sequences whose KV was rebuilt after an "
                                  "attention peer failed.", value=self.engine.recomputed)
        yield CounterMetricFamily("lamina_replica_failovers", "Shards served by their replica after an "
                                  "attention peer failed (no recompute).", value=self.engine.promoted)


class _GcCollector:
    """The process's garbage-collector pauses (runtime.track_gc_pauses) and frozen heap, read at
    scrape time: a pause holds the GIL, so it is a stall of every step and request in flight."""

    def collect(self):
        import gc

        n = CounterMetricFamily("lamina_gc_collections", "Garbage collections of this process.",
                                labels=["generation"])
        paused = CounterMetricFamily("lamina_gc_pause_seconds", "Time this process spent in garbage "
                                     "collections (the GIL held).", labels=["generation"])
        longest = GaugeMetricFamily("lamina_gc_pause_longest_seconds", "The longest garbage collection "
                                    "pause seen.", labels=["generation"])
        for g, (count, seconds, top) in gc_pauses().items():
            n.add_metric([str(g)], count)
            paused.add_metric([str(g)], seconds)
            longest.add_metric([str(g)], top)
        yield n
        yield paused
        yield longest
        yield GaugeMetricFamily("lamina_gc_frozen_objects", "Objects frozen out of the collector's view "
                                "once the peer was ready (runtime.freeze_heap).", value=gc.get_freeze_count())


class _TransportCollector:
    """KV per attention peer and wire bytes, read at scrape time."""

    def __init__(self, transport):
        self.transport = transport

    def collect(self):
        used = GaugeMetricFamily("lamina_kv_used_bytes", "KV bytes in use on an attention peer.", labels=["peer"])
        free = GaugeMetricFamily("lamina_kv_free_bytes", "KV bytes free on an attention peer.", labels=["peer"])
        for peer, (total, fr) in sorted(self.transport.kv_capacity().items()):
            used.add_metric([peer], total - fr)
            free.add_metric([peer], fr)
        yield used
        yield free
        sent, received = self.transport.wire_bytes()
        yield CounterMetricFamily("lamina_wire_sent_bytes", "Bytes sent to attention peers.", value=sent)
        yield CounterMetricFamily("lamina_wire_received_bytes", "Bytes received from attention peers.",
                                  value=received)
