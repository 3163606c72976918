"""The data path's binary messages, parsed straight from a stream's receive buffer in compiled code.

Why (issue 11, the per-layer messaging): each layer's attend and its reply are read after the caches
were emptied (the compute side streamed a layer's weights, the attention peer the KV), and the general
reader, the stream's framing (net/stream.py) then the wire decoder (net/wire.py), is a few dozen Python
operations that then run at several times their warm cost. Measured on the compute side (2-vCPU Zen 5,
batch-16 reply of SmolLM2's shapes, a layer's weights copied before each read, wall time): framing
8.4-9.6 us and decoding 11.4-13.7 us through the general reader; 7.7-13.4 and 1.7-3.1 here (the
copy of the payload into fresh arrays is most of what is left).

`parse_reply` and `parse_attend` accept exactly the messages the general reader would decode to a
binary reply or attend, with the same contents (tests/test_binary_parse.py checks the two against each
other on well-formed and mutated messages); anything else (msgpack messages, error replies, a partial
message, a header the limits refuse) they leave to the general reader, which answers as it always has.
The payload is copied into new arrays (the receive buffer is reused): out, lse float32; meta int64; q,
k, v back to back as raw bytes, each at a 64-byte offset, for the caller to view in the wire dtype.

Layouts (little-endian; net/stream.py's framing, then net/wire.py's ATTEND or REPLY header):

    reply   b"LMS1", 3 (uint32), 3 frame lengths (uint32) | REPLY (56 bytes) | out | lse
    attend  b"LMS1", 5 (uint32), 5 frame lengths (uint32) | ATTEND (64 bytes) + owner | meta | q | k | v

`limits`: int64 [4] = (max_frames, max_header_bytes, max_frame_bytes, max_total_bytes) (`limits_array`).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .wire import ATTEND, FLAG_DEADLINE, FLAG_TRACE, KIND_ATTEND, KIND_REPLY, MAGIC, PROTOCOL_VERSION, REPLY, Limits

_STREAM_MAGIC = np.frombuffer(b"LMS1", np.uint8).copy()
_REPLY_HEAD = 8 + 3 * 4  # the stream's prefix (net/stream.py PREFIX) and three frame lengths
_REPLY_SIZE = REPLY.size
_ATTEND_HEAD = 8 + 5 * 4
_ATTEND_SIZE = ATTEND.size
_N_CODES = 4  # wire._CODE_TAG: f32, bf16, f16, u16
_CODE_ITEMSIZE = np.array([4, 2, 2, 2], np.int64)


def limits_array(limits: Limits) -> np.ndarray:
    """`limits` as the parsers take them: int64 [4]."""
    return np.array([limits.max_frames, limits.max_header_bytes, limits.max_frame_bytes, limits.max_total_bytes],
                    np.int64)


@njit(cache=True, inline="always")
def _prefix(buf, at, end, count, head_size, limits):
    """The stream prefix and frame lengths at buf[at:], copied 4-byte aligned (uint32 [2 + count]), where
    they are whole, `count` frames long, with a first frame of `head_size` bytes and lengths the stream's
    reader accepts (net/stream.py FrameReader._header); else a zero-size array."""
    if end - at < 8 + 4 * count or count > limits[0] + 1:
        return np.empty(0, np.uint32)
    for i in range(4):
        if buf[at + i] != _STREAM_MAGIC[i]:
            return np.empty(0, np.uint32)
    words = np.empty(2 + count, np.uint32)
    w8 = words.view(np.uint8)
    for i in range(8 + 4 * count):
        w8[i] = buf[at + i]
    if words[1] != count or words[2] != head_size:
        return np.empty(0, np.uint32)
    largest, body = 0, 0
    for i in range(count):
        largest = max(largest, np.int64(words[2 + i]))
        body += np.int64(words[2 + i])
    if largest > max(limits[1], limits[2]) or body - np.int64(words[2]) > limits[3]:
        return np.empty(0, np.uint32)
    return words


@njit(cache=True, inline="always")
def _copy(src, at, dst, to, size):
    """dst[to:to + size] = src[at:at + size] (uint8) in 8-byte words, the tail by bytes: a byte loop, or a
    slice assignment, compiles to one byte at a time (~10x slower). The words may be unaligned (x86-64 and
    arm64 load and store them as they are)."""
    words = size // 8
    s64 = src[at:at + 8 * words].view(np.int64)
    d64 = dst[to:to + 8 * words].view(np.int64)
    for i in range(words):
        d64[i] = s64[i]
    for i in range(8 * words, size):
        dst[to + i] = src[at + i]


@njit(cache=True)  # the GIL stays held: a few us, and releasing it lets the event loop take it (5 ms switches)
def parse_reply(buf, at, end, limits):
    """The binary reply at buf[at:end] (uint8), if one is there whole and well-formed: (its end, or 0 where
    there is none; request id; whether it carries trace times; out float32 [T, Hq, D]; lse float32 [T, Hq];
    tq; tk0; tk1)."""
    none = (np.int64(0), np.int64(0), False, np.empty((0, 0, 0), np.float32), np.empty((0, 0), np.float32),
            0.0, 0.0, 0.0)
    words = _prefix(buf, at, end, 3, _REPLY_SIZE, limits)
    if words.size == 0 or end - at < _REPLY_HEAD + _REPLY_SIZE:
        return none
    head = np.empty(_REPLY_SIZE // 8, np.int64)
    h8 = head.view(np.uint8)
    for i in range(_REPLY_SIZE):
        h8[i] = buf[at + _REPLY_HEAD + i]
    if h8[0] != MAGIC or h8[1] != PROTOCOL_VERSION or h8[2] != KIND_REPLY or h8[3] & ~FLAG_TRACE:
        return none
    dims = head.view(np.int32)  # rid at int64 word 1; T, Hq, D at int32 words 4, 5, 6; times at float64 4-6
    t, hq, d = np.int64(dims[4]), np.int64(dims[5]), np.int64(dims[6])
    n_out, n_lse = np.int64(words[3]), np.int64(words[4])
    if min(t, hq, d) < 0 or n_out != 4 * t * hq * d or n_lse != 4 * t * hq or max(n_out, n_lse) > limits[2] \
            or n_out + n_lse > limits[3]:
        return none
    start = at + _REPLY_HEAD + _REPLY_SIZE
    stop = start + n_out + n_lse
    if stop > end:
        return none
    # Copied as float32 words: a byte-wise slice assignment compiles to a byte loop (~10x slower).
    body = buf[start:stop].view(np.float32)
    out = np.empty(t * hq * d, np.float32)
    lse = np.empty(t * hq, np.float32)
    for i in range(out.size):
        out[i] = body[i]
    for i in range(lse.size):
        lse[i] = body[out.size + i]
    times = head.view(np.float64)
    return (np.int64(stop), head[1], (h8[3] & FLAG_TRACE) != 0, out.reshape((t, hq, d)), lse.reshape((t, hq)),
            times[4], times[5], times[6])


@njit(cache=True)
def parse_attend(buf, at, end, limits):
    """The binary attend at buf[at:end] (uint8), if one is there whole and well-formed: (its end, or 0
    where there is none; request id; flags; dtype code (wire._CODE_TAG); deadline; layer; h0; h1; where
    the owner's utf-8 bytes begin and end in buf; dims int64 [6] = (n, Tq, Hq, Tkv, Hkv, D); meta int64
    [n, 4]; data uint8: q, k, v's bytes at offsets 0, `offsets`[1], `offsets`[2] (int64 [3])).
    The owner's utf-8 is the caller's to check."""
    none = (np.int64(0), np.int64(0), np.int64(0), np.int64(0), 0.0, np.int64(0), np.int64(0), np.int64(0),
            np.int64(0), np.int64(0), np.empty(0, np.int64), np.empty((0, 4), np.int64), np.empty(0, np.uint8),
            np.empty(0, np.int64))
    if end - at < _ATTEND_HEAD + _ATTEND_SIZE:
        return none
    head = np.empty(_ATTEND_SIZE // 8, np.int64)
    h8 = head.view(np.uint8)
    for i in range(_ATTEND_SIZE):
        h8[i] = buf[at + _ATTEND_HEAD + i]
    name_len = np.int64(h8[60]) | (np.int64(h8[61]) << 8)
    words = _prefix(buf, at, end, 5, _ATTEND_SIZE + name_len, limits)
    if words.size == 0:
        return none
    flags, code = np.int64(h8[3]), np.int64(h8[4])
    if h8[0] != MAGIC or h8[1] != PROTOCOL_VERSION or h8[2] != KIND_ATTEND \
            or flags & ~(FLAG_TRACE | FLAG_DEADLINE) or code >= _N_CODES or limits[0] < 4:
        return none
    deadline = head.view(np.float64)[2]
    if flags & FLAG_DEADLINE and not np.isfinite(deadline):
        return none
    f = head.view(np.int32)  # layer, h0, h1, n, Tq, Hq, Tkv, Hkv, D at int32 words 6-14
    dims = np.empty(6, np.int64)
    for i in range(6):
        dims[i] = f[9 + i]
    n, tq, hq, tkv, hkv, d = dims[0], dims[1], dims[2], dims[3], dims[4], dims[5]
    item = _CODE_ITEMSIZE[code]
    sizes = (8 * n * 4, item * tq * hq * d, item * tkv * hkv * d)
    if dims.min() < 0 or np.int64(words[3]) != sizes[0] or np.int64(words[4]) != sizes[1] \
            or np.int64(words[5]) != sizes[2] or np.int64(words[6]) != sizes[2] or max(sizes) > limits[2] \
            or sizes[0] + sizes[1] + 2 * sizes[2] > limits[3]:
        return none
    owner_at = at + _ATTEND_HEAD + _ATTEND_SIZE
    start = owner_at + name_len
    stop = start + sizes[0] + sizes[1] + 2 * sizes[2]
    if stop > end:
        return none
    meta = np.empty(n * 4, np.int64)
    _copy(buf, start, meta.view(np.uint8), 0, sizes[0])
    offsets = np.empty(3, np.int64)  # q, k, v in data, each at a 64-byte offset (data itself: malloc's alignment)
    offsets[0] = 0
    offsets[1] = (sizes[1] + 63) // 64 * 64
    offsets[2] = offsets[1] + (sizes[2] + 63) // 64 * 64
    data = np.empty(offsets[2] + sizes[2], np.uint8)
    at_src = start + sizes[0]
    for j in range(3):
        size = sizes[1] if j == 0 else sizes[2]
        _copy(buf, at_src, data, offsets[j], size)
        at_src += size
    return (np.int64(stop), head[1], flags, code, deadline, np.int64(f[6]), np.int64(f[7]), np.int64(f[8]),
            np.int64(owner_at), np.int64(start), dims, meta.reshape((n, 4)), data, offsets)
