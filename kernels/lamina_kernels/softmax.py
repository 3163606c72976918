"""Online softmax over one KV block's scores (shared by the scalar and vector tiles).

Scores are pre-scaled (q carries 1/sqrt(d)). The running max m starts at -inf, so
the fastmath flags leave out no-NaN/no-Inf; exp is a polynomial (exp_nonpos) because
llvmlite's LLVM has no vector exp without SVML.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from . import simd as S

FASTMATH = {"reassoc", "contract", "arcp", "nsz", "afn"}
_JIT = dict(nogil=True, cache=True, error_model="numpy", fastmath=FASTMATH)


@intrinsic
def u32_as_f32(typingctx, u):
    """Reinterpret the bits of a uint32 as float32 (no value conversion)."""
    if not isinstance(u, types.Integer):
        return None
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@njit(inline="always", **_JIT)
def exp_nonpos(x):
    """exp(x) for x <= 0 (scores minus their running max), vectorisable.

    llvmlite's LLVM here is not SVML-patched, so np.exp is a scalar expf call per
    element and the softmax loop cannot vectorise. Cody-Waite reduction to
    r in [-ln2/2, ln2/2] and a degree-7 Taylor polynomial: ~1 ulp. x is clamped at
    -87 (result ~1e-38 instead of a denormal or 0; callers only ever scale zeros by
    such a value).
    """
    x = max(x, np.float32(-87.0))
    n = np.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
    r = x - n * np.float32(0.693145751953125) - n * np.float32(1.428606765330187e-06)
    p = np.float32(1.0 / 5040.0)
    p = p * r + np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    return p * u32_as_f32(np.uint32(np.int32(n) + np.int32(127)) << np.uint32(23))


@njit(inline="always", **_JIT)
def softmax_block(s, n_rows, row_lim, base, t0, t1, m, l, acc):
    """Online-softmax update for keys [t0, t1) of one block: scores in s become
    probabilities (0 past each row's causal limit), m/l/acc are rescaled.

    Rows whose visible keys are whole 16-key chunks (every block but a causal
    diagonal or a tail) take the vector path: max, exp and sum 16 keys at a time.
    """
    d = acc.shape[1]
    sw = s.shape[1]
    for r in range(n_rows):
        te = max(min(t1, row_lim[r] - base), t0)  # causal limit of this row
        for t in range(te, t1):
            s[r, t] = 0.0  # masked keys get probability 0 in the PV pass
        if te == t0:
            continue
        mx = m[r]
        vec = (te - t0) % 16 == 0
        if vec:
            for t in range(t0, te, 16):
                mx = max(mx, S.vhmax(S.vload(s, r * sw + t)))
        else:
            for t in range(t0, te):
                mx = max(mx, s[r, t])
        # ~0 on the first block (m = -inf); once the max has settled it stops moving
        # and the scalar exp (a long dependency chain) is skipped.
        alpha = np.float32(1.0) if mx == m[r] else exp_nonpos(m[r] - mx)
        psum = np.float32(0.0)
        if vec:
            for t in range(t0, te, 16):
                pv = S.vexp_nonpos(S.vsub(S.vload(s, r * sw + t), mx))
                S.vstore(s, r * sw + t, pv)
                psum += S.vhsum(pv)
        else:
            for t in range(t0, te):
                p = exp_nonpos(s[r, t] - mx)
                s[r, t] = p
                psum += p
        l[r] = l[r] * alpha + psum
        m[r] = mx
        if alpha != 1.0:
            for x in range(d):
                acc[r, x] *= alpha
