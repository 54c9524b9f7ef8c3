"""The cloud's half of tuning M: its frozen segments run in torch, forward and backward.

The cloud computes with `decoder.SegmentModule`, the very module its ONNX graphs
were traced from, on the bundle's weights (frozen: nothing here has a
parameter). A `CloudTrainSession` is one edge's training state machine and
implements `train_link.TrainLink`.

Keep or recompute: the cloud keeps, for the current step only, the inputs of
each segment (`resid`, `x`, `M A x` at every cut: about two hidden vectors per
token per cut, like activation checkpointing), not the autograd graphs. The
backward recomputes one segment at a time with gradients on and frees its
inputs at once; everything is dropped when the backward reaches the first cut,
on `abort()`, or when the next step starts. So the cloud holds no training
state between steps (no optimizer, no M), at the price of one extra forward per
segment; and the backward stays exact because it recomputes with the same
inputs and weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .bundle import GRAPHS, BundleError
from .cloud import CloudModel, StepOutput
from .decoder import ProjectionModule, SegmentModule
from .train_link import GradOutput


def rope_inv_freq(model: CloudModel) -> np.ndarray:
    """The rotary frequencies, read from the graphs they were frozen into (the cloud bundle keeps no config)."""
    import onnx
    from onnx import numpy_helper

    half = model.arch.head_dim // 2
    for kind in model.plan.kinds.values():
        if kind.attention_layer is None:
            continue
        graph = onnx.load(str(model.dir / GRAPHS / model.manifest.graphs[kind.name]), load_external_data=False).graph
        for init in graph.initializer:
            if init.name.endswith("inv_freq"):
                inv_freq = numpy_helper.to_array(init).astype(np.float32)
                if inv_freq.shape == (half,):
                    return inv_freq
    raise BundleError(f"{model.dir}: no rotary frequencies (inv_freq of shape ({half},)) in the attention graphs")


class TorchSegments:
    """A cloud bundle's segments as torch modules with frozen weights, shared by every training session."""

    def __init__(self, model: CloudModel):
        self.model = model
        self.arch, self.plan = model.arch, model.plan
        inv_freq = torch.from_numpy(rope_inv_freq(model))
        self.modules = {name: SegmentModule(self.arch, kind, model.manifest.rank, inv_freq).eval()
                        for name, kind in self.plan.kinds.items()}
        self.projections = {cut.stage: ProjectionModule(self.arch, cut.stage).eval() for cut in self.plan.cuts}
        # The same arrays as the ONNX feeds: torch views, no copies.
        self.weights = [[torch.from_numpy(feed[n]) for n in self.modules[seg.kind.name].weight_names]
                        for seg, feed in zip(self.plan.segments, model.segment_weights)]
        self.projection_weights = [feed and [torch.from_numpy(w) for w in feed.values()] for feed in model.projection_weights]
        self.windows = [torch.from_numpy(np.asarray(w)) for w in model.windows]

    def run(self, index: int, inputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Segment `index` on its activation `inputs` (+ the batch's positions and mask where it has attention).

        After a cut the inputs are `resid`, `x` and `madx`, as the edge's gradients need them:
        the projections of `x` run here, as part of the segment.
        """
        seg = self.plan.segments[index]
        module = self.modules[seg.kind.name]
        feed = dict(inputs)
        if "x" in feed:
            feed["xw"] = self.projections[seg.kind.in_cut.stage](feed.pop("x"), *self.projection_weights[index])
        layer = seg.attention_layer
        if layer is not None:
            bsz = batch["position_ids"].shape[0]
            empty = torch.zeros(bsz, self.arch.num_kv_heads, 0, self.arch.head_dim)
            feed.update(position_ids=batch["position_ids"], attention_mask=batch["attention_mask"],
                        past_length=torch.zeros(bsz, dtype=torch.int64), window=self.windows[layer],
                        past_key=empty, past_value=empty)
        outputs = module(*(feed[n] for n in module.input_names), *self.weights[index])
        return dict(zip(module.output_names, outputs))

    def new_session(self, *, max_context: int | None = None) -> "CloudTrainSession":
        return CloudTrainSession(self, max_context=max_context)


class CloudTrainSession:
    """One edge's training steps. Phases: idle -> forward (cut by cut) -> backward (cut by cut, in reverse) -> idle."""

    def __init__(self, segments: TorchSegments, *, max_context: int | None = None):
        self.segments = segments
        self.max_context = max_context or segments.arch.max_position_embeddings
        self.abort()

    @property
    def phase(self) -> str:
        return self._phase

    @property
    def expected_shape(self) -> tuple[int, ...]:
        """Shape of the next array the edge must send (`M A x`, or a gradient)."""
        return self._expect

    def close(self) -> None:
        """In this process there is no session to give back, only the open step's activations."""
        self.abort()

    def abort(self) -> None:
        self._phase = "idle"
        self._train = False
        self._batch: dict[str, torch.Tensor] = {}
        self._inputs: dict[int, dict[str, torch.Tensor]] = {}  # segment -> its inputs, kept for the backward
        self._carry: dict[str, torch.Tensor] = {}  # forward: resid and x for the next segment
        self._grads: dict[str, torch.Tensor] = {}  # backward: gradients at resid_out and x_out of segment _next
        self._next = 0  # forward: segment to run next; backward: segment to recompute next
        self._expect: tuple[int, ...] = ()  # shape of the next array the edge must send

    # -- forward -----------------------------------------------------------
    def forward_start(self, embeds: np.ndarray, attention_mask: np.ndarray | None = None, *, train: bool = True) -> StepOutput:
        arch = self.segments.arch
        self.abort()  # a new step replaces whatever was left open
        _check_float(embeds, "embeddings")
        if embeds.ndim != 3 or embeds.shape[2] != arch.hidden_size or min(embeds.shape[:2]) < 1:
            raise ValueError(f"embeddings must be [batch, seq, {arch.hidden_size}], got {list(embeds.shape)}")
        bsz, seq = embeds.shape[:2]
        if seq > self.max_context:
            raise ValueError(f"sequence of {seq} tokens exceeds the model's context of {self.max_context}")
        if attention_mask is None:
            attention_mask = np.ones((bsz, seq), np.int64)
        if not isinstance(attention_mask, np.ndarray) or attention_mask.shape != (bsz, seq) \
                or not np.isin(attention_mask, (0, 1)).all():
            raise ValueError(f"attention mask must be 0/1 of shape [{bsz}, {seq}]")
        if not attention_mask.any(axis=1).all():
            raise ValueError("every sequence needs at least one unmasked token")
        # Positions count from 0 whatever the mask: batches are right-padded, as transformers numbers them.
        self._batch = {
            "position_ids": torch.arange(seq).expand(bsz, seq),
            "attention_mask": torch.from_numpy(attention_mask.astype(np.int64)),
        }
        self._train = train
        self._phase = "forward"
        return self._forward({"inputs_embeds": _tensor(embeds)})

    def forward_resume(self, madx: np.ndarray) -> StepOutput:
        if self._phase != "forward":
            raise RuntimeError(f"forward_resume in phase {self._phase}")
        _check_array(madx, self._expect, "M A x")
        return self._forward({**self._carry, "madx": _tensor(madx)})

    def _forward(self, inputs: dict[str, torch.Tensor]) -> StepOutput:
        index = self._next
        with torch.no_grad():
            out = self.segments.run(index, inputs, self._batch)
        if self._train and index > 0:  # segment 0 is never recomputed: its backward only reaches the embedding
            self._inputs[index] = inputs
        seg = self.segments.plan.segments[index]
        if seg.kind.out_cut is None:
            hidden = out["hidden"].numpy()
            if self._train:
                self._phase, self._expect, self._carry = "forward_done", hidden.shape, {}
            else:
                self.abort()
            return StepOutput(hidden=hidden)
        self._carry = {"resid": out["resid_out"], "x": out["x_out"]}
        self._next, self._expect = index + 1, tuple(out["ax"].shape)
        return StepOutput(ax=out["ax"].numpy(), layer=seg.cut_layer, stage=seg.kind.out_cut.stage)

    # -- backward ----------------------------------------------------------
    def backward_start(self, grad_hidden: np.ndarray) -> GradOutput:
        if self._phase != "forward_done":
            raise RuntimeError(f"backward_start in phase {self._phase}")
        _check_array(grad_hidden, self._expect, "gradient at the hidden state")
        self._phase = "backward"
        return self._backward({"hidden": _tensor(grad_hidden)})

    def backward_resume(self, grad_ax: np.ndarray) -> GradOutput:
        if self._phase != "backward":
            raise RuntimeError(f"backward_resume in phase {self._phase}")
        _check_array(grad_ax, self._expect, "gradient at A x")
        return self._backward({**self._grads, "ax": _tensor(grad_ax)})

    def _backward(self, grad_outputs: dict[str, torch.Tensor]) -> GradOutput:
        index = self._next
        inputs = {k: v.requires_grad_(True) for k, v in self._inputs.pop(index).items()}
        with torch.enable_grad():
            out = self.segments.run(index, inputs, self._batch)
            grads = torch.autograd.grad([out[n] for n in grad_outputs], list(inputs.values()),
                                        list(grad_outputs.values()), allow_unused=True)
        grads = {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(inputs.items(), grads)}
        cut = self.segments.plan.segments[index - 1]  # the segment that ended at the cut this madx answered
        grad_madx = grads["madx"].numpy()
        last = index == 1  # below the first cut lies only the frozen embedding
        if last:
            self.abort()
        else:
            self._grads = {"resid_out": grads["resid"], "x_out": grads["x"]}
            self._next, self._expect = index - 1, tuple(grad_madx.shape)
        return GradOutput(grad_madx=grad_madx, layer=cut.cut_layer, stage=cut.kind.out_cut.stage, last=last)


def _tensor(a: np.ndarray) -> torch.Tensor:
    # A copy: the cloud keeps inputs until the backward, whatever the caller does with its arrays.
    return torch.from_numpy(np.array(a, np.float32))


def _check_float(a: np.ndarray, what: str) -> None:
    if not isinstance(a, np.ndarray) or a.dtype != np.float32:
        raise ValueError(f"{what} must be a float32 array")


def _check_array(a: np.ndarray, shape: tuple[int, ...], what: str) -> None:
    _check_float(a, what)
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{what} must have shape {list(shape)}, got {list(a.shape)}")


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def local_train_link(cloud_dir: str | Path, *, threads: int | None = None) -> CloudTrainSession:
    """The cloud in this process: for tests and single-machine tuning."""
    set_threads(threads)
    return TorchSegments(CloudModel(cloud_dir, threads=threads)).new_session()
