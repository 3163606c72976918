"""Greedy decoding's log-probability without torch's reductions: logsumexp of rows whose maximum is known.

torch's `max(dim=-1)` then `logsumexp(dim=-1)` over SmolLM2's 49152 logits took ~0.15-0.3 ms
at batch 1 and ~2.7 ms at batch 16 on the 2-vCPU VM (OpenMP regions waking a passive thread,
logsumexp's temporaries). sampling.py takes the first maximal index from numpy's SIMD argmax
(~4 us a row) and the sum of exp(x - max) from here: one vectorised pass on the calling thread
(lamina_kernels.softmax.exp_nonpos, ~1 ulp; 16 float32 partial sums, as torch's vectorised sum).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from lamina_kernels.softmax import exp_nonpos

from ..jit import FAST as _JIT  # reassoc lets the sum vectorise; no nnan/ninf: -inf logits (masked tokens) are valid


@njit(**_JIT)
def greedy_logprobs(logits, ids, out):
    """out[r] = log p(ids[r]) = -log(sum_i exp(logits[r, i] - m)), m = logits[r, ids[r]], for float32 logits
    [rows, vocab] whose row maxima are at ids (int64 [rows]; float32 out [rows]). Returns False, out unspecified,
    when some row's m is NaN or infinite (the caller takes torch's path): the check and the sum in one call,
    because a step's caches are cold here and each numpy call costs 20-40 us (tools/PERFORMANCE_LOG.md, stop 39)."""
    for r in range(logits.shape[0]):
        if not np.isfinite(logits[r, ids[r]]):
            return False
    for r in range(logits.shape[0]):
        row = logits[r]
        m = row[ids[r]]
        s = np.float32(0.0)
        for i in range(row.shape[0]):
            s += exp_nonpos(row[i] - m)
        out[r] = -np.log(s)
    return True
