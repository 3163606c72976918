"""The wire format: round trips, zero-copy, and hostile input that must only ever raise WireError."""
import tracemalloc

import msgpack
import numpy as np
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lamina_p2p.net.wire import (
    DEFAULT_LIMITS,
    DTYPES,
    PROTOCOL_VERSION,
    ZERO_COPY_THRESHOLD,
    Limits,
    WireError,
    decode,
    encode,
    encode_attend,
    encode_attend_reply,
)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NP_DTYPES = {tag: dt for tag, dt in DTYPES.items() if tag != "bf16"}
SHAPES = [(), (0,), (1,), (7,), (3, 4), (2, 0, 5), (2, 3, 4, 5)]


def _sample(dt: np.dtype, shape) -> np.ndarray:
    rng = np.random.default_rng(0)
    if dt.kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return rng.integers(info.min, info.max, size=shape, dtype=dt, endpoint=True)
    return rng.standard_normal(size=shape).astype(dt)


def _header(**over) -> bytes:
    h = {"v": PROTOCOL_VERSION, "op": "x", "id": 1, "t": [], "f": {}}
    h.update(over)
    return msgpack.packb(h)


@pytest.mark.parametrize("tag", sorted(NP_DTYPES))
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_numpy(tag, shape):
    a = _sample(NP_DTYPES[tag], shape)
    m = decode(encode("put", 42, {"seq": [1, 2], "name": "é"}, [a], deadline=123.5))
    assert (m.op, m.rid, m.fields, m.deadline, m.dtypes) == ("put", 42, {"seq": [1, 2], "name": "é"}, 123.5, [tag])
    assert m.tensors[0].shape == shape and m.tensors[0].dtype == a.dtype
    np.testing.assert_array_equal(m.tensors[0], a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool, torch.uint8])
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_torch(dtype, shape):
    t = (torch.randn(shape) * 10).to(dtype)
    m = decode(encode("put", 1, tensors=[t]))
    if dtype == torch.bfloat16:
        assert m.dtypes == ["bf16"] and m.tensors[0].dtype == np.uint16
    back = m.torch(0)
    assert back.dtype == dtype and tuple(back.shape) == shape
    assert torch.equal(back, t)


def test_bf16_bits_are_the_tensor_bits():
    t = torch.tensor([1.0, -2.5, float("inf"), 3.140625], dtype=torch.bfloat16)
    m = decode(encode("x", 0, tensors=[t]))
    np.testing.assert_array_equal(m.tensors[0], t.view(torch.int16).numpy().view(np.uint16))


def test_non_contiguous_and_big_endian_inputs():
    a = np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2]
    b = np.arange(5, dtype=">i4")
    t = torch.arange(12.0).reshape(3, 4).T
    m = decode(encode("x", 0, tensors=[a, b, t]))
    np.testing.assert_array_equal(m.tensors[0], a)
    np.testing.assert_array_equal(m.tensors[1], b)
    assert m.dtypes[1] == "i32"
    assert torch.equal(m.torch(2), t)


def test_no_deadline_and_no_fields():
    m = decode(encode("ping", 7))
    assert m.deadline is None and m.fields == {} and m.tensors == []


def test_unsupported_inputs_raise():
    with pytest.raises(WireError):
        encode("x", 0, tensors=[np.zeros(3, np.complex64)])
    with pytest.raises(WireError):
        encode("x", 0, tensors=[torch.zeros(3, dtype=torch.int16)])


