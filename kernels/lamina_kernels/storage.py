"""KV storage encodings: float32 as is, float16 and bfloat16 as raw uint16 bits.

Numba on CPU has no 16-bit float arithmetic, so 16-bit pools and tensors travel as
np.uint16 bit patterns and are widened to float32 inside the kernels. These numpy
helpers are the host-side encode/decode used by callers, tests and benchmarks; the
kernels carry their own (jitted) decoders.
"""

import numpy as np

STORAGES = ("float32", "float16", "bfloat16")

# Integer codes passed into the jitted kernels (a runtime argument is cheaper to
# dispatch on than one compiled variant per storage for the two uint16 encodings).
CODE = {"float32": 0, "float16": 1, "bfloat16": 2}


def check_storage(storage: str) -> str:
    if storage not in CODE:
        raise ValueError(f"unknown storage {storage!r}; expected one of {STORAGES}")
    return storage


def storage_itemsize(storage: str) -> int:
    """Bytes per element in the pool for this storage kind."""
    return 4 if check_storage(storage) == "float32" else 2


def storage_dtype(storage: str) -> np.dtype:
    """The numpy dtype arrays of this storage kind are held in."""
    return np.dtype(np.float32) if check_storage(storage) == "float32" else np.dtype(np.uint16)


def to_storage(x_f32: np.ndarray, storage: str) -> np.ndarray:
    """Encode float32 values in the storage representation (a new C-contiguous array).

    bfloat16 rounds to nearest, ties to even, overflowing to inf; NaN stays a quiet
    NaN with its sign. float16 uses numpy's IEEE half conversion (also RNE, with
    subnormals).
    """
    x = np.ascontiguousarray(x_f32, dtype=np.float32)
    check_storage(storage)
    if storage == "float32":
        return x.copy()
    if storage == "float16":
        with np.errstate(over="ignore"):  # overflow to +-inf is the correct encoding
            return x.astype(np.float16).view(np.uint16)
    u = x.view(np.uint32)
    # Adding 0x7fff plus the lowest kept bit rounds ties to even; a carry out of
    # the mantissa bumps the exponent, which is exactly the right rounding.
    rounded = (u + (np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1)))) >> 16
    quiet_nan = (u >> 16) | np.uint32(0x0040)
    return np.where(np.isnan(x), quiet_nan, rounded).astype(np.uint16)


def widen(bits: np.ndarray, storage: str) -> np.ndarray:
    """Decode a storage-encoded array to float32 (a new array)."""
    check_storage(storage)
    if storage == "float32":
        return np.array(bits, dtype=np.float32)
    b = np.ascontiguousarray(bits)
    if b.dtype != np.uint16:
        raise TypeError(f"{storage} data must be held as uint16 bits, got {b.dtype}")
    if storage == "float16":
        return b.view(np.float16).astype(np.float32)
    return (b.astype(np.uint32) << np.uint32(16)).view(np.float32)
