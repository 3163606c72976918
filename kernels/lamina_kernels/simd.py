"""Explicit 16-lane float32 vectors for the CPU kernels (a Numba type and intrinsics).

LLVM's loop vectoriser does not find the register blocking the attention tiles need
(16 dot products kept unreduced in registers, one transposed reduction per 16 keys),
so the tile loops are written with an explicit vector type: `F32x16` is LLVM's
`<16 x float>`, held in SSA registers like any scalar local. On AVX-512 it is one zmm
register; on AVX2 LLVM splits it in two ymm, so the code stays portable.

Loads take an array and a flat element index (C order) and do no bounds checks: the
kernels validate every block they touch before the call. Storage decoding happens
in the load: float32 as is, bfloat16 bits (int16 arrays) by a 16-bit shift, float16
bits (uint16 arrays) by LLVM's `fpext half` (vcvtph2ps with F16C).
"""

import ctypes

from llvmlite import binding, ir
from numba.core import cgutils, types
from numba.core.datamodel import models, register_default
from numba.extending import intrinsic

LANES = 16
_F = ir.FloatType()
_V = ir.VectorType(_F, LANES)
_I32 = ir.IntType(32)
_FM = ("reassoc", "contract", "nsz", "arcp", "afn")


class F32x16Type(types.Type):
    """16 float32 lanes in one LLVM vector value."""

    def __init__(self):
        super().__init__(name="F32x16")


f32x16 = F32x16Type()


@register_default(F32x16Type)
class _F32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V)


