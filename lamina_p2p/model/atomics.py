"""Atomic loads, stores and adds on int64 array elements, a spin-wait hint and the cycle counter,
as Numba intrinsics (LLVM's atomic instructions; Numba has none of its own).

A spinning loop of plain loads may be hoisted by LLVM (the value "cannot change" inside a loop
that writes nothing), so every word two threads share is read with `load_acquire` or
`load_seq_cst`. `store_seq_cst` and `fetch_add` are sequentially consistent: the spin pool's
two Dekker-style hand-offs (close an op / count active workers; park / post) need a store and
a later load of another word not to be reordered, which acquire/release alone allows.
"""

from __future__ import annotations

import platform

from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

_I64 = ir.IntType(64)
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def _slot(context, builder, arrty, arr, idx):
    ary = context.make_array(arrty)(context, builder, arr)
    return builder.gep(ary.data, [idx])


def _is_int64_slot(arr, idx) -> bool:
    return isinstance(arr, types.Array) and arr.dtype == types.int64 and isinstance(idx, types.Integer)


@intrinsic
def load_acquire(typingctx, arr, idx):
    """arr[idx] (int64) with acquire ordering."""
    if not _is_int64_slot(arr, idx):
        return None

    def codegen(context, builder, sig, args):
        return builder.load_atomic(_slot(context, builder, sig.args[0], args[0], args[1]), "acquire", 8)

    return types.int64(arr, idx), codegen


@intrinsic
def load_seq_cst(typingctx, arr, idx):
    """arr[idx] (int64), sequentially consistent."""
    if not _is_int64_slot(arr, idx):
        return None

    def codegen(context, builder, sig, args):
        return builder.load_atomic(_slot(context, builder, sig.args[0], args[0], args[1]), "seq_cst", 8)

    return types.int64(arr, idx), codegen


@intrinsic
def store_seq_cst(typingctx, arr, idx, value):
    """arr[idx] = value (int64), sequentially consistent."""
    if not _is_int64_slot(arr, idx) or not isinstance(value, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = context.cast(builder, args[2], sig.args[2], types.int64)
        builder.store_atomic(v, _slot(context, builder, sig.args[0], args[0], args[1]), "seq_cst", 8)
        return context.get_dummy_value()

    return types.void(arr, idx, value), codegen


@intrinsic
def fetch_add(typingctx, arr, idx, value):
    """old = arr[idx]; arr[idx] += value, atomically (int64, sequentially consistent); returns old."""
    if not _is_int64_slot(arr, idx) or not isinstance(value, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = context.cast(builder, args[2], sig.args[2], types.int64)
        return builder.atomic_rmw("add", _slot(context, builder, sig.args[0], args[0], args[1]), v, "seq_cst")

    return types.int64(arr, idx, value), codegen


@intrinsic
def compare_exchange(typingctx, arr, idx, expected, new):
    """If arr[idx] == expected, set it to new; True when it did (int64, sequentially consistent)."""
    if not _is_int64_slot(arr, idx):
        return None

    def codegen(context, builder, sig, args):
        e = context.cast(builder, args[2], sig.args[2], types.int64)
        n = context.cast(builder, args[3], sig.args[3], types.int64)
        pair = builder.cmpxchg(_slot(context, builder, sig.args[0], args[0], args[1]), e, n, "seq_cst", "seq_cst")
        return builder.extract_value(pair, 1)

    return types.boolean(arr, idx, expected, new), codegen


@intrinsic
def spin_pause(typingctx):
    """The x86 `pause` hint (or nothing elsewhere): a spin loop yields the core's pipeline to its sibling."""

    def codegen(context, builder, sig, args):
        if _X86:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                "llvm.x86.sse2.pause")
            builder.call(fn, [])
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def cycles(typingctx):
    """The CPU's cycle counter (rdtsc on x86: a constant rate, see SpinPool's calibration)."""

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I64, []), "llvm.readcyclecounter")
        return builder.call(fn, [])

    return types.int64(), codegen


@intrinsic
def sched_yield(typingctx):
    """POSIX sched_yield(): let another runnable thread have this CPU (a spinning thread whose
    partner was preempted onto the same CPU would otherwise wait out a whole time slice).
    Called by symbol name, so cached code stays valid in another process."""

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []), "sched_yield")
        builder.call(fn, [])
        return context.get_dummy_value()

    return types.void(), codegen
