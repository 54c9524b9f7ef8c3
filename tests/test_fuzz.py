"""Hostile input on both sides of the wire: a fuzzed cloud keeps serving, a lied-to edge fails cleanly.

The cloud half sends well over 10,000 malformed inputs to a real `CloudServer`:
junk on its TCP port, random multipart messages, well-formed headers that lie,
replays of a recorded session and pickles. The cloud must answer what it can
with an `error`, never stop, and afterwards serve an edge exactly. The edge half
points `RemoteCloudSession` and `RemoteTrainLink` at a fake cloud that answers
the handshake correctly and then lies: every lie must end as a `CloudError`
within the edge's timeout.

Every server binds 127.0.0.1 on a port the OS picks and is stopped by the test
that started it. Each test draws from its own fixed seed, so a failure
reproduces; the seed is in every assertion message.
"""

from __future__ import annotations

import json
import pickle
import socket
import struct
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import zmq

from plcli.runtime import wire
from plcli.runtime.client import CloudError, RemoteCloudSession, RemoteTrainLink, cloud_status
from plcli.runtime.cloud import CloudModel
from plcli.runtime.edge import EdgeModel, forward
from plcli.runtime.generate import Sampling, generate
from plcli.runtime.plan import STAGE_TARGETS
from plcli.runtime.server import CloudServer, running

TIMEOUT = 5.0
PROMPT_IDS = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def models(llama_bundle):
    return llama_bundle, CloudModel(llama_bundle / "cloud", threads=1), EdgeModel(llama_bundle / "edge", threads=1)


@contextmanager
def serve(cloud: CloudModel, **options):
    server = CloudServer(cloud, bind="tcp://127.0.0.1:*", threads=1, **options)
    with running(server) as endpoint:
        yield server, endpoint


def cloud_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "plcli-cloud" and t.is_alive()]


def assert_still_serves_exactly(server: CloudServer, endpoint: str, edge: EdgeModel, cloud: CloudModel, seed: int) -> None:
    """The loop thread lives, `status` answers, and an edge gets exactly the tokens of an in-process run."""
    assert len(cloud_threads()) == 1, f"seed {seed}: the cloud's thread died"
    assert cloud_status(endpoint, timeout=TIMEOUT)["max_sessions"] == server.max_sessions, f"seed {seed}"
    sampling = Sampling(max_new_tokens=8, ignore_eos=True)
    want = list(generate(edge, cloud.new_session(), PROMPT_IDS, sampling))
    with RemoteCloudSession(endpoint, edge.manifest, timeout=TIMEOUT) as session:
        assert list(generate(edge, session, PROMPT_IDS, sampling)) == want, f"seed {seed}"


class Peer:
    """A DEALER that sends whatever frames it is given and collects every reply, checked as the edge checks them."""

    def __init__(self, endpoint: str):
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)

    def send(self, frames: list) -> None:
        self.socket.send_multipart(frames)

    def replies(self, count: int, seed: int) -> list[tuple[dict, memoryview | None]]:
        got = []
        for _ in range(count):
            assert self.socket.poll(int(TIMEOUT * 1000)), f"seed {seed}: {len(got)} of {count} replies came"
            # A reply the edge would refuse is a server bug too: decode it exactly as the client does.
            got.append(wire.decode(self.socket.recv_multipart(), wire.REPLIES, max_message_bytes=1 << 24))
        assert not self.socket.poll(0), f"seed {seed}: more replies than requests"
        return got

    def ask(self, frames: list, seed: int = -1) -> tuple[dict, memoryview | None]:
        self.send(frames)
        return self.replies(1, seed)[0]

    def close(self) -> None:
        self.socket.close()


def _open(edge: EdgeModel, mode: str) -> list:
    return wire.encode("open", {"ab_fingerprint": edge.manifest.ab_fingerprint, "wire_dtype": "float32", "batch": 1,
                                "mode": mode})


# -- raw bytes on the TCP port --------------------------------------------------------------
def zmtp_greeting(mechanism: bytes = b"NULL") -> bytes:
    """The 64-byte ZMTP 3.0 greeting of a client."""
    return b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + mechanism.ljust(20, b"\0") + b"\x00" + b"\0" * 31


