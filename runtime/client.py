"""The edge's side of the wire: a cloud session behind a ZeroMQ DEALER socket.

`RemoteCloudSession` has the interface of the local `CloudSession` (`start`,
`resume`, `position`, `max_context`), so `edge.forward` and `generate` run
unchanged over the network; `RemoteTrainLink` is the `TrainLink` that `Tuner`
drives, so tuning runs unchanged over it too. Everything either needs to exist
is the URL, the edge manifest and its options: a replacement is one
constructor call away. Both count the bytes they move as they sit in the ZMTP
stream, and the round trips.
"""

from __future__ import annotations

import time
from typing import NoReturn

import numpy as np
import zmq

from . import wire
from .bundle import Manifest
from .cloud import StepOutput
from .secure import ClientKeys, secure_client
from .train_link import GradOutput, LinkError


CLOSE_LINGER_MS = 200  # how long a `close` sent on giving up may still take to leave
# Replies a connection queues unread: the protocol has at most two on their way (a step's and `close`'s), and without
# a bound a cloud could park up to ZeroMQ's default of 1000 replies of the largest size in the edge's memory.
REPLIES_QUEUED = 4


def _bound_replies(socket: zmq.Socket, frame_bytes: int) -> None:
    """Bound what a cloud can make `socket` (not yet connected) hold: a few replies, each frame at most `frame_bytes`.

    libzmq drops a connection that sends a larger frame, as it arrives, before it is allocated in full; the edge
    then sees a silence. Without this, a cloud's one frame of many GB was received whole, and only then refused.
    """
    socket.setsockopt(zmq.RCVHWM, REPLIES_QUEUED)
    socket.setsockopt(zmq.MAXMSGSIZE, frame_bytes)


