"""Host feature detection and the per-element decoders of 16-bit storages for the CPU
kernels. Numba has no float16/bfloat16 arithmetic on CPU, so pools of either hold uint16
bits; both storages share one compiled kernel (compiling a variant per storage doubled
the cold warm-up) and a runtime flag `bf16` picks the decoder: `dec(h, bf16)` is a
16-bit shift for bfloat16, one vcvtph2ps (LLVM's fpext half) for float16 where the CPU
has F16C, else a branch-light manual decode. Also whether the vector tiles may take a
pool (`vector_ok`) and whether the host reports avx512_bf16.
"""

import numba
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from .softmax import u32_as_f32 as _u32_as_f32
from .storage import widen

# No nnan/ninf: the running max starts at -inf and empty rows yield lse = -inf.
FASTMATH = {"reassoc", "contract", "arcp", "nsz", "afn"}
_JIT = dict(nogil=True, cache=True, error_model="numpy", fastmath=FASTMATH)


@intrinsic
def half_bits_to_f32(typingctx, h):
    """IEEE half bits (a 16-bit integer) to float32 via LLVM's fpext half: one
    vcvtph2ps per 16 lanes on CPUs with F16C."""
    if not isinstance(h, types.Integer) or h.bitwidth != 16:
        return None
    sig = types.float32(h)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


def _host_has_f16c():
    # Only when compiling for this host: for a generic target LLVM would lower fpext
    # half to a runtime call that may not resolve.
    from llvmlite import binding

    if numba.config.CPU_NAME or numba.config.CPU_FEATURES:
        return "+f16c" in (numba.config.CPU_FEATURES or "")
    try:
        return bool(binding.get_host_cpu_features().get("f16c", False))
    except RuntimeError:
        return False


F16C = _host_has_f16c()


def _host_has(feature):
    from llvmlite import binding

    try:
        return bool(binding.get_host_cpu_features().get(feature, False))
    except RuntimeError:
        return False


# Whether this CPU reports avx512_bf16 (vdpbf16ps). Where it does (and Numba compiles for
# it), bfloat16 pools' QK runs on bfloat16 dot products (simd.vdpbf16, tiles.py); elsewhere
# (e.g. the Intel VMs whose hypervisor hides it) bfloat16 is widened to float32 in the
# vector load (a shift) and computed with float32 FMAs. Reported by tools/bench_kernels.py.
HOST_AVX512_BF16 = _host_has("avx512bf16")


@njit(inline="always", **_JIT)
def bf16_to_f32(h):
    # Works for uint16 and int16 bits alike: the shift drops any sign extension.
    return _u32_as_f32(np.uint32(h) << np.uint32(16))


@njit(inline="always", **_JIT)
def f16_to_f32(h):
    # Manual IEEE half decode, for CPUs without F16C; written branch-light so LLVM
    # turns it into selects and the loops still vectorise.
    a = np.uint32(h) & np.uint32(0x7FFF)
    normal = _u32_as_f32((a << np.uint32(13)) + np.uint32(0x38000000))  # rebias 15 -> 127
    special = _u32_as_f32((a << np.uint32(13)) | np.uint32(0x7F800000))  # inf / nan
    subnormal = np.float32(a) * np.float32(5.9604644775390625e-08)  # a * 2**-24
    f = normal if a >= np.uint32(0x0400) else subnormal
    f = special if a >= np.uint32(0x7C00) else f
    return -f if (np.uint32(h) & np.uint32(0x8000)) != 0 else f


def vector_ok(pool, bf16):
    """Whether the vector tiles can decode this pool's storage (host version)."""
    return pool.dtype != np.uint16 or bf16 or F16C


@overload(vector_ok, jit_options=_JIT)
def _ov_vector_ok(pool, bf16):
    # float16 is widened by LLVM's fpext half: one instruction with F16C, else a
    # runtime call that the JIT may not resolve; such hosts keep the scalar decoder.
    if pool.dtype != types.uint16 or F16C:
        return lambda pool, bf16: True
    return lambda pool, bf16: bf16


def dec(h, bf16):
    """float32 value of one stored element (uint16 bits: bfloat16 if bf16, else
    float16). Jitted code gets the overload below; this host version is the same
    mapping, for checks."""
    if isinstance(h, np.uint16):
        return widen(np.array([h], np.uint16), "bfloat16" if bf16 else "float16")[0]
    return np.float32(h)


@overload(dec, jit_options=_JIT)
def _ov_dec(h, bf16):
    # float32 as is; both 16-bit storages are uint16 bits and share one compiled
    # kernel, told apart by the runtime flag (a select, or a loop LLVM unswitches).
    if h == types.float32:
        return lambda h, bf16: h
    if h == types.uint16:
        if F16C:
            return lambda h, bf16: bf16_to_f32(h) if bf16 else half_bits_to_f32(h)
        return lambda h, bf16: bf16_to_f32(h) if bf16 else f16_to_f32(h)
    return None


def scaled_row(dst, r, src, t, h, scale, bf16):
    """dst[r, :] = float32 value of src[t, h, :] * scale (jitted code only)."""


@overload(scaled_row, jit_options=_JIT)
def _ov_scaled_row(dst, r, src, t, h, scale, bf16):
    # The storage branch is taken once per row, not per element: a per-element decode
    # that chooses between bfloat16 and float16 does not vectorise.
    if src.dtype == types.float32:
        def impl(dst, r, src, t, h, scale, bf16):
            for x in range(dst.shape[1]):
                dst[r, x] = src[t, h, x] * scale
        return impl
    half = half_bits_to_f32 if F16C else f16_to_f32

    def impl16(dst, r, src, t, h, scale, bf16):
        if bf16:
            for x in range(dst.shape[1]):
                dst[r, x] = bf16_to_f32(src[t, h, x]) * scale
        else:
            for x in range(dst.shape[1]):
                dst[r, x] = half(src[t, h, x]) * scale
    return impl16