def zmtp_command(name: bytes, properties: dict[bytes, bytes]) -> bytes:
    body = bytes([len(name)]) + name + b"".join(bytes([len(k)]) + k + struct.pack(">I", len(v)) + v
                                                for k, v in properties.items())
    return (b"\x04" + bytes([len(body)]) if len(body) <= 255 else b"\x06" + struct.pack(">Q", len(body))) + body


def zmtp_frame(body: bytes, more: bool = False) -> bytes:
    if len(body) <= 255:
        return bytes([int(more)]) + bytes([len(body)]) + body
    return bytes([int(more) | 2]) + struct.pack(">Q", len(body)) + body


def zmtp_ready() -> bytes:
    return zmtp_command(b"READY", {b"Socket-Type": b"DEALER"})


def zmtp_send(s: socket.socket, greeting: bytes, rest: bytes) -> None:
    """Send a greeting, then (once a valid one has been answered) the rest, as a libzmq peer does.

    libzmq drops a peer whose READY arrives in the same read as its greeting, so
    the rest must wait for the cloud's greeting to reach the frames at all.
    """
    s.sendall(greeting)
    if greeting == zmtp_greeting() and rest:
        received = b""
        while len(received) < 64 and (chunk := s.recv(64 - len(received))):
            received += chunk
    s.sendall(rest)


def _tcp_address(endpoint: str) -> tuple[str, int]:
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    assert host == "127.0.0.1"
    return host, int(port)


def test_the_hand_made_zmtp_stream_is_what_the_cloud_speaks(models):
    # Otherwise the junk below would never get past the greeting and the tests of frames would test nothing.
    _, cloud, _ = models
    with serve(cloud, tune=False) as (_, endpoint):
        with socket.create_connection(_tcp_address(endpoint), timeout=TIMEOUT) as s:
            zmtp_send(s, zmtp_greeting(), zmtp_ready() + zmtp_frame(wire.encode("status", {})[0]))
            received = b""
            while b'"op":"status"' not in received:
                chunk = s.recv(4096)
                assert chunk, f"connection closed after {received!r}"
                received += chunk


def _junk_connection(rng: np.random.Generator) -> tuple[bytes, bytes]:
    """(greeting, rest) of one hostile connection: random junk, a broken greeting or a stream broken mid-frame."""
    kind = rng.integers(8)
    junk = rng.bytes(int(rng.integers(0, 600)))
    if kind == 0:
        return junk, b""
    if kind == 1:  # a greeting cut short
        return zmtp_greeting()[: rng.integers(0, 64)], b""
    if kind == 2:  # a greeting with one byte changed, then junk
        greeting = bytearray(zmtp_greeting())
        greeting[rng.integers(0, 64)] = rng.integers(0, 256)
        return bytes(greeting), junk
    if kind == 3:  # another mechanism, or a command that is not READY
        mechanism = [b"PLAIN", b"CURVE", b"GSSAPI", rng.bytes(20)][rng.integers(4)]
        return zmtp_greeting(mechanism), zmtp_command(b"HELLO", {b"User": junk[:40]})
    if kind == 4:  # READY with a wrong or absurd socket type
        return zmtp_greeting(), zmtp_command(b"READY", {b"Socket-Type": [b"PUB", b"ROUTER", junk[:30]][rng.integers(3)]})
    if kind == 5:  # a frame that promises more bytes than ever come
        frame = zmtp_frame(junk + b"x" * 300)
        return zmtp_greeting(), zmtp_ready() + frame[: rng.integers(1, len(frame))]
    if kind == 6:  # a frame length beyond any limit (libzmq drops the connection)
        return zmtp_greeting(), zmtp_ready() + b"\x02" + struct.pack(">Q", int(rng.integers(1 << 40, 1 << 62))) + junk[:50]
    # Complete frames of junk, then gone before any reply.
    frames = b"".join(zmtp_frame(rng.bytes(int(rng.integers(0, 300))), more=bool(i < 2)) for i in range(3))
    return zmtp_greeting(), zmtp_ready() + frames


