"""The edge <-> cloud wire protocol, version 2: every op, header field, frame and limit.

Transport: ZeroMQ. The cloud binds one ROUTER socket; each edge connects one
DEALER socket and runs one session over it. A message is a multipart ZeroMQ
message:

    frame 0     header: one JSON object, UTF-8, at most MAX_HEADER_BYTES
    frame 1     (ops that carry a tensor) the tensor's raw bytes: C order,
                little-endian, in the session's wire dtype, exactly
                prod(shape) * itemsize bytes; the edge refuses a reply whose
                tensor holds NaN or infinity

Nothing is ever pickled; a header is plain JSON and a tensor is raw numbers,
so a message can describe data but never make its reader run code. Every
header carries `v` (PROTOCOL_VERSION) and `op`, then exactly the fields its op
lists below, no more. Integers must be JSON integers (not floats, not booleans).

Edge -> cloud (requests)

    open    ab_fingerprint, wire_dtype, batch, mode
            Handshake. `ab_fingerprint` is the sha256 of the A/B the edge's
            bundle was split with ("sha256:" and 64 hex digits); the cloud
            refuses any other (an M is useless with other A/B). `wire_dtype` is "float32" (exact) or
            "float16" (half the bytes) and must be the cloud's. `mode` is
            "generate" (a KV cache grows step by step) or "tune" (passes over
            independent batches, forward and backward, no cache). `batch` is
            the number of sequences a generate step carries (a tune session
            gives it per pass). One connection holds at most one session.
    step    session, step, shape + tensor
            Starts step `step` (0 for the first, counting completed steps)
            with input embeddings [batch, seq, hidden] of the tokens after
            the cached ones: all prompt tokens in one message for a prefill,
            one token per step when decoding.
    madx    session, step, cut, shape + tensor
            The edge's `M A x` for cut `cut` (0, 1, ... within the step) of
            the open step; shape exactly that of the `ax` it answers.
    close   session
            Frees the session and its KV cache, at once, even while a step
            is in flight (an edge that stops mid-step): that step is dropped
            unanswered, and `closed` is the reply.

Tune sessions (mode "tune") run passes numbered 0, 1, ... instead of steps:

    train_step  session, step, lengths, grad, shape + tensor
            Starts pass `step` with input embeddings [batch, seq, hidden] of
            right-padded rows; `lengths` (one per row, 1..seq) says how many
            positions of each row are real. With `grad` false (evaluation) the
            pass ends with `hidden` and the cloud keeps nothing; with `grad`
            true it keeps each segment's inputs until the backward.
    madx        as above, answering the pass's forward cut by cut.
    grad_hidden session, step, shape + tensor
            The loss gradient at the last hidden state [batch, seq, hidden].
    grad_ax     session, step, cut, shape + tensor
            The gradient at the `A x` of cut `cut` (`M^T` times the gradient
            at its `M A x`), answering the `grad` reply of that cut.
    abort       session
            Drops the open pass, if any, and whatever the cloud kept for it.
            A pass ends with its `hidden` (evaluation), with the `grad` of
            cut 0 (training) or with `abort`; the next one is `step` + 1.
    status  (no fields)
            Server counters; needs no session.

A connection has one request in flight: it reads the reply before it sends
again (`close` excepted). The cloud queues at most a few messages per connection either way;
past that it stops reading a connection, and drops replies its peer does not
read, so that a peer cannot park gigabytes of replies in the cloud.

Cloud -> edge (replies; exactly one per request)

    opened  session, max_context, max_message_bytes, wire_dtype
            `session` is 128 random bits as 32 hex digits; it only works from
            the connection that opened it (but `close`, from any: one that
            ZeroMQ reconnected) and, under CURVE (see secure.py), from the
            public key that opened it. `max_context` caps the
            session's tokens; `max_message_bytes` caps any message the cloud
            accepts.
    ax      step, cut, layer, stage, shape + tensor
            The stacked `A x` of every target of the cut at (`layer`, `stage`):
            [batch, seq, targets, rank].
    hidden  step, shape + tensor
            The last hidden state [batch, seq, hidden]; the step is complete
            and the session's KV cache now holds its tokens.
    grad    step, cut, layer, stage, last, shape + tensor
            The gradient at the `M A x` of cut `cut` [batch, seq, targets,
            rank], from the last cut down to cut 0 (`last` true: the pass is
            over; below cut 0 lies only the frozen embedding).
    aborted session
    closed  session
    status  sessions, max_sessions, tokens, tokens_per_s, uptime_s, rejected, memory_bytes,
            grouped_calls, largest_group
            `memory_bytes`: what the sessions hold against the cloud's memory
            budget (KV caches, activations of open tune passes).
            `grouped_calls`: segment calls that ran the steps of more than one
            session at once; `largest_group`: the most sessions one call ran.
    error   code, message
            The request was refused and changed nothing (see ERROR_CODES),
            except `internal` in a generate step: the cloud failed to run the
            step and dropped it (the KV cache keeps completed steps only), so
            the edge's next message is that step's `step` again.

Per token the edge sends `step` and one `madx` per cut; the cloud answers each
with `ax`, and the last one with `hidden`. A training pass adds the backward:
`grad_hidden`, answered by the last cut's `grad`, then one `grad_ax` per cut
but the first. Token ids, text, labels, the loss and M never cross.

Byte accounting: `framed_size` counts what the frames occupy in the ZMTP 3
stream (a flags byte and a 1- or 8-byte length before each frame's body), so
an edge's counters equal the bytes its TCP connection carries after the
ZeroMQ handshake.
"""

