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
import re
import signal
import socket
import struct
import threading
import time
import tracemalloc
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
from processes import SLOW_MACHINE_S

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
WINDOW = 64  # messages per round, spread over the peers: the cloud answers each, the test checks every answer
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
    return [head] + ([] if data is None or rng.integers(20) == 0 else [data]) + extra_frames


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
                waiting = [False] * len(peers)  # one request in flight per connection, as the protocol allows
                for _ in range(WINDOW):
                    i = int(rng.integers(len(peers)))
                    if waiting[i]:
                        replies += [header for header, _ in peers[i].replies(1, seed)]
                    peers[i].send(_random_frames(rng) if rng.integers(4) == 0 else _lie(rng, valid, sessions))
                    waiting[i] = True
                for peer, count in zip(peers, waiting):
                    replies += [header for header, _ in peer.replies(int(count), seed)]
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


MANY_FRAMES = 200_000  # empty frames, 2 bytes each on the wire


def _python_peak_bytes(work) -> int:
    """The most memory Python held above its level before `work()` (tracemalloc: libzmq's own is not counted)."""
    tracemalloc.start()
    try:
        work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_message_of_many_frames_is_one_error_and_never_held_whole(models):
    """A message of 200,000 empty frames (400 kB) was taken in as a list of as many frames: some 80 MB and a second of
    the loop, so that a few MB of them held everyone's steps for seconds. Now only the first frames are kept."""
    _, cloud, edge = models
    server = CloudServer(cloud, bind="tcp://127.0.0.1:*", tune=False, threads=1)
    peer = Peer(server.endpoint)
    try:
        peer.send([wire.encode("status", {})[0]] + [b""] * MANY_FRAMES)
        peak = _python_peak_bytes(lambda: server.turn(TIMEOUT))
        (reply, _), = peer.replies(1, seed=0)
        assert reply["code"] == "bad_message" and f"got {MANY_FRAMES + 1}" in reply["message"], reply
        assert peak < 4 << 20, f"{peak / 2 ** 20:.0f} MiB held for one message"
        peer.send(wire.encode("status", {}))
        server.turn(TIMEOUT)
        assert peer.replies(1, seed=0)[0][0]["op"] == "status"
    finally:
        peer.close()
        server.close()


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def test_a_peer_that_never_reads_has_its_replies_dropped_not_queued(models):
    """Replies pile up nowhere: past a few per connection, the ones its peer does not read are dropped."""
    _, cloud, edge = models
    rows, seq, warm, passes = 64, 256, 4, 20  # each pass answered with 7 MiB: 4 of last hidden state, 3 of `A x`
    with serve(cloud, max_train_tokens=rows * seq) as (server, endpoint):
        hostile = zmq.Context.instance().socket(zmq.DEALER)
        hostile.setsockopt(zmq.LINGER, 0)
        hostile.setsockopt(zmq.RCVHWM, 1)
        hostile.setsockopt(zmq.RCVBUF, 4096)
        hostile.connect(endpoint)
        try:
            hostile.send_multipart(_open(edge, "tune"))
            assert hostile.poll(int(TIMEOUT * 1000))
            session = server.sessions[json.loads(hostile.recv_multipart()[0])["session"]]
            embeds = np.zeros((rows, seq, edge.arch.hidden_size), np.float32)

            def until(done) -> None:  # the peer paces itself by the server's state, never by reading
                deadline = time.monotonic() + 30
                while not (not session.busy and done()):
                    assert time.monotonic() < deadline, (session.trainer.phase, session.cut)
                    time.sleep(0.002)

            def evaluation_pass(step: int) -> None:
                hostile.send_multipart(wire.encode("train_step", {"session": session.id, "step": step, "lengths": [seq] * rows,
                                                                  "grad": False}, embeds))
                for cut in range(len(edge.plan.segments) - 1):
                    until(lambda: session.trainer.phase == "forward" and session.cut == cut)
                    madx = np.zeros(session.trainer.expected_shape, np.float32)
                    hostile.send_multipart(wire.encode("madx", {"session": session.id, "step": step, "cut": cut}, madx))
                until(lambda: session.trainer.phase == "idle")

            for step in range(warm):  # what stays queued, and the allocator's own pools, in place
                evaluation_pass(step)
            before = _rss_mib()
            for step in range(warm, warm + passes):
                evaluation_pass(step)
            grown = _rss_mib() - before
            assert server.counters.rejected == 0
            assert grown < 200, f"{grown:.0f} MiB more after {passes * 7} MiB of replies nobody read"
        finally:
            hostile.close()
        assert_still_serves_exactly(server, endpoint, edge, cloud, seed=0)


