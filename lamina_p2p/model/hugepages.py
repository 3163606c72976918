"""Weights in transparent-huge-page memory: one 2 MiB-aligned anonymous mapping, advised before first touch.

Why: a decode step streams every weight once (SmolLM2-135M: 270 MB a step). With 4 KiB pages the
core's L2 streaming prefetcher stops at each page edge and the STLB misses on every page, so one
thread reads ~10-11.5 GB/s on this VM; on 2 MiB pages the same read runs 12-14.6 GB/s (a 16-row
GEMV unit is 18 kB: four and a half 4 KiB pages). Linux's THP in `madvise` mode (the common
default) backs a region with huge pages only if madvise(MADV_HUGEPAGE) reaches it before its pages
are first touched, so the mapping is advised empty and the weights are copied in afterwards. (numpy
advises its own allocations of 4 MiB or more the same way, which is why the KV pool, one large np.empty,
needs nothing; a layer's packed matrices are smaller than that, and one mapping keeps them in step order.)

`ENABLED` (default on) turns it off for A/B runs; where madvise or MADV_HUGEPAGE is missing (not
Linux) or the mapping fails, the arrays are plain numpy memory and nothing else changes.
"""

from __future__ import annotations

import mmap

import numpy as np

HUGE_PAGE = 2 << 20
ALIGN = 64  # each array starts on its own cache line
ENABLED = True


def _mapping(nbytes: int):
    """(buffer, offset of its first 2 MiB boundary), advised for huge pages; None where unavailable."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None or not hasattr(mmap.mmap, "madvise"):
        return None
    try:
        # Private: Python's default for fd -1 is a shared mapping of /dev/zero, which is shmem (its own
        # THP switch, usually off), not anonymous memory. The slack finds a 2 MiB boundary inside.
        m = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE)
        m.madvise(advice)
    except (OSError, ValueError):
        return None
    base = np.frombuffer(m, np.uint8)
    start = (-base.ctypes.data) % HUGE_PAGE
    return base, start


def huge_copies(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """C-contiguous copies of `arrays` laid one after another (in order, 64-byte aligned) in one
    huge-page-advised mapping; the originals when ENABLED is off, the list is empty or huge pages are
    unavailable. The copies keep the mapping alive (numpy's base), so it lives as long as any of them."""
    if not ENABLED or not arrays:
        return list(arrays)
    offsets, total = [], 0
    for a in arrays:
        offsets.append(total)
        total += -(-a.nbytes // ALIGN) * ALIGN
    mapped = _mapping(total)
    if mapped is None:
        return list(arrays)
    base, start = mapped
    out = []
    for a, off in zip(arrays, offsets):
        dst = base[start + off: start + off + a.nbytes].view(a.dtype).reshape(a.shape)
        dst[...] = a
        out.append(dst)
    return out


def mapping_info(a: np.ndarray) -> dict[str, int]:
    """The /proc/self/smaps fields (kB values as bytes; THPeligible as 0/1) of the mapping holding `a`'s
    first byte: e.g. "AnonHugePages" (its bytes on huge pages), "THPeligible". Empty where unknown."""
    addr, found, out = a.ctypes.data, False, {}
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(None, 1)[0]
                if not head.endswith(":"):  # a mapping's first line: "lo-hi perms ..."
                    if found:
                        break
                    lo, hi = (int(v, 16) for v in head.split("-"))
                    found = lo <= addr < hi
                elif found:
                    parts = line.split()
                    if len(parts) >= 2 and parts[1].isdigit():
                        out[head[:-1]] = int(parts[1]) * (1024 if parts[-1] == "kB" else 1)
    except OSError:
        return {}
    return out