class CloudError(LinkError):
    """The cloud refused, failed to answer, or broke the protocol; the message is meant for the user."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


# Under CURVE a refused key or a wrong server key fails the handshake without a word: only silence tells.
_SILENCE_CAUSE = {False: "(is `plcli serve-cloud` running there?)",
                  True: "(is `plcli serve-cloud` running there, does it authorize this edge's key, and is --server-key its key?)"}


class WireConnection:
    """One DEALER connection and the session it opened: handshake, strict request/reply, byte and round-trip counts.

    A silence or a malformed reply (a tensor holding NaN or infinity included)
    closes the connection (the stream can no longer be trusted); an `error`
    reply raises CloudError and changes nothing, except `internal` in the
    middle of a generate step: the cloud failed to run it and dropped it.
    """

    too_large_hint = ""  # what to change when a message is over the cloud's limit

    def __init__(self, url: str, manifest: Manifest, *, mode: str, wire_dtype: str = "float32", timeout: float = 10.0,
                 batch: int = 1, max_tokens: int | None = None, context: zmq.Context | None = None,
                 curve: ClientKeys | None = None):
        """`max_tokens`: the most tokens (rows x positions) one request of this connection carries, which bounds
        every reply (default: `batch` rows of the model's positions)."""
        if wire_dtype not in wire.WIRE_DTYPES:
            raise ValueError(f"wire dtype must be one of {', '.join(wire.WIRE_DTYPES)}")
        wait_ms = wire.timeout_ms(timeout)
        try:
            wire.check_endpoint(url, bind=False)
        except ValueError as e:  # not a loss: no cloud is there to fail over from
            raise CloudError(str(e), "connect") from None
        self.url, self.manifest, self.wire_dtype, self.timeout, self.batch = url, manifest, wire_dtype, timeout, batch
        self.plan = manifest.plan
        self.bytes_up = self.bytes_down = self.round_trips = 0
        self._socket = (context or zmq.Context.instance()).socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SNDTIMEO, wait_ms)
        self._socket.setsockopt(zmq.RCVTIMEO, wait_ms)
        # The largest reply is a hidden state or `A x` of the most tokens a request carries.
        widest = max([manifest.architecture.hidden_size] + [len(s.kind.out_cut.targets) * manifest.rank
                                                            for s in self.plan.segments if s.kind.out_cut is not None])
        itemsize = wire.WIRE_DTYPES[wire_dtype].itemsize
        tokens = max_tokens or batch * manifest.architecture.max_position_embeddings
        _bound_replies(self._socket, wire.MAX_HEADER_BYTES + tokens * widest * itemsize)
        try:
            if curve is not None:
                secure_client(self._socket, curve)
            self._socket.connect(url)
        except zmq.ZMQError as e:
            self._socket.close()
            raise CloudError(f"cannot connect to {url!r}: {e}", "connect") from None
        except BaseException:
            self._socket.close()
            raise
        self.max_message_bytes = wire.MAX_HEADER_BYTES
        try:
            reply, _ = self._request(
                wire.encode("open", {"ab_fingerprint": manifest.ab_fingerprint, "wire_dtype": wire_dtype, "batch": batch,
                                     "mode": mode}),
                expect="opened",
                silence=f"no answer from the cloud at {url} within {timeout:g} s " + _SILENCE_CAUSE[curve is not None],
            )
        except CloudError:
            self._socket.close()
            raise
        self.session_id: str = reply["session"]
        self.max_context: int = reply["max_context"]
        self.max_message_bytes = reply["max_message_bytes"]
        if reply["wire_dtype"] != wire_dtype:
            self._broken(f"the cloud opened a {reply['wire_dtype']} session, the edge asked for {wire_dtype}")
        one_token = wire.MAX_HEADER_BYTES + batch * widest * itemsize
        if self.max_message_bytes < one_token:
            self._broken(f"the cloud takes messages of at most {self.max_message_bytes} bytes, "
                         f"less than the {one_token} of one token's step")

    def close(self) -> None:
        """Free the session on the cloud (best effort, waiting up to a second for its word) and the socket; safe to call twice."""
        if self._socket.closed:
            return
        try:
            self._socket.send_multipart(wire.encode("close", {"session": self.session_id}), zmq.NOBLOCK)
            deadline = time.monotonic() + min(self.timeout, 1.0)
            while (left := deadline - time.monotonic()) > 0 and self._socket.poll(max(1, int(left * 1000))):
                # The reply to a step that Ctrl-C left in flight may come first: the cloud's `closed` is what counts.
                reply, count, nbytes = wire.receive(self._socket, zmq.NOBLOCK)
                try:
                    header, _ = wire.decode(reply, wire.REPLIES, max_message_bytes=self.max_message_bytes, count=count,
                                            nbytes=nbytes)
                except wire.ProtocolError:
                    continue
                if header["op"] in ("closed", "error"):
                    break
        except zmq.ZMQError:
            pass
        self._socket.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def socket(self) -> zmq.Socket:
        """The connection's socket, to poll many sessions at once (see `RemoteCloudSession.post_start`); never to send on."""
        return self._socket

    def _request(self, frames: list, *, expect: str, silence: str | None = None) -> tuple[dict, memoryview | None]:
        """Send a request and wait for its one reply; an `error` reply raises CloudError and leaves the session as it was."""
        self._send(frames, silence)
        return self._receive(expect=expect, silence=silence)

    def _send(self, frames: list, silence: str | None = None) -> None:
        if self._socket.closed:
            raise CloudError(f"the connection to the cloud at {self.url} is closed", "closed")
        size = sum(memoryview(f).nbytes for f in frames)
        if size > self.max_message_bytes:
            # Sent, libzmq at the cloud would drop the connection without a word, which looks like a lost cloud.
            raise CloudError(f"a message of {size} bytes exceeds the cloud's limit of {self.max_message_bytes} bytes"
                             f"{self.too_large_hint}", "too_large")
        try:
            wire.send(self._socket, frames)
        except zmq.Again:
            self._broken(silence or f"the cloud at {self.url} does not take messages (no connection within {self.timeout:g} s)", "timeout")
        self.bytes_up += wire.framed_size(frames)

    def _receive(self, *, expect: str, silence: str | None = None) -> tuple[dict, memoryview | None]:
        try:
            reply, count, nbytes = wire.receive(self._socket)  # waits up to RCVTIMEO; tensors are read in place
        except zmq.Again:
            self._broken(silence or f"the cloud at {self.url} stopped answering (no reply within {self.timeout:g} s)", "timeout")
        self.bytes_down += wire.framed_size(reply)
        self.round_trips += 1
        try:
            header, payload = wire.decode(reply, wire.REPLIES, max_message_bytes=self.max_message_bytes, count=count,
                                          nbytes=nbytes)
        except wire.ProtocolError as e:
            self._broken(f"the cloud sent a malformed reply: {e}")
        if header["op"] == "error":
            raise CloudError(f"the cloud refused: {header['message']}", header["code"])
        if header["op"] != expect:
            self._broken(f"the cloud answered {header['op']!r} where {expect!r} was due")
        return header, payload

    def _reply_tensor(self, header: dict, payload: memoryview, step: int, shape: tuple[int, ...]) -> np.ndarray:
        """The reply's tensor, once its step and shape are exactly the ones due."""
        if header["step"] != step or tuple(header["shape"]) != shape:
            self._broken(f"the cloud answered step {header['step']} with shape {header['shape']}; expected step {step}, shape {list(shape)}")
        try:
            array = wire.tensor(payload, shape, self.wire_dtype)
        except wire.ProtocolError as e:
            self._broken(f"the cloud sent a malformed tensor: {e}")
        # A NaN or infinity would reach the logits or, when tuning, M and every checkpoint after it, silently.
        if not np.isfinite(array).all():
            self._broken(f"the cloud sent NaN or infinity in step {step}'s {header['op']}")
        return array

    def _check_cut(self, header: dict, cut: int, segment) -> None:
        """The reply names cut `cut` at the layer and stage this edge's plan puts it."""
        want = (cut, segment.cut_layer, segment.kind.out_cut.stage)
        if (header["cut"], header["layer"], header["stage"]) != want:
            self._broken(f"the cloud answered for cut {header['cut']} (layer {header['layer']}, {header['stage']}); "
                         f"this edge's plan expects cut {cut} (layer {want[1]}, {want[2]})")

    def _broken(self, message: str, code: str = "bad_reply") -> NoReturn:
        """Give up on this connection: after a silence or a bad reply the stream can no longer be trusted."""
        session = getattr(self, "session_id", None)
        if session is not None:
            # A cloud that is only slow frees the session now rather than when it expires; nothing waits for its word.
            try:
                self._socket.send_multipart(wire.encode("close", {"session": session}), zmq.NOBLOCK)
                self._socket.setsockopt(zmq.LINGER, CLOSE_LINGER_MS)
            except zmq.ZMQError:
                pass
        self._socket.close()
        raise CloudError(message, code)


