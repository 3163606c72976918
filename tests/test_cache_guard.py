"""lamina_kernels.cache_guard: Numba's on-disk cache follows a change in any source file, not only the function's own."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from lamina_kernels.cache_guard import STAMP, keep_in_step


def _touch_later(path: Path, text: str) -> None:
    """Rewrite a file with a modification time surely after the one a stamp saw (coarse clocks)."""
    st = path.stat()
    path.write_text(text)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))


def _cache_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix in (".nbi", ".nbc"))


def test_cache_files_are_removed_once_per_change_of_any_source(tmp_path):
    pkg, dep = tmp_path / "pkg", tmp_path / "dep"
    (pkg / "sub" / "__pycache__").mkdir(parents=True)
    dep.mkdir()
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "sub" / "b.py").write_text("y = 1\n")
    (dep / "c.py").write_text("z = 1\n")

    def fill():
        for name in ("sub/__pycache__/b.f-1.py311.nbi", "sub/__pycache__/b.f-1.py311.1.nbc"):
            (pkg / name).write_bytes(b"compiled")
        (pkg / "sub" / "__pycache__" / "b.cpython-311.pyc").write_bytes(b"bytecode")

    fill()
    assert keep_in_step(pkg, also=[dep])  # no stamp yet: whatever is there was compiled from unknown sources
    assert _cache_files(pkg) == []
    assert (pkg / "__pycache__" / STAMP).exists()
    assert (pkg / "sub" / "__pycache__" / "b.cpython-311.pyc").exists()  # Python's own cache is Python's

    fill()
    assert not keep_in_step(pkg, also=[dep])  # nothing changed: the cache stays
    assert len(_cache_files(pkg)) == 2

    _touch_later(dep / "c.py", "z = 2\n")  # a file the cached code was built from, outside the package
    assert keep_in_step(pkg, also=[dep])
    assert _cache_files(pkg) == []

    fill()
    (pkg / "sub" / "new.py").write_text("w = 1\n")  # a new source file counts too
    assert keep_in_step(pkg, also=[dep])
    assert _cache_files(pkg) == []


_CALLEE = "from numba import njit\n\n@njit(cache=True)\ndef f():\n    return {}\n"
_CALLER = "from numba import njit\n\nfrom .callee import f\n\n@njit(cache=True)\ndef g():\n    return f() + 10\n"
_GUARDED_INIT = textwrap.dedent("""
    from pathlib import Path
    from lamina_kernels.cache_guard import keep_in_step
    keep_in_step(Path(__file__).parent)
""")


def _g(root: Path, pkg: str) -> int:
    out = subprocess.run([sys.executable, "-c", f"from {pkg}.caller import g; print(g())"], cwd=root,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(root), "NUMBA_CACHE_DIR": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


def test_a_cached_function_follows_a_change_in_a_function_it_calls_from_another_file(tmp_path):
    for pkg, init in (("plain", ""), ("guarded", _GUARDED_INIT)):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text(init)
        (tmp_path / pkg / "callee.py").write_text(_CALLEE.format(1))
        (tmp_path / pkg / "caller.py").write_text(_CALLER)
        assert _g(tmp_path, pkg) == 11
        assert _cache_files(tmp_path / pkg)  # compiled and cached
        _touch_later(tmp_path / pkg / "callee.py", _CALLEE.format(2))
    # Numba alone (0.60-0.68 at least): the caller's cache entry is keyed on caller.py, which did not change,
    # so the old f runs. Not asserted: a Numba that follows dependencies itself would make this 12, and the
    # guard merely redundant.
    assert _g(tmp_path, "plain") in (11, 12)
    # With the guard the change is seen, and the new code is cached in turn.
    assert _g(tmp_path, "guarded") == 12
    assert _g(tmp_path, "guarded") == 12
