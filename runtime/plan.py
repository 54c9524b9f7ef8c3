"""Where the decoder is cut, and the segments the cloud runs between cuts.

A decoder layer is five pieces; the input of each adapted projection is a
point where the cloud must stop and ask the edge for `M A x`:

    piece 0  x1 = input_norm(h)                         -> cut "attn_in"  (q, k, v read x1)
    piece 1  attention(q, k, v)                         -> cut "attn_out" (o reads the attention output)
    piece 2  h2 = h + o; x2 = post_attention_norm(h2)   -> cut "mlp_in"   (gate, up read x2)
    piece 3  m = act(gate) * up                         -> cut "mlp_out"  (down reads m)
    piece 4  h3 = h2 + down

Only stages with an adapted target become cuts. The cloud runs each stretch of
pieces between two cuts as one ONNX Runtime call, so a token costs
`layers * cuts_per_layer + 1` round trips to the edge (and as many calls, plus
one per cut for the base projections it runs while the edge answers; see
arch.projection_name). All middle stretches that start at the same stage share
one graph ("kind").
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

PIECES_PER_LAYER = 5

# Stage index s means "the cut before piece s".
STAGE_TARGETS: dict[str, tuple[str, ...]] = {
    "attn_in": ("q_proj", "k_proj", "v_proj"),
    "attn_out": ("o_proj",),
    "mlp_in": ("gate_proj", "up_proj"),
    "mlp_out": ("down_proj",),
}
STAGE_INDEX = {"attn_in": 1, "attn_out": 2, "mlp_in": 3, "mlp_out": 4}
ALL_TARGETS: tuple[str, ...] = tuple(t for ts in STAGE_TARGETS.values() for t in ts)
DEFAULT_TARGETS: tuple[str, ...] = STAGE_TARGETS["attn_in"]
ATTENTION_PIECE = 1


def normalize_targets(targets: list[str] | tuple[str, ...] | str) -> tuple[str, ...]:
    """Validated targets in canonical order (the order their stacked `A x` travels in)."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    unknown = sorted(set(targets) - set(ALL_TARGETS))
    if unknown:
        raise ValueError(f"unknown target(s) {', '.join(unknown)}; allowed: {', '.join(ALL_TARGETS)}")
    if not targets:
        raise ValueError(f"no targets given; allowed: {', '.join(ALL_TARGETS)}")
    if len(set(targets)) != len(targets):
        raise ValueError("targets repeat a name")
    return tuple(t for t in ALL_TARGETS if t in targets)


@dataclass(frozen=True)
class Cut:
    stage: str
    targets: tuple[str, ...]

    @property
    def index(self) -> int:
        return STAGE_INDEX[self.stage]


@dataclass(frozen=True)
class SegmentKind:
    """One graph: pieces [start, end) counted from piece 0 of the segment's first layer."""

    name: str
    start: int
    end: int
    in_cut: Cut | None  # None: starts at the model's input embeddings
    out_cut: Cut | None  # None: ends with the last hidden state

    # Cached: the cloud asks for these on every message, and a frozen dataclass never changes.
    @cached_property
    def pieces(self) -> tuple[tuple[int, int], ...]:
        """(relative layer, piece) for every piece this kind runs."""
        return tuple(divmod(g, PIECES_PER_LAYER) for g in range(self.start, self.end))

    @cached_property
    def attention_layer(self) -> int | None:
        """Relative layer whose attention runs inside this kind (at most one by construction)."""
        hits = [rel for rel, p in self.pieces if p == ATTENTION_PIECE]
        assert len(hits) <= 1
        return hits[0] if hits else None


@dataclass(frozen=True)
class Segment:
    kind: SegmentKind
    layer: int  # absolute layer of the kind's relative layer 0
    cut_layer: int | None  # absolute layer whose M the edge applies after this segment

    @cached_property
    def attention_layer(self) -> int | None:
        rel = self.kind.attention_layer
        return None if rel is None else self.layer + rel


class SplitPlan:
    """The cut points and segment sequence for a decoder of `num_layers` layers."""

    def __init__(self, num_layers: int, targets: tuple[str, ...]):
        self.num_layers = num_layers
        self.targets = normalize_targets(targets)
        self.cuts: tuple[Cut, ...] = tuple(
            Cut(stage, tuple(t for t in ts if t in self.targets))
            for stage, ts in STAGE_TARGETS.items()
            if any(t in self.targets for t in ts)
        )
        total = num_layers * PIECES_PER_LAYER
        bounds = [0] + [layer * PIECES_PER_LAYER + c.index for layer in range(num_layers) for c in self.cuts] + [total]
        cut_at = {layer * PIECES_PER_LAYER + c.index: c for layer in range(num_layers) for c in self.cuts}

        kinds: dict[str, SegmentKind] = {}
        segments: list[Segment] = []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            layer = lo // PIECES_PER_LAYER
            start = lo - layer * PIECES_PER_LAYER
            in_cut, out_cut = cut_at.get(lo), cut_at.get(hi)
            if in_cut is None:
                name = "first"
            elif out_cut is None:
                name = "last"
            else:
                name = f"from_{in_cut.stage}"
            kind = SegmentKind(name, start, hi - layer * PIECES_PER_LAYER, in_cut, out_cut)
            if kinds.setdefault(name, kind) != kind:
                raise AssertionError(f"segment kind {name} is not uniform across layers")
            segments.append(Segment(kind, layer, None if out_cut is None else (hi - 1) // PIECES_PER_LAYER))
        self.kinds = kinds
        self.segments: tuple[Segment, ...] = tuple(segments)

    @property
    def round_trips_per_token(self) -> int:
        """Edge<->cloud exchanges per generated token: one per cut, plus embedding up / hidden down."""
        return len(self.segments)