class RemoteCloudSession(WireConnection):
    """A generate session: the local `CloudSession` interface (`start`, `resume`, `position`, `max_context`)."""

    def __init__(self, url: str, manifest: Manifest, *, wire_dtype: str = "float32", timeout: float = 10.0,
                 batch: int = 1, context: zmq.Context | None = None, curve: ClientKeys | None = None):
        self.position = 0
        self._step = 0
        self._seq = 0  # tokens in the open step
        self._cut: int | None = None  # cut of the last `ax` received, while a step is open
        self._ax_shape: tuple[int, ...] | None = None
        self._due: int | None = None  # cut whose reply is awaited, between a post and its receive
        super().__init__(url, manifest, mode="generate", wire_dtype=wire_dtype, timeout=timeout, batch=batch,
                         context=context, curve=curve)

    @property
    def in_step(self) -> bool:
        return self._cut is not None

    def start(self, embeds: np.ndarray) -> StepOutput:
        """Send the embeddings [batch, seq, hidden] of a new step; returns the first cut's `A x` (or the hidden state)."""
        self.post_start(embeds)
        return self.receive()

    def resume(self, madx: np.ndarray) -> StepOutput:
        """Answer the last `A x` with `M A x` of the same shape; returns the next cut's `A x` or the hidden state."""
        self.post_resume(madx)
        return self.receive()

    def post_start(self, embeds: np.ndarray) -> None:
        """The sending half of `start`: `receive` waits for its reply. What lets one thread drive many sessions,
        polling their `socket`s, rather than one thread per session sleeping in its receive."""
        self._not_awaiting()
        if self.in_step:
            raise RuntimeError("a step is already open in this session")
        hidden = self.manifest.architecture.hidden_size
        if embeds.ndim != 3 or embeds.shape[0] != self.batch or embeds.shape[2] != hidden or embeds.shape[1] < 1:
            raise ValueError(f"embeddings must be [{self.batch}, seq>=1, {hidden}], got {list(embeds.shape)}")
        if self.position + embeds.shape[1] > self.max_context:
            raise ValueError(f"context of {self.position + embeds.shape[1]} tokens exceeds this session's limit of {self.max_context}")
        self._seq = embeds.shape[1]
        self._send(wire.encode("step", {"session": self.session_id, "step": self._step}, embeds, self.wire_dtype))
        self._due = 0

    def post_resume(self, madx: np.ndarray) -> None:
        """The sending half of `resume`: `receive` waits for its reply."""
        self._not_awaiting()
        if not self.in_step:
            raise RuntimeError("no step is open in this session")
        if tuple(madx.shape) != self._ax_shape:
            raise ValueError(f"M A x must have shape {list(self._ax_shape)}, got {list(madx.shape)}")
        self._send(wire.encode("madx", {"session": self.session_id, "step": self._step, "cut": self._cut}, madx,
                               self.wire_dtype))
        self._due = self._cut + 1

    def _not_awaiting(self) -> None:
        # One message at a time per session: the cloud refuses a second one before it has answered the first.
        if self._due is not None:
            raise RuntimeError("this session awaits a reply: `receive` it before sending again")

    def receive(self) -> StepOutput:
        """The reply to the last `post_start` or `post_resume`, checked to be exactly what its cut must produce."""
        if self._due is None:
            raise RuntimeError("nothing was sent in this session that awaits a reply")
        cut, self._due = self._due, None
        try:
            return self._receive_cut(cut, self.plan.segments[cut])
        except CloudError as e:
            if e.code == "internal":  # the cloud failed to run the step and dropped it: the next call is a `start`
                self._cut = self._ax_shape = None
            raise

    def _receive_cut(self, cut: int, segment) -> StepOutput:
        arch, b, s = self.manifest.architecture, self.batch, self._seq
        if segment.kind.out_cut is None:
            header, payload = self._receive(expect="hidden")
            array = self._reply_tensor(header, payload, self._step, (b, s, arch.hidden_size))
            self.position += s
            self._step += 1
            self._cut = self._ax_shape = None
            return StepOutput(hidden=array)
        header, payload = self._receive(expect="ax")
        self._check_cut(header, cut, segment)
        shape = (b, s, len(segment.kind.out_cut.targets), self.manifest.rank)
        array = self._reply_tensor(header, payload, self._step, shape)
        self._cut, self._ax_shape = cut, shape
        return StepOutput(ax=array, layer=segment.cut_layer, stage=segment.kind.out_cut.stage)