from __future__ import annotations

import json
import math
import re
from typing import Callable, Sequence

import numpy as np
import zmq

from .plan import STAGE_TARGETS

PROTOCOL_VERSION = 2  # readers refuse any other field set, so changing one is a new version (see tests/test_wire.py)
MAX_HEADER_BYTES = 4096
MAX_ERROR_MESSAGE = 1000  # characters of an `error` reply's message: a reader refuses a longer one
MAX_FRAMES = 2  # header and tensor: `receive` keeps no more of a message than this (and a ROUTER's routing id)
MAX_DIMS = 8
MAX_DIM = (1 << 31) - 1
MAX_STEP = (1 << 53) - 1  # JSON numbers stay exact up to here in every reader
WIRE_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
MODES = ("generate", "tune")
MAX_BATCH = 256  # rows a tune pass may carry: `lengths` must fit in a header
MAX_OPEN_BATCH = 1 << 16  # sequences a generate session may ask for in its `open`
# The longest wait plcli takes anywhere (a reply, a reconnect, an idle session). ZeroMQ takes a wait as a C int of
# milliseconds (at most 24.8 days), and a wait of more than a day is a typo rather than a plan.
MAX_TIMEOUT_S = 24 * 3600

ERROR_CODES = {
    "bad_message": "not a valid header, field or frame layout",
    "too_large": "header or message over the limits",
    "unsupported_version": "another protocol version",
    "unknown_op": "no such op",
    "wrong_mode": "an op of the other session mode (generate / tune)",
    "fingerprint_mismatch": "the edge and cloud bundles were not split together",
    "wire_dtype_mismatch": "the edge and cloud use different wire dtypes",
    "busy": "the cloud serves its maximum number of sessions",
    "limit": "batch, context or sessions per connection over the limits",
    "unknown_session": "no such session for this connection",
    "out_of_order": "not the message the session expects next",
    "bad_tensor": "tensor shape or size not the expected one",
    "internal": "the cloud failed to run the step",
}


