"""Numba's on-disk cache kept in step with the sources it was compiled from.

Numba keys a function cached with cache=True on its own file's modification time and size only: a
change in another file the function calls or inlines is not seen (numba PRs 8396 and 9563, to extend
it, were not merged), and the old machine code keeps running. Nearly every cached body here is built
from other files (tiles.py compiled into items.py, simd.py's intrinsics everywhere, lamina_p2p's
layers on this package's kernels), so after a `git pull` or an edit a checkout would run stale kernels.

`keep_in_step(package_dir, also)` stamps every .py file under package_dir and `also` (relative path,
size, mtime in ns) and, when the stamp differs from the one saved in package_dir's __pycache__, removes
every Numba cache file (.nbi index, .nbc code) under package_dir before anything loads one, then saves
the new stamp. It runs at import under an exclusive file lock: the peers of a local cluster start at
once, and one must not remove what another has just written and stamped. A checkout whose __pycache__
cannot be written (a read-only install: there Numba caches elsewhere, and a reinstall rewrites every
file, which Numba sees) is left alone, as are caches under NUMBA_CACHE_DIR.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

STAMP = "numba-sources.stamp"
CACHE_SUFFIXES = (".nbi", ".nbc")


def source_stamp(roots: Iterable[Path]) -> str:
    """sha256 over (root, path relative to it, size, mtime_ns) of every .py file under the roots, sorted."""
    h = hashlib.sha256()
    for root in roots:
        root = Path(root)
        for path in sorted(root.rglob("*.py")):
            st = path.stat()
            h.update(f"{root.name}/{path.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def keep_in_step(package_dir: Path, also: Iterable[Path] = ()) -> bool:
    """Remove package_dir's Numba cache files if the sources under it or `also` changed since the stamp
    was saved (module doc). Returns True when the stamp had changed (whatever cache files there were are
    gone), False when it had not or package_dir's __pycache__ cannot be written."""
    package_dir = Path(package_dir)
    cache_dir = package_dir / "__pycache__"
    try:
        cache_dir.mkdir(exist_ok=True)
        lock = open(cache_dir / "numba-sources.lock", "a")
    except OSError:
        return False  # not writable: nothing of ours to keep in step there
    with lock:
        _lock(lock)
        stamp = source_stamp([package_dir, *also])
        saved = cache_dir / STAMP
        try:
            if saved.read_text() == stamp:
                return False
        except OSError:
            pass
        for path in package_dir.rglob("*"):
            if path.suffix in CACHE_SUFFIXES and path.parent.name == "__pycache__":
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
        tmp = saved.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(stamp)
        os.replace(tmp, saved)
        return True


def _lock(f) -> None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock, the stamp still guards
        return
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # released when the file is closed
