"""The cloud server: one ROUTER socket, many edge sessions, each with its own KV cache.

A session is opened to *generate* (ONNX Runtime segments, a KV cache that
grows step by step) or to *tune* (the same segments in torch, forward and
backward over independent batches; see cloud_tune.py). The torch half is
loaded when the server is made, not on the first tune session, so that no
edge's step waits on it; `tune=False` leaves it out (and torch unimported).

The loop drains whatever messages are waiting, *admits* each one (decode and
validate it against the session it names, answer control ops at once) and
queues the admitted steps; then it *executes* one group of them and goes round
again. Tune ops run alone; the generate steps of sessions at the same segment
(with as many new tokens per row) run as one ONNX Runtime call of up to
`max_group` sessions (`CloudModel.run_group`), which is what lets many edges
share the cost of reading the weights. Right after answering a group's `A x`,
the loop runs the projections those steps need next (cloud.py), so that they
are computed while the edges compute their `M A x`. Admission never touches the
model and execution never sees an unvalidated message: grouping changes how
steps are computed, not what is accepted or answered, and a step that fails in
a group is retried alone, so it fails only its own session. A message that fails
validation is answered with an `error` and changes nothing; no input can stop
the loop.

Memory: with `max_memory_bytes` each session holds, against that budget, the
KV cache buffers it has once the open step is in (reserved when the step is
admitted, and kept if the step fails: the buffers it grew stay; in a group's
shared buffers, its rows, as wide as the group's longest member needs) or the
activations its open tune pass keeps; a session or step that would go over it
is refused with `limit`, a group that would go over it runs one session at a
time, and a session's bytes go with it when it is closed or expires.
"""

from __future__ import annotations

import collections
import ctypes
import math
import os
import secrets
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import zmq

from . import wire
from .cloud import CloudModel, CloudSession, SegmentCall, StepOutput, cache_slots, slot_bytes
from .cpus import MAX_SPIN_US, io_context
from .secure import ServerKeys, peer_key, secure_server

if TYPE_CHECKING:
    from .cloud_tune import CloudTrainSession

# As plain ints: socket options and events are Python enums, whose `&` costs tens of us on a cold cache, per message.
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
MESSAGES_QUEUED_PER_PEER = 4
POLL_S = 0.05  # how often the loop wakes to expire sessions and notice a stop request
HOUSEKEEPING_S = 0.01  # how often a busy loop looks for expired sessions: not on every message, where it costs most
RATE_WINDOW_S = 5.0


GENERATE_OPS = ("step", "madx")
TUNE_OPS = ("train_step", "madx", "grad_hidden", "grad_ax", "abort")


@dataclass
class Session:
    id: str
    peer: bytes  # ZeroMQ routing id of the connection that opened it; no other connection may use it but to close it
    key: str | None  # under CURVE, the public key that opened it: a routing id can be reused after a disconnect, a key cannot be forged
    mode: str  # "generate" or "tune"
    batch: int
    cloud: CloudSession | None  # generate: the KV cache and position
    trainer: "CloudTrainSession | None"  # tune: the pass in progress
    last_seen: float  # when it last sent a message or was answered: idle time is the edge's, never the cloud's
    steps: int = 0  # generate: completed steps; tune: passes started
    cut: int | None = None  # generate: cut the edge must answer next; tune: cut of the last ax or grad sent
    ax_shape: tuple[int, ...] | None = None
    tokens: int = 0
    busy: bool = False  # a message of this session is admitted and not yet executed
    memory: int = 0  # bytes held against --max-memory: the KV cache with the open step's tokens, or the open pass's activations


@dataclass
class StepRequest:
    """An admitted model op (`step`, `madx`, `train_step`, `grad_hidden`, `grad_ax`): validated, tensor decoded."""

    session: Session
    op: str
    tensor: np.ndarray
    header: dict


@dataclass
class QueuedCall:
    """An admitted generate step's next segment call, waiting to run in a group."""

    request: StepRequest
    call: SegmentCall
    queued: float  # monotonic time it was queued
    key: tuple[int, int] = field(init=False)  # (segment, tokens per row): calls group only with calls of the same key
    passed: int = 0  # groups that ran before it since

    def __post_init__(self):
        self.key = (self.call.index, self.call.tokens_per_row)


@dataclass
class _Counters:
    started: float = field(default_factory=time.monotonic)
    tokens: int = 0
    rejected: int = 0
    recent: collections.deque = field(default_factory=collections.deque)  # (time, tokens) of completed steps
    grouped_calls: int = 0  # segment calls that ran the steps of more than one session
    largest_group: int = 0


