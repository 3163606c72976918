"""Array addresses through int64 words, for work handed to another thread by address.

The engine's spin pool (lamina_p2p/model/spin_pool.py) posts its ops' arrays as int64
addresses in a control array, and pooled.py's record does the same for attention items;
the thread that runs a unit rebuilds each array with numba.carray. One definition for
both sides (kernels/ imports nothing of lamina_p2p).
"""

from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic


@intrinsic
def address(typingctx, arr):
    """The data pointer of an array as int64."""
    if not isinstance(arr, types.Array):
        return None

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        return builder.ptrtoint(ary.data, ir.IntType(64))

    return types.int64(arr), codegen


@intrinsic
def as_voidptr(typingctx, addr):
    """An int64 address as void* (for numba.carray)."""
    if not isinstance(addr, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], ir.IntType(8).as_pointer())

    return types.voidptr(addr), codegen
