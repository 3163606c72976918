"""Fuzzing the wire decoder, the trust boundary of every peer: whatever arrives, decode() returns a
Message whose tensors are exactly the frames that came, or raises WireError. Nothing else.

Hypothesis runs in every test run with a bounded number of examples. The same target runs under
atheris (coverage-guided libFuzzer) when atheris is installed, for a bounded number of runs:

    python tests/test_fuzz_wire.py -runs=1000000          # by hand, longer
"""

from __future__ import annotations

import math
import subprocess
import sys

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lamina_p2p.net.wire import DTYPES, PROTOCOL_VERSION, Limits, Message, WireError, decode, encode

SMALL = Limits(max_header_bytes=4096, max_frames=8, max_frame_bytes=1 << 16, max_total_bytes=1 << 17, max_ndim=4)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_decode(frames, limits=SMALL):
    """The property every input must satisfy."""
    try:
        msg = decode(frames, limits)
    except WireError as e:
        assert e.rid is None or type(e.rid) is int
        return None
    assert isinstance(msg, Message)
    assert len(msg.tensors) == len(frames) - 1 == len(msg.dtypes) <= limits.max_frames
    total = 0
    for arr, frame in zip(msg.tensors, frames[1:]):
        assert arr.nbytes == len(frame) <= limits.max_frame_bytes
        assert arr.ndim <= limits.max_ndim
        total += arr.nbytes
    assert total <= limits.max_total_bytes
    assert type(msg.op) is str and type(msg.rid) is int and isinstance(msg.fields, dict)
    assert msg.deadline is None or math.isfinite(msg.deadline)
    return msg


# -- unstructured: any frames at all --------------------------------------------------------------
@FUZZ
@given(st.lists(st.binary(max_size=256), max_size=12))
def test_random_frames(frames):
    check_decode(frames)


# -- structured: headers that are valid msgpack with plausible keys and hostile values ------------
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=True),
                    st.text(max_size=80), st.binary(max_size=16))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                        st.dictionaries(st.text(max_size=4), inner, max_size=4)),
                      max_leaves=20)
dims = st.one_of(st.integers(0, 8), st.integers(-3, 2**64 - 1), st.floats(), st.text(max_size=2))
specs = st.lists(st.one_of(st.tuples(st.sampled_from(sorted(DTYPES) + ["f128", "", "O"]),
                                     st.lists(dims, max_size=6)).map(list), values), max_size=6)
headers = st.fixed_dictionaries(
    {"v": st.one_of(st.just(PROTOCOL_VERSION), scalars), "op": st.one_of(st.text(max_size=70), scalars),
     "id": st.one_of(st.integers(-2**63, 2**64 - 1), scalars), "t": st.one_of(specs, values),
     "f": st.one_of(st.dictionaries(st.text(max_size=8), values, max_size=4), values)},
    optional={"dl": st.one_of(st.floats(allow_nan=True, allow_infinity=True), scalars), "extra": values})


@FUZZ
@given(headers, st.lists(st.binary(max_size=128), max_size=7))
def test_structured_headers(header, bodies):
    frames = [msgpack.packb(header, use_bin_type=True), *bodies]
    check_decode(frames)


# -- mutations of valid messages ------------------------------------------------------------------
arrays = st.sampled_from(["f32", "i64", "u8", "f16", "bool"]).flatmap(
    lambda tag: st.lists(st.integers(0, 5), max_size=3).map(
        lambda shape: np.zeros(shape, DTYPES[tag]) + np.array(1, DTYPES[tag])))


@FUZZ
@given(st.lists(arrays, max_size=4), st.data())
def test_mutated_valid_messages(tensors, data):
    frames = [bytes(f) for f in encode("attend", 5, {"layer": 1}, tensors, deadline=1e9)]
    ok = check_decode(frames)
    assert ok is not None and ok.op == "attend" and len(ok.tensors) == len(tensors)
    for a, b in zip(ok.tensors, tensors):
        np.testing.assert_array_equal(a, b)
    # Then break it: flip a byte, truncate a frame, drop or duplicate a frame, or pad one.
    i = data.draw(st.integers(0, len(frames) - 1))
    kind = data.draw(st.sampled_from(["flip", "truncate", "drop", "dup", "pad"]))
    f = bytearray(frames[i])
    if kind == "flip" and f:
        j = data.draw(st.integers(0, len(f) - 1))
        f[j] ^= data.draw(st.integers(1, 255))
        frames[i] = bytes(f)
    elif kind == "truncate":
        frames[i] = bytes(f[: data.draw(st.integers(0, max(len(f) - 1, 0)))])
    elif kind == "drop":
        del frames[i]
    elif kind == "dup":
        frames.insert(i, frames[i])
    else:
        frames[i] = bytes(f) + data.draw(st.binary(min_size=1, max_size=16))
    check_decode(frames)