def test_words_of_a_peer_reach_the_log_escaped_and_the_cloud_serves_on(llama_bundle):
    """A field name with a lone surrogate once stopped `serve-cloud` (its log could not encode it); escape codes
    went to the operator's terminal."""
    from processes import spawn_plcli, stop

    server = spawn_plcli("serve-cloud", llama_bundle / "cloud", "--bind", "tcp://127.0.0.1:*", "--no-tune", "--threads", 1)
    try:
        first = next(line for line in server.stdout if " serving " in line)
        endpoint = re.search(r"serving (tcp://\S+)", first).group(1)
        peer = Peer(endpoint)
        for evil in ("\ud800", "\x1b[2J\nforged log line"):
            head = json.dumps({"v": wire.PROTOCOL_VERSION, "op": "status", evil: 1}).encode()
            header, _ = peer.ask([head])
            assert header["code"] == "bad_message" and all(c.isprintable() for c in header["message"]), header
        peer.close()
        assert cloud_status(endpoint, timeout=TIMEOUT)["rejected"] == 2
    finally:
        log = stop(server, signal.SIGINT)[0]
    assert server.returncode == 0, log
    assert "\x1b" not in log and "forged" in log and "\nforged" not in log


def test_peers_that_claim_the_routing_ids_libzmq_would_give_next_do_not_abort_the_cloud(llama_bundle):
    """libzmq aborts a ROUTER's process when the id it gives a peer is one another peer chose for itself. Unseeded,
    the first id is 0x00 + 0x6b8b4567 (glibc's first `rand()`) in every process: a real process, since the abort
    would take pytest with it."""
    from processes import listening, spawn_plcli, stop

    server = spawn_plcli("serve-cloud", llama_bundle / "cloud", "--bind", "tcp://127.0.0.1:*", "--no-tune",
                         "--threads", 1, "--json")
    context = zmq.Context()
    sockets = []

    def dealer(routing_id: bytes | None = None) -> zmq.Socket:
        s = context.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        if routing_id is not None:
            s.setsockopt(zmq.ROUTING_ID, routing_id)
        s.connect(endpoint)
        sockets.append(s)
        return s

    status = json.dumps({"v": wire.PROTOCOL_VERSION, "op": "status"}).encode()
    try:
        endpoint = listening(server)["endpoint"]
        claimed = [dealer(b"\x00" + struct.pack(">I", 0x6B8B4567 + k)) for k in range(64)]
        for s in claimed:
            s.send(status)
        assert all(s.poll(int(TIMEOUT * 1000)) for s in claimed)
        plain = dealer()
        plain.send(status)
        assert plain.poll(int(TIMEOUT * 1000)), server.stderr.read() if server.poll() is not None else "no answer"
        assert json.loads(plain.recv())["op"] == "status" and server.poll() is None
    finally:
        for s in sockets:
            s.close()
        context.term()
        stop(server, signal.SIGINT)


def test_an_error_quoting_a_peers_words_is_still_a_reply_the_protocol_allows(models):
    """An error message quotes a peer's field names or version: escaped, six names of 40 unprintable characters made
    a message of 2,000 characters, and a version of 3,000 digits one of 3,000, past the 1,000 an `error` may have.
    A reader refused the reply as malformed."""
    _, cloud, _ = models
    names = {chr(0x21 + i) + "\U0010ffff" * 39: 1 for i in range(6)}
    messages = [json.dumps({"v": wire.PROTOCOL_VERSION, "op": "status", **names}).encode(),
                b'{"v": 1' + b"0" * 3000 + b', "op": "status"}']
    with serve(cloud, tune=False) as (server, endpoint):
        peer = Peer(endpoint)
        try:
            replies = [peer.ask([frames])[0] for frames in messages]  # decoded as an edge decodes them
        finally:
            peer.close()
    assert [r["code"] for r in replies] == ["bad_message", "unsupported_version"], replies
    assert all(len(r["message"]) == wire.MAX_ERROR_MESSAGE for r in replies)


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


