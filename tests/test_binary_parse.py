"""The compiled parse of the data path's binary messages (net/binary_parse.py) against the general reader.

A stream reader made for binary replies or attends must hand out exactly what the general reader
(net/stream.py framing, then net/wire.py decode) makes of the same bytes: the same Message for every
message it takes, the same frames (and so the same WireError or StreamError) for everything else.
Each case goes through two readers over real socket pairs, one general and one binary, and the
outcomes are compared: well-formed messages of every dtype and shape, then thousands of mutations of
their headers, truncations, and limits that refuse them.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest

from lamina_p2p.net import stream
from lamina_p2p.net.wire import DEFAULT_LIMITS, Limits, Message, WireError, decode, encode

RNG = np.random.default_rng(11)


def _attend(rid=7, owner=b"compute-peer-0001", dtype=np.uint16, n=3, tq=3, hq=9, tkv=3, hkv=3, d=64,
            deadline=1e9, trace=True) -> bytes:
    meta = RNG.integers(0, 1 << 40, (n, 4), dtype=np.int64)
    q, k = (RNG.integers(0, 1 << 16, shape).astype(np.uint16).view(dtype) if dtype != np.float32
            else RNG.random(shape, np.float32) for shape in ((tq, hq, d), (tkv, hkv, d)))
    v = k[::-1].copy()
    bufs = stream.pack_attend(rid, owner, 4, 0, hkv, meta, q, k, v, deadline, trace)
    assert bufs is not None
    return b"".join(bytes(b) for b in bufs)


def _reply(rid=9, t=16, hq=9, d=64, times=(1.5, 2.5, 3.5)) -> bytes:
    out = RNG.random((t, hq, d), np.float32)
    lse = RNG.random((t, hq), np.float32)
    return b"".join(bytes(b) for b in stream.pack_attend_reply(rid, out, lse, times))


def _outcome(item, limits: Limits):
    """What the caller gets of one message: ("message", op, rid, fields, dtypes, deadline, tensors) or ("error", text)."""
    if type(item) is not Message:
        try:
            item = decode(item, limits)
        except WireError as e:
            return ("error", str(e), e.rid)
    tensors = [(t.dtype.str, t.shape, t.tobytes()) for t in item.tensors]
    # (repr: a mutated trace time or deadline may be NaN, which equals nothing)
    return ("message", item.op, item.rid, repr(item.fields), item.dtypes, repr(item.deadline), tensors)


def _read_all(data: bytes, binary: str | None, limits: Limits, pieces: int = 1):
    """Every outcome a reader gives for `data` written to a socket pair (in `pieces` writes), its error and
    whether it saw the end."""
    a, b = socket.socketpair()
    try:
        b.setblocking(False)
        reader = stream.FrameReader(b, limits, binary=binary)
        got = []
        cuts = sorted(RNG.choice(np.arange(1, len(data)), size=min(pieces - 1, len(data) - 1), replace=False)) \
            if pieces > 1 and len(data) > 1 else []
        at = 0
        for cut in [*cuts, len(data)]:
            a.sendall(data[at:cut])
            at = cut
            got += reader.read()
        a.close()
        got += reader.read()
        _read_all.parsed = sum(type(x) is Message for x in got)  # how many the compiled parse took
        return [_outcome(x, limits) for x in got], str(reader.error), reader.closed
    finally:
        a.close()
        b.close()


def _same(data: bytes, binary: str, limits: Limits = DEFAULT_LIMITS, pieces: int = 1) -> list:
    general = _read_all(data, None, limits, pieces)
    fast = _read_all(data, binary, limits, pieces)
    assert fast == general
    return general[0]


@pytest.mark.parametrize("dtype", [np.uint16, np.float16, np.float32])
@pytest.mark.parametrize("shape", [dict(), dict(tkv=0), dict(n=1, tq=1, hq=4, tkv=1, hkv=1, d=128), dict(d=3, hq=5)])
def test_well_formed_attends_decode_the_same(dtype, shape):
    for kw in (dict(), dict(trace=False), dict(owner="héllo-ü".encode()), dict(deadline=-5.0)):
        got = _same(_attend(dtype=dtype, **shape, **kw), "attend")
        assert len(got) == 1 and got[0][0] == "message" and got[0][1] == "attend" and _read_all.parsed == 1


def test_well_formed_replies_decode_the_same_one_or_many_in_a_read():
    for kw in (dict(), dict(times=None), dict(t=0), dict(t=1, hq=1, d=1)):
        got = _same(_reply(**kw), "reply")
        assert len(got) == 1 and got[0][:2] == ("message", "reply") and _read_all.parsed == 1
    many = _reply(rid=1) + _reply(rid=2, times=None) + b"".join(bytes(x) for x in stream.pack(
        encode("error", 3, {"code": "busy", "reason": "try later"}))) + _reply(rid=4)
    got = _same(many, "reply")
    assert [g[2] for g in got] == [1, 2, 3, 4] and got[2][1] == "error" and _read_all.parsed == 3
    _same(many, "reply", pieces=7)  # cut anywhere: partial messages go through the general path


def test_an_owner_that_is_not_utf8_gets_the_general_error():
    got = _same(_attend(owner=b"\xff\xfe-bad"), "attend")
    assert got[0][0] == "error" and "utf-8" in got[0][1] and got[0][2] == 7


def test_limits_refuse_the_same_messages():
    data = _attend()
    for limits in (Limits(max_frames=3), Limits(max_frame_bytes=1000), Limits(max_total_bytes=4000),
                   Limits(max_frames=4, max_header_bytes=10, max_frame_bytes=64)):
        _same(data, "attend", limits)
    for limits in (Limits(max_frames=1), Limits(max_frame_bytes=500), Limits(max_total_bytes=2000)):
        _same(_reply(), "reply", limits)


@pytest.mark.parametrize("kind", ["attend", "reply"])
def test_mutated_headers_and_truncations_decode_the_same(kind):
    """Any byte of the framing or the header changed (or the message cut short): the binary reader takes the
    message only where the general one decodes it, to the same Message."""
    base = _attend(tkv=1, n=1, tq=1, hq=3, hkv=1, d=8) if kind == "attend" else _reply(t=2, hq=3, d=8)
    head = 28 + 64 + 17 if kind == "attend" else 20 + 56
    taken = 0
    for i in range(3000):
        data = bytearray(base)
        for _ in range(int(RNG.integers(1, 4))):
            at = int(RNG.integers(0, head)) if RNG.random() < 0.9 else int(RNG.integers(0, len(data)))
            data[at] = int(RNG.integers(0, 256)) if RNG.random() < 0.7 else data[at] ^ (1 << int(RNG.integers(0, 8)))
        if i % 10 == 0:
            data = data[:int(RNG.integers(0, len(data)))]
        got = _same(bytes(data), kind)
        taken += sum(g[0] == "message" for g in got)
    assert 0 < taken < 3000  # both kinds of outcome were exercised