def test_large_frames_are_not_copied_on_send():
    a = np.ones(ZERO_COPY_THRESHOLD // 4, np.float32)
    frames = encode("x", 0, tensors=[a, np.ones(8, np.float32)])
    assert isinstance(frames[1], memoryview) and np.shares_memory(np.asarray(frames[1]), a)
    assert isinstance(frames[2], bytes)


def test_decoded_tensor_is_a_view_of_the_received_frame():
    """Over real sockets: the array must share memory with the zmq.Frame that arrived."""
    ctx = zmq.Context()
    try:
        pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
        pull.bind("inproc://wire-zero-copy")
        push.connect("inproc://wire-zero-copy")
        a = np.arange(1 << 16, dtype=np.float32)  # 256 KiB: well above the zero-copy threshold
        push.send_multipart(encode("x", 0, tensors=[a]), copy=False)
        frames = pull.recv_multipart(copy=False)
        m = decode(frames)
        assert np.shares_memory(m.tensors[0], np.frombuffer(frames[1].buffer, np.uint8))
        np.testing.assert_array_equal(m.tensors[0], a)
        t = m.torch(0)
        assert t.data_ptr() == m.tensors[0].ctypes.data  # aligned large frame: torch shares it too
        push.close(0)
        pull.close(0)
    finally:
        ctx.term()


@pytest.mark.parametrize(
    "frames, why",
    [
        ([], "empty"),
        ([b"\xc1"], "msgpack"),  # 0xc1 is never valid msgpack
        ([msgpack.packb([1, "x", 1])], "not a map"),
        ([msgpack.packb(5)], "not a map"),
        ([_header(v=PROTOCOL_VERSION + 1)], "version"),
        ([_header(v="1")], "version"),
        ([_header(op=3)], "op"),
        ([_header(op="")], "op"),
        ([_header(op="x" * 65)], "op"),
        ([_header(id="1")], "id"),
        ([_header(id=1.0)], "id"),
        ([_header(dl="soon")], "deadline"),
        ([_header(dl=float("nan"))], "deadline"),
        ([_header(f=[1])], "fields"),
        ([_header(t=[["f32", [2]]])], "declares 1"),
        ([_header(), b"\0" * 4], "declares 0"),
        ([_header(t=[["c64", [1]]]), b"\0" * 8], "unknown dtype"),
        ([_header(t=[["f32", [-1]]]), b""], "non-negative"),
        ([_header(t=[["f32", [2.0]]]), b"\0" * 8], "non-negative"),
        ([_header(t=[["f32", 2]]), b"\0" * 8], "shape"),
        ([_header(t=[["f32", [1] * 9]]), b"\0" * 4], "shape"),
        ([_header(t=[["f32"]]), b"\0" * 4], "spec"),
        ([_header(t=[["f32", [3]]]), b"\0" * 8], "frame has 8"),
        ([_header(t=[["f32", [1 << 40]]]), b"\0" * 8], "limit"),
        ([_header(t=[["f64", [1 << 62, 1 << 62]]]), b"\0" * 8], "limit"),
        ([_header(t=[["u8", []]] * 65)] + [b"\0"] * 65, "tensor frames"),
        ([b"\x80" * (DEFAULT_LIMITS.max_header_bytes + 1)], "header is"),
    ],
)
def test_malformed_messages(frames, why):
    with pytest.raises(WireError, match=why):
        decode(frames)


def test_total_bytes_limit():
    lim = Limits(max_total_bytes=100)
    with pytest.raises(WireError, match="exceed"):
        decode(encode("x", 0, tensors=[np.zeros(20, np.float32), np.zeros(20, np.float32)]), lim)


def test_huge_declared_shape_allocates_nothing():
    """A header that claims 2**40 elements must fail on the frame length, not on allocation."""
    limits = Limits(max_frame_bytes=1 << 62, max_total_bytes=1 << 62)
    frames = [_header(t=[["f32", [1 << 20, 1 << 20]]]), b"\0" * 16]
    tracemalloc.start()
    try:
        with pytest.raises(WireError, match="frame has 16"):
            decode(frames, limits)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


# --- property-based: whatever arrives, decode returns a consistent Message or raises WireError ---


def _check_consistent(frames, m):
    assert len(m.tensors) == len(frames) - 1
    for arr, frame in zip(m.tensors, frames[1:]):
        assert arr.nbytes == len(frame)


def _decode_or_wire_error(frames):
    try:
        m = decode(frames)
    except WireError:
        return
    _check_consistent(frames, m)


tensors_st = st.lists(
    st.tuples(st.sampled_from(sorted(NP_DTYPES)), st.lists(st.integers(0, 4), max_size=3)),
    max_size=4,
).map(lambda specs: [np.zeros(shape, NP_DTYPES[tag]) for tag, shape in specs])


@FAST
@given(tensors=tensors_st, data=st.data())
def test_mutated_valid_messages(tensors, data):
    frames = [bytes(f) for f in encode("op", 3, {"k": 1}, tensors)]
    i = data.draw(st.integers(0, len(frames) - 1))
    kind = data.draw(st.sampled_from(["truncate", "extend", "drop", "add", "flip", "garbage"]))
    f = bytearray(frames[i])
    if kind == "truncate":
        frames[i] = bytes(f[: data.draw(st.integers(0, max(0, len(f) - 1)))])
    elif kind == "extend":
        frames[i] = bytes(f) + data.draw(st.binary(min_size=1, max_size=16))
    elif kind == "drop":
        del frames[i]
    elif kind == "add":
        frames.insert(i + 1, data.draw(st.binary(max_size=32)))
    elif kind == "flip" and f:
        j = data.draw(st.integers(0, len(f) - 1))
        f[j] ^= data.draw(st.integers(1, 255))
        frames[i] = bytes(f)
    else:
        frames[i] = data.draw(st.binary(max_size=64))
    _decode_or_wire_error(frames)


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=4), kids, max_size=4),
    max_leaves=12,
)
shape_st = st.lists(st.integers(-(2**63), 2**64 - 1) | st.sampled_from([0, 1, 2, 2**31, 2**40]), max_size=9)
header_st = st.fixed_dictionaries(
    {},
    optional={
        "v": st.sampled_from([PROTOCOL_VERSION, 0, PROTOCOL_VERSION + 1, -1, "1", None]),
        "op": st.text(max_size=70) | msgpack_values,
        "id": st.integers(-(2**63), 2**64 - 1) | msgpack_values,
        "dl": st.floats() | msgpack_values,
        "f": msgpack_values,
        "t": st.lists(
            st.tuples(st.sampled_from(sorted(DTYPES)) | st.text(max_size=4), shape_st).map(list)
            | msgpack_values,
            max_size=4,
        ),
    },
)


