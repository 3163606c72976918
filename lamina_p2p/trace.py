"""What a step did, for whoever watches: the observer interface, and the tracer that writes Chrome traces.

The engine reports each piece of a step to its observers (`StepObserver`) from its
dense thread: every dense piece of a micro-batch (embed + layer 0's pre, a layer's
post + the next pre, the last post, the LM head and sampling) and every layer's
attention round trip (sent, waited for, received). Two observers exist: `Tracer`
here, which keeps the pieces as spans of a Chrome trace (chrome://tracing,
Perfetto), and `serve.metrics.ServeMetrics`, which turns them into Prometheus
histograms. With no observer attached the engine takes no timestamps at all.

Trace rows: one per micro-batch on the compute peer (its dense work and its
attention round trips alternate along the row), one for the step's LM head, and
one per attention peer (queue and kernel; the transport records those). Times are
`now()` = time.monotonic() seconds, which on Linux is one clock for every process
of a machine, so peers' spans line up; on several machines they are only as
aligned as the clocks. Recording is a tuple append under a lock.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from typing import Protocol

now = time.monotonic

# The dense pieces of a step, as StepObserver.on_dense names them.
EMBED = "embed"  # embedding + layer 0's pre (norm, q/k/v projections, rope)
LAYER = "layer"  # layer l's merge + post (o-projection, MLP) + layer l+1's pre
LAST = "last"  # the last layer's merge + post, and the rows to sample picked out
SAMPLE = "sample"  # one LM head over every micro-batch's sampled rows + sampling


class StepObserver(Protocol):
    """Receives the pieces of every engine step, on the engine's dense thread.

    Calls must be quick (they run between a micro-batch's layers) and must not raise.
    Times are `now()` seconds (time.monotonic).
    """

    def on_dense(self, piece: str, layer: int, micro_batch: int, tokens: int, t0: float, t1: float) -> None:
        """One dense piece: `piece` is EMBED, LAYER, LAST or SAMPLE. `layer`: the layer whose post ran
        (EMBED: 0, SAMPLE: -1); `micro_batch`: its index in the step (SAMPLE: -1, it covers all);
        `tokens`: the micro-batch's rows (SAMPLE: the rows sampled)."""

    def on_attention(self, layer: int, micro_batch: int, tokens: int, requests: int, sent_at: float,
                     wait_from: float, t1: float) -> None:
        """One layer's attention of one micro-batch: `requests` attends sent at `sent_at`, waited for
        from `wait_from` (after the dense work overlapped with them) until every reply was in at `t1`."""


class Tracer:
    """A StepObserver that keeps every piece as a span; `write` saves them as a Chrome trace."""

    def __init__(self):
        self._spans: list[tuple[str, str, str, float, float, dict | None]] = []
        self._lock = threading.Lock()  # spans come from the loop and from worker threads

    def add(self, process: str, row: str, name: str, t0: float, t1: float, args: dict | None = None) -> None:
        with self._lock:
            self._spans.append((process, row, name, t0, t1, args))

    @contextmanager
    def span(self, process: str, row: str, name: str, args: dict | None = None):
        t0 = now()
        try:
            yield
        finally:
            self.add(process, row, name, t0, now(), args)

    # -- StepObserver ---------------------------------------------------------------
    def on_dense(self, piece: str, layer: int, micro_batch: int, tokens: int, t0: float, t1: float) -> None:
        if piece == SAMPLE:
            self.add("compute", "step", "logits+sample", t0, t1, {"rows": tokens})
            return
        name = {EMBED: "dense embed+L0", LAYER: f"dense L{layer}/L{layer + 1}", LAST: f"dense L{layer}"}[piece]
        self.add("compute", f"micro-batch {micro_batch}", name, t0, t1, {"tokens": tokens})

    def on_attention(self, layer: int, micro_batch: int, tokens: int, requests: int, sent_at: float,
                     wait_from: float, t1: float) -> None:
        # The span runs from the send; with several micro-batches in flight most of it overlaps
        # other micro-batches' dense work, so the part the dense thread really waited is kept too.
        self.add("compute", f"micro-batch {micro_batch}", f"attention L{layer}", sent_at, t1,
                 {"tokens": tokens, "requests": requests, "exposed_ms": round((t1 - wait_from) * 1e3, 4)})

    # -- output -----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._spans)

    def chrome(self) -> dict:
        with self._lock:
            spans = list(self._spans)
        if not spans:
            return {"traceEvents": []}
        origin = min(s[3] for s in spans)
        pids: dict[str, int] = {}
        tids: dict[tuple[str, str], int] = {}
        events = []
        for process, row, name, t0, t1, args in spans:
            pid = pids.setdefault(process, len(pids) + 1)
            tid = tids.setdefault((process, row), len(tids) + 1)
            ev = {"name": name, "ph": "X", "pid": pid, "tid": tid, "ts": (t0 - origin) * 1e6,
                  "dur": max(0.0, t1 - t0) * 1e6}
            if args:
                ev["args"] = args
            events.append(ev)
        for process, pid in pids.items():
            events.append({"name": "process_name", "ph": "M", "pid": pid, "args": {"name": process}})
        for (process, row), tid in tids.items():
            events.append({"name": "thread_name", "ph": "M", "pid": pids[process], "tid": tid, "args": {"name": row}})
            events.append({"name": "thread_sort_index", "ph": "M", "pid": pids[process], "tid": tid,
                           "args": {"sort_index": tid}})
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    def write(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.chrome(), f)
