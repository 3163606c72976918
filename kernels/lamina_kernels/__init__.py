"""lamina_kernels: paged-KV attention kernels for lamina-p2p (numpy + numba only).

Public API:
  append_attend(...)       CPU (Numba) append-then-attend, returns (out, lse)
  append_attend_cuda(...)  the same with numba.cuda (imported lazily on first use)
  merge(outs, lses)        exact LSE merge of partial results
  warmup(storages)         compile every CPU variant before serving
  to_storage, widen, storage_itemsize, STORAGES   storage encodings
The pure-torch oracle lives in lamina_kernels.reference (imports torch).
"""

from pathlib import Path as _Path

from .cache_guard import keep_in_step as _keep_in_step

# Before any cached kernel loads: Numba alone would keep running code compiled from older sources.
_keep_in_step(_Path(__file__).parent)

from .merge import merge  # noqa: E402
from .storage import STORAGES, storage_dtype, storage_itemsize, to_storage, widen  # noqa: E402


def __getattr__(name):
    # The CPU kernels import Numba (about a second): only when used, so that what needs only the
    # storage names (the command line's options and its one-line errors) starts without it.
    if name in ("append_attend", "warmup"):
        from . import cpu

        globals()[name] = value = getattr(cpu, name)  # looked up here once, then a plain attribute
        return value
    raise AttributeError(f"module 'lamina_kernels' has no attribute {name!r}")


def append_attend_cuda(*args, **kwargs):
    """numba.cuda version of append_attend; see lamina_kernels.cuda (lazy import)."""
    from .cuda import append_attend_cuda as impl

    return impl(*args, **kwargs)


__all__ = ["append_attend", "append_attend_cuda", "merge", "warmup", "STORAGES",
           "storage_dtype", "storage_itemsize", "to_storage", "widen"]
