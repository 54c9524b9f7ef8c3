"""What crosses the split while the edge tunes M: the training step as the edge sees it.

A training step is the inference step (embeddings up, `A x` down, `M A x` up,
last hidden state down), followed by the backward pass in the opposite
direction. At every cut, from the last to the first, the cloud sends the
gradient at `M A x`; the edge adds `grad_madx ⊗ A x` to the gradient of M and
answers with the gradient at `A x` (`M^T grad_madx`), which the cloud carries
on through its frozen layers. The backward ends when the edge has the first
cut's gradient at `M A x`: what lies below that cut only leads to the frozen
embedding, so nothing more is sent.

Everything here is numpy; the local cloud (cloud_tune.py) and a remote one
behind the wire protocol implement the same `TrainLink`, so the edge's
training loop does not know which one it drives. What crosses is floats of
activation shapes, plus a 0/1 padding mask: never token ids, labels or a loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .cloud import StepOutput
from .errors import PlcliError


class LinkError(PlcliError):
    """The cloud could not finish a request (lost connection, timeout, refused); the step is void."""


@dataclass
class GradOutput:
    """The cloud's gradient at the `M A x` of one cut, [batch, seq, targets, rank]; `last` at the first cut."""

    grad_madx: np.ndarray
    layer: int
    stage: str
    last: bool


class TrainLink(Protocol):
    """The cloud's half of a training step, driven by the edge."""

    def forward_start(self, embeds: np.ndarray, attention_mask: np.ndarray | None = None, *, train: bool = True) -> StepOutput:
        """Begin a step on a fresh batch: `embeds` [batch, seq, hidden], `attention_mask` [batch, seq] (1 = real token).

        With `train=False` (evaluation) the cloud keeps nothing and the step ends with the hidden state.
        """

    def forward_resume(self, madx: np.ndarray) -> StepOutput:
        """The edge's `M A x` for the cut it was last given; returns the next `A x`, or the last hidden state."""

    def backward_start(self, grad_hidden: np.ndarray) -> GradOutput:
        """The loss gradient at the last hidden state; returns the gradient at the last cut's `M A x`."""

    def backward_resume(self, grad_ax: np.ndarray) -> GradOutput:
        """The gradient at the `A x` of the cut just answered; returns the gradient at the previous cut's `M A x`."""

    def abort(self) -> None:
        """Drop the open step, if any, and whatever the cloud kept for it."""

    def close(self) -> None:
        """Let go of the cloud: a remote link closes its session (a failover replaces a lost link by a new one)."""