def test_huge_declared_shapes_are_refused_without_allocating():
    for shape in ([2**40, 2**40], [2**62], [0, 2**63], [3] * 9):
        header = msgpack.packb({"v": PROTOCOL_VERSION, "op": "x", "id": 1, "t": [["f32", shape]], "f": {}})
        with pytest.raises(WireError):
            decode([header, b"\0" * 12], SMALL)
    with pytest.raises(WireError, match="header is"):
        decode([b"\x91" + b"\xc0" * 5000], SMALL)  # an over-long header
    with pytest.raises(WireError, match="tensor frames"):
        decode([msgpack.packb({"v": 1})] + [b""] * 9, SMALL)


# -- atheris (coverage-guided), bounded ----------------------------------------------------------
def atheris_target(data: bytes) -> None:
    import atheris

    fdp = atheris.FuzzedDataProvider(data)
    n = fdp.ConsumeIntInRange(0, 9)
    frames = [fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 512)) for _ in range(n)]
    if n and fdp.ConsumeBool():
        # Half the time frame 0 is a real msgpack map built from the input, to get past the parser.
        try:
            obj = msgpack.unpackb(frames[0], raw=False, strict_map_key=False)
        except Exception:
            obj = None
        frames[0] = msgpack.packb({"v": PROTOCOL_VERSION, "op": "attend", "id": n,
                                   "t": obj if isinstance(obj, list) else [["u8", [len(frames[-1])]]],
                                   "f": {}}, use_bin_type=True)
    check_decode(frames)


def test_atheris_bounded(tmp_path):
    pytest.importorskip("atheris")
    out = subprocess.run([sys.executable, __file__, "-runs=100000", "-max_len=2048", "-seed=1"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Done 100000 runs" in out.stderr


if __name__ == "__main__":
    import atheris

    import lamina_p2p.net.wire as wire

    # wire is imported already (instrument_imports would be too late): instrument its functions, and
    # only those, since instrument_all would spend minutes on numpy and hypothesis.
    for name in ("decode", "_decode_body", "_check_header", "frame_view"):
        setattr(wire, name, atheris.instrument_func(getattr(wire, name)))
    atheris.Setup(sys.argv, atheris_target)
    atheris.Fuzz()


# -- the stream socket's framing (net/stream.py): the same boundary on plaintext links -------------------
def read_stream(data: bytes, chunks: list[int], limits=SMALL):
    """Feed `data` through a real socket pair in these chunk sizes; every message the reader returns."""
    import socket

    from lamina_p2p.net.stream import FrameReader

    a, b = socket.socketpair()
    b.setblocking(False)
    reader, out = FrameReader(b, limits), []
    try:
        at = 0
        for n in chunks + [len(data)]:
            a.sendall(data[at:at + n])
            at += n
            out += reader.read()  # a socket pair delivers what sendall wrote before it returns
            if at >= len(data):
                break
        a.close()
        out += reader.read()
        assert reader.closed or reader.error is not None
    finally:
        a.close()
        b.close()
    for frames in out:
        assert 1 <= len(frames) <= limits.max_frames + 1
        assert all(type(f) is bytearray and len(f) <= max(limits.max_frame_bytes, limits.max_header_bytes) for f in frames)
    return out, reader.error


messages = st.lists(st.lists(st.binary(max_size=64), min_size=1, max_size=4), max_size=4)


@FUZZ
@given(messages, st.lists(st.integers(1, 64), max_size=8), st.data())
def test_stream_framing_returns_exactly_what_was_sent_or_stops(msgs, chunks, data):
    from lamina_p2p.net.stream import pack

    wire = b"".join(bytes(b) for m in msgs for b in pack(m))
    got, error = read_stream(wire, chunks)
    assert got == msgs and error is None
    # Broken: flip a byte, cut it short, or append garbage. A cut stream gives a prefix of what was sent,
    # garbage after it leaves what came before intact; broken framing stops the reader with an error.
    kind = data.draw(st.sampled_from(["flip", "truncate", "garbage"]))
    if kind == "flip" and wire:
        i = data.draw(st.integers(0, len(wire) - 1))
        wire = wire[:i] + bytes([wire[i] ^ data.draw(st.integers(1, 255))]) + wire[i + 1:]
    elif kind == "truncate":
        wire = wire[: data.draw(st.integers(0, max(len(wire) - 1, 0)))]
    else:
        wire += data.draw(st.binary(min_size=1, max_size=64))
    got, error = read_stream(wire, chunks)  # (it checks every message against the limits)
    if kind == "truncate":
        assert got == msgs[:len(got)] and len(got) < len(msgs) + (not wire)
    elif kind == "garbage":
        assert got[:len(msgs)] == msgs


def test_stream_framing_refuses_absurd_sizes_without_allocating():
    from lamina_p2p.net.stream import PREFIX, STREAM_MAGIC

    for count, lengths in ((0, []), (2**32 - 1, []), (2, [8, 2**32 - 1]), (SMALL.max_frames + 2, [])):
        wire = PREFIX.pack(STREAM_MAGIC, count) + b"".join(n.to_bytes(4, "little") for n in lengths)
        got, error = read_stream(wire, [])
        assert got == [] and error is not None
