"""The wire protocol on its own: every op round-trips, every malformed message is refused with the right code."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from plcli.runtime import wire

SID = "0123456789abcdef0123456789abcdef"
FINGERPRINT = "sha256:" + "ab" * 32
LIMIT = 1 << 20


def _header(**fields) -> bytes:
    return json.dumps({"v": wire.PROTOCOL_VERSION, **fields}).encode()


VALID_REQUESTS = {
    "open": ({"ab_fingerprint": FINGERPRINT, "wire_dtype": "float32", "batch": 1, "mode": "generate"}, None),
    "step": ({"session": SID, "step": 0}, np.ones((1, 3, 8), np.float32)),
    "madx": ({"session": SID, "step": 4, "cut": 1}, np.ones((1, 1, 3, 2), np.float32)),
    "train_step": ({"session": SID, "step": 2, "lengths": [3, 1], "grad": True}, np.ones((2, 3, 8), np.float32)),
    "grad_hidden": ({"session": SID, "step": 2}, np.ones((2, 3, 8), np.float32)),
    "grad_ax": ({"session": SID, "step": 2, "cut": 0}, np.ones((2, 3, 3, 2), np.float32)),
    "abort": ({"session": SID}, None),
    "close": ({"session": SID}, None),
    "status": ({}, None),
}
VALID_REPLIES = {
    "opened": ({"session": SID, "max_context": 256, "max_message_bytes": 9000, "wire_dtype": "float16"}, None),
    "ax": ({"step": 0, "cut": 0, "layer": 0, "stage": "attn_in"}, np.ones((1, 3, 3, 2), np.float32)),
    "hidden": ({"step": 0}, np.ones((1, 3, 8), np.float32)),
    "grad": ({"step": 2, "cut": 1, "layer": 0, "stage": "mlp_in", "last": False}, np.ones((2, 3, 2, 2), np.float32)),
    "aborted": ({"session": SID}, None),
    "closed": ({"session": SID}, None),
    "status": ({"sessions": 1, "max_sessions": 16, "tokens": 10, "tokens_per_s": 2.5, "uptime_s": 1, "rejected": 0,
                "memory_bytes": 4096, "grouped_calls": 3, "largest_group": 2}, None),
    "error": ({"code": "busy", "message": "try later"}, None),
}


def test_the_tables_cover_exactly_the_documented_ops():
    assert set(VALID_REQUESTS) == set(wire.REQUESTS) and set(VALID_REPLIES) == set(wire.REPLIES)
    for op in [*wire.REQUESTS, *wire.REPLIES]:
        assert f"\n    {op} " in wire.__doc__, op


# The field set of every op, per protocol version. A reader refuses any other set, so a field added to or dropped
# from an op breaks every peer built before: that is a new version (a new entry here), never an edit of an old one.
FIELDS_BY_VERSION = {
    2: {
        "requests": {"open": {"ab_fingerprint", "wire_dtype", "batch", "mode"}, "step": {"session", "step", "shape"},
                     "madx": {"session", "step", "cut", "shape"},
                     "train_step": {"session", "step", "lengths", "grad", "shape"},
                     "grad_hidden": {"session", "step", "shape"}, "grad_ax": {"session", "step", "cut", "shape"},
                     "abort": {"session"}, "close": {"session"}, "status": set()},
        "replies": {"opened": {"session", "max_context", "max_message_bytes", "wire_dtype"},
                    "ax": {"step", "cut", "layer", "stage", "shape"}, "hidden": {"step", "shape"},
                    "grad": {"step", "cut", "layer", "stage", "last", "shape"}, "aborted": {"session"},
                    "closed": {"session"},
                    "status": {"sessions", "max_sessions", "tokens", "tokens_per_s", "uptime_s", "rejected",
                               "memory_bytes", "grouped_calls", "largest_group"},
                    "error": {"code", "message"}},
    },
}


def _fields(table) -> dict[str, set[str]]:
    return {op: set(schema) for op, schema in table.items()}


def test_changing_an_ops_fields_takes_a_new_protocol_version():
    assert wire.PROTOCOL_VERSION in FIELDS_BY_VERSION, "a new protocol version: record its field sets above"
    fields = FIELDS_BY_VERSION[wire.PROTOCOL_VERSION]
    assert _fields(wire.REQUESTS) == fields["requests"], "request fields changed: bump wire.PROTOCOL_VERSION"
    assert _fields(wire.REPLIES) == fields["replies"], "reply fields changed: bump wire.PROTOCOL_VERSION"


def test_the_readme_documents_the_protocol_as_implemented():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"### The wire protocol (version {wire.PROTOCOL_VERSION})" in readme
    assert f"`v` (protocol version, {wire.PROTOCOL_VERSION})" in readme
    section = readme.split("### The wire protocol", 1)[1].split("\n## ", 1)[0]
    documented = {"edge -> cloud": {}, "cloud -> edge": {}}
    direction = None
    for row in re.findall(r"^\|\s*(.*?)\s*\|\s*`(\w+)`\s*\|\s*(.*?)\s*\|", section, re.M):
        direction = row[0] or direction
        # Backquoted names outside parentheses are fields; inside they are values or flags.
        documented[direction][row[1]] = set(re.findall(r"`(\w+)`", re.sub(r"\([^)]*\)", "", row[2])))
    assert documented["edge -> cloud"] == _fields(wire.REQUESTS)
    assert documented["cloud -> edge"] == _fields(wire.REPLIES)


@pytest.mark.parametrize("table, op", [(wire.REQUESTS, op) for op in VALID_REQUESTS] + [(wire.REPLIES, op) for op in VALID_REPLIES])
def test_every_op_round_trips(table, op):
    fields, tensor = (VALID_REQUESTS if table is wire.REQUESTS else VALID_REPLIES)[op]
    frames = wire.encode(op, fields, tensor)
    header, payload = wire.decode(frames, table, max_message_bytes=LIMIT)
    assert header == {"v": wire.PROTOCOL_VERSION, "op": op, **fields, **({"shape": list(tensor.shape)} if tensor is not None else {})}
    if tensor is None:
        assert payload is None
    else:
        np.testing.assert_array_equal(wire.tensor(payload, header["shape"], "float32"), tensor)


def test_float32_tensors_are_sent_without_a_copy_and_float16_halves_them():
    x = np.random.default_rng(0).standard_normal((1, 5, 16)).astype(np.float32)
    frames = wire.encode("step", {"session": SID, "step": 0}, x)
    assert np.shares_memory(np.frombuffer(frames[1], np.float32), x)
    half = wire.encode("step", {"session": SID, "step": 0}, x, "float16")
    assert memoryview(half[1]).nbytes * 2 == x.nbytes
    header, payload = wire.decode(half, wire.REQUESTS, max_message_bytes=LIMIT)
    got = wire.tensor(payload, header["shape"], "float16")
    assert got.dtype == np.float32 and np.allclose(got, x, rtol=1e-3, atol=1e-3)


def test_received_tensors_are_aligned_float32_even_at_odd_offsets():
    x = np.arange(12, dtype=np.float32)
    odd = memoryview(b"\0" + x.tobytes())[1:]
    got = wire.tensor(odd, [3, 4], "float32")
    assert got.flags.aligned and np.array_equal(got.ravel(), x)


@pytest.mark.parametrize("frames, code", [
    ([], "bad_message"),
    ([b""], "bad_message"),
    ([b"\xff\xfe{}"], "bad_message"),
    ([b'{"v": 2, "op": "status"'], "bad_message"),  # truncated header
    ([b"[1, 2]"], "bad_message"),
    ([b"[" * 3000 + b"]" * 1000], "bad_message"),
    ([b'{"op": "status"}'], "bad_message"),
    ([b'{"v": true, "op": "status"}'], "bad_message"),
    ([_header(op=7)], "bad_message"),
    ([b'{"v": 1, "op": "status"}'], "unsupported_version"),
    ([_header(op="hello")], "unknown_op"),
    ([_header(op="open", ab_fingerprint=FINGERPRINT, wire_dtype="float32", batch=1)], "bad_message"),  # no mode
    ([_header(op="open", ab_fingerprint=FINGERPRINT, wire_dtype="float32", batch=1, mode="train")], "bad_message"),
    ([_header(op="train_step", session=SID, step=0, lengths=[], grad=True, shape=[1, 1, 8]), b"\0" * 32], "bad_message"),
    ([_header(op="train_step", session=SID, step=0, lengths=[0], grad=True, shape=[1, 1, 8]), b"\0" * 32], "bad_message"),
    ([_header(op="train_step", session=SID, step=0, lengths=[1], grad=1, shape=[1, 1, 8]), b"\0" * 32], "bad_message"),
    ([_header(op="train_step", session=SID, step=0, lengths=[1] * 257, grad=True, shape=[1, 1, 8]), b"\0" * 32],
     "bad_message"),
    ([_header(op="grad_ax", session=SID, step=0, shape=[1, 1, 8]), b"\0" * 32], "bad_message"),  # no cut
    ([_header(op="status", extra=1)], "bad_message"),
    ([b'{"v": 2, "op": "open", "op": "status"}'], "bad_message"),  # a name twice: readers may differ on which counts
    ([b'{"v": 2, "v": 2, "op": "status"}'], "bad_message"),
    ([_header(op="status"), b"tensor"], "bad_message"),
    ([_header(op="close")], "bad_message"),
    ([_header(op="close", session="XYZ")], "bad_message"),
    ([_header(op="close", session=SID.upper())], "bad_message"),
    ([_header(op="open", ab_fingerprint=FINGERPRINT, wire_dtype="float64", batch=1, mode="generate")], "bad_message"),
    ([_header(op="open", ab_fingerprint=FINGERPRINT, wire_dtype="float32", batch=0, mode="generate")], "bad_message"),
    ([b'{"v": 2, "op": "open", "ab_fingerprint": "' + FINGERPRINT.encode()
      + b'", "wire_dtype": "float32", "batch": NaN, "mode": "tune"}'], "bad_message"),
    ([_header(op="open", ab_fingerprint="x" * 200, wire_dtype="float32", batch=1, mode="generate")], "bad_message"),
    ([_header(op="open", ab_fingerprint=FINGERPRINT.upper(), wire_dtype="float32", batch=1, mode="generate")], "bad_message"),
    ([_header(op="open", ab_fingerprint=FINGERPRINT[:-1] + "\x1b", wire_dtype="float32", batch=1, mode="generate")],
     "bad_message"),
    ([_header(op="step", session=SID, step=0, shape=[1, 1, 8])], "bad_message"),  # tensor frame missing
    ([_header(op="step", session=SID, step=0, shape=[1, 1, 8]), b"\0" * 32, b"\0" * 32], "bad_message"),
    ([_header(op="step", session=SID, step=-1, shape=[1, 1, 8]), b"\0" * 32], "bad_message"),
    ([_header(op="step", session=SID, step=1.0, shape=[1, 1, 8]), b"\0" * 32], "bad_message"),
    ([_header(op="step", session=SID, step=True, shape=[1, 1, 8]), b"\0" * 32], "bad_message"),
    ([_header(op="step", session=SID, step=0, shape=[1, 0, 8]), b""], "bad_message"),
    ([_header(op="step", session=SID, step=0, shape=[[1], 1, 8]), b"\0" * 32], "bad_message"),
    ([_header(op="step", session=SID, step=0, shape=[1] * 9), b"\0" * 4], "bad_message"),
    ([_header(op="step", session=SID, step=0, shape=[1, 1, 2**40]), b"\0" * 4], "bad_message"),
    ([_header(op="step", session=SID, step=0), b"\0" * 32], "bad_message"),  # no shape
    ([_header(op="status", pad="x" * wire.MAX_HEADER_BYTES)], "too_large"),
    ([_header(op="step", session=SID, step=0, shape=[1, 1, LIMIT]), b"\0" * LIMIT], "too_large"),
])
def test_malformed_messages_are_refused_with_their_code(frames, code):
    with pytest.raises(wire.ProtocolError) as info:
        wire.decode(frames, wire.REQUESTS, max_message_bytes=LIMIT)
    assert info.value.code == code and info.value.code in wire.ERROR_CODES


@pytest.mark.parametrize("nbytes", [31, 33, 0])
def test_tensor_frames_must_hold_exactly_their_shape(nbytes):
    with pytest.raises(wire.ProtocolError) as info:
        wire.tensor(memoryview(b"\0" * nbytes), [1, 1, 8], "float32")
    assert info.value.code == "bad_tensor"


def test_framed_size_counts_zmtp_frame_headers():
    assert wire.framed_size([b"x" * 255]) == 257  # flags + 1-byte length
    assert wire.framed_size([b"x" * 256]) == 265  # flags + 8-byte length
    assert wire.framed_size([b"", memoryview(np.zeros(100, np.float32))]) == 2 + 409


def test_random_corruptions_only_ever_raise_protocol_errors():
    rng = np.random.default_rng(0)
    valid = [wire.encode(op, f, t) for op, (f, t) in VALID_REQUESTS.items()]
    for _ in range(2000):
        frames = [bytearray(memoryview(f).tobytes()) for f in valid[rng.integers(len(valid))]]
        target = frames[rng.integers(len(frames))]
        for _ in range(rng.integers(1, 4)):
            if not target:
                break
            if rng.random() < 0.7:
                target[rng.integers(len(target))] = rng.integers(256)
            else:
                del target[rng.integers(len(target)):]
        try:
            header, payload = wire.decode([bytes(f) for f in frames], wire.REQUESTS, max_message_bytes=LIMIT)
            if payload is not None:
                wire.tensor(payload, header["shape"], "float32")
        except wire.ProtocolError as e:
            assert e.code in wire.ERROR_CODES