# -- the edge facing a lying cloud ------------------------------------------------------------
EDGE_TIMEOUT = 0.5


def _frames(header: dict, data: bytes | None) -> list[bytes]:
    return [json.dumps(header).encode()] + ([] if data is None else [data])


def _other(value, choices):
    return next(c for c in choices if c != value)


# Each lie turns the correct reply (header, tensor bytes) into what the cloud sends instead: a list of messages,
# or None where it does not apply to this reply.
LIES = {
    "step": lambda h, d, marker: "step" in h and [_frames({**h, "step": h["step"] + 1}, d)],
    "older step": lambda h, d, marker: h.get("step", 0) > 0 and [_frames({**h, "step": h["step"] - 1}, d)],
    "cut": lambda h, d, marker: "cut" in h and [_frames({**h, "cut": h["cut"] + 1}, d)],
    "layer": lambda h, d, marker: "layer" in h and [_frames({**h, "layer": h["layer"] + 1}, d)],
    "stage": lambda h, d, marker: "stage" in h and [_frames({**h, "stage": _other(h["stage"], STAGE_TARGETS)}, d)],
    "last": lambda h, d, marker: "last" in h and [_frames({**h, "last": not h["last"]}, d)],
    "shape": lambda h, d, marker: "shape" in h and [_frames({**h, "shape": [*h["shape"][:-1], 1, h["shape"][-1]]}, d)],
    "float64": lambda h, d, marker: d is not None and [_frames(h, np.frombuffer(d, np.float32).astype(np.float64).tobytes())],
    "truncated": lambda h, d, marker: d is not None and [_frames(h, d[:-1])],
    "op": lambda h, d, marker: [_frames({**h, "op": _other(h["op"], ["hidden", "ax"])}, d)],
    "status": lambda h, d, marker: [_frames({"v": 2, "op": "status", "sessions": 1, "max_sessions": 1, "tokens": 0,
                                     "tokens_per_s": 0.0, "uptime_s": 1.0, "rejected": 0,
                                             "memory_bytes": 0}, None)],
    "extra field": lambda h, d, marker: [_frames({**h, "token_ids": [1, 2]}, d)],
    "extra frame": lambda h, d, marker: [_frames(h, d) + [b"\0" * 8]],
    "missing frame": lambda h, d, marker: d is not None and [_frames(h, None)],
    "version": lambda h, d, marker: [_frames({**h, "v": 1}, d)],
    "garbage": lambda h, d, marker: [[b"\x00\xff garbage"]],
    "pickle": lambda h, d, marker: [[pickle.dumps(FileMaker(marker))]],
    "oversize": lambda h, d, marker: d is not None and [_frames(h, d * (1 + OPENED_MAX_MESSAGE // len(d)))],
    "nothing": lambda h, d, marker: [],
    "wire dtype": lambda h, d, marker: "wire_dtype" in h and [_frames({**h, "wire_dtype": "float16"}, d)],
    "tiny message limit": lambda h, d, marker: "max_message_bytes" in h and [_frames({**h, "max_message_bytes": 64}, d)],
    "NaN": lambda h, d, marker: d is not None and [_frames(h, np.float32("nan").tobytes() + d[4:])],
    "infinity": lambda h, d, marker: d is not None and [_frames(h, d[:-4] + np.float32("-inf").tobytes())],
    "error of no known code": lambda h, d, marker: [_frames({"v": 2, "op": "error", "code": "x" * 64, "message": "m"}, None)],
    # (A second `aborted` answers the next abort exactly as the right one would: harmless and undetectable.)
    "a reply twice": lambda h, d, marker: "step" in h and [_frames(h, d), _frames(h, d)],
    "stale reply first": lambda h, d, marker: "step" in h and [_frames({**h, "step": h["step"] + 7}, d), _frames(h, d)],
}
OPENED_MAX_MESSAGE = 1 << 16


class LyingCloud:
    """A ROUTER in a thread that opens a session as a cloud does, then answers request `lie_at` with a lie.

    Its honest answers have the header the edge's plan expects and random numbers
    of the right shape: the edge checks structure, it cannot check values.
    """

    def __init__(self, edge: EdgeModel, lie, lie_at: int, marker: Path):
        self.edge, self.lie, self.lie_at, self.marker = edge, lie, lie_at, marker
        self.rng = np.random.default_rng(lie_at)
        self.requests = 0
        self.lied = False
        self.socket = zmq.Context.instance().socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind("tcp://127.0.0.1:*")
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.socket.close()

    def _serve(self) -> None:
        while not self.stop.is_set():
            if not self.socket.poll(20):
                continue
            peer, head, *_ = self.socket.recv_multipart()
            header = json.loads(head)
            reply = self._truth(header)
            lie = self.requests == self.lie_at and self.lie(reply[0], reply[1], self.marker)
            if lie is not False:
                self.lied = True
            for message in ([_frames(*reply)] if lie is False else lie):
                self.socket.send_multipart([peer, *message])
            self.requests += 1

    def _tensor(self, *shape: int) -> bytes:
        return self.rng.standard_normal(shape).astype(np.float32).tobytes()

    def _truth(self, h: dict) -> tuple[dict, bytes | None]:
        """The correct reply to request `h`: the header the edge's plan expects, random numbers of the right shape."""
        op, manifest = h["op"], self.edge.manifest
        plan, rank, hidden = manifest.plan, manifest.rank, manifest.architecture.hidden_size
        if op == "open":
            return {"v": 2, "op": "opened", "session": "ab" * 16, "max_context": 64, "max_message_bytes": OPENED_MAX_MESSAGE,
                    "wire_dtype": "float32"}, None
        if op in ("close", "abort"):
            return {"v": 2, "op": "closed" if op == "close" else "aborted", "session": h["session"]}, None
        if op in ("step", "train_step"):
            self.step, self.rows, self.seq = h["step"], h["shape"][0], h["shape"][1]
        cuts = [s for s in plan.segments if s.kind.out_cut is not None]
        if op in ("step", "madx", "train_step"):
            cut = 0 if op in ("step", "train_step") else h["cut"] + 1
            if cut == len(cuts):
                return {"v": 2, "op": "hidden", "step": self.step, "shape": [self.rows, self.seq, hidden]}, \
                    self._tensor(self.rows, self.seq, hidden)
            kind = "ax"
        else:
            cut = len(cuts) - 1 if op == "grad_hidden" else h["cut"] - 1
            kind = "grad"
        seg = cuts[cut]
        shape = [self.rows, self.seq, len(seg.kind.out_cut.targets), rank]
        header = {"v": 2, "op": kind, "step": self.step, "cut": cut, "layer": seg.cut_layer, "stage": seg.kind.out_cut.stage,
                  **({"last": cut == 0} if kind == "grad" else {}), "shape": shape}
        return header, self._tensor(*shape)


def _drive_generate(edge: EdgeModel, endpoint: str) -> None:
    # Three tokens: a reply sent twice at the second one's last cut still meets a request to confuse.
    with RemoteCloudSession(endpoint, edge.manifest, timeout=EDGE_TIMEOUT) as session:
        ids = np.asarray([PROMPT_IDS])
        for _ in range(3):
            ids = forward(edge, session, ids)[:, -1:].argmax(-1)


def _drive_tune(edge: EdgeModel, endpoint: str) -> None:
    with RemoteTrainLink(endpoint, edge.manifest, timeout=EDGE_TIMEOUT) as link:
        out = link.forward_start(edge.embed(np.asarray([[3, 4, 5], [6, 7, 7]])), np.asarray([[1, 1, 1], [1, 1, 0]]))
        while not out.done:
            out = link.forward_resume(edge.apply_adapter(out.layer, out.stage, out.ax))
        grad = link.backward_start(out.hidden)
        while not grad.last:
            grad = link.backward_resume(grad.grad_madx)
        link.abort()
        link.abort()


DRIVES = {"generate": _drive_generate, "tune": _drive_tune}


@pytest.mark.parametrize("mode", list(DRIVES))
def test_an_honest_fake_cloud_is_accepted(models, mode, tmp_path):
    # Without this, every lie below could be refused for a fault of the fake cloud's own.
    _, _, edge = models
    fake = LyingCloud(edge, lambda h, d, marker: False, lie_at=1, marker=tmp_path / "unpickled")
    try:
        DRIVES[mode](edge, fake.endpoint)
    finally:
        fake.close()
    assert fake.requests >= 2 * len(edge.plan.segments) and not fake.lied


@pytest.mark.parametrize("mode", list(DRIVES))
def test_every_lie_of_the_cloud_is_a_cloud_error_within_the_timeout(models, mode, tmp_path):
    seed = 4
    rng = np.random.default_rng(seed)
    _, _, edge = models
    marker = tmp_path / "unpickled"
    requests = 1 + 2 * len(edge.plan.segments)  # the handshake, then two steps or one pass forward and back
    caught = 0
    for name, lie in LIES.items():
        for lie_at in [0, *rng.choice(np.arange(1, requests), size=3, replace=False)]:
            fake = LyingCloud(edge, lie, int(lie_at), marker)
            started = time.monotonic()
            try:
                DRIVES[mode](edge, fake.endpoint)
            except CloudError as e:
                elapsed = time.monotonic() - started
                where = f"seed {seed}: {name} at request {lie_at}"
                assert fake.lied, f"{where}: refused an honest reply: {e}"
                assert elapsed < EDGE_TIMEOUT + SLOW_MACHINE_S, f"{where} took {elapsed:.1f} s"
                assert e.code in ("bad_reply", "timeout", "x" * 64), f"{where}: {e.code}"
                caught += 1
            else:
                # A lie that does not apply to the reply at that request leaves it honest.
                assert not fake.lied, f"seed {seed}: {name} at request {lie_at} was accepted"
            finally:
                fake.close()
    assert caught > 2 * len(LIES)
    assert not marker.exists()


def test_a_reply_of_many_frames_is_a_cloud_error_and_never_held_whole(models, tmp_path):
    _, _, edge = models
    many = [b""] * MANY_FRAMES
    fake = LyingCloud(edge, lambda h, d, marker: [_frames(h, d) + many], lie_at=0, marker=tmp_path / "unpickled")
    caught: list[CloudError] = []

    def connect() -> None:
        with pytest.raises(CloudError) as refused:
            RemoteCloudSession(fake.endpoint, edge.manifest, timeout=TIMEOUT)
        caught.append(refused.value)

    try:
        peak = _python_peak_bytes(connect)
    finally:
        fake.close()
    assert caught[0].code == "bad_reply" and f"got {MANY_FRAMES + 1}" in str(caught[0])
    # The fake cloud's own list of the frames it sends is counted too (1.6 MB).
    assert peak < 8 << 20, f"{peak / 2 ** 20:.0f} MiB held for one reply"


@pytest.mark.parametrize("mode", list(DRIVES))
def test_a_frame_larger_than_any_reply_due_is_dropped_by_libzmq_before_the_edge_holds_it(models, mode, tmp_path):
    """A cloud's frame of any size was received whole (a 10 GB one would be allocated in full) and only then refused as
    over the session's `max_message_bytes`, which the cloud itself had named. Now libzmq drops the connection when the
    frame's size arrives, past what the edge's largest reply can be (here 16 MiB for a pass of 256 rows of the
    model's 256 positions, under 70 kB for a generate step): the edge sees a silence."""
    _, _, edge = models
    huge = b"\0" * (24 << 20)
    fake = LyingCloud(edge, lambda h, d, marker: d is not None and [_frames(h, huge)], lie_at=1, marker=tmp_path / "x")
    started = time.monotonic()
    try:
        with pytest.raises(CloudError) as lost:
            DRIVES[mode](edge, fake.endpoint)
    finally:
        fake.close()
    assert fake.lied and lost.value.code == "timeout" and time.monotonic() - started < EDGE_TIMEOUT + SLOW_MACHINE_S, lost.value


def test_a_tune_link_takes_no_pass_over_its_max_tokens(models):
    _, cloud, edge = models
    with serve(cloud) as (_, endpoint), RemoteTrainLink(endpoint, edge.manifest, timeout=TIMEOUT, max_tokens=6) as link:
        with pytest.raises(ValueError, match="max_tokens of 6"):
            link.forward_start(edge.embed(np.asarray([[3, 4, 5, 6], [6, 7, 7, 8]])))
        assert link.socket.getsockopt(zmq.MAXMSGSIZE) == wire.MAX_HEADER_BYTES + 6 * edge.arch.hidden_size * 4
        out = link.forward_start(edge.embed(np.asarray([[3, 4, 5], [6, 7, 7]])), train=False)
        while not out.done:
            out = link.forward_resume(edge.apply_adapter(out.layer, out.stage, out.ax))
        assert out.hidden.shape == (2, 3, edge.arch.hidden_size)


# -- limits -----------------------------------------------------------------------------------
def test_abandoned_sessions_stay_within_the_memory_budget_and_are_all_freed_by_the_timeout(models):
    from plcli.runtime.server import memory_per_session

    seed, edges, session_timeout = 5, 100, 1.5
    _, cloud, edge = models
    per_prefill = memory_per_session(cloud, len(PROMPT_IDS))
    budget = 60 * per_prefill + per_prefill // 2  # room for 60 abandoned prefills, not for a 61st
    with serve(cloud, max_sessions=edges + 1, session_timeout=session_timeout, max_memory_bytes=budget) as (server, endpoint):
        peers = [Peer(endpoint) for _ in range(edges)]
        try:
            # All open first: an open is refused once the budget has no room for one more cache chunk.
            sids = [peer.ask(_open(edge, "generate"), seed)[0]["session"] for peer in peers]
            for peer, sid in zip(peers, sids):
                peer.send(wire.encode("step", {"session": sid, "step": 0}, edge.embed(np.asarray([PROMPT_IDS]))))
            answers = [peer.replies(1, seed)[0][0] for peer in peers]
            held = cloud_status(endpoint, timeout=TIMEOUT)["memory_bytes"]
            # What the sessions really hold: their cache buffers, allocated when the step was admitted.
            actual = sum(a.nbytes for s in list(server.sessions.values()) for kv in s.cloud.kv if kv is not None for a in kv)
            silent_since = time.monotonic()
            assert [a["op"] for a in answers].count("ax") == 60, f"seed {seed}"
            assert {a["code"] for a in answers if a["op"] == "error"} == {"limit"}, f"seed {seed}"
            assert actual <= held <= budget
            while server.stats()["sessions"]:
                assert time.monotonic() - silent_since < session_timeout + SLOW_MACHINE_S, "abandoned sessions were not freed"
                time.sleep(0.05)
            assert cloud_status(endpoint, timeout=TIMEOUT)["memory_bytes"] == 0
        finally:
            for peer in peers:
                peer.close()
        assert_still_serves_exactly(server, endpoint, edge, cloud, seed)


def test_a_tune_pass_holds_its_activations_against_the_budget_until_its_backward_ends(models):
    _, cloud, edge = models
    embeds, mask = edge.embed(np.asarray([[3, 4, 5], [6, 7, 7]])), np.asarray([[1, 1, 1], [1, 1, 0]])
    with pytest.raises(ValueError, match="--max-memory"):
        CloudServer(cloud, bind="tcp://127.0.0.1:*", tune=False, max_memory_bytes=0)
    probe = CloudServer(cloud, bind="tcp://127.0.0.1:*", threads=1)
    pass_bytes = embeds.shape[0] * embeds.shape[1] * probe.train_bytes_per_token
    probe.socket.close()
    for budget, fits in ((pass_bytes - 1, False), (pass_bytes, True)):
        with serve(cloud, max_memory_bytes=budget) as (_, endpoint), \
                RemoteTrainLink(endpoint, edge.manifest, timeout=TIMEOUT) as link:
            if not fits:
                with pytest.raises(CloudError) as refused:
                    link.forward_start(embeds, mask)
                assert refused.value.code == "limit" and "--max-memory" in str(refused.value)
                continue
            out = link.forward_start(embeds, mask)
            while not out.done:
                assert cloud_status(endpoint, timeout=TIMEOUT)["memory_bytes"] == pass_bytes
                out = link.forward_resume(edge.apply_adapter(out.layer, out.stage, out.ax))
            grad = link.backward_start(out.hidden)
            while not grad.last:
                grad = link.backward_resume(grad.grad_madx)
            assert cloud_status(endpoint, timeout=TIMEOUT)["memory_bytes"] == 0
            link.forward_start(embeds, mask, train=True)
            link.abort()
            assert cloud_status(endpoint, timeout=TIMEOUT)["memory_bytes"] == 0


def test_serve_cloud_refuses_a_memory_budget_of_zero(models):
    from typer.testing import CliRunner

    from plcli.cli import app

    bundle, _, _ = models
    result = CliRunner().invoke(app, ["serve-cloud", str(bundle / "cloud"), "--bind", "tcp://127.0.0.1:*", "--no-tune",
                                      "--max-memory", "0"])
    assert result.exit_code == 2 and "--max-memory must be positive" in result.output