class ProtocolError(Exception):
    """A message that breaks the protocol; `code` is one of ERROR_CODES."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


# -- field checks --------------------------------------------------------------
Check = Callable[[object], bool]


def _integer(lo: int, hi: int) -> Check:
    return lambda v: type(v) is int and lo <= v <= hi


def _number(v: object) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def _text(max_len: int) -> Check:
    return lambda v: type(v) is str and len(v) <= max_len


def _one_of(choices) -> Check:
    return lambda v: type(v) is str and v in choices


_SESSION_ID = re.compile(r"[0-9a-f]{32}")
_SHA256 = re.compile(r"sha256:[0-9a-f]{64}")


def _session(v: object) -> bool:
    return type(v) is str and _SESSION_ID.fullmatch(v) is not None


def _sha256(v: object) -> bool:
    return type(v) is str and _SHA256.fullmatch(v) is not None


def _lengths(v: object) -> bool:
    return type(v) is list and 1 <= len(v) <= MAX_BATCH and all(type(n) is int and 1 <= n <= MAX_DIM for n in v)


def _flag(v: object) -> bool:
    return type(v) is bool


def _shape(v: object) -> bool:
    return type(v) is list and 1 <= len(v) <= MAX_DIMS and all(type(d) is int and 1 <= d <= MAX_DIM for d in v)


_STEP = _integer(0, MAX_STEP)
_COUNT = _integer(0, MAX_STEP)
_CUT = _integer(0, 1 << 16)

REQUESTS: dict[str, dict[str, Check]] = {
    "open": {"ab_fingerprint": _sha256, "wire_dtype": _one_of(WIRE_DTYPES), "batch": _integer(1, MAX_OPEN_BATCH),
             "mode": _one_of(MODES)},
    "step": {"session": _session, "step": _STEP, "shape": _shape},
    "madx": {"session": _session, "step": _STEP, "cut": _CUT, "shape": _shape},
    "train_step": {"session": _session, "step": _STEP, "lengths": _lengths, "grad": _flag, "shape": _shape},
    "grad_hidden": {"session": _session, "step": _STEP, "shape": _shape},
    "grad_ax": {"session": _session, "step": _STEP, "cut": _CUT, "shape": _shape},
    "abort": {"session": _session},
    "close": {"session": _session},
    "status": {},
}
REPLIES: dict[str, dict[str, Check]] = {
    "opened": {"session": _session, "max_context": _integer(1, MAX_STEP), "max_message_bytes": _integer(1, MAX_STEP),
               "wire_dtype": _one_of(WIRE_DTYPES)},
    "ax": {"step": _STEP, "cut": _CUT, "layer": _integer(0, 1 << 16), "stage": _one_of(STAGE_TARGETS),
           "shape": _shape},
    "hidden": {"step": _STEP, "shape": _shape},
    "grad": {"step": _STEP, "cut": _CUT, "layer": _integer(0, 1 << 16), "stage": _one_of(STAGE_TARGETS),
             "last": _flag, "shape": _shape},
    "aborted": {"session": _session},
    "closed": {"session": _session},
    "status": {"sessions": _COUNT, "max_sessions": _COUNT, "tokens": _COUNT, "tokens_per_s": _number,
               "uptime_s": _number, "rejected": _COUNT, "memory_bytes": _COUNT, "grouped_calls": _COUNT,
               "largest_group": _COUNT},
    "error": {"code": _text(64), "message": _text(MAX_ERROR_MESSAGE)},
}
# Each op's exact field set, made once rather than for every message.
_FIELDS = {id(schema): frozenset(schema) | {"v", "op"} for table in (REQUESTS, REPLIES) for schema in table.values()}


# -- encoding ------------------------------------------------------------------
_HEADER_ENCODER = json.JSONEncoder(separators=(",", ":"))  # json.dumps would build one per message for the separators
_SNDMORE = int(zmq.SNDMORE)


def encode(op: str, fields: dict, tensor: np.ndarray | None = None, wire_dtype: str = "float32") -> list:
    """Frames of one message: the JSON header, then the tensor's bytes (not copied when already in wire form)."""
    header = {"v": PROTOCOL_VERSION, "op": op, **fields}
    frames: list = []
    if tensor is not None:
        data = np.ascontiguousarray(tensor, dtype=WIRE_DTYPES[wire_dtype])
        header["shape"] = list(data.shape)
        frames.append(memoryview(data).cast("B"))
    return [_HEADER_ENCODER.encode(header).encode()] + frames