class RemoteTrainLink(WireConnection):
    """A tune session: `train_link.TrainLink` over the wire, so `Tuner` drives a remote cloud like a local one.

    What crosses is what the protocol allows a tune pass: embeddings and the
    gradient at the last hidden state up, `A x` and gradients at `M A x` down,
    `M A x` and gradients at `A x` up, and each row's length (the padding mask
    of right-padded rows). Token ids, labels and the loss stay here.
    """

    too_large_hint = "; a pass carries --batch-size x --seq-len tokens: make them smaller"

    def __init__(self, url: str, manifest: Manifest, *, wire_dtype: str = "float32", timeout: float = 10.0,
                 max_tokens: int | None = None, context: zmq.Context | None = None, curve: ClientKeys | None = None):
        """`max_tokens`: the most tokens (rows x sequence length) a pass of this link carries; it bounds the replies
        the edge takes in (default: the most the protocol allows a pass, wire.MAX_BATCH rows of the model's
        positions)."""
        self._passes = 0  # passes started
        self._cut: int | None = None  # cut of the last ax / grad received, while a pass is open
        self._shape: tuple[int, int] = (0, 0)  # batch, seq of the open pass
        self._max_tokens = max_tokens or wire.MAX_BATCH * manifest.architecture.max_position_embeddings
        super().__init__(url, manifest, mode="tune", wire_dtype=wire_dtype, timeout=timeout, max_tokens=self._max_tokens,
                         context=context, curve=curve)
        self._cuts = [s for s in self.plan.segments if s.kind.out_cut is not None]

    def forward_start(self, embeds: np.ndarray, attention_mask: np.ndarray | None = None, *, train: bool = True) -> StepOutput:
        bsz, seq = embeds.shape[:2]
        if bsz * seq > self._max_tokens:
            raise ValueError(f"a pass of {bsz} x {seq} tokens exceeds this link's max_tokens of {self._max_tokens}")
        if attention_mask is None:
            attention_mask = np.ones((bsz, seq), np.int64)
        lengths = attention_mask.sum(axis=1)
        if attention_mask.shape != (bsz, seq) or not np.array_equal(attention_mask, np.arange(seq) < lengths[:, None]):
            raise ValueError("the attention mask must mark right-padded rows (ones, then zeros)")
        self._shape = (bsz, seq)
        frames = wire.encode("train_step", {"session": self.session_id, "step": self._passes,
                                            "lengths": [int(n) for n in lengths], "grad": bool(train)}, embeds, self.wire_dtype)
        return self._forward(frames, cut=0, first=True)

    def forward_resume(self, madx: np.ndarray) -> StepOutput:
        self._started()
        frames = wire.encode("madx", {"session": self.session_id, "step": self._passes - 1, "cut": self._cut}, madx,
                             self.wire_dtype)
        return self._forward(frames, cut=self._cut + 1)

    def backward_start(self, grad_hidden: np.ndarray) -> GradOutput:
        self._started()
        frames = wire.encode("grad_hidden", {"session": self.session_id, "step": self._passes - 1}, grad_hidden,
                             self.wire_dtype)
        return self._backward(frames, cut=len(self._cuts) - 1)

    def backward_resume(self, grad_ax: np.ndarray) -> GradOutput:
        self._started()
        frames = wire.encode("grad_ax", {"session": self.session_id, "step": self._passes - 1, "cut": self._cut}, grad_ax,
                             self.wire_dtype)
        return self._backward(frames, cut=self._cut - 1)

    def abort(self) -> None:
        self._request(wire.encode("abort", {"session": self.session_id}), expect="aborted")
        self._cut = None

    def _forward(self, frames: list, *, cut: int, first: bool = False) -> StepOutput:
        bsz, seq = self._shape
        if cut == len(self._cuts):
            header, payload = self._request(frames, expect="hidden")
            self._passes += first
            hidden = self._reply_tensor(header, payload, self._passes - 1, (bsz, seq, self.manifest.architecture.hidden_size))
            return StepOutput(hidden=hidden)
        header, payload = self._request(frames, expect="ax")
        self._passes += first
        segment = self._cuts[cut]
        self._check_cut(header, cut, segment)
        ax = self._reply_tensor(header, payload, self._passes - 1, self._cut_shape(segment))
        self._cut = cut
        return StepOutput(ax=ax, layer=segment.cut_layer, stage=segment.kind.out_cut.stage)

    def _backward(self, frames: list, *, cut: int) -> GradOutput:
        header, payload = self._request(frames, expect="grad")
        segment = self._cuts[cut]
        self._check_cut(header, cut, segment)
        if header["last"] != (cut == 0):
            self._broken(f"the cloud ended the backward at cut {cut}" if header["last"] else "the cloud went on past cut 0")
        grad = self._reply_tensor(header, payload, self._passes - 1, self._cut_shape(segment))
        self._cut = None if cut == 0 else cut
        return GradOutput(grad_madx=grad, layer=segment.cut_layer, stage=segment.kind.out_cut.stage, last=cut == 0)

    def _started(self) -> None:
        # The cloud checks the order of everything else; a pass number below 0 would not even be a message.
        if not self._passes:
            raise RuntimeError("no pass has been started in this session")

    def _cut_shape(self, segment) -> tuple[int, ...]:
        return (*self._shape, len(segment.kind.out_cut.targets), self.manifest.rank)


