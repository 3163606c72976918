"""Per-layer spans of the pipeline, written as a Chrome trace (chrome://tracing, Perfetto).

Rows: one per micro-batch on the compute peer (its dense work and its attention
round trips alternate along the row), one for the dense thread's queue, and one
per attention peer (queue and kernel). Timestamps are time.monotonic(), which on
Linux is one clock for every process of a machine, so peers' spans line up; on
several machines they are only as aligned as the clocks.

Recording is a tuple append; a disabled tracer is None and costs one check.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager

now = time.monotonic


class Tracer:
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
