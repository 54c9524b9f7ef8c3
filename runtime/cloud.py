"""The cloud side: decoder segments in ONNX Runtime and per-session KV caches.

A `CloudSession` is a small state machine driven by the edge. `start` takes
input embeddings and runs until the first cut, returning the stacked `A x`;
each `resume` takes the edge's `M A x` and runs to the next cut; the last one
returns the final hidden state. The cloud never sees token ids or text.

Each of those runs one segment, in three parts a server can take apart:
`start_call`/`resume_call` build the segment's feed, `CloudModel.run_group`
runs the feeds of several sessions at the same segment as one ONNX Runtime
call (their caches in buffers the group shares: SharedCache), and `complete`
takes a session's share of the outputs into its state.

After a cut, the base projections of the next segment's first piece need only
the cut's input, not the edge's answer: `projection_call`/`complete_projection`
let a server compute them while the edge computes `M A x` (see
arch.projection_name); `resume_call` computes them itself when nobody has.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .arch import kind_io, kind_weight_names, layer_weight_shapes, projection_name, projection_weight_names
from .bundle import GRAPHS, WEIGHTS, BundleError, Manifest, read_manifest
from .ort import BoundSession, make_session, read_weights, share_threads

# Full-attention layers get a window longer than any context.
NO_WINDOW = np.array(1 << 62, np.int64)
# Cache buffers grow by whole chunks of key slots: a session copies its cache only when a step crosses a chunk
# boundary, and attention reads at most this many free (masked) slots besides the used ones (a group reads up to
# two chunks past its longest member's).
KV_CHUNK = 32
# Cache buffers in a feed: a group reads its members' rows of one buffer (SharedCache).
CACHE_INPUTS = ("past_key", "past_value")


def cache_slots(tokens: int) -> int:
    """Slots in the cache buffers of a session that holds `tokens` tokens: whole chunks."""
    return -(-tokens // KV_CHUNK) * KV_CHUNK


def slot_bytes(arch, batch: int) -> int:
    """Bytes one cache slot of one layer takes: float32 keys and values of `batch` rows."""
    return 2 * batch * arch.num_kv_heads * arch.head_dim * 4


@dataclass
class StepOutput:
    """What the cloud hands the edge: `A x` at a cut (layer, stage), or the final hidden state."""

    ax: np.ndarray | None = None
    layer: int | None = None
    stage: str | None = None
    hidden: np.ndarray | None = None

    @property
    def done(self) -> bool:
        return self.hidden is not None


@dataclass
class SegmentCall:
    """A segment an open step is due to run, with its feed: activations, positions, mask and the session's past.

    With `projection`, the call is the base projections before segment `index` (feed: the cut's `x`).
    """

    index: int
    feed: dict[str, np.ndarray]
    projection: bool = False
    session: "CloudSession | None" = None  # whose cache the feed reads: a group may move it (SharedCache)

    @property
    def rows(self) -> int:
        return _activations(self.feed).shape[0]

    @property
    def tokens_per_row(self) -> int:
        return _activations(self.feed).shape[1]


def _activations(feed: dict[str, np.ndarray]) -> np.ndarray:
    for name in ("inputs_embeds", "resid", "x"):
        if name in feed:
            return feed[name]
    raise KeyError("a call without activations")


def last_level_cache_bytes() -> int | None:
    """The size of the CPU's largest cache, where Linux tells (sysfs); None elsewhere."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = path.read_text().strip()
            sizes.append(int(text[:-1]) * units[text[-1]] if text[-1:] in units else int(text))
        except (OSError, ValueError):
            continue
    return max(sizes, default=None)


class CloudModel:
    """A loaded cloud bundle: one ORT session per segment kind fed each segment's weights, or, with `prepack`,
    one session per segment with its weights bound (see ort.BoundSession): what runs groups of sessions fast,
    at the cost of a second, packed copy of the weights in memory.

    A call of one token of one row (a session's decode step) reads each weight for one product, and when the
    weights come from memory rather than cache, ONNX Runtime's kernels for weights fed as they are stream them
    faster than its packed ones (1024 shape, 810 MB: 4% more tokens/s; 512 shape, 100 MB in a 480 MB cache: 10%
    fewer). So a prepacked model with `stream_one_row` runs those calls on the sessions fed their weights;
    None, the default, does so when the weights outgrow the CPU's largest cache (or 32 MiB, where it is unknown).

    `threads` are the compute threads of the whole model, not of each session. Any number but one (None: one per
    core) is the size of the process's shared ORT pool (ort.share_threads), which all sessions run on; one runs
    every call in the caller's thread, unless the process already has a shared pool.
    """

    def __init__(self, bundle_dir: str | Path, *, threads: int | None = None, prepack: bool = False,
                 stream_one_row: bool | None = None):
        self.dir = Path(bundle_dir)
        self.manifest: Manifest = read_manifest(self.dir, side="cloud")
        self.arch = self.manifest.architecture
        self.plan = self.manifest.plan
        self.weights = weights = read_weights(self.dir / WEIGHTS)
        self._check_weights(weights)

        def feed(seg, names):
            """A graph's weight inputs, named `l{relative layer}.{name}`, from the layers of `seg`."""
            out = {}
            for name in names:
                rel, rest = name.split(".", 1)
                out[name] = weights[f"layers.{seg.layer + int(rel[1:])}.{rest}"]
            return out

        # Per segment: the feeds of its weights (and of its projection's, after a cut), prepared once so
        # that a call only adds activations.
        self.segment_weights = [feed(seg, kind_weight_names(self.arch, seg.kind)) for seg in self.plan.segments]
        self.projection_weights = [None if seg.kind.in_cut is None else
                                   feed(seg, projection_weight_names(self.arch, seg.kind.in_cut.stage))
                                   for seg in self.plan.segments]
        self.windows = [NO_WINDOW if w is None else np.array(w, np.int64) for w in self.arch.sliding_windows]
        self._outputs = [kind_io(seg.kind)[1] for seg in self.plan.segments]  # looked up per call, built once
        if stream_one_row is None:
            layer_bytes = sum(v.nbytes for k, v in weights.items() if k.startswith("layers."))
            stream_one_row = layer_bytes > (last_level_cache_bytes() or 32 << 20)
        self.streams_one_row = prepack and stream_one_row
        names = [(seg.kind.name, None if seg.kind.in_cut is None else projection_name(seg.kind.in_cut.stage))
                 for seg in self.plan.segments]

        def graph(name):
            return self.dir / GRAPHS / self.manifest.graphs[name]

        if threads != 1:
            share_threads(threads)
        # What each graph takes besides its weights: a graph of another split is refused as it loads.
        inputs = {kind: kind_io(seg.kind)[0] for seg, (kind, _) in zip(self.plan.segments, names)}
        inputs.update({proj: ["x"] for _, proj in names if proj})
        # Per segment: (its session, its projection's session or None), fed their weights (shared by kind) or bound.
        self._fed = self._packed = None
        if not prepack or stream_one_row:
            weights_of = {}  # a graph's weight shapes are those of any segment it runs
            for i, (kind, proj) in enumerate(names):
                weights_of[kind] = self.segment_weights[i]
                if proj:
                    weights_of[proj] = self.projection_weights[i]
            shared = {name: make_session(graph(name), threads=threads, feeds={
                **dict.fromkeys(inputs[name]), **{n: w.shape for n, w in weights_of[name].items()}})
                for name in weights_of}
            self._fed = [(shared[kind], proj and shared[proj]) for kind, proj in names]
        if prepack:
            self._packed = [(BoundSession(graph(kind), self.segment_weights[i], inputs=inputs[kind], threads=threads),
                             proj and BoundSession(graph(proj), self.projection_weights[i], inputs=inputs[proj],
                                                   threads=threads))
                            for i, (kind, proj) in enumerate(names)]

    def _check_weights(self, weights: dict[str, np.ndarray]) -> None:
        shapes = layer_weight_shapes(self.arch, self.manifest.rank, self.plan.cuts)
        for layer in range(self.arch.num_layers):
            for name, shape in shapes.items():
                key = f"layers.{layer}.{name}"
                if key not in weights:
                    raise BundleError(f"{self.dir}: weight {key} missing")
                if tuple(weights[key].shape) != shape or weights[key].dtype != np.float32:
                    raise BundleError(f"{self.dir}: weight {key} is {weights[key].dtype}{weights[key].shape}, expected float32{shape}")

    def new_session(self, *, max_context: int | None = None) -> "CloudSession":
        return CloudSession(self, max_context=max_context or self.arch.max_position_embeddings)

    def run_segment(self, index: int, feed: dict[str, np.ndarray], *, projection: bool = False) -> dict[str, np.ndarray]:
        """Segment `index` (or, with `projection`, the projections before it) on the activations in `feed`."""
        outputs = ["xw"] if projection else self._outputs[index]
        if self._packed is not None and not (self.streams_one_row and _activations(feed).shape[:2] == (1, 1)):
            values = self._packed[index][projection].run(outputs, feed)
        else:
            weights = (self.projection_weights if projection else self.segment_weights)[index]
            values = self._fed[index][projection].run(outputs, {**feed, **weights})
        return dict(zip(outputs, values))

    def run(self, call: SegmentCall) -> dict[str, np.ndarray]:
        return self.run_segment(call.index, call.feed, projection=call.projection)

    def run_group(self, calls: list[SegmentCall]) -> list[dict[str, np.ndarray]]:
        """Run the calls of several sessions at one segment as one call: their rows stacked on the batch axis.

        Every call must carry the same number of new tokens per row. The slots
        in use of the calls' caches are stacked into buffers as long as the
        longest; each row's `past_length` masks the rest, as it masks a
        session's free slots. Positions stay each session's own. Each call gets
        back its own rows: what `run_segment` gives it alone, up to float rounding.
        """
        if len(calls) == 1:
            return [self.run(calls[0])]
        if len({(c.index, c.projection, c.tokens_per_row) for c in calls}) != 1:
            raise ValueError("a group runs one segment (or projection) with one number of new tokens per row")
        layer = None if calls[0].projection else self.plan.segments[calls[0].index].attention_layer
        order = list(range(len(calls)))
        caches = None
        if layer is not None:
            order, caches = self._group_cache([c.session for c in calls], layer,
                                              [int(c.feed["past_length"][0]) for c in calls], calls[0].tokens_per_row)
        feeds = [calls[i].feed for i in order]
        batched = {}
        for name, value in feeds[0].items():
            if name == "window":  # one segment, one layer, one window
                batched[name] = value
            elif name in CACHE_INPUTS:
                batched[name] = caches[CACHE_INPUTS.index(name)]
            else:
                batched[name] = np.concatenate([f[name] for f in feeds])
        out = self.run_segment(calls[0].index, batched, projection=calls[0].projection)
        parts, lo = [None] * len(calls), 0
        for i in order:
            hi = lo + calls[i].rows
            parts[i] = {name: value[lo:hi] for name, value in out.items()}
            lo = hi
        return parts

    def group_widening(self, calls: list[SegmentCall]) -> tuple[int, int] | None:
        """(layer, slots) where `run_group(calls)` would stack its members' caches into new shared buffers of that
        many slots, which become their caches at that layer; None where it makes none. For memory accounting."""
        if len(calls) < 2 or calls[0].projection:
            return None
        layer = self.plan.segments[calls[0].index].attention_layer
        if layer is None:
            return None
        slots = _new_shared_slots([c.session for c in calls], layer, [int(c.feed["past_length"][0]) for c in calls],
                                  calls[0].tokens_per_row)
        return None if slots is None else (layer, slots)

    def _group_cache(self, sessions: list["CloudSession"], layer: int, used: list[int],
                     tokens_per_row: int) -> tuple[list[int], tuple[np.ndarray, np.ndarray]]:
        """The order to stack `sessions` in and their caches at `layer` as one (keys, values) pair.

        Sessions that share buffers in consecutive rows (a group that ran
        before) get a view of them: nothing is copied. Sessions from several
        buffers are stacked into new shared buffers that become their caches
        (SharedCache), so that the group's next call reads them in place. Some
        sessions of one shared buffer, in rows apart, are stacked for this call
        only, so that the buffer stays whole for the group it was made for.
        """
        slots = _new_shared_slots(sessions, layer, used, tokens_per_row)
        if slots is None:
            home = sessions[0].shared[layer]
            order = sorted(range(len(sessions)), key=lambda i: home.rows[sessions[i]][0])
            spans = [home.rows[sessions[i]] for i in order]
            if all(lo + n == next_lo for (lo, n), (next_lo, _) in zip(spans, spans[1:])):
                start, end = spans[0][0], spans[-1][0] + spans[-1][1]
                return order, (home.keys[start:end], home.values[start:end])
            order_used = [used[i] for i in order]
            return order, tuple(_stack_cache([sessions[i].kv[layer][k] for i in order], order_used) for k in (0, 1))
        shared = SharedCache(sessions, layer, used, slots)
        return list(range(len(sessions))), (shared.keys, shared.values)


def _new_shared_slots(sessions: list["CloudSession"], layer: int, used: list[int], tokens_per_row: int) -> int | None:
    """Slots of the shared buffers a group of `sessions` would be stacked into at `layer`; None if they share some.

    As many as the group's step needs, and a chunk to spare when that is more, so that members that cross a chunk
    boundary a few tokens apart stay together; never sized by the members' buffers, which may be wider than they
    need (a group they left): a short session's row would stay as wide as the longest it ever grouped with.
    """
    home = sessions[0].shared[layer]
    if home is not None and all(s.shared[layer] is home for s in sessions):
        return None
    return cache_slots(max(used) + max(tokens_per_row, KV_CHUNK))


class SharedCache:
    """The caches at one layer of sessions that ran as a group: consecutive rows of one pair of buffers.

    A group call needs its members' caches as one array. Stacking them on
    every call copied every used slot, every layer, every token: with 8
    sessions of 512 tokens, 1.2 ms of a 4.2 ms call on the 512 shape. So the
    stacking a group needs anyway moves the caches into buffers they share,
    each member keeping its rows as its cache, and while the group stays
    together its calls read them in place. A member leaves when its cache
    must grow past the buffers, when another group stacks it, or when it is
    released; once half the rows are left behind, the members that stay move
    to buffers of their own, so that what the caches hold stays within twice
    the rows in use. Rows left behind are never handed to another session:
    a session only ever reads and writes the rows it was stacked into.
    """

    def __init__(self, sessions: list["CloudSession"], layer: int, used: list[int], slots: int):
        """Stack the first `used` slots of each session's cache at `layer` into `slots`, and make them its cache."""
        self.layer = layer
        self.keys, self.values = (_stack_cache([s.kv[layer][k] for s in sessions], used, slots) for k in (0, 1))
        self.rows: weakref.WeakKeyDictionary[CloudSession, tuple[int, int]] = weakref.WeakKeyDictionary()  # first, count
        self._compacting = False
        left: dict[SharedCache, list[CloudSession]] = {}
        row = 0
        for session in sessions:
            count = session.kv[layer][0].shape[0]
            self.rows[session] = (row, count)
            if session.shared[layer] is not None:
                left.setdefault(session.shared[layer], []).append(session)
            session.kv[layer] = (self.keys[row:row + count], self.values[row:row + count])
            session.shared[layer] = self
            row += count
        # Only once every member has moved: a buffer they leave compacts only the sessions that stay in it.
        for buffers, sessions_left in left.items():
            buffers.leave(*sessions_left)

    def leave(self, *sessions: "CloudSession") -> None:
        for session in sessions:
            self.rows.pop(session, None)
        if self._compacting:
            return
        held = sum(n for _, n in self.rows.values())
        if held and 2 * held <= self.keys.shape[0]:
            self._compacting = True
            for member in list(self.rows):
                member.own_cache(self.layer)


def _stack_cache(buffers: list[np.ndarray], used: list[int], slots: int | None = None) -> np.ndarray:
    """The first `used` slots of each cache buffer, stacked on the batch axis into `slots` (the most used); zeros (free
    slots) after them."""
    _, heads, _, dim = buffers[0].shape
    stacked = np.empty((sum(b.shape[0] for b in buffers), heads, slots or max(used), dim), buffers[0].dtype)
    row = 0
    for buffer, n in zip(buffers, used):
        rows = buffer.shape[0]
        stacked[row:row + rows, :, :n] = buffer[:, :, :n]
        # Masking adds a large negative bias to a free slot's score, so the slot must still hold finite numbers.
        stacked[row:row + rows, :, n:] = 0
        row += rows
    return stacked


class CloudSession:
    """One edge's state on the cloud: KV cache per layer, position, and where the current step stands.

    The cache of a layer is a pair of preallocated buffers [batch, kv heads, slots, head dim], of which the first
    `position` slots are in use. Attention reads the buffers in place and returns only the new keys and values;
    a completed step writes them into the next free slots. The buffers grow by `KV_CHUNK` slots when a step needs
    more, so neither a token nor a layer copies the cache, except once per chunk.
    """

    def __init__(self, model: CloudModel, *, max_context: int):
        self.model = model
        self.max_context = max_context
        self.position = 0
        self.kv: list[tuple[np.ndarray, np.ndarray] | None] = [None] * model.arch.num_layers
        self.shared: list[SharedCache | None] = [None] * model.arch.num_layers  # whose rows kv[layer] is, if any
        self._segment: int | None = None  # next segment to run, while a step is open
        self._state: dict[str, np.ndarray] = {}

    @property
    def in_step(self) -> bool:
        return self._segment is not None

    def cache(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """The keys and values of `layer` in use: views [batch, kv heads, position, head dim] of its buffers."""
        buffers = self.kv[layer]
        if buffers is None:
            raise ValueError("nothing is cached yet")
        return buffers[0][:, :, :self.position], buffers[1][:, :, :self.position]

    def _reserve(self, bsz: int, slots: int) -> None:
        """Make every layer's buffers hold at least `slots` keys, keeping the ones in use."""
        arch = self.model.arch
        shape = (bsz, arch.num_kv_heads, cache_slots(slots), arch.head_dim)
        for layer, old in enumerate(self.kv):
            if old is not None and old[0].shape[2] >= slots:  # rows in a group's buffers may have room to spare
                continue
            grown = (np.zeros(shape, np.float32), np.zeros(shape, np.float32))
            if old is not None:
                for new, kept in zip(grown, old):
                    new[:, :, :self.position] = kept[:, :, :self.position]
            self._set_cache(layer, grown)

    def _set_cache(self, layer: int, cache: tuple[np.ndarray, np.ndarray]) -> None:
        """Make `cache`, buffers of this session's own, its cache at `layer`."""
        left = self.shared[layer]
        self.kv[layer], self.shared[layer] = cache, None
        if left is not None:
            left.leave(self)

    def own_cache(self, layer: int) -> None:
        """Copy this session's cache at `layer` out of shared buffers into buffers of its own: the slots its tokens
        and open step need, with a chunk to spare, not the width of the group's rows."""
        if self.shared[layer] is not None:
            slots = min(self.kv[layer][0].shape[2], cache_slots(self._tokens_reserved() + KV_CHUNK))
            self._set_cache(layer, tuple(buffer[:, :, :slots].copy() for buffer in self.kv[layer]))

    def _tokens_reserved(self) -> int:
        """The slots the cache must hold: its tokens and those of the open step."""
        return self.position + (self._state["position_ids"].shape[1] if self.in_step else 0)

    def cache_bytes(self, batch: int, tokens: int = 0, *, widen: tuple[int, int] | None = None) -> int:
        """Bytes of this session's KV cache (float32 keys and values of every layer, `batch` rows each) once it holds
        at least `tokens` slots, as `start_call` reserves them; with `widen` = (layer, slots), that layer's rows are
        `slots` wide, as in the new shared buffers of a group (`CloudModel.group_widening`)."""
        need = cache_slots(tokens)
        slots = 0
        for layer, kv in enumerate(self.kv):
            width = widen[1] if widen is not None and widen[0] == layer else (kv[0].shape[2] if kv is not None else 0)
            slots += max(width, need)
        return slot_bytes(self.model.arch, batch) * slots

    def release(self) -> None:
        """Leave every shared buffer (a server drops the session next), so that the members left can be compacted."""
        for layer, shared in enumerate(self.shared):
            if shared is not None:
                self.shared[layer] = None
                shared.leave(self)

    def start(self, embeds: np.ndarray) -> StepOutput:
        """Begin a step with `embeds` [batch, seq, hidden] for the tokens after the cached ones."""
        return self._run(self.start_call(embeds))

    def resume(self, madx: np.ndarray) -> StepOutput:
        """Continue the open step with the edge's `M A x` for the cut it was last given."""
        return self._run(self.resume_call(madx))

    def abort(self) -> None:
        """Drop an unfinished step; the cache keeps only completed tokens."""
        self._segment, self._state = None, {}

    def start_call(self, embeds: np.ndarray) -> SegmentCall:
        """Open a step with `embeds` (as `start`) and return its first segment's call, not yet run."""
        if self.in_step:
            raise RuntimeError("a step is already open in this session")
        arch = self.model.arch
        if embeds.ndim != 3 or embeds.shape[2] != arch.hidden_size or embeds.shape[1] < 1:
            raise ValueError(f"embeddings must be [batch, seq>=1, {arch.hidden_size}], got {list(embeds.shape)}")
        if self.kv[0] is not None and self.kv[0][0].shape[0] != embeds.shape[0]:
            raise ValueError("batch size changed within a session")
        if self.position + embeds.shape[1] > self.max_context:
            raise ValueError(f"context of {self.position + embeds.shape[1]} tokens exceeds this session's limit of {self.max_context}")
        bsz, seq = embeds.shape[:2]
        # Growing keeps the slots in use and the position: a step that is later aborted leaves the cache as it was.
        self._reserve(bsz, self.position + seq)
        self._state = {
            "inputs_embeds": embeds,
            "position_ids": np.arange(self.position, self.position + seq, dtype=np.int64).reshape(1, seq).repeat(bsz, 0),
            "attention_mask": np.ones((bsz, seq), np.int64),
            "past_length": np.full(bsz, self.position, np.int64),
        }
        self._segment = 0
        return self._call(None)

    def resume_call(self, madx: np.ndarray) -> SegmentCall:
        """The call that continues the open step with `madx` (as `resume`), not yet run.

        The projections before it run first, unless `projection_call` was run already;
        otherwise the session is unchanged.
        """
        if not self.in_step:
            raise RuntimeError("no step is open in this session")
        expected = self._state["ax_shape"]
        if tuple(madx.shape) != expected:
            raise ValueError(f"M A x must have shape {list(expected)}, got {list(madx.shape)}")
        pending = self.projection_call()
        if pending is not None:
            self.complete_projection(self.model.run(pending))
        return self._call(madx)

    def projection_call(self) -> SegmentCall | None:
        """The projections the open step needs before its next segment, while they are still to run."""
        if not self.in_step or "x" not in self._state:
            return None
        return SegmentCall(self._segment, {"x": self._state["x"]}, projection=True)

    def complete_projection(self, out: dict[str, np.ndarray]) -> None:
        self._state["xw"] = out["xw"]
        del self._state["x"]

    def _call(self, madx: np.ndarray | None) -> SegmentCall:
        model, st = self.model, self._state
        feed = {}
        if madx is not None:
            feed.update(resid=st["resid"], xw=st["xw"], madx=madx)
        else:
            feed["inputs_embeds"] = st["inputs_embeds"]
        layer = model.plan.segments[self._segment].attention_layer
        if layer is not None:
            keys, values = self.kv[layer]
            feed.update(position_ids=st["position_ids"], attention_mask=st["attention_mask"],
                        past_length=st["past_length"], window=model.windows[layer], past_key=keys, past_value=values)
        return SegmentCall(self._segment, feed, session=self)

    def complete(self, out: dict[str, np.ndarray]) -> StepOutput:
        """Take the outputs of the open step's current segment call; at the step's last segment, commit the cache."""
        model, st = self.model, self._state
        index = self._segment
        seg = model.plan.segments[index]
        layer = seg.attention_layer
        if layer is not None:
            st.setdefault("new", {})[layer] = (out["new_key"], out["new_value"])
        if seg.kind.out_cut is None:
            # The step is complete: only now does the cache take the new tokens.
            end = self.position + st["position_ids"].shape[1]
            for l, new in st["new"].items():
                for buffer, part in zip(self.kv[l], new):
                    buffer[:, :, self.position:end] = part
            self.position = end
            self.abort()
            return StepOutput(hidden=out["hidden"])
        st.pop("xw", None)
        st.update(resid=out["resid_out"], x=out["x_out"], ax_shape=out["ax"].shape)
        self._segment = index + 1
        return StepOutput(ax=out["ax"], layer=seg.cut_layer, stage=seg.kind.out_cut.stage)

    def _run(self, call: SegmentCall) -> StepOutput:
        return self.complete(self.model.run(call))