class CloudServer:
    def __init__(
        self,
        model: CloudModel,
        *,
        bind: str,
        max_sessions: int = 16,
        max_context: int | None = None,
        session_timeout: float = 600.0,
        wire_dtype: str = "float32",
        max_batch: int = 1,
        tune: bool = True,
        max_train_tokens: int = 16384,
        max_memory_bytes: int | None = None,
        max_group: int | None = None,
        batch_wait_s: float = 0.0,
        spin_s: float = 0.0,
        threads: int | None = None,
        on_event: Callable[[dict], None] | None = None,
        context: zmq.Context | None = None,
        curve: ServerKeys | None = None,
        io_cpus: frozenset[int] | None = None,
    ):
        if max_sessions < 1:
            raise ValueError("--max-sessions must be at least 1")
        positions = model.arch.max_position_embeddings
        if max_context is not None and not 1 <= max_context <= positions:
            raise ValueError(f"--max-context {max_context} is out of range: 1 to the model's {positions} positions")
        if not 0 < session_timeout <= wire.MAX_TIMEOUT_S:
            raise ValueError(f"--session-timeout {session_timeout:g} is out of range: more than 0 and at most "
                             f"{wire.MAX_TIMEOUT_S} s")
        if wire_dtype not in wire.WIRE_DTYPES:
            raise ValueError(f"--wire-dtype must be one of {', '.join(wire.WIRE_DTYPES)}")
        if not 1 <= max_batch <= wire.MAX_OPEN_BATCH:
            raise ValueError(f"--max-batch {max_batch} is out of range: 1 to {wire.MAX_OPEN_BATCH}, the most an edge can ask for")
        if max_train_tokens < 1:
            raise ValueError("--max-train-tokens must be at least 1")
        if max_memory_bytes is not None and max_memory_bytes < 1:
            raise ValueError("--max-memory must be positive")
        if max_group is not None and max_group < 1:
            raise ValueError("--max-group must be at least 1")
        if not batch_wait_s >= 0:
            raise ValueError("--batch-wait-us must be >= 0")
        if not 0 <= spin_s <= MAX_SPIN_US / 1e6:
            raise ValueError(f"--spin-us {spin_s * 1e6:g} is out of range: 0 to {MAX_SPIN_US}")
        wire.check_endpoint(bind, bind=True)
        self.model = model
        self.max_sessions = max_sessions
        self.max_context = max_context or positions
        self.session_timeout = session_timeout
        self.wire_dtype = wire_dtype
        self.max_batch = max_batch
        self.max_train_tokens = max_train_tokens
        self.max_memory_bytes = max_memory_bytes
        self.max_group = max_group or max_sessions
        self.batch_wait_s = batch_wait_s
        self.spin_s = spin_s
        self._queue: list[QueuedCall] = []
        self.torch_segments = None  # shared by tune sessions: the same segments in torch, for the backward
        if tune:
            from .cloud_tune import TorchSegments, set_threads

            set_threads(threads)
            self.torch_segments = TorchSegments(model)
        self.on_event = on_event or (lambda event: None)
        arch, plan = model.arch, model.plan
        widest = max([arch.hidden_size] + [len(s.kind.out_cut.targets) * model.manifest.rank
                                           for s in plan.segments if s.kind.out_cut is not None])
        # The largest legitimate message: a full-context prefill or a full tune pass of the widest tensor, in float32.
        # A pass has at most wire.MAX_BATCH rows of max_context tokens, however many --max-train-tokens allows.
        tokens = max(max_batch * self.max_context, min(max_train_tokens, wire.MAX_BATCH * self.max_context))
        self.max_message_bytes = wire.MAX_HEADER_BYTES + tokens * widest * 4
        # What a tune pass keeps per token until its backward: each segment's inputs (resid, x) and its cut's M A x.
        self.train_bytes_per_token = len(plan.segments) * (2 * arch.hidden_size + widest) * 4
        self.sessions: dict[str, Session] = {}
        self.counters = _Counters()
        self._housekeeping_due = 0.0
        self.curve = curve
        if context is not None and io_cpus is not None:
            raise ValueError("io_cpus places the I/O threads of the server's own context: give no context with it")
        # ZAP allows one handler per context: a secured server brings its own unless the caller gives one; so does a
        # server whose I/O threads run on cores of their own.
        self.io_cpus = io_cpus
        self._own_context = (io_context(io_cpus) if io_cpus is not None else
                             zmq.Context() if curve is not None and context is None else None)
        unguessable_routing_ids()  # before the socket: libzmq draws the counter's start as it makes a ROUTER
        self.socket = (context or self._own_context or zmq.Context.instance()).socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        # An edge waits for each reply before its next request, so a connection never has more than one or two
        # messages queued either way. A peer that floods, or stops reading, would otherwise have up to 1000 of up to
        # max_message_bytes each queued here, outside every memory budget: past this, ZeroMQ stops reading its
        # connection, and ROUTER drops its replies.
        self.socket.setsockopt(zmq.SNDHWM, MESSAGES_QUEUED_PER_PEER)
        self.socket.setsockopt(zmq.RCVHWM, MESSAGES_QUEUED_PER_PEER)
        # libzmq drops a connection that sends a frame over this; smaller excesses get an `error` reply.
        self.socket.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
        self._auth = None
        try:  # whatever fails, the socket (and its context, and the ZAP handler once started) goes with it
            if curve is not None:
                self._auth = secure_server(self.socket, curve)
            try:
                self.socket.bind(bind)
            except zmq.ZMQError as e:
                raise OSError(f"cannot bind {bind}: {e}") from None
        except BaseException:
            self.close()
            raise
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._poller = zmq.Poller()  # one for the loop's life: `socket.poll` would build one per wait
        self._poller.register(self.socket, zmq.POLLIN)

    # -- loop ------------------------------------------------------------------
    def serve(self, stop: threading.Event) -> None:
        """Serve until `stop` is set, then free every session and close the socket."""
        self.on_event({"event": "listening", "endpoint": self.endpoint, "max_sessions": self.max_sessions,
                       "max_context": self.max_context, "session_timeout": self.session_timeout,
                       "wire_dtype": self.wire_dtype, "spin_us": round(self.spin_s * 1e6),
                       "io_cpus": None if self.io_cpus is None else sorted(self.io_cpus),
                       "authorized_keys": self.curve.authorized if self.curve is not None else None})
        try:
            idle_s = POLL_S
            while not stop.is_set():
                idle_s = self.turn(idle_s)
        finally:
            count = len(self.sessions)
            self.sessions.clear()
            self.close()
            self.on_event({"event": "stopped", "sessions_freed": count, "tokens": self.counters.tokens})

    def turn(self, wait_s: float = 0.0) -> float:
        """One turn of the loop: take in the messages waiting (after up to `wait_s` for one), run one group.

        Returns how long the next turn may wait. `serve` is these turns until stopped.
        """
        if self._wait(wait_s):
            self._take([r for r in (self._admit(*message) for message in self._receive()) if r])
        # Expired only once what has arrived is taken in: after a long call, an edge's answer may be waiting.
        now = time.monotonic()
        if now >= self._housekeeping_due:
            self._housekeeping_due = now + HOUSEKEEPING_S
            self._expire(now)
        return self._run_next()

    def _wait(self, wait_s: float) -> bool:
        """Whether a message waits, after up to `wait_s`: the first `spin_s` of it polling, then asleep.

        A thread asleep leaves its core idle, and an idle core halts: waking it costs more than a round trip
        (runtime/cpus.py). Polling keeps the core awake, and is worth it where the core is the server's own.
        """
        if self.spin_s and wait_s:
            start = time.perf_counter()
            end = start + min(self.spin_s, wait_s)
            while time.perf_counter() < end:
                if self.socket.getsockopt(_EVENTS) & _POLLIN:
                    return True
            wait_s -= end - start
        return bool(self._poller.poll(math.ceil(wait_s * 1000)))

    def close(self) -> None:
        """Close the socket (and what secures it); `serve` does this when it stops."""
        self.socket.close()
        if self._auth is not None:
            self._auth.stop()
        if self._own_context is not None:
            self._own_context.term()

    def _receive(self) -> list[tuple[bytes, str | None, list, int, int]]:
        """Every message waiting now (at most one per session slot and a few more), without blocking.

        Each comes with its sender's routing id and, under CURVE, public key, then its first frames and the count
        and bytes of all of them (`wire.receive` keeps only the first few).
        """
        messages = []
        # Asking first is cheaper than the exception a receive raises when nothing is left; `_wait` has asked for
        # the first one.
        while not messages or (len(messages) < self.max_sessions + 8 and self.socket.getsockopt(_EVENTS) & _POLLIN):
            try:
                frames, count, nbytes = wire.receive(self.socket, zmq.NOBLOCK, routed=True)
            except zmq.Again:
                break
            messages.append((frames[0].bytes, peer_key(frames[0]) if self.curve is not None else None, frames[1:],
                             count, nbytes))
        return messages

    def _send(self, peer: bytes, frames: list) -> None:
        wire.send(self.socket, [peer, *frames])

    def _answer(self, session: Session, frames: list) -> None:
        """Reply to a session's model op: from now on its edge owes the next message, so its idle time starts now."""
        session.last_seen = time.monotonic()
        wire.send(self.socket, [session.peer, *frames])

    def _reply_error(self, peer: bytes, code: str, message: str) -> None:
        # Cut to what the protocol lets a reader take: a message quotes a peer's words (field names, an op), whose
        # escapes (`\U0010ffff` for one character) could make it twice as long.
        message = message[:wire.MAX_ERROR_MESSAGE]
        self.counters.rejected += 1
        self.on_event({"event": "rejected", "code": code, "message": message})
        self._send(peer, wire.encode("error", {"code": code, "message": message}))

    # -- admission: decode, validate, answer control ops ------------------------
    def _admit(self, peer: bytes, key: str | None, frames: list, count: int, nbytes: int) -> StepRequest | None:
        try:
            header, payload = wire.decode(frames, wire.REQUESTS, max_message_bytes=self.max_message_bytes, count=count,
                                          nbytes=nbytes)
            op = header["op"]
            if op == "open":
                self._open(peer, key, header)
                return None
            if op == "status":
                self._send(peer, wire.encode("status", self.stats()))
                return None
            session = self.sessions.get(header["session"])
            # `close` from any connection of the session's key: ZeroMQ reconnects a dropped connection by itself, under
            # a routing id the cloud has not seen, and an edge giving up says `close` from there; were that refused,
            # its session would hold a slot and its memory until it expired. Its 128-bit id is the edge's proof.
            if session is None or session.key != key or (session.peer != peer and op != "close"):
                # One answer for all, so that a stranger cannot probe which session ids exist.
                raise wire.ProtocolError("unknown_session", "no such session on this connection (closed, expired or never opened)")
            if op == "close":
                # Even mid-step: an edge stopped by Ctrl-C closes without waiting for the reply it asked for,
                # and its session must not hold a slot and its memory until it expires. `_run_next` and `_take`
                # drop the steps of sessions that are gone.
                self._drop(session)
                self._send(peer, wire.encode("closed", {"session": session.id}))
                self.on_event({"event": "closed", "session": session.id[:8], "tokens": session.tokens,
                               "sessions": len(self.sessions)})
                return None
            if session.busy:
                raise wire.ProtocolError("out_of_order", "one message at a time per session")
            if op not in (GENERATE_OPS if session.mode == "generate" else TUNE_OPS):
                raise wire.ProtocolError("wrong_mode", f"{op} does not belong to a {session.mode} session")
            # Only a message that is taken renews the session: one refused changes nothing, its idle clock included,
            # or a peer could hold a session (and its slot) for ever with messages that are never valid.
            if op == "abort":
                session.trainer.abort()
                session.cut = None
                session.memory = 0
                session.last_seen = time.monotonic()
                self._send(peer, wire.encode("aborted", {"session": session.id}))
                return None
            admit = self._admit_step if session.mode == "generate" else self._admit_tune
            request = admit(session, op, header, payload)
            session.busy, session.last_seen = True, time.monotonic()
            return request
        except wire.ProtocolError as e:
            self._reply_error(peer, e.code, str(e))
        except Exception as e:  # a bug must not take the server down with it
            self._reply_error(peer, "internal", f"{type(e).__name__}: {e}")
        return None

    def _open(self, peer: bytes, key: str | None, header: dict) -> None:
        fp = self.model.manifest.ab_fingerprint
        if header["ab_fingerprint"] != fp:
            raise wire.ProtocolError(
                "fingerprint_mismatch",
                f"the edge and cloud bundles were not split together: the edge's bundle is paired with A/B "
                f"{header['ab_fingerprint'][:23]}..., this cloud serves A/B {fp[:23]}...",
            )
        if header["wire_dtype"] != self.wire_dtype:
            raise wire.ProtocolError("wire_dtype_mismatch", f"this cloud sends {self.wire_dtype} on the wire, the edge asked "
                                                            f"for {header['wire_dtype']}: use the same --wire-dtype on both sides")
        if header["batch"] > self.max_batch:
            raise wire.ProtocolError("limit", f"batch {header['batch']} exceeds this cloud's limit of {self.max_batch}")
        if any(s.peer == peer for s in self.sessions.values()):
            raise wire.ProtocolError("limit", "this connection already has a session open: one session per connection")
        if len(self.sessions) >= self.max_sessions:
            raise wire.ProtocolError("busy", f"the cloud serves its maximum of {self.max_sessions} sessions; try again later")
        # Room for the least the session can hold: one token's cache chunk, or a one-token tune pass.
        least = memory_per_session(self.model, 1, header["batch"]) if header["mode"] == "generate" else self.train_bytes_per_token
        self._reserve(None, least)
        sid = secrets.token_hex(16)
        if header["mode"] == "generate":
            cloud, trainer = self.model.new_session(max_context=self.max_context), None
        elif self.torch_segments is None:
            raise wire.ProtocolError("wrong_mode", "this cloud does not serve tuning (it was started with --no-tune)")
        else:
            cloud, trainer = None, self.torch_segments.new_session(max_context=self.max_context)
        self.sessions[sid] = Session(sid, peer, key, header["mode"], header["batch"], cloud, trainer, last_seen=time.monotonic())
        self._send(peer, wire.encode("opened", {"session": sid, "max_context": self.max_context,
                                                "max_message_bytes": self.max_message_bytes, "wire_dtype": self.wire_dtype}))
        self.on_event({"event": "opened", "session": sid[:8], "mode": header["mode"], "sessions": len(self.sessions)})

    def _admit_step(self, session: Session, op: str, header: dict, payload: memoryview) -> StepRequest:
        shape = tuple(header["shape"])
        if header["step"] != session.steps:
            raise wire.ProtocolError("out_of_order", f"expected step {session.steps}, got {header['step']}")
        if op == "step":
            if session.cut is not None:
                raise wire.ProtocolError("out_of_order", f"step {session.steps} is open; the cloud expects madx for cut {session.cut}")
            hidden = self.model.arch.hidden_size
            if len(shape) != 3 or shape[0] != session.batch or shape[2] != hidden:
                raise wire.ProtocolError("bad_tensor", f"embeddings must be [{session.batch}, seq, {hidden}], got {list(shape)}")
            room = session.cloud.max_context - session.cloud.position
            if shape[1] > room:
                raise wire.ProtocolError("limit", f"{shape[1]} tokens do not fit: the session has room for {room} more "
                                                  f"(max context {session.cloud.max_context})")
            need = session.cloud.cache_bytes(session.batch, session.cloud.position + shape[1])
            self._reserve(session, need)
            request = StepRequest(session, op, wire.tensor(payload, shape, self.wire_dtype), header)
            session.memory = need
            return request
        else:
            if session.cut is None:
                raise wire.ProtocolError("out_of_order", "no step is open")
            if header["cut"] != session.cut:
                raise wire.ProtocolError("out_of_order", f"expected madx for cut {session.cut}, got cut {header['cut']}")
            if shape != session.ax_shape:
                raise wire.ProtocolError("bad_tensor", f"M A x must have the shape of the A x it answers, "
                                                       f"{list(session.ax_shape)}; got {list(shape)}")
        return StepRequest(session, op, wire.tensor(payload, shape, self.wire_dtype), header)

    def _admit_tune(self, session: Session, op: str, header: dict, payload: memoryview) -> StepRequest:
        """Check a tune op against the pass in progress: its number, phase, cut and exact shape."""
        trainer, shape = session.trainer, tuple(header["shape"])
        phase = trainer.phase
        if op == "train_step":
            if header["step"] != session.steps:
                raise wire.ProtocolError("out_of_order", f"expected pass {session.steps}, got {header['step']}")
            if phase != "idle":
                raise wire.ProtocolError("out_of_order", f"pass {session.steps - 1} is still open; abort it first")
            lengths, hidden = header["lengths"], self.model.arch.hidden_size
            if len(shape) != 3 or shape[0] != len(lengths) or shape[2] != hidden:
                raise wire.ProtocolError("bad_tensor", f"embeddings must be [{len(lengths)} (one per length), seq, {hidden}], "
                                                       f"got {list(shape)}")
            if shape[1] > self.max_context or shape[0] * shape[1] > self.max_train_tokens:
                raise wire.ProtocolError("limit", f"a pass of {shape[0]} x {shape[1]} tokens exceeds this cloud's limits "
                                                  f"({self.max_context} per row, {self.max_train_tokens} per pass)")
            if max(lengths) > shape[1]:
                raise wire.ProtocolError("bad_message", f"a row length exceeds the sequence length {shape[1]}")
            need = shape[0] * shape[1] * self.train_bytes_per_token
            self._reserve(session, need)
            request = StepRequest(session, op, wire.tensor(payload, shape, self.wire_dtype), header)
            session.memory = need
            return request
        else:
            if header["step"] != session.steps - 1 or phase == "idle":
                raise wire.ProtocolError("out_of_order", f"{op} for pass {header['step']}, but the open pass is "
                                                         f"{session.steps - 1 if phase != 'idle' else 'none'}")
            due = {"madx": "forward", "grad_hidden": "forward_done", "grad_ax": "backward"}[op]
            if phase != due:
                raise wire.ProtocolError("out_of_order", f"{op} arrived while the pass is in phase {phase}")
            if op != "grad_hidden" and header["cut"] != session.cut:
                raise wire.ProtocolError("out_of_order", f"expected {op} for cut {session.cut}, got cut {header['cut']}")
            if shape != trainer.expected_shape:
                raise wire.ProtocolError("bad_tensor", f"{op} must have shape {list(trainer.expected_shape)}; got {list(shape)}")
        return StepRequest(session, op, wire.tensor(payload, shape, self.wire_dtype), header)

    # -- execution ---------------------------------------------------------------
    # Admitted generate steps wait in `_queue` as segment calls; each turn of the loop takes in whatever
    # arrived and runs one group, so steps that arrive while a group runs can still join the next one.
    def _take(self, requests: list[StepRequest]) -> None:
        """Run tune ops at once; open the generate steps' segment calls and queue them for grouping."""
        now = time.monotonic()
        for request in requests:
            session = request.session
            if self.sessions.get(session.id) is not session:  # closed after its step was admitted, in the same turn
                continue
            if session.mode == "tune":
                session.busy = False
                self._execute_tune(request)
                continue
            cloud = session.cloud
            try:
                call = cloud.start_call(request.tensor) if request.op == "step" else cloud.resume_call(request.tensor)
            except Exception as e:
                session.busy = False
                self._fail_step(session, e)
                continue
            self._queue.append(QueuedCall(request, call, now))

    def _run_next(self) -> float:
        """Run the group `_choose` picks; return how long the loop may then wait for messages."""
        self._queue = [r for r in self._queue if self.sessions.get(r.request.session.id) is r.request.session]
        if not self._queue:
            return POLL_S
        key, wait_s = self._choose()
        if key is None:
            # However long --batch-wait-us: the loop must still see a stop request and expire sessions (an edge it
            # waits for may be dead) when no message comes.
            return min(wait_s, POLL_S)
        # One pass: a membership test would compare the dataclasses field by field, tens of us a group.
        members, waiting = [], []
        for r in self._queue:
            (members if r.key == key and len(members) < self.max_group else waiting).append(r)
        for r in waiting:
            r.passed += 1
        self._queue = waiting
        for r in members:
            r.request.session.busy = False
        self._run_group([(r.request, r.call) for r in members])
        return 0.0

    def _choose(self) -> tuple[tuple[int, int] | None, float]:
        """The (segment, tokens per row) of the group to run next, or None and how long to wait for more.

        Steps group only at the same segment, so sessions spread over the
        segments have to come together: the group furthest behind runs first
        (the first after the widest gap between the segments that steps are
        at, queued or owed by an edge), and groups ahead of it wait while it
        catches up with them. A call passed over as many times as there are
        segments runs next, whatever its place. With `batch_wait_s`, a group at
        a segment that other sessions owe (their edge is computing its
        `M A x`) waits up to that long for them, while other groups run.
        """
        if len(self._queue) == 1 and not self.batch_wait_s:  # the common case of one edge: nothing to choose or wait for
            return self._queue[0].key, 0.0
        groups: dict[tuple[int, int], list[QueuedCall]] = {}
        for r in self._queue:
            groups.setdefault(r.key, []).append(r)
        if len(groups) == 1 and not self.batch_wait_s:  # steps of several edges at one segment: they run together
            return next(iter(groups)), 0.0
        segments = len(self.model.plan.segments)
        starved = [k for k, rs in groups.items() if max(r.passed for r in rs) >= segments]
        if starved:
            return starved[0], 0.0
        owed = collections.Counter((s.cut + 1, s.ax_shape[1]) for s in self.sessions.values()
                                   if s.mode == "generate" and not s.busy and s.cut is not None)
        positions = sorted({k[0] for k in groups} | {k[0] for k in owed})
        if self.batch_wait_s > 0:
            now = time.monotonic()
            due = {k: min(r.queued for r in rs) + self.batch_wait_s for k, rs in groups.items()
                   if owed[k] and len(rs) < self.max_group}
            groups = {k: rs for k, rs in groups.items() if due.get(k, now) <= now}
            if not groups:
                return None, min(due.values()) - now
        # The gap after each position, and the position after the widest: the tail.
        gaps = [((after - at - 1) % segments, after) for at, after in zip(positions, positions[1:] + positions[:1])]
        tail = max(gaps)[1]
        return min(groups, key=lambda k: ((k[0] - tail) % segments, -len(groups[k]))), 0.0

    def _run_group(self, members: list[tuple[StepRequest, SegmentCall]]) -> None:
        widened = self._widened_memory(members)
        if widened is False:
            for member in members:
                self._run_group([member])
            return
        try:
            outputs = self.model.run_group([call for _, call in members])
        except Exception as e:
            if len(members) == 1:
                self._fail_step(members[0][0].session, e)
                return
            # Whatever failed, it must fail only the session it belongs to: run each alone.
            for member in members:
                self._run_group([member])
            return
        if len(members) > 1:
            self.counters.grouped_calls += 1
            self.counters.largest_group = max(self.counters.largest_group, len(members))
        for (request, _), memory in zip(members, widened or ()):
            request.session.memory = memory
        for (request, _), out in zip(members, outputs):
            session = request.session
            try:
                result = session.cloud.complete(out)
            except Exception as e:
                self._fail_step(session, e)
                continue
            self._reply_step(session, request.op, result)
        self._project([request.session for request, _ in members])

    def _widened_memory(self, members: list[tuple[StepRequest, SegmentCall]]) -> list[int] | bool | None:
        """What the members hold once their group has moved their caches into shared buffers, whose rows are as
        wide as the longest member needs: a list of bytes, False if that does not fit --max-memory (they then
        run one by one, which costs no memory), None if the group moves no cache."""
        widen = self.model.group_widening([call for _, call in members])
        if widen is None:
            return None
        sessions = [request.session for request, _ in members]
        after = [max(s.memory, s.cloud.cache_bytes(s.batch, widen=widen)) for s in sessions]
        if (self.max_memory_bytes is not None
                and self.memory_bytes() + sum(after) - sum(s.memory for s in sessions) > self.max_memory_bytes):
            return False
        return after

    def _project(self, sessions: list[Session]) -> None:
        """Run the projections that the steps just answered need next, while their edges compute `M A x`."""
        pending = [(s, call) for s in sessions if (call := s.cloud.projection_call()) is not None]
        if not pending:
            return
        try:
            outputs = self.model.run_group([call for _, call in pending])
        except Exception:
            return  # left to each session's own `resume_call`, which runs them again and fails only its session
        for (session, _), out in zip(pending, outputs):
            session.cloud.complete_projection(out)

    def _fail_step(self, session: Session, error: Exception) -> None:
        """The model itself failed: refuse the step, drop what it had done, keep serving."""
        session.cloud.abort()
        session.cut = session.ax_shape = None
        # `session.memory` stays what the step reserved: the cache buffers it grew are kept for the next step.
        session.last_seen = time.monotonic()
        self._reply_error(session.peer, "internal", f"the cloud failed to run the step: {type(error).__name__}: {error}")

    def _reply_step(self, session: Session, op: str, out: StepOutput) -> None:
        step = session.steps
        if out.done:
            seq = out.hidden.shape[1]
            session.steps += 1
            session.cut = session.ax_shape = None
            session.tokens += seq * session.batch
            self._count_tokens(seq * session.batch)
            self._answer(session, wire.encode("hidden", {"step": step}, out.hidden, self.wire_dtype))
        else:
            session.cut = 0 if op == "step" else session.cut + 1
            session.ax_shape = tuple(out.ax.shape)
            self._answer(session, wire.encode("ax", {"step": step, "cut": session.cut, "layer": out.layer,
                                                     "stage": out.stage}, out.ax, self.wire_dtype))

    def _execute_tune(self, request: StepRequest) -> None:
        session, op, h, trainer = request.session, request.op, request.header, request.session.trainer
        try:
            if op == "train_step":
                bsz, seq = request.tensor.shape[:2]
                mask = (np.arange(seq) < np.asarray(h["lengths"])[:, None]).astype(np.int64)
                out = trainer.forward_start(request.tensor, mask, train=h["grad"])
                session.steps += 1
            elif op == "madx":
                out = trainer.forward_resume(request.tensor)
            elif op == "grad_hidden":
                out = trainer.backward_start(request.tensor)
            else:
                out = trainer.backward_resume(request.tensor)
        except Exception as e:  # the model itself failed: drop the pass, keep serving
            trainer.abort()
            session.cut = None
            session.memory = 0
            session.last_seen = time.monotonic()
            self._reply_error(session.peer, "internal", f"the cloud failed to run {op}: {type(e).__name__}: {e}")
            return
        step = session.steps - 1
        if op in ("train_step", "madx"):
            if out.done:
                seq = out.hidden.shape[0] * out.hidden.shape[1]
                session.tokens += seq
                self._count_tokens(seq)
                session.cut = None
                if trainer.phase == "idle":  # an evaluation pass keeps nothing
                    session.memory = 0
                self._answer(session, wire.encode("hidden", {"step": step}, out.hidden, self.wire_dtype))
            else:
                session.cut = 0 if op == "train_step" else session.cut + 1
                self._answer(session, wire.encode("ax", {"step": step, "cut": session.cut, "layer": out.layer,
                                                         "stage": out.stage}, out.ax, self.wire_dtype))
            return
        session.cut = len(self.model.plan.segments) - 2 if op == "grad_hidden" else session.cut - 1
        self._answer(session, wire.encode("grad", {"step": step, "cut": session.cut, "layer": out.layer, "stage": out.stage,
                                                   "last": out.last}, out.grad_madx, self.wire_dtype))
        if out.last:
            session.cut = None
            session.memory = 0

    # -- housekeeping --------------------------------------------------------------
    def _expire(self, now: float) -> None:
        # A busy session waits on the cloud, not on its edge, however long the calls queued before it take.
        for session in [s for s in self.sessions.values() if not s.busy and now - s.last_seen > self.session_timeout]:
            self._drop(session)
            self.on_event({"event": "expired", "session": session.id[:8], "idle_s": round(now - session.last_seen, 3),
                           "tokens": session.tokens, "sessions": len(self.sessions)})

    def _drop(self, session: Session) -> None:
        del self.sessions[session.id]
        if session.cloud is not None:
            session.cloud.release()  # the rows it held in a group's cache buffers, for the sessions still there

    def _count_tokens(self, n: int) -> None:
        c = self.counters
        now = time.monotonic()
        c.tokens += n
        c.recent.append((now, n))
        while now - c.recent[0][0] > RATE_WINDOW_S:
            c.recent.popleft()

    @property
    def tokens_per_s(self) -> float:
        """Tokens completed per second over the last RATE_WINDOW_S: worked out when asked, not on every message."""
        c, now = self.counters, time.monotonic()
        # A copy first: the live status line asks from another thread while steps complete.
        recent = sum(n for t, n in tuple(c.recent) if now - t <= RATE_WINDOW_S)
        return recent / min(RATE_WINDOW_S, max(now - c.started, POLL_S))

    def memory_bytes(self) -> int:
        """Bytes the sessions hold against --max-memory: KV caches and the activations of open tune passes."""
        # A copy first: the live status line reads this from another thread while sessions come and go.
        return sum(s.memory for s in tuple(self.sessions.values()))

    def _reserve(self, session: Session | None, need: int) -> None:
        """Refuse with `limit` unless `session` (None: a new one) may hold `need` bytes within --max-memory."""
        if self.max_memory_bytes is None:
            return
        others = self.memory_bytes() - (session.memory if session else 0)
        if others + need > self.max_memory_bytes:
            raise wire.ProtocolError("limit", f"{need} bytes for this session do not fit: the cloud's sessions hold {others} "
                                              f"of its {self.max_memory_bytes} bytes (--max-memory)")

    def stats(self) -> dict:
        """Counters for the `status` op and the live status line."""
        return {"sessions": len(self.sessions), "max_sessions": self.max_sessions, "tokens": self.counters.tokens,
                "tokens_per_s": round(self.tokens_per_s, 3),
                "uptime_s": round(time.monotonic() - self.counters.started, 3), "rejected": self.counters.rejected,
                "memory_bytes": self.memory_bytes(), "grouped_calls": self.counters.grouped_calls,
                "largest_group": self.counters.largest_group}