def send(socket: zmq.Socket, frames: Sequence) -> None:
    """Send one message's frames, the tensor's without a copy where it is large enough to matter.

    What `send_multipart` does, without its flag arithmetic on Python enums:
    right after an ONNX Runtime call has evicted the caches, a message took
    86 us that way against 60 us this way.
    """
    for frame in frames[:-1]:
        socket.send(frame, _SNDMORE, copy=False)
    socket.send(frames[-1], 0, copy=False)


def framed_size(frames: Sequence) -> int:
    """Bytes the frames take in the ZMTP 3 stream: body plus a flags byte and a 1- or 8-byte length."""
    total = 0
    for f in frames:
        n = memoryview(f).nbytes
        total += n + (2 if n <= 255 else 9)
    return total


# -- decoding ------------------------------------------------------------------
def receive(socket: zmq.Socket, flags: int = 0, *, routed: bool = False) -> tuple[list, int, int]:
    """One message's first frames (zmq.Frames, not copied), how many frames it had and their bytes in all.

    What `recv_multipart` does, but a frame past MAX_FRAMES (after the routing
    id, with `routed`; neither count nor bytes include that) is dropped as it is
    received: a peer's message of a million empty frames, 2 MB on the wire, cost
    a reader a list of a million frames, hundreds of MB and seconds of Python
    before `decode` could refuse it. (libzmq itself still holds every frame of a
    message, about 64 bytes each, until the last one has come: that much no
    option bounds.)
    """
    keep = MAX_FRAMES + routed
    frame = socket.recv(flags, copy=False)
    frames = [frame]
    count, nbytes = 1, 0 if routed else len(frame)
    # The rest of the message is there already: ZeroMQ delivers it whole. A frame says whether more follow for a
    # fraction of what asking the socket (RCVMORE) costs.
    while frame.more:
        frame = socket.recv(flags, copy=False)
        if count < keep:
            frames.append(frame)
        nbytes += len(frame)
        count += 1
    return frames, count - routed, nbytes


class _DuplicateField(ValueError):
    pass