def _fn(builder, name, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def _elem_ptr(context, builder, arrty, arr, idx):
    ary = context.make_array(arrty)(context, builder, arr)
    return builder.gep(ary.data, [idx])


def _decode(builder, raw, dtype):
    """Widen a loaded <16 x storage> vector to <16 x float>."""
    if dtype == types.float32:
        return raw
    if dtype == types.int16:  # bfloat16 bits
        wide = builder.zext(raw, ir.VectorType(_I32, LANES))
        return builder.bitcast(builder.shl(wide, ir.Constant(ir.VectorType(_I32, LANES), [16] * LANES)), _V)
    # uint16: IEEE half bits
    half = builder.bitcast(raw, ir.VectorType(ir.HalfType(), LANES))
    return builder.fpext(half, _V)


_STORAGE_TYPES = (types.float32, types.int16, types.uint16)


@intrinsic
def vload(typingctx, arr, idx):
    """16 consecutive elements of a C-contiguous array from flat index idx, as float32."""
    if not isinstance(arr, types.Array) or arr.dtype not in _STORAGE_TYPES:
        return None
    sig = f32x16(arr, types.intp)
    width = arr.dtype.bitwidth

    def codegen(context, builder, signature, args):
        ptr = _elem_ptr(context, builder, signature.args[0], args[0], args[1])
        vty = _V if width == 32 else ir.VectorType(ir.IntType(16), LANES)
        raw = builder.load(builder.bitcast(ptr, vty.as_pointer()), align=width // 8)
        return _decode(builder, raw, signature.args[0].dtype)

    return sig, codegen


@intrinsic
def vload16(typingctx, arr, idx, bf16):
    """16 consecutive elements of a uint16 array from flat index idx as float32: bfloat16
    bits when bf16, else float16. Branch-free (both decodes and a select, 2 extra
    µops per 16 elements): a branch on bf16 in the block loop cost ~2.6 ns per key
    and kv head at G3 D64 (the loop LLVM made of it was slower than the select)."""
    if not isinstance(arr, types.Array) or arr.dtype != types.uint16:
        return None
    sig = f32x16(arr, types.intp, types.boolean)

    def codegen(context, builder, signature, args):
        ptr = _elem_ptr(context, builder, signature.args[0], args[0], args[1])
        vty = ir.VectorType(ir.IntType(16), LANES)
        raw = builder.load(builder.bitcast(ptr, vty.as_pointer()), align=2)
        return builder.select(args[2], _decode(builder, raw, types.int16),
                              _decode(builder, raw, types.uint16))

    return sig, codegen


@intrinsic
def vstore(typingctx, arr, idx, v):
    """arr.flat[idx:idx+16] = v for a C-contiguous float32 array."""
    if not isinstance(arr, types.Array) or arr.dtype != types.float32 or v != f32x16:
        return None
    sig = types.void(arr, types.intp, f32x16)

    def codegen(context, builder, signature, args):
        ptr = _elem_ptr(context, builder, signature.args[0], args[0], args[1])
        builder.store(args[2], builder.bitcast(ptr, _V.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def vzero(typingctx):
    """A vector of zeros."""
    sig = f32x16()

    def codegen(context, builder, signature, args):
        return ir.Constant(_V, [0.0] * LANES)

    return sig, codegen


def _splat(builder, x):
    undef = ir.Constant(_V, ir.Undefined)
    one = builder.insert_element(undef, x, _I32(0))
    return builder.shuffle_vector(one, undef, ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES))


@intrinsic
def vsplat(typingctx, x):
    """Every lane = the float32 scalar x."""
    sig = f32x16(types.float32)

    def codegen(context, builder, signature, args):
        return _splat(builder, args[0])

    return sig, codegen


@intrinsic
def vfma(typingctx, a, b, c):
    """a * b + c lane by lane (one fused multiply-add); b may be a float32 scalar (broadcast)."""
    if a != f32x16 or c != f32x16 or b not in (f32x16, types.float32):
        return None
    sig = f32x16(a, b, c)

    def codegen(context, builder, signature, args):
        x, y, z = args
        if signature.args[1] == types.float32:
            y = _splat(builder, y)
        fma = _fn(builder, "llvm.fma.v16f32", _V, [_V, _V, _V])
        return builder.call(fma, [x, y, z])

    return sig, codegen


@intrinsic
def vmul(typingctx, a, b):
    """a * b lane by lane; b may be a float32 scalar (broadcast)."""
    if a != f32x16 or b not in (f32x16, types.float32):
        return None
    sig = f32x16(a, b)

    def codegen(context, builder, signature, args):
        x, y = args
        if signature.args[1] == types.float32:
            y = _splat(builder, y)
        return builder.fmul(x, y, flags=_FM)

    return sig, codegen


@intrinsic
def vadd(typingctx, a, b):
    """a + b lane by lane."""
    if a != f32x16 or b != f32x16:
        return None
    sig = f32x16(a, b)

    def codegen(context, builder, signature, args):
        return builder.fadd(args[0], args[1], flags=_FM)

    return sig, codegen


@intrinsic
def vhsum(typingctx, v):
    """Sum of the 16 lanes (a float32 scalar)."""
    if v != f32x16:
        return None
    sig = types.float32(f32x16)

    def codegen(context, builder, signature, args):
        red = _fn(builder, "llvm.vector.reduce.fadd.v16f32", _F, [_F, _V])
        return builder.call(red, [ir.Constant(_F, -0.0), args[0]], fastmath=_FM)

    return sig, codegen


def _half_sums(builder, a, b, width):
    """Given two vectors whose lanes hold partial sums for `LANES // width` keys in
    blocks of `width` lanes, fold each block in half: the result holds a's and b's
    keys side by side, each over width/2 lanes."""
    h = width // 2
    lo, hi = [], []
    for blk in range(LANES // width):
        base = blk * width
        # a's lower half and b's lower half of this block, then the upper halves.
        lo += [base + j for j in range(h)] + [LANES + base + j for j in range(h)]
        hi += [base + h + j for j in range(h)] + [LANES + base + h + j for j in range(h)]
    mask = lambda m: ir.Constant(ir.VectorType(_I32, LANES), m)  # noqa: E731
    x = builder.shuffle_vector(a, b, mask(lo))
    y = builder.shuffle_vector(a, b, mask(hi))
    return builder.fadd(x, y, flags=_FM)


@intrinsic
def vsum16(typingctx, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15):
    """Lane t of the result = the sum of the 16 lanes of a_t (a transposed reduction:
    15 shuffle pairs and adds for 16 dot products, instead of 16 horizontal sums)."""
    args_t = (a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15)
    if any(a != f32x16 for a in args_t):
        return None
    sig = f32x16(*args_t)

    def codegen(context, builder, signature, args):
        # Pairing halves lanes level by level and leaves key t in lane bitrev4(t);
        # feeding the inputs in bit-reversed order puts key t in lane t.
        vs = [args[int(f"{i:04b}"[::-1], 2)] for i in range(LANES)]
        width = LANES
        # Level by level: pair vectors, halving the lanes each key occupies.
        while len(vs) > 1:
            vs = [_half_sums(builder, vs[i], vs[i + 1], width) for i in range(0, len(vs), 2)]
            width //= 2
        return vs[0]

    return sig, codegen


@intrinsic
def vsub(typingctx, a, b):
    """a - b lane by lane; b may be a float32 scalar (broadcast)."""
    if a != f32x16 or b not in (f32x16, types.float32):
        return None
    sig = f32x16(a, b)

    def codegen(context, builder, signature, args):
        x, y = args
        if signature.args[1] == types.float32:
            y = _splat(builder, y)
        return builder.fsub(x, y, flags=_FM)

    return sig, codegen


@intrinsic
def vhmax(typingctx, v):
    """Largest of the 16 lanes (a float32 scalar; -inf lanes are ordinary values)."""
    if v != f32x16:
        return None
    sig = types.float32(f32x16)

    def codegen(context, builder, signature, args):
        red = _fn(builder, "llvm.vector.reduce.fmax.v16f32", _F, [_V])
        return builder.call(red, [args[0]])

    return sig, codegen


@intrinsic
def vany_gt(typingctx, v, x):
    """Whether any of the 16 lanes exceeds the scalar x (a compare into a mask register
    and one test: cheaper than the horizontal max it lets the softmax skip)."""
    if v != f32x16 or x != types.float32:
        return None
    sig = types.boolean(f32x16, types.float32)

    def codegen(context, builder, signature, args):
        gt = builder.fcmp_ordered(">", args[0], _splat(builder, args[1]))
        bits = builder.bitcast(gt, ir.IntType(LANES))
        return builder.icmp_unsigned("!=", bits, ir.Constant(ir.IntType(LANES), 0))

    return sig, codegen


@intrinsic
def vexp_nonpos(typingctx, v):
    """exp(x) lane by lane for x <= 0 (scores minus their running max), ~1 ulp.

    The same Cody-Waite reduction and degree-7 polynomial as exp_nonpos, in
    vector registers (LLVM's llvm.exp would be 16 scalar expf calls without SVML).
    Lanes below -87 give ~1e-38 instead of a denormal (or 0); -inf gives the same.
    """
    if v != f32x16:
        return None
    sig = f32x16(f32x16)

    def codegen(context, builder, signature, args):
        def c(x):
            return ir.Constant(_V, [float(x)] * LANES)

        vi = ir.VectorType(_I32, LANES)
        fma = _fn(builder, "llvm.fma.v16f32", _V, [_V, _V, _V])
        floor = _fn(builder, "llvm.floor.v16f32", _V, [_V])
        vmax = _fn(builder, "llvm.maxnum.v16f32", _V, [_V, _V])
        x = builder.call(vmax, [args[0], c(-87.0)])
        n = builder.call(floor, [builder.call(fma, [x, c(1.4426950408889634), c(0.5)])])
        r = builder.call(fma, [n, c(-0.693145751953125), x])
        r = builder.call(fma, [n, c(-1.428606765330187e-06), r])
        p = c(1.0 / 5040.0)
        for k in (1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0):
            p = builder.call(fma, [p, r, c(k)])
        e = builder.shl(builder.add(builder.fptosi(n, vi), ir.Constant(vi, [127] * LANES)),
                        ir.Constant(vi, [23] * LANES))
        return builder.fmul(p, builder.bitcast(e, _V))

    return sig, codegen


@intrinsic
def vstore8(typingctx, arr, idx, v, upper):
    """arr.flat[idx:idx+8] = lanes 0-7 of v (upper False) or lanes 8-15 (upper True)."""
    if not isinstance(arr, types.Array) or arr.dtype != types.float32 or v != f32x16:
        return None
    if not isinstance(upper, types.BooleanLiteral):
        return None
    sig = types.void(arr, types.intp, f32x16, upper)
    base = 8 if upper.literal_value else 0

    def codegen(context, builder, signature, args):
        ptr = _elem_ptr(context, builder, signature.args[0], args[0], args[1])
        v8 = ir.VectorType(_F, 8)
        half = builder.shuffle_vector(args[2], ir.Constant(_V, ir.Undefined),
                                      ir.Constant(ir.VectorType(_I32, 8), list(range(base, base + 8))))
        builder.store(half, builder.bitcast(ptr, v8.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def vstore4(typingctx, arr, idx, v, quarter):
    """arr.flat[idx:idx+4] = lanes 4 quarter .. 4 quarter + 3 of v (quarter a literal 0-3)."""
    if not isinstance(arr, types.Array) or arr.dtype != types.float32 or v != f32x16:
        return None
    if not isinstance(quarter, types.IntegerLiteral) or not 0 <= quarter.literal_value < 4:
        return None
    sig = types.void(arr, types.intp, f32x16, quarter)
    base = 4 * quarter.literal_value

    def codegen(context, builder, signature, args):
        ptr = _elem_ptr(context, builder, signature.args[0], args[0], args[1])
        v4 = ir.VectorType(_F, 4)
        part = builder.shuffle_vector(args[2], ir.Constant(_V, ir.Undefined),
                                      ir.Constant(ir.VectorType(_I32, 4), list(range(base, base + 4))))
        builder.store(part, builder.bitcast(ptr, v4.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


def _prefetch_codegen(locality):
    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
            "llvm.prefetch.p0")
        ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), i8p)
        builder.call(fn, [ptr, i32(0), i32(locality), i32(1)])
        return context.get_dummy_value()

    return codegen


@intrinsic
def prefetch(typingctx, arr, idx):
    """llvm.prefetch (read, into L2: locality 1) of the element at flat index idx of a C-contiguous array."""
    return types.void(arr, types.intp), _prefetch_codegen(1)


@intrinsic
def prefetch_nta(typingctx, arr, idx):
    """llvm.prefetch (read, non-temporal: locality 0, prefetchnta) of the element at flat index idx."""
    return types.void(arr, types.intp), _prefetch_codegen(0)


# Key-quad layout (tiles.py, large GQA groups): a staged 16-key tile is stored as 4 quads
# of 4 keys (vquad); vector j of quad q holds K[4q + kk, 4j + e] in lane 4 kk + e. A query
# row's 4 dims [4j, 4j + 4) broadcast to all four 128-bit lanes (vbcast4) multiply it, so
# the 16 lanes of one accumulator are 4 keys x 4 dims: folding 16 dot products into 16
# scores then takes 6 shuffles and 3 adds (vsum4x4) instead of 30 and 15 (vsum16).


@intrinsic
def vbcast4(typingctx, arr, idx):
    """arr.flat[idx:idx+4] (float32) repeated in all four 128-bit lanes (one
    vbroadcastf32x4 from memory: a load, no shuffle port)."""
    if not isinstance(arr, types.Array) or arr.dtype != types.float32:
        return None
    sig = f32x16(arr, types.intp)

    def codegen(context, builder, signature, args):
        ptr = _elem_ptr(context, builder, signature.args[0], args[0], args[1])
        v4 = ir.VectorType(_F, 4)
        raw = builder.load(builder.bitcast(ptr, v4.as_pointer()), align=4)
        return builder.shuffle_vector(raw, ir.Constant(v4, ir.Undefined),
                                      ir.Constant(ir.VectorType(_I32, LANES), [0, 1, 2, 3] * 4))

    return sig, codegen


@intrinsic
def vsum4x4(typingctx, a0, a1, a2, a3):
    """Lane 4 q + kk of the result = the sum of lanes 4 kk .. 4 kk + 3 of a_q: the scores
    of a key-quad tile's 16 keys (see vbcast4) from its four accumulators."""
    if any(a != f32x16 for a in (a0, a1, a2, a3)):
        return None
    sig = f32x16(a0, a1, a2, a3)

    def codegen(context, builder, signature, args):
        mask = lambda m: ir.Constant(ir.VectorType(_I32, LANES), m)  # noqa: E731
        # Level 1, (a, b) -> lane 8 ql + 2 kk + e' = a_ql[4 kk + e'] + a_ql[4 kk + e' + 2].
        lo = [ql * 16 + kk * 4 + e for ql in range(2) for kk in range(4) for e in range(2)]
        hi = [i + 2 for i in lo]

        def level1(a, b):
            return builder.fadd(builder.shuffle_vector(a, b, mask(lo)),
                                builder.shuffle_vector(a, b, mask(hi)), flags=_FM)

        v01 = level1(args[0], args[1])
        v23 = level1(args[2], args[3])
        # Level 2 -> lane 4 q + kk = the two e' of quad q (q // 2 picks v01 or v23).
        lo2 = [(q // 2) * 16 + (q % 2) * 8 + kk * 2 for q in range(4) for kk in range(4)]
        hi2 = [i + 1 for i in lo2]
        return builder.fadd(builder.shuffle_vector(v01, v23, mask(lo2)),
                            builder.shuffle_vector(v01, v23, mask(hi2)), flags=_FM)

    return sig, codegen


@intrinsic
def vquad(typingctx, r0, r1, r2, r3, i):
    """[r0, r1, r2, r3]'s 128-bit lane i side by side (i a literal 0-3): four calls with
    i = 0..3 transpose the 4 x 4 blocks of four key rows into key-quad vectors (see
    vbcast4). Two levels of block shuffles; the four calls share the first level
    (identical shuffles, merged by LLVM): 8 shuffles per 4 vectors."""
    if any(a != f32x16 for a in (r0, r1, r2, r3)):
        return None
    if not isinstance(i, types.IntegerLiteral) or not 0 <= i.literal_value < 4:
        return None
    sig = f32x16(r0, r1, r2, r3, i)
    blk = i.literal_value

    def codegen(context, builder, signature, args):
        def mask(blocks):  # 128-bit blocks of the 32-lane concatenation
            return ir.Constant(ir.VectorType(_I32, LANES), [4 * b + e for b in blocks for e in range(4)])

        half = [0, 1, 4, 5] if blk < 2 else [2, 3, 6, 7]  # blocks (blk & ~1, | 1) of a, then of b
        x01 = builder.shuffle_vector(args[0], args[1], mask(half))
        x23 = builder.shuffle_vector(args[2], args[3], mask(half))
        pick = [0, 2, 4, 6] if blk % 2 == 0 else [1, 3, 5, 7]
        return builder.shuffle_vector(x01, x23, mask(pick))

    return sig, codegen


# Even/odd bfloat16 widening (tiles.py, 16-bit pools staged in the specialised bodies): a
# bfloat16 is the upper half of a float32, so of 32 bfloat16 loaded as 16 32-bit words the
# even elements are `word << 16` and the odd ones `word & 0xFFFF0000`: one integer op per
# 16 lanes, where the in-order widening (vpmovzxwd + shift) costs a shuffle-port µop and
# a shift. The 32 dims then come out as [the 16 even, the 16 odd]; query rows are put in
# the same order once per call (veo) and the accumulators back in dim order (vinterleave).


@intrinsic
def vload_raw(typingctx, arr, idx):
    """The 64 bytes at flat index idx of a uint16 array (32 elements), bits unchanged, as
    the 16 lanes of an f32x16: raw bfloat16 pairs for the block shuffles (vquad) before
    widening (vbf16_eo). Also takes a float32 array (16 elements): the tiles' code for
    both pool types; and int16 (bfloat16 bits as the dense layer holds them)."""
    if not isinstance(arr, types.Array) or arr.dtype not in (types.uint16, types.int16, types.float32):
        return None
    sig = f32x16(arr, types.intp)

    def codegen(context, builder, signature, args):
        ptr = _elem_ptr(context, builder, signature.args[0], args[0], args[1])
        return builder.load(builder.bitcast(ptr, _V.as_pointer()), align=2)

    return sig, codegen


@intrinsic
def vbf16_eo(typingctx, v, odd):
    """Of 32 bfloat16 held in the 16 lanes of v (vload_raw), each lane's low (odd False)
    or high (odd True, a literal) bfloat16 as float32: vload_bf16_eo after the load."""
    if v != f32x16 or not isinstance(odd, types.BooleanLiteral):
        return None
    sig = f32x16(v, odd)
    is_odd = odd.literal_value

    def codegen(context, builder, signature, args):
        return _bf16_half(builder, builder.bitcast(args[0], ir.VectorType(_I32, LANES)), is_odd)

    return sig, codegen


def _bf16_half(builder, words, odd: bool):
    """Each 32-bit lane's high (odd) or low bfloat16 as float32: the lane masked, or shifted up 16 bits."""
    vi = ir.VectorType(_I32, LANES)
    if odd:
        bits = builder.and_(words, ir.Constant(vi, [-65536] * LANES))
    else:
        bits = builder.shl(words, ir.Constant(vi, [16] * LANES))
    return builder.bitcast(bits, _V)


@intrinsic
def vload_bf16_eo(typingctx, arr, idx, odd):
    """Of the 32 bfloat16 values (uint16 bits) at flat index idx, those at even offsets
    (odd False) or odd offsets (odd True, a literal) as float32, in order. Also takes a
    float32 array (two loads and a vpermt2ps): the tiles' code for both pools types."""
    if not isinstance(arr, types.Array) or arr.dtype not in (types.uint16, types.float32):
        return None
    if not isinstance(odd, types.BooleanLiteral):
        return None
    sig = f32x16(arr, types.intp, odd)
    is_odd = odd.literal_value
    f32 = arr.dtype == types.float32

    def codegen(context, builder, signature, args):
        ptr = _elem_ptr(context, builder, signature.args[0], args[0], args[1])
        if f32:
            vp = builder.bitcast(ptr, _V.as_pointer())
            a = builder.load(vp, align=4)
            b = builder.load(builder.gep(vp, [_I32(1)]), align=4)
            mask = ir.Constant(ir.VectorType(_I32, LANES), list(range(int(is_odd), 2 * LANES, 2)))
            return builder.shuffle_vector(a, b, mask)
        words = builder.load(builder.bitcast(ptr, ir.VectorType(_I32, LANES).as_pointer()), align=2)
        return _bf16_half(builder, words, is_odd)

    return sig, codegen


@intrinsic
def vload_bf16(typingctx, arr, idx):
    """16 bfloat16 values (uint16 bits) from flat index idx as float32, in order (a
    float32 array: as they are)."""
    if not isinstance(arr, types.Array) or arr.dtype not in (types.uint16, types.float32):
        return None
    sig = f32x16(arr, types.intp)
    f32 = arr.dtype == types.float32

    def codegen(context, builder, signature, args):
        ptr = _elem_ptr(context, builder, signature.args[0], args[0], args[1])
        if f32:
            return builder.load(builder.bitcast(ptr, _V.as_pointer()), align=4)
        vty = ir.VectorType(ir.IntType(16), LANES)
        raw = builder.load(builder.bitcast(ptr, vty.as_pointer()), align=2)
        return _decode(builder, raw, types.int16)

    return sig, codegen


@intrinsic
def veo(typingctx, a, b, odd):
    """The even (odd False) or odd (odd True, a literal) lanes of the 32-lane [a, b]:
    a row's 32 dims in the order vload_bf16_eo gives them (one vpermt2ps)."""
    if a != f32x16 or b != f32x16 or not isinstance(odd, types.BooleanLiteral):
        return None
    sig = f32x16(a, b, odd)
    first = 1 if odd.literal_value else 0

    def codegen(context, builder, signature, args):
        mask = ir.Constant(ir.VectorType(_I32, LANES), list(range(first, 2 * LANES, 2)))
        return builder.shuffle_vector(args[0], args[1], mask)

    return sig, codegen


@intrinsic
def vinterleave(typingctx, e, o, upper):
    """Lanes 0-7 (upper False) or 8-15 (upper True, a literal) of e and o interleaved
    (e0 o0 e1 o1 ...): the inverse of veo (one vpermt2ps)."""
    if e != f32x16 or o != f32x16 or not isinstance(upper, types.BooleanLiteral):
        return None
    sig = f32x16(e, o, upper)
    base = LANES // 2 if upper.literal_value else 0

    def codegen(context, builder, signature, args):
        idx = [j for i in range(base, base + LANES // 2) for j in (i, LANES + i)]
        return builder.shuffle_vector(args[0], args[1], ir.Constant(ir.VectorType(_I32, LANES), idx))

    return sig, codegen


# bfloat16 dot products (vdpbf16ps, AVX512_BF16). Lane i of the accumulator gains
# a[2i] b[2i] + a[2i+1] b[2i+1] of two vectors of 32 bfloat16 (raw pairs, as vload_raw
# and vbcast4 give them): the products are exact in float32 and the accumulation is
# float32, so a dot product of bfloat16 rows is what the float32 FMAs on widened rows
# compute, in another order, for half the instructions and without the widening.
#
# Whether the instruction may be emitted is a property of the compile target, not of a
# call: the codegen below emits it only when Numba compiles for a CPU with avx512_bf16
# (Numba's cache is keyed by the target CPU's name and features, so such code is never
# loaded on a CPU without them); for any other target it emits the same arithmetic with
# float32 FMAs, so the tiles compile, and run correctly, everywhere. Whether the tiles
# take the dot-product path at all is a runtime flag (dpbf16_enabled, set by
# set_dpbf16), chosen per process from the host's features: the float32 path stays the
# default elsewhere and the fallback everywhere.

_DP_SYMBOL = "lamina_kernels_dpbf16"
_DP_FLAG = ctypes.c_int64(0)
# Resolved by name when a function reading the flag is linked (compiled or loaded from
# the cache), as Numba resolves its own runtime symbols: the address is this process's.
binding.add_symbol(_DP_SYMBOL, ctypes.addressof(_DP_FLAG))


def _target_has(feature):
    """Whether Numba compiles for a CPU with `feature` (LLVM's name: "avx512bf16",
    "avx512f"): the host's CPU, unless NUMBA_CPU_NAME / NUMBA_CPU_FEATURES choose another
    target (then only a feature listed in NUMBA_CPU_FEATURES counts)."""
    from numba.core import config

    if config.CPU_NAME or config.CPU_FEATURES:
        return f"+{feature}" in (config.CPU_FEATURES or "")
    try:
        return bool(binding.get_host_cpu_features().get(feature, False))
    except RuntimeError:
        return False


TARGET_BF16 = _target_has("avx512bf16")
# 32 vector registers of 16 float32 lanes. Without them (AVX2: 16 registers of 8 lanes, a
# vector here is two) the tiles' 16-accumulator passes spill, and tiles.py leaves out the
# variants that only paid with room to spare (key quads, a padded fourth row, even/odd bf16).
TARGET_AVX512 = _target_has("avx512f")


def dpbf16_default(host_features=None):
    """Whether the dot-product path is on by default: only where the host reports
    avx512_bf16 (host_features: a dict like llvmlite's get_host_cpu_features(); None:
    this host's) and Numba's target has it (else the path would run on FMAs, slower
    than the float32 tiles)."""
    if host_features is None:
        try:
            host_features = binding.get_host_cpu_features()
        except RuntimeError:
            host_features = {}
    return bool(host_features.get("avx512bf16", False)) and TARGET_BF16


def set_dpbf16(on):
    """Turn the tiles' bfloat16 dot-product path on or off for this process (from the
    next call on); returns the previous setting. On a target without avx512_bf16 the
    path runs on float32 FMAs (same results up to summation order, slower): callers
    turn it on only where TARGET_BF16 (see cpu.py)."""
    old = bool(_DP_FLAG.value)
    _DP_FLAG.value = 1 if on else 0
    return old


def dpbf16_enabled_now():
    """The flag as the next call will read it (host version of dpbf16_enabled)."""
    return bool(_DP_FLAG.value)


@intrinsic
def dpbf16_enabled(typingctx):
    """The process's dot-product flag (set_dpbf16), read at run time."""
    sig = types.boolean()

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        gv = builder.module.globals.get(_DP_SYMBOL)
        if gv is None:
            gv = ir.GlobalVariable(builder.module, i64, _DP_SYMBOL)
            gv.linkage = "external"
        return builder.icmp_unsigned("!=", builder.load(gv), i64(0))

    return sig, codegen


set_dpbf16(dpbf16_default())


class _BF16(ir.Type):
    """LLVM's bfloat (llvmlite has no bfloat type; only its name is needed: values of it
    are never built here, only vectors of them bitcast from integer vectors)."""

    def _to_string(self):
        return "bfloat"

    def __eq__(self, other):
        return isinstance(other, _BF16)

    def __hash__(self):
        return hash("bfloat")


_VB = ir.VectorType(_BF16(), 2 * LANES)


def _dp_codegen(builder, acc, a, b):
    if TARGET_BF16:
        fn = _fn(builder, "llvm.x86.avx512bf16.dpbf16ps.512", _V, [_V, _VB, _VB])
        return builder.call(fn, [acc, builder.bitcast(a, _VB), builder.bitcast(b, _VB)])
    # The same arithmetic with float32 FMAs (odd pair element first, as the instruction;
    # bfloat16 products are exact, so fma and multiply-add agree).
    vi = ir.VectorType(_I32, LANES)
    ai, bi = builder.bitcast(a, vi), builder.bitcast(b, vi)
    fma = _fn(builder, "llvm.fma.v16f32", _V, [_V, _V, _V])
    acc = builder.call(fma, [_bf16_half(builder, ai, True), _bf16_half(builder, bi, True), acc])
    return builder.call(fma, [_bf16_half(builder, ai, False), _bf16_half(builder, bi, False), acc])


@intrinsic
def vdpbf16(typingctx, acc, a, b):
    """acc + the pairwise bfloat16 dot products of a and b (each 32 bfloat16 held as the
    16 lanes of an f32x16: vload_raw, vbcast4 on raw rows): lane i += a[2i] b[2i] +
    a[2i+1] b[2i+1], exact products, float32 accumulation (one vdpbf16ps)."""
    if acc != f32x16 or a != f32x16 or b != f32x16:
        return None
    sig = f32x16(acc, a, b)

    def codegen(context, builder, signature, args):
        return _dp_codegen(builder, args[0], args[1], args[2])

    return sig, codegen


@intrinsic
def vbcast_raw32(typingctx, arr, idx):
    """The 32 bits at flat index idx of an int32 array (two bfloat16: a pair) in every lane of an
    f32x16, bits unchanged: vdpbf16's broadcast operand (one pair against 16 columns' pairs)."""
    if not isinstance(arr, types.Array) or arr.dtype != types.int32:
        return None
    sig = f32x16(arr, types.intp)

    def codegen(context, builder, signature, args):
        x = builder.load(_elem_ptr(context, builder, signature.args[0], args[0], args[1]), align=4)
        vi = ir.VectorType(_I32, LANES)
        v = builder.insert_element(ir.Constant(vi, ir.Undefined), x, ir.Constant(_I32, 0))
        v = builder.shuffle_vector(v, ir.Constant(vi, ir.Undefined), ir.Constant(vi, [0] * LANES))
        return builder.bitcast(v, _V)

    return sig, codegen
