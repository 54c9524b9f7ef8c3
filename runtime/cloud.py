"""The cloud side: decoder segments in ONNX Runtime and per-session KV caches.

A `CloudSession` is a small state machine driven by the edge. `start` takes
input embeddings and runs until the first cut, returning the stacked `A x`;
each `resume` takes the edge's `M A x` and runs to the next cut; the last one
returns the final hidden state. The cloud never sees token ids or text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .arch import kind_io, kind_weight_names, layer_weight_shapes
from .bundle import GRAPHS, WEIGHTS, BundleError, Manifest, read_manifest
from .ort import make_session, read_weights

# Full-attention layers get a window longer than any context.
NO_WINDOW = np.array(1 << 62, np.int64)


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


class CloudModel:
    """A loaded cloud bundle: one ORT session per segment kind, weights bound per segment."""

    def __init__(self, bundle_dir: str | Path, *, threads: int | None = None):
        self.dir = Path(bundle_dir)
        self.manifest: Manifest = read_manifest(self.dir, side="cloud")
        self.arch = self.manifest.architecture
        self.plan = self.manifest.plan
        self.weights = weights = read_weights(self.dir / WEIGHTS)
        self._check_weights(weights)
        self.sessions = {
            name: make_session(self.dir / GRAPHS / file, threads=threads) for name, file in self.manifest.graphs.items()
        }
        missing = set(self.plan.kinds) - set(self.sessions)
        if missing:
            raise BundleError(f"{self.dir}: manifest lacks graphs for {', '.join(sorted(missing))}")
        # Per segment: the feed of its weights, prepared once so a call only adds activations.
        self.segment_weights = []
        for seg in self.plan.segments:
            feed = {}
            for name in kind_weight_names(self.arch, seg.kind):
                rel, rest = name.split(".", 1)
                feed[name] = weights[f"layers.{seg.layer + int(rel[1:])}.{rest}"]
            self.segment_weights.append(feed)
        self.windows = [NO_WINDOW if w is None else np.array(w, np.int64) for w in self.arch.sliding_windows]

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

    def run_segment(self, index: int, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seg = self.plan.segments[index]
        _, outputs = kind_io(self.arch, seg.kind)
        values = self.sessions[seg.kind.name].run(outputs, {**feed, **self.segment_weights[index]})
        return dict(zip(outputs, values))


class CloudSession:
    """One edge's state on the cloud: KV cache per layer, position, and where the current step stands."""

    def __init__(self, model: CloudModel, *, max_context: int):
        self.model = model
        self.max_context = max_context
        self.position = 0
        self.kv: list[tuple[np.ndarray, np.ndarray] | None] = [None] * model.arch.num_layers
        self._segment: int | None = None  # next segment to run, while a step is open
        self._state: dict[str, np.ndarray] = {}

    @property
    def in_step(self) -> bool:
        return self._segment is not None

    def start(self, embeds: np.ndarray) -> StepOutput:
        """Begin a step with `embeds` [batch, seq, hidden] for the tokens after the cached ones."""
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
        self._state = {
            "inputs_embeds": embeds,
            "position_ids": np.tile(np.arange(self.position, self.position + seq, dtype=np.int64), (bsz, 1)),
            "attention_mask": np.ones((bsz, self.position + seq), np.int64),
        }
        self._segment = 0
        return self._run(None)

    def resume(self, madx: np.ndarray) -> StepOutput:
        """Continue the open step with the edge's `M A x` for the cut it was last given."""
        if not self.in_step:
            raise RuntimeError("no step is open in this session")
        expected = self._state["ax_shape"]
        if tuple(madx.shape) != expected:
            raise ValueError(f"M A x must have shape {list(expected)}, got {list(madx.shape)}")
        return self._run(madx)

    def abort(self) -> None:
        """Drop an unfinished step; the cache keeps only completed tokens."""
        self._segment, self._state = None, {}

    def _run(self, madx: np.ndarray | None) -> StepOutput:
        model, st = self.model, self._state
        index = self._segment
        seg = model.plan.segments[index]
        inputs, _ = kind_io(model.arch, seg.kind)
        feed = {}
        if madx is not None:
            feed.update(resid=st["resid"], x=st["x"], madx=madx)
        else:
            feed["inputs_embeds"] = st["inputs_embeds"]
        layer = seg.attention_layer
        if layer is not None:
            past = self.kv[layer]
            if past is None:
                bsz = st["position_ids"].shape[0]
                empty = np.zeros((bsz, model.arch.num_kv_heads, 0, model.arch.head_dim), np.float32)
                past = (empty, empty)
            feed.update(position_ids=st["position_ids"], attention_mask=st["attention_mask"],
                        window=model.windows[layer], past_key=past[0], past_value=past[1])
        out = model.run_segment(index, feed)
        if layer is not None:
            st.setdefault("present", {})[layer] = (out["present_key"], out["present_value"])
        if seg.kind.out_cut is None:
            # The step is complete: only now does the cache take the new tokens.
            for l, kv in st["present"].items():
                self.kv[l] = kv
            self.position += st["position_ids"].shape[1]
            self.abort()
            return StepOutput(hidden=out["hidden"])
        st.update(resid=out["resid_out"], x=out["x_out"], ax_shape=out["ax"].shape)
        self._segment = index + 1
        return StepOutput(ax=out["ax"], layer=seg.cut_layer, stage=seg.kind.out_cut.stage)
