"""Numba's options for lamina_p2p's cached compiled functions, and their cache kept in step with the sources.

Every module here that compiles with cache=True takes its options from this one, so that importing it runs
lamina_kernels.cache_guard first: this package's bodies are built from its own files and lamina_kernels'
(simd.py's intrinsics, the kernels' drivers), and Numba alone sees a change in neither (cache_guard's doc).
"""

from __future__ import annotations

from pathlib import Path

import lamina_kernels
from lamina_kernels.cache_guard import keep_in_step

keep_in_step(Path(__file__).parent, also=[Path(lamina_kernels.__file__).parent])

CACHED = dict(nogil=True, cache=True)
# The fused layers' and the sampler's loops: reassoc lets their sums vectorise; no nnan/ninf (-inf logits
# are valid input, and a NaN must reach the checks that look for it).
FAST = dict(CACHED, error_model="numpy", fastmath={"reassoc", "contract", "arcp", "nsz", "afn"})