def test_junk_on_the_tcp_port_never_stops_the_cloud(models):
    seed, connections = 1, 1000
    rng = np.random.default_rng(seed)
    _, cloud, edge = models
    with serve(cloud, tune=False) as (server, endpoint):
        address = _tcp_address(endpoint)
        for _ in range(connections):
            with socket.create_connection(address, timeout=TIMEOUT) as s:
                try:
                    zmtp_send(s, *_junk_connection(rng))
                except ConnectionError:
                    continue  # the cloud hung up on this one first: what it should do
                if rng.integers(2):  # half end with a reset rather than a clean close
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        assert_still_serves_exactly(server, endpoint, edge, cloud, seed)


# -- random and lying messages through ZeroMQ ------------------------------------------------
WINDOW = 64  # messages in flight per round: the cloud answers each, the test then checks every answer
EVIL = [-1, -(1 << 63), 1 << 64, 1 << 53, 0.0, 1.5, 1e308, True, False, None, "", "0", "\U0010ffff" * 40, [], {}, [1],
        {"a": 1}, float("nan"), float("inf"), float("-inf")]


def _random_frames(rng: np.random.Generator) -> list[bytes]:
    """1 to 4 frames of random bytes, sometimes a JSON-looking first frame."""
    frames = [rng.bytes(int(rng.integers(0, 300))) for _ in range(rng.integers(1, 5))]
    if rng.integers(3) == 0:
        frames[0] = b'{"v": 2, "op": ' + frames[0]
    return frames


def _nested(rng: np.random.Generator) -> str:
    depth = int(rng.integers(100, 2000))
    return "[" * depth + "]" * depth if rng.integers(2) else '{"a":' * depth + "0" + "}" * depth


