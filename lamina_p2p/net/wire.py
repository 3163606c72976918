"""The wire format: one message = one ZeroMQ multipart message.

frame 0      msgpack map {"v": version, "op": str, "id": int, "dl": deadline (unix s, optional),
             "t": [[dtype, shape], ...] one per tensor frame, "f": {op fields}}
frames 1..n  raw C-contiguous tensor bytes, one frame per tensor

The per-layer hot path (an attend and its reply, once per layer per micro-batch) has a second,
fixed binary header instead of msgpack (`encode_attend`, `encode_attend_reply`): frame 0 starts
with the byte 0xC1, which msgpack never emits, so `decode` tells the two apart by one byte and
returns the same `Message` for both. A struct unpack and a few integer checks cost a few
microseconds where the msgpack map and its per-field checks cost tens (measured in
tools/bench_layer_path.py). Everything else (control path, error replies) stays msgpack.

    attend  frame 0: struct ATTEND (magic, version, kind=1, flags, dtype code, request id,
                     deadline, layer, h0, h1, n, Tq, Hq, Tkv, Hkv, D, owner length) + owner (utf-8)
            frames 1..4: meta int64 [n, 4], q [Tq, Hq, D], k [Tkv, Hkv, D], v [Tkv, Hkv, D]
    reply   frame 0: struct REPLY (magic, version, kind=2, flags, request id, T, Hq, D, tq, tk0, tk1)
            frames 1..2: out float32 [T, Hq, D], lse float32 [T, Hq]

The decoder is the trust boundary of every peer: it checks each header field and each frame's
real byte length before it builds anything, and it never allocates from a size a header merely
claims (tensors are `np.frombuffer` views of the frames that actually arrived). No pickle.
"""
from __future__ import annotations

import math
import struct
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import msgpack
import numpy as np

# 2: the data path's attend and reply travel in the fixed binary header (a version-1 peer could not read
# them): peers of different versions ignore each other in gossip instead of failing every attend.
PROTOCOL_VERSION = 2

# Wire tag -> numpy dtype. bf16 has no numpy dtype: it travels as its uint16 bit pattern.
DTYPES: dict[str, np.dtype] = {
    "f32": np.dtype("<f4"),
    "f64": np.dtype("<f8"),
    "f16": np.dtype("<f2"),
    "bf16": np.dtype("<u2"),
    "i8": np.dtype("i1"),
    "i32": np.dtype("<i4"),
    "i64": np.dtype("<i8"),
    "u8": np.dtype("u1"),
    "u16": np.dtype("<u2"),
    "bool": np.dtype("?"),
}
_NP_TO_TAG = {np.dtype(v): k for k, v in DTYPES.items() if k != "bf16"}

# Frames at or above this size are handed to ZeroMQ without a copy. Below it the copy is cheaper
# than the bookkeeping (pyzmq uses the same figure for its own copy threshold).
ZERO_COPY_THRESHOLD = 64 * 1024

MAX_OP_LEN = 64


class WireError(ValueError):
    """A message that does not follow the wire format. The text says what was wrong.

    `rid` is the request id when the header got far enough to carry a valid one, so a server can
    address its error reply to the right call instead of leaving the caller to time out.
    """

    rid: int | None = None


@dataclass(frozen=True)
class Limits:
    max_header_bytes: int = 64 * 1024
    max_frames: int = 64  # tensor frames, header excluded
    max_frame_bytes: int = 1 << 30
    max_total_bytes: int = 2 << 30
    max_ndim: int = 8
    # Requests a server holds at once (each keeps its frames in memory until answered); past it a
    # request gets a "busy" error reply at once, so a flood costs the sender, not the server.
    max_in_flight: int = 1024


DEFAULT_LIMITS = Limits()