@contextmanager
def running(server: CloudServer) -> Iterator[str]:
    """Serve in a background thread; yield the endpoint; always stop and join on exit."""
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop,), name="plcli-cloud", daemon=True)
    thread.start()
    try:
        yield server.endpoint
    finally:
        stop.set()
        thread.join()


def unguessable_routing_ids() -> None:
    """Seed the C library's `rand()`, from which libzmq starts the routing ids a ROUTER gives its peers.

    A ROUTER names each peer that does not name itself with the next value of a 32-bit counter, and never checks
    that value against the names peers chose for themselves: when it reaches one, libzmq (4.3.5) fails an
    assertion and aborts the whole process. Unseeded, the counter starts at the same value in every process, so a
    peer could claim the next few names and then kill the cloud by connecting once more. Seeded from os.urandom, a
    peer would have to guess a 32-bit value it never sees. Where there is no C library to seed, nothing changes.
    """
    try:
        srand = ctypes.CDLL(None).srand
    except (OSError, AttributeError):
        return
    srand.argtypes = [ctypes.c_uint]
    srand(int.from_bytes(os.urandom(4), "little"))


def memory_per_session(model: CloudModel, tokens: int, batch: int = 1) -> int:
    """Bytes of the KV cache buffers of a session holding `tokens` tokens (float32 keys and values of every layer)."""
    return model.arch.num_layers * slot_bytes(model.arch, batch) * cache_slots(tokens)

