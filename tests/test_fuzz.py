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