@dataclass
class Message:
    op: str
    rid: int
    fields: dict = field(default_factory=dict)
    tensors: list = field(default_factory=list)  # np.ndarray views of the received frames
    dtypes: list = field(default_factory=list)  # wire tags, one per tensor
    deadline: float | None = None

    def torch(self, i: int):
        """Tensor i as a torch tensor: shares the frame's memory when it can.

        bf16 comes back as torch.bfloat16. A frame buffer that is not aligned to the item size
        (ZeroMQ may hand back small messages at any offset inside its receive buffer) is copied,
        because torch and numba kernels assume aligned data.
        """
        import torch

        arr = self.tensors[i]
        if not arr.flags.aligned or not arr.flags.writeable:
            # A read-only buffer (bytes frames in tests) cannot be shared safely with torch,
            # which has no read-only tensors: copy it rather than hand out undefined behaviour.
            arr = arr.copy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(arr)
        if self.dtypes[i] == "bf16":
            t = t.view(torch.bfloat16)
        return t


def _as_array(t: Any) -> tuple[str, np.ndarray]:
    """(wire tag, C-contiguous numpy array sharing memory with t where possible)."""
    if type(t) is np.ndarray and t.flags.c_contiguous:  # the data path's case: no conversion to look for
        tag = _NP_TO_TAG.get(t.dtype)
        if tag is not None:
            return tag, t
    if type(t).__module__.startswith("torch"):
        import torch

        if t.device.type != "cpu":
            raise WireError(f"tensor on {t.device}: move it to the CPU before encoding")
        t = t.detach()
        if t.dtype == torch.bfloat16:
            return "bf16", t.contiguous().view(torch.int16).numpy().view(np.uint16)
        arr = t.contiguous().numpy()
    else:
        arr = np.asarray(t)
    native = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
    tag = _NP_TO_TAG.get(native)
    if tag is None:
        raise WireError(f"dtype {arr.dtype} has no wire tag")
    if arr.dtype != DTYPES[tag]:  # big-endian input: the wire is little-endian
        arr = arr.astype(DTYPES[tag])
    if not arr.flags.c_contiguous:
        # Not np.ascontiguousarray: it turns a 0-d array into a 1-d one.
        arr = arr.copy(order="C")
    return tag, arr


def encode(
    op: str,
    rid: int,
    fields: dict | None = None,
    tensors: Sequence = (),
    deadline: float | None = None,
) -> list:
    """Frames for `socket.send_multipart(frames, copy=False)`.

    Large tensor frames are memoryviews of the caller's arrays: pyzmq wraps each in a zmq.Frame
    that holds a reference to the buffer until libzmq has sent it, so the memory stays alive on its
    own. The caller must not write into those arrays until the send completes (pass track=True to
    send_multipart and wait on the tracker if it must).
    """
    specs = []
    frames: list = [b""]
    for t in tensors:
        tag, arr = _as_array(t)
        specs.append([tag, list(arr.shape)])
        if arr.nbytes >= ZERO_COPY_THRESHOLD:
            frames.append(memoryview(arr.reshape(-1)).cast("B"))
        else:
            frames.append(arr.tobytes())
    header: dict = {"v": PROTOCOL_VERSION, "op": op, "id": rid, "t": specs, "f": fields or {}}
    if deadline is not None:
        header["dl"] = float(deadline)
    frames[0] = msgpack.packb(header, use_bin_type=True)
    return frames


def frame_view(frame: Any) -> memoryview:
    """A byte view of one frame: zmq.Frame, bytes, bytearray or memoryview (of any item type)."""
    if type(frame) is bytes or type(frame) is bytearray:  # (the stream's frames, most sent ones: cheap case first)
        return memoryview(frame)
    buf = getattr(frame, "buffer", None)  # zmq.Frame
    mv = memoryview(buf if buf is not None else frame)
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    return mv


def _check_header(raw: memoryview, limits: Limits) -> dict:
    if raw.nbytes > limits.max_header_bytes:
        raise WireError(f"header is {raw.nbytes} bytes, limit {limits.max_header_bytes}")
    try:
        # unpackb caps every container and string length at the input's size, so a small header
        # cannot declare a huge list; ext types (and with them msgpack timestamps) are refused.
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_ext_len=0)
    except Exception as e:  # msgpack raises a zoo of exception types on garbage
        raise WireError(f"header is not valid msgpack: {type(e).__name__}: {e}") from None
    if not isinstance(header, dict):
        raise WireError(f"header is a {type(header).__name__}, not a map")
    return header