@FAST
@given(header=header_st | msgpack_values, bodies=st.lists(st.binary(max_size=64), max_size=5))
def test_arbitrary_headers(header, bodies):
    _decode_or_wire_error([msgpack.packb(header)] + bodies)


@FAST
@given(frames=st.lists(st.binary(max_size=128), max_size=6))
def test_garbage_frames(frames):
    _decode_or_wire_error(frames)


# -- the hot path's fixed binary header -------------------------------------------------------------
@pytest.mark.parametrize("storage", ["float32", "bfloat16", "float16"])
def test_binary_attend_and_reply_round_trip(storage):
    rng = np.random.default_rng(3)
    meta = np.array([[7, 12, 2, 2], [9, 0, 1, 0]], np.int64)
    q, k = (torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for s in ((3, 4, 8), (2, 2, 8)))
    if storage != "float32":
        q, k = q.to(getattr(torch, storage)), k.to(getattr(torch, storage))
    frames = encode_attend(41, "owner-\u00e9", 5, 1, 3, meta, q, k, k, deadline=1.5e9, trace=True)
    assert bytes(frames[0])[0] == 0xC1
    msg = decode([bytes(f) for f in frames])
    assert (msg.op, msg.rid, msg.deadline) == ("attend", 41, 1.5e9)
    assert msg.fields == {"owner": "owner-\u00e9", "layer": 5, "h0": 1, "h1": 3, "trace": True}
    np.testing.assert_array_equal(msg.tensors[0], meta)
    for i, t in ((1, q), (2, k), (3, k)):
        assert torch.equal(msg.torch(i), t)
    out, lse = rng.standard_normal((3, 4, 8)).astype(np.float32), rng.standard_normal((3, 4)).astype(np.float32)
    reply = decode([bytes(f) for f in encode_attend_reply(41, out, lse, (1.0, 2.0, 3.0))])
    assert (reply.op, reply.rid, reply.fields) == ("reply", 41, {"tq": 1.0, "tk0": 2.0, "tk1": 3.0})
    np.testing.assert_array_equal(reply.tensors[0], out)
    np.testing.assert_array_equal(reply.tensors[1], lse)
    assert decode([bytes(f) for f in encode_attend_reply(2, out, lse)]).fields == {}


def test_binary_attend_refuses_what_it_cannot_carry():
    meta, q = np.zeros((1, 4), np.int64), np.zeros((1, 2, 8), np.float32)
    with pytest.raises(WireError):
        encode_attend(1, "o", 0, 0, 1, meta, q, q.astype(np.float64), q)  # mixed dtypes
    with pytest.raises(WireError):
        encode_attend(1, "o", 0, 0, 1, meta.astype(np.int32), q, q, q)
    with pytest.raises(WireError):
        encode_attend_reply(1, q, np.zeros((1, 3), np.float32))


@FAST
@given(st.data())
def test_mutated_binary_attends_decode_or_raise(data):
    meta, q = np.zeros((2, 4), np.int64), np.ones((3, 2, 4), np.float32)
    frames = [bytes(f) for f in encode_attend(9, "o", 1, 0, 1, meta, q, q[:, :1], q[:, :1], deadline=1e9)]
    i = data.draw(st.integers(0, len(frames) - 1))
    f = bytearray(frames[i])
    j = data.draw(st.integers(0, max(len(f) - 1, 0)))
    kind = data.draw(st.sampled_from(["flip", "truncate", "pad", "drop"]))
    if kind == "flip" and f:
        f[j] ^= data.draw(st.integers(1, 255))
        frames[i] = bytes(f)
    elif kind == "truncate":
        frames[i] = bytes(f[:j])
    elif kind == "pad":
        frames[i] = bytes(f) + b"\0" * data.draw(st.integers(1, 9))
    else:
        del frames[i]
    try:
        msg = decode(frames, Limits(max_frame_bytes=1 << 16, max_total_bytes=1 << 17))
    except WireError as e:
        assert e.rid is None or type(e.rid) is int
        return
    assert [t.nbytes for t in msg.tensors] == [len(x) for x in frames[1:]]
    assert msg.deadline is None or np.isfinite(msg.deadline)