def status_connection(url: str, *, context: zmq.Context | None = None, curve: ClientKeys | None = None) -> zmq.Socket:
    """A connection of its own to the cloud at `url`, for `ask_status`; the caller closes it."""
    socket = (context or zmq.Context.instance()).socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    _bound_replies(socket, wire.MAX_HEADER_BYTES)  # a status reply is one header
    if curve is not None:
        secure_client(socket, curve)
    try:
        socket.connect(url)
    except zmq.ZMQError:
        socket.close()
        raise
    return socket


def ask_status(socket: zmq.Socket, url: str, *, timeout: float = 5.0, secured: bool = False) -> dict:
    """The cloud's counters (sessions, tokens, ...) from one `status` request on `socket`."""
    socket.setsockopt(zmq.RCVTIMEO, wire.timeout_ms(timeout))  # wait in the receive, as a session does: no poll first
    try:
        socket.send_multipart(wire.encode("status", {}))
        reply, count, nbytes = wire.receive(socket)
        header, _ = wire.decode(reply, wire.REPLIES, max_message_bytes=wire.MAX_HEADER_BYTES, count=count, nbytes=nbytes)
    except zmq.Again:
        raise CloudError(f"no answer from the cloud at {url} within {timeout:g} s " + _SILENCE_CAUSE[secured], "timeout") from None
    except wire.ProtocolError as e:
        raise CloudError(f"the cloud sent a malformed reply: {e}", "bad_reply") from None
    if header["op"] != "status":
        raise CloudError(f"the cloud answered {header['op']!r} to a status request", "bad_reply")
    return {k: v for k, v in header.items() if k not in ("v", "op")}


def cloud_status(url: str, *, timeout: float = 5.0, context: zmq.Context | None = None, curve: ClientKeys | None = None) -> dict:
    """The cloud's counters from a `status` request on a connection of its own."""
    socket = status_connection(url, context=context, curve=curve)
    try:
        return ask_status(socket, url, timeout=timeout, secured=curve is not None)
    finally:
        socket.close()