def decode(frames: Sequence, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Validate and view a received multipart message. Raises WireError on anything wrong."""
    if len(frames) == 0:
        raise WireError("empty message")
    if len(frames) - 1 > limits.max_frames:
        raise WireError(f"{len(frames) - 1} tensor frames, limit {limits.max_frames}")
    raw = frame_view(frames[0])
    if raw.nbytes and raw[0] == MAGIC:
        return _decode_binary(raw, frames, limits)
    header = _check_header(raw, limits)

    v = header.get("v")
    if type(v) is not int or v != PROTOCOL_VERSION:
        raise WireError(f"protocol version {v!r}, expected {PROTOCOL_VERSION}")
    op = header.get("op")
    if type(op) is not str or not 0 < len(op) <= MAX_OP_LEN:
        raise WireError(f"op must be a str of 1..{MAX_OP_LEN} chars, got {type(op).__name__}")
    rid = header.get("id")
    if type(rid) is not int:
        raise WireError(f"id must be an int, got {type(rid).__name__}")
    try:
        return _decode_body(header, op, rid, frames, limits)
    except WireError as e:
        e.rid = rid
        raise


def _decode_body(header: dict, op: str, rid: int, frames: Sequence, limits: Limits) -> Message:
    dl = header.get("dl")
    if dl is not None:
        if type(dl) not in (int, float) or not math.isfinite(dl):
            raise WireError("deadline must be a finite number")
        dl = float(dl)
    fields = header.get("f", {})
    if not isinstance(fields, dict):
        raise WireError(f"fields must be a map, got {type(fields).__name__}")
    specs = header.get("t", [])
    if not isinstance(specs, list):
        raise WireError("tensor specs must be a list")
    if len(specs) != len(frames) - 1:
        raise WireError(f"header declares {len(specs)} tensors, message has {len(frames) - 1} frames")

    # First pass: check every spec against its frame's real length. Nothing is built until all pass.
    checked = []
    total = 0
    for i, spec in enumerate(specs):
        if not isinstance(spec, list) or len(spec) != 2:
            raise WireError(f"tensor {i}: spec must be [dtype, shape]")
        tag, shape = spec
        if type(tag) is not str or tag not in DTYPES:
            raise WireError(f"tensor {i}: unknown dtype {tag!r}")
        if not isinstance(shape, list) or len(shape) > limits.max_ndim:
            raise WireError(f"tensor {i}: shape must be a list of at most {limits.max_ndim} dims")
        if any(type(d) is not int or d < 0 for d in shape):
            raise WireError(f"tensor {i}: shape {shape!r} must hold non-negative ints")
        # Python ints do not overflow, so a shape of 2**40 x 2**40 is just a big number here.
        declared = DTYPES[tag].itemsize * math.prod(shape)
        if declared > limits.max_frame_bytes:
            raise WireError(f"tensor {i}: {declared} bytes, limit {limits.max_frame_bytes}")
        view = frame_view(frames[i + 1])
        if view.nbytes != declared:
            raise WireError(f"tensor {i}: header declares {declared} bytes, frame has {view.nbytes}")
        total += declared
        if total > limits.max_total_bytes:
            raise WireError(f"message tensors exceed {limits.max_total_bytes} bytes")
        checked.append((tag, shape, view))

    tensors = [np.frombuffer(view, dtype=DTYPES[tag]).reshape(shape) for tag, shape, view in checked]
    return Message(
        op=op,
        rid=rid,
        fields=fields,
        tensors=tensors,
        dtypes=[tag for tag, _, _ in checked],
        deadline=dl,
    )


# -- the hot path's fixed header ------------------------------------------------------------------
MAGIC = 0xC1  # "never used" in msgpack: no msgpack header starts with it
KIND_ATTEND, KIND_REPLY = 1, 2
FLAG_TRACE, FLAG_DEADLINE = 1, 2
# magic, version, kind, flags, dtype code, pad x3, request id, deadline (unix s),
# layer, h0, h1, n, Tq, Hq, Tkv, Hkv, D (int32), owner length (uint16), pad x2
ATTEND = struct.Struct("<BBBBBxxxqdiiiiiiiiiHxx")
# magic, version, kind, flags, pad x4, request id, T, Hq, D (int32), pad x4, tq, tk0, tk1 (trace times)
REPLY = struct.Struct("<BBBBxxxxqiiixxxxddd")
_CODE_TAG = ("f32", "bf16", "f16", "u16")
TAG_CODE = {t: i for i, t in enumerate(_CODE_TAG)}
_F32 = DTYPES["f32"]
_I64 = DTYPES["i64"]


def encode_attend(rid: int, owner: str, layer: int, h0: int, h1: int, meta: np.ndarray, q, k, v,
                  deadline: float | None = None, trace: bool = False) -> list:
    """Frames of one attend in the fixed binary header (see the module docstring).

    meta: int64 [n, 4]; q [Tq, Hq, D] and k, v [Tkv, Hkv, D] with one dtype among float32,
    bfloat16/float16 (torch or as uint16 bits) and uint16. `deadline`: unix seconds. Raises
    WireError for a dtype or shape the format cannot carry. The arrays' memory is sent without a
    copy where large (as `encode`): do not write into them until the send completes.
    """
    tag, qa = _as_array(q)
    ktag, ka = _as_array(k)
    vtag, va = _as_array(v)
    mtag, ma = _as_array(meta)
    if tag not in TAG_CODE or not tag == ktag == vtag or mtag != "i64":
        raise WireError(f"attend: q/k/v dtypes {tag}/{ktag}/{vtag}, meta {mtag}: need one float dtype and int64 meta")
    if qa.ndim != 3 or ka.ndim != 3 or ka.shape != va.shape or ma.ndim != 2 or ma.shape[1] != 4 \
            or qa.shape[2] != ka.shape[2]:
        raise WireError(f"attend: shapes meta {ma.shape}, q {qa.shape}, k {ka.shape}, v {va.shape}")
    name = owner.encode()
    flags = (FLAG_TRACE if trace else 0) | (FLAG_DEADLINE if deadline is not None else 0)
    head = ATTEND.pack(MAGIC, PROTOCOL_VERSION, KIND_ATTEND, flags, TAG_CODE[tag], rid,
                       0.0 if deadline is None else float(deadline), layer, h0, h1, ma.shape[0],
                       qa.shape[0], qa.shape[1], ka.shape[0], ka.shape[1], qa.shape[2], len(name))
    return [head + name, *(_payload(a) for a in (ma, qa, ka, va))]


def encode_attend_reply(rid: int, out: np.ndarray, lse: np.ndarray, times: tuple | None = None) -> list:
    """Frames of an attend's reply: out float32 [T, Hq, D], lse float32 [T, Hq]; `times` (tq, tk0, tk1)
    on the shared monotonic clock when the caller asked for a trace. Raises WireError otherwise.

    The arrays' memory is sent without a copy at any size (a kernel's outputs are fresh arrays,
    never written again; ZeroMQ copies small frames itself): do not write into them afterwards."""
    if out.dtype != _F32 or lse.dtype != _F32 or out.ndim != 3 or lse.shape != out.shape[:2]:
        raise WireError(f"attend reply: out {out.dtype}{list(out.shape)}, lse {lse.dtype}{list(lse.shape)}")
    head = REPLY.pack(MAGIC, PROTOCOL_VERSION, KIND_REPLY, FLAG_TRACE if times else 0, rid, *out.shape,
                      *(times or (0.0, 0.0, 0.0)))
    return [head, *(memoryview(np.ascontiguousarray(a).reshape(-1)).cast("B") for a in (out, lse))]


def _payload(arr: np.ndarray):
    return memoryview(arr.reshape(-1)).cast("B") if arr.nbytes >= ZERO_COPY_THRESHOLD else arr.tobytes()


def _tensor(frames: Sequence, i: int, dtype: np.dtype, shape: tuple, limits: Limits) -> np.ndarray:
    declared = dtype.itemsize * math.prod(shape)
    if declared > limits.max_frame_bytes:
        raise WireError(f"tensor {i}: {declared} bytes, limit {limits.max_frame_bytes}")
    view = frame_view(frames[i + 1])
    if view.nbytes != declared:
        raise WireError(f"tensor {i}: header declares {declared} bytes, frame has {view.nbytes}")
    # One array object, not frombuffer's then reshape's: this runs for every tensor of every attend,
    # and in the pipeline (caches emptied by the kernel's and the weights' streams) each call costs
    # several times what it does warm.
    return np.ndarray(shape, dtype, view)


def _decode_binary(raw: memoryview, frames: Sequence, limits: Limits) -> Message:
    if raw.nbytes < 3:
        raise WireError(f"header of {raw.nbytes} bytes starts with 0xC1: neither msgpack nor a whole binary header")
    if raw[1] != PROTOCOL_VERSION:
        raise WireError(f"protocol version {raw[1]}, expected {PROTOCOL_VERSION}")
    kind = raw[2]
    if kind == KIND_ATTEND:
        if raw.nbytes < ATTEND.size:
            raise WireError(f"attend header is {raw.nbytes} bytes, expected at least {ATTEND.size}")
        _, _, _, flags, code, rid, dl, layer, h0, h1, n, tq, hq, tkv, hkv, d, name_len = ATTEND.unpack_from(raw)
        try:
            if raw.nbytes != ATTEND.size + name_len:
                raise WireError(f"attend header is {raw.nbytes} bytes, declares {ATTEND.size + name_len}")
            if flags & ~(FLAG_TRACE | FLAG_DEADLINE) or code >= len(_CODE_TAG):
                raise WireError(f"attend: unknown flags {flags:#x} or dtype code {code}")
            if flags & FLAG_DEADLINE and not math.isfinite(dl):
                raise WireError("deadline must be a finite number")
            if min(n, tq, hq, tkv, hkv, d) < 0:
                raise WireError("attend: negative dimension")
            if len(frames) != 5:
                raise WireError(f"attend carries 4 tensors, message has {len(frames) - 1} frames")
            try:
                owner = str(raw[ATTEND.size:], "utf-8")
            except UnicodeDecodeError:
                raise WireError("attend: owner is not utf-8") from None
            tag = _CODE_TAG[code]
            dt = DTYPES[tag]
            tensors = [_tensor(frames, 0, _I64, (n, 4), limits), _tensor(frames, 1, dt, (tq, hq, d), limits),
                       _tensor(frames, 2, dt, (tkv, hkv, d), limits), _tensor(frames, 3, dt, (tkv, hkv, d), limits)]
            if sum(t.nbytes for t in tensors) > limits.max_total_bytes:
                raise WireError(f"message tensors exceed {limits.max_total_bytes} bytes")
        except WireError as e:
            e.rid = rid
            raise
        fields = {"owner": owner, "layer": layer, "h0": h0, "h1": h1}
        if flags & FLAG_TRACE:
            fields["trace"] = True
        return Message("attend", rid, fields, tensors, ["i64", tag, tag, tag],
                       dl if flags & FLAG_DEADLINE else None)
    if kind == KIND_REPLY:
        if raw.nbytes != REPLY.size:
            raise WireError(f"reply header is {raw.nbytes} bytes, expected {REPLY.size}")
        _, _, _, flags, rid, t, hq, d, tq, tk0, tk1 = REPLY.unpack_from(raw)
        try:
            if flags & ~FLAG_TRACE or min(t, hq, d) < 0 or len(frames) != 3:
                raise WireError(f"reply: flags {flags:#x}, shape {[t, hq, d]}, {len(frames) - 1} tensor frames")
            tensors = [_tensor(frames, 0, _F32, (t, hq, d), limits), _tensor(frames, 1, _F32, (t, hq), limits)]
            if tensors[0].nbytes + tensors[1].nbytes > limits.max_total_bytes:
                raise WireError(f"message tensors exceed {limits.max_total_bytes} bytes")
        except WireError as e:
            e.rid = rid
            raise
        fields = {"tq": tq, "tk0": tk0, "tk1": tk1} if flags & FLAG_TRACE else {}
        return Message("reply", rid, fields, tensors, ["f32", "f32"])
    raise WireError(f"binary header of unknown kind {kind}")