def _unique_fields(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object whose every name is its own: with `{"op": "open", "op": "status"}`, json.loads keeps the last,
    and a proxy or a log in front of the cloud might read the first."""
    fields = dict(pairs)
    if len(fields) != len(pairs):
        name = next(n for i, (n, _) in enumerate(pairs) if any(n == m for m, _ in pairs[:i]))
        raise _DuplicateField(f"header names {name[:40]!r} twice")
    return fields


_HEADER_DECODER = json.JSONDecoder(object_pairs_hook=_unique_fields)


def decode(frames: Sequence, table: dict[str, dict[str, Check]], *, max_message_bytes: int,
           count: int | None = None, nbytes: int | None = None) -> tuple[dict, memoryview | None]:
    """Validated (header, tensor frame or None) of one message; raises ProtocolError.

    `count` and `nbytes` are the message's frames and bytes where `frames` holds only its first ones (see `receive`).
    Checks, in order: sizes against the limits, the header's JSON, version, op,
    the exact field set and each field's type and range, the frame count.
    The tensor frame's size is checked by `tensor` once the dtype is known.
    """
    views = [memoryview(f) for f in frames]
    count = len(views) if count is None else count
    if not views:
        raise ProtocolError("bad_message", "empty message")
    total = sum(v.nbytes for v in views) if nbytes is None else nbytes
    if total > max_message_bytes:
        raise ProtocolError("too_large", f"message of {total} bytes exceeds the limit of {max_message_bytes}")
    if views[0].nbytes > MAX_HEADER_BYTES:
        raise ProtocolError("too_large", f"header of {views[0].nbytes} bytes exceeds the limit of {MAX_HEADER_BYTES}")
    try:
        header = _HEADER_DECODER.decode(str(views[0], "utf-8"))
    except _DuplicateField as e:
        raise ProtocolError("bad_message", str(e)) from None
    except (ValueError, RecursionError):
        raise ProtocolError("bad_message", "header is not UTF-8 JSON") from None
    if not isinstance(header, dict):
        raise ProtocolError("bad_message", "header is not a JSON object")
    version = header.get("v")
    if type(version) is not int:
        raise ProtocolError("bad_message", "header lacks the protocol version `v`")
    if version != PROTOCOL_VERSION:
        raise ProtocolError("unsupported_version", f"protocol version {version}, this side speaks {PROTOCOL_VERSION}")
    op = header.get("op")
    if type(op) is not str:
        raise ProtocolError("bad_message", "header lacks `op`")
    if op not in table:
        raise ProtocolError("unknown_op", f"unknown op {op[:40]!r}")
    schema = table[op]
    if header.keys() != (_FIELDS.get(id(schema)) or schema.keys() | {"v", "op"}):
        fields = set(header) - {"v", "op"}
        missing, extra = sorted(set(schema) - fields), sorted(fields - set(schema))
        detail = "; ".join(s for s in (missing and f"missing {', '.join(missing)}",
                                       extra and f"unexpected {', '.join(repr(f[:40]) for f in extra[:5])}") if s)
        raise ProtocolError("bad_message", f"{op}: {detail}")
    for name, check in schema.items():
        if not check(header[name]):
            raise ProtocolError("bad_message", f"{op}: invalid {name}")
    carries = "shape" in schema
    if count != 1 + carries or len(views) != count:
        raise ProtocolError("bad_message", f"{op} takes {1 + carries} frame(s), got {count}")
    return header, views[1] if carries else None


def tensor(frame: memoryview, shape: Sequence[int], wire_dtype: str) -> np.ndarray:
    """The float32 array in a tensor frame of `shape`; raises ProtocolError unless the size is exact."""
    dtype = WIRE_DTYPES[wire_dtype]
    expected = math.prod(shape) * dtype.itemsize
    if frame.nbytes != expected:
        raise ProtocolError("bad_tensor", f"tensor of shape {list(shape)} in {wire_dtype} is {expected} bytes, got {frame.nbytes}")
    array = np.frombuffer(frame, dtype=dtype).reshape(shape)
    if wire_dtype != "float32":
        return array.astype(np.float32)
    # Small frames arrive inside ZeroMQ's receive buffer at any offset; large ones are aligned and used in place.
    return array if array.flags.aligned else array.copy()


# -- endpoints and waits ---------------------------------------------------------
def timeout_ms(seconds: float) -> int:
    """A wait in seconds as ZeroMQ's milliseconds (at least 1: 0 would not wait at all); ValueError unless it is
    above 0 and at most MAX_TIMEOUT_S (NaN and infinity included)."""
    if not 0 < seconds <= MAX_TIMEOUT_S:
        raise ValueError(f"timeout {seconds:g} s is out of range: more than 0 and at most {MAX_TIMEOUT_S} s")
    return math.ceil(seconds * 1000)


def check_endpoint(endpoint: str, *, bind: bool) -> None:
    """Raise ValueError for a tcp endpoint whose port is not one: ZeroMQ reads what digits it can and wraps them
    modulo 65536 (`tcp://127.0.0.1:99999` binds port 34463, `:-1` binds 65535, `:1e3` port 1) where it should refuse.

    A bind may name port 0 or `*` (a free port); ipc:// and inproc:// endpoints, and other transports, are ZeroMQ's
    to check.
    """
    transport, scheme, address = endpoint.partition("://")
    if not (scheme and transport and address):
        # ZeroMQ says only "Invalid argument", and serve-cloud took such a name for a non-loopback address.
        raise ValueError(f"{endpoint!r} is not an endpoint: give TRANSPORT://ADDRESS, e.g. tcp://127.0.0.1:5555")
    if transport != "tcp":
        return
    host, colon, port = address.rpartition(":")
    if not colon:
        raise ValueError(f"{endpoint}: no port (tcp://HOST:PORT)")
    if not host:
        raise ValueError(f"{endpoint}: no host (tcp://HOST:PORT)")
    if bind and port == "*":
        return
    lowest = 0 if bind else 1
    if not (re.fullmatch(r"[0-9]+", port) and lowest <= int(port) <= 65535):
        free = ", or * for a free one" if bind else ""
        raise ValueError(f"{endpoint}: {port!r} is not a port: use {lowest} to 65535{free}")
