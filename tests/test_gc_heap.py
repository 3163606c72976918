"""The garbage collector of a ready peer: its startup heap frozen, its pauses timed and exported.

A full collection walks every tracked object with the GIL held (~0.14 s on SmolLM2's ~300k), a
stall of every step in flight; a peer freezes what startup left once it is ready (runtime.freeze_heap).
The freeze itself runs in a child process: frozen objects of pytest's own heap would never be collected.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys

from helpers import metrics

from lamina_p2p import runtime

CHILD = """
import gc, sys, weakref
from lamina_p2p.runtime import freeze_heap
frozen = freeze_heap()
class Node: pass
a, b = Node(), Node()
a.other, b.other = b, a  # a cycle made after the freeze: still garbage the collector must find
gone = weakref.ref(a)
del a, b
gc.collect()
print(frozen, gc.get_freeze_count(), gone() is None)
"""


def _child(env_freeze: str | None) -> list[str]:
    env = dict(os.environ)
    env.pop("LAMINA_GC_FREEZE", None)
    if env_freeze is not None:
        env["LAMINA_GC_FREEZE"] = env_freeze
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_freeze_heap_freezes_startup_and_later_cycles_are_still_collected():
    frozen, count, collected = _child(None)
    assert int(frozen) == int(count) > 1000  # the interpreter's and the imports' objects
    assert collected == "True"


def test_freeze_heap_can_be_turned_off():
    frozen, count, collected = _child("0")
    assert (frozen, count, collected) == ("0", "0", "True")


def test_gc_pauses_are_timed_per_generation():
    runtime.track_gc_pauses()
    runtime.track_gc_pauses()  # idempotent: one callback
    before = runtime.gc_pauses()
    gc.collect()
    after = runtime.gc_pauses()
    assert after[2][0] == before[2][0] + 1
    assert after[2][1] > before[2][1] and after[2][2] >= after[2][1] - before[2][1]
    assert sum(cb is runtime._on_gc for cb in gc.callbacks) == 1


def test_a_served_peer_froze_its_heap_and_exports_its_pauses(tiny, serve_url):
    url = serve_url(tiny, "--kv-memory", "64MiB")
    m = metrics(url)
    assert m[("lamina_gc_frozen_objects", frozenset())] > 10_000  # torch, Numba, the model
    for g in "012":
        labels = frozenset({("generation", g)})
        assert m[("lamina_gc_collections_total", labels)] >= 0
        assert m[("lamina_gc_pause_seconds_total", labels)] >= m[("lamina_gc_pause_longest_seconds", labels)]
    # freeze_heap's own gc.collect() ran after the metrics began timing: one full collection at least
    assert m[("lamina_gc_collections_total", frozenset({("generation", "2")}))] >= 1