def _lie(rng: np.random.Generator, valid: dict[str, tuple[dict, tuple[int, ...] | None]], sessions: list[str]) -> list[bytes]:
    """A well-framed message that starts from a valid request and lies about one to three things."""
    op = list(valid)[rng.integers(len(valid))]
    fields, shape = valid[op]
    header = {"v": wire.PROTOCOL_VERSION, "op": op, **fields}
    if shape is not None:
        header["shape"] = list(shape)
    data = None if shape is None else rng.standard_normal(shape).astype(np.float32).tobytes()
    extra_frames: list[bytes] = []
    raw_json = None
    for _ in range(rng.integers(1, 4)):
        lie = rng.integers(12)
        name = list(header)[rng.integers(len(header))] if header else "v"
        if lie == 0:  # a field of the wrong type or out of range
            header[name] = EVIL[rng.integers(len(EVIL))]
        elif lie == 1:
            header.pop(name)
        elif lie == 2:  # an extra field
            header[["pad", "x" * 40, "\U0001f600", "session_", "__class__"][rng.integers(5)]] = EVIL[rng.integers(len(EVIL))]
        elif lie == 3:  # a shape that does not match the frame, or absurd
            header["shape"] = [int(d) for d in rng.choice([0, 1, 2, 3, 64, 1 << 20, (1 << 31) - 1, 1 << 31, -1],
                                                          size=rng.integers(0, 10))]
        elif lie == 4 and data is not None:  # a frame of another size (other dtype, truncated, one byte more)
            data = [data[: len(data) // 2], data + data, data[:-1], data + b"\0", b""][rng.integers(5)]
        elif lie == 5:
            header["v"] = [0, 1, 3, -2, 2.0, "2", True, None, 1 << 70][rng.integers(9)]
        elif lie == 6:  # a forged or foreign session (the other mode's session is a mode mismatch)
            header["session"] = [rng.bytes(16).hex(), rng.bytes(16).hex().upper(), "0" * 31, *sessions][rng.integers(3 + len(sessions))]
        elif lie == 7:
            header["step"] = int(rng.integers(-2, 6)) if rng.integers(2) else wire.MAX_STEP
        elif lie == 8:
            header["cut"] = int(rng.integers(-1, 8))
        elif lie == 9:  # the op of another request, or none that exists
            header["op"] = [*wire.REQUESTS, *wire.REPLIES, "Step", "", "open\0"][rng.integers(len(wire.REQUESTS) + len(wire.REPLIES) + 3)]
        elif lie == 10:
            extra_frames.append(rng.bytes(int(rng.integers(0, 64))))
        else:  # JSON only Python's parser accepts, or nested to blow a recursive one
            raw_json = json.dumps(header)[:-1] + f', "{name}": ' + ["NaN", "Infinity", "-Infinity", _nested(rng)][rng.integers(4)] + "}"
    head = (raw_json or json.dumps(header)).encode("utf-8", "surrogatepass")
    frames = [head] + ([] if data is None or (shape is not None and rng.integers(20) == 0) else [data]) + extra_frames
    return frames


def _valid_requests(edge: EdgeModel, generate: Peer, tune: Peer, seed: int) -> tuple[dict, list[str]]:
    """Open a generate and a tune session; the valid request of every op, as templates to lie from."""
    g, _ = generate.ask(_open(edge, "generate"), seed)
    t, _ = tune.ask(_open(edge, "tune"), seed)
    gid, tid = g["session"], t["session"]
    hidden, rank = edge.arch.hidden_size, edge.manifest.rank
    return {
        "open": ({"ab_fingerprint": edge.manifest.ab_fingerprint, "wire_dtype": "float32", "batch": 1, "mode": "generate"}, None),
        "step": ({"session": gid, "step": 0}, (1, 2, hidden)),
        "madx": ({"session": gid, "step": 0, "cut": 0}, (1, 2, 3, rank)),
        "train_step": ({"session": tid, "step": 0, "lengths": [2, 1], "grad": True}, (2, 2, hidden)),
        "grad_hidden": ({"session": tid, "step": 0}, (2, 2, hidden)),
        "grad_ax": ({"session": tid, "step": 0, "cut": 0}, (2, 2, 3, rank)),
        "abort": ({"session": tid}, None),
        "close": ({"session": gid}, None),
        "status": ({}, None),
    }, [gid, tid]


def test_random_and_lying_messages_get_errors_and_the_cloud_serves_exactly_afterwards(models):
    seed, rounds = 2, 150  # 9,600 messages
    rng = np.random.default_rng(seed)
    _, cloud, edge = models
    with serve(cloud, max_sessions=4, session_timeout=60.0) as (server, endpoint):
        peers = [Peer(endpoint) for _ in range(3)]
        try:
            valid, sessions = _valid_requests(edge, peers[0], peers[1], seed)
            replies: list[dict] = []
            for _ in range(rounds):
                sent = [0] * len(peers)
                for _ in range(WINDOW):
                    i = int(rng.integers(len(peers)))
                    peers[i].send(_random_frames(rng) if rng.integers(4) == 0 else _lie(rng, valid, sessions))
                    sent[i] += 1
                for peer, count in zip(peers, sent):
                    replies += [header for header, _ in peer.replies(count, seed)]
        finally:
            for peer in peers:
                peer.close()
        errors = [r["code"] for r in replies if r["op"] == "error"]
        assert len(replies) == rounds * WINDOW, f"seed {seed}"
        assert set(errors) <= set(wire.ERROR_CODES), f"seed {seed}: {set(errors) - set(wire.ERROR_CODES)}"
        assert "internal" not in errors, f"seed {seed}: a message reached the model unvalidated"
        # A lie can come out true (a step of the right number and shape): then the reply is the real one.
        assert len(errors) > 0.9 * len(replies), f"seed {seed}"
        assert {r["op"] for r in replies} <= {"error", "opened", "ax", "hidden", "status", "closed", "aborted"}, f"seed {seed}"
        assert_still_serves_exactly(server, endpoint, edge, cloud, seed)


def _run_step(peer: Peer, edge: EdgeModel, sid: str, step: int, ids: np.ndarray, sent: list[list[bytes]]) -> np.ndarray:
    """One real step over `peer`, every request kept in `sent`; the logits."""
    frames = wire.encode("step", {"session": sid, "step": step}, edge.embed(ids))
    while True:
        sent.append([bytes(f) for f in frames])
        header, payload = peer.ask(frames)
        if header["op"] == "hidden":
            return edge.logits(wire.tensor(payload, header["shape"], "float32"))
        assert header["op"] == "ax", header
        madx = edge.apply_adapter(header["layer"], header["stage"], wire.tensor(payload, header["shape"], "float32"))
        frames = wire.encode("madx", {"session": sid, "step": step, "cut": header["cut"]}, madx)


def test_replayed_steps_are_refused_and_change_nothing(models):
    seed = 3
    _, cloud, edge = models
    ids = [np.asarray([PROMPT_IDS]), np.asarray([[9]]), np.asarray([[10]])]
    local = cloud.new_session()
    want = [forward(edge, local, i) for i in ids]
    with serve(cloud, tune=False) as (server, endpoint):
        peer, stranger = Peer(endpoint), Peer(endpoint)
        try:
            sent: list[list[bytes]] = []
            sid = peer.ask(_open(edge, "generate"))[0]["session"]
            np.testing.assert_array_equal(_run_step(peer, edge, sid, 0, ids[0], sent), want[0])
            np.testing.assert_array_equal(_run_step(peer, edge, sid, 1, ids[1], sent), want[1])
            replays = [sent[i] for i in np.random.default_rng(seed).permutation(len(sent))]
            # Old steps on their own connection, mid-step and between steps; on another connection they name no session.
            codes = {peer.ask(frames)[0].get("code") for frames in replays}
            codes |= {stranger.ask(frames)[0].get("code") for frames in replays}
            assert codes == {"out_of_order", "unknown_session"}, f"seed {seed}: {codes}"
            np.testing.assert_array_equal(_run_step(peer, edge, sid, 2, ids[2], []), want[2])
            assert peer.ask(wire.encode("close", {"session": sid}))[0]["op"] == "closed"
            assert {peer.ask(frames)[0].get("code") for frames in replays} == {"unknown_session"}, f"seed {seed}"
        finally:
            peer.close()
            stranger.close()
        assert_still_serves_exactly(server, endpoint, edge, cloud, seed)


class FileMaker:
    """Unpickling this creates the file `path`: the marker of a reader that unpickles."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_pickles_are_never_unpickled_by_the_cloud(models, tmp_path):
    _, cloud, edge = models
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(FileMaker(probe)))
    assert probe.exists()  # the payload does what it says to whoever unpickles it
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(FileMaker(marker), protocol=2)
    hidden = edge.arch.hidden_size
    with serve(cloud, tune=False) as (server, endpoint):
        peer = Peer(endpoint)
        try:
            sid = peer.ask(_open(edge, "generate"))[0]["session"]
            size = 4 * hidden * ((len(payload) + 4 * hidden - 1) // (4 * hidden))
            as_tensor = payload.ljust(size, b".")
            messages = [[payload], [payload, payload], [json.dumps({"v": 2, "op": "status"}).encode(), payload],
                        [json.dumps({"v": 2, "op": payload.decode("latin-1")}).encode()],
                        [json.dumps({"v": 2, "op": "step", "session": sid, "step": 0, "shape": [1, len(payload), 1]}).encode(), payload]]
            for frames in messages:
                assert peer.ask(frames)[0]["op"] == "error"
            # The right size for a tensor: then it is numbers, whatever they spell.
            step = json.dumps({"v": 2, "op": "step", "session": sid, "step": 0, "shape": [1, size // (4 * hidden), hidden]})
            assert peer.ask([step.encode(), as_tensor])[0]["op"] == "ax"
        finally:
            peer.close()
        with socket.create_connection(_tcp_address(endpoint), timeout=TIMEOUT) as s:
            zmtp_send(s, zmtp_greeting(), zmtp_ready() + zmtp_frame(payload))
        assert_still_serves_exactly(server, endpoint, edge, cloud, 0)
    assert not marker.exists()
