"""The decoder's architecture as the split sees it, and the names and shapes of its split weights.

Torch-free: the exporter writes weights by these names, the runtime checks a
bundle against them, and decoder.py computes with them.
"""

from __future__ import annotations

from dataclasses import dataclass

from .plan import STAGE_INDEX, SegmentKind


@dataclass(frozen=True)
class Architecture:
    """Everything the graphs and the runtime need to know about the decoder."""

    family: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    hidden_act: str
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    rope_type: str
    rope_attention_scaling: float
    # Per layer: keys further back than this are masked; None is full attention.
    sliding_windows: tuple[int | None, ...]
    tie_word_embeddings: bool
    max_position_embeddings: int

    def target_dims(self, target: str) -> tuple[int, int]:
        """(in, out) features of a projection."""
        d, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {
            "q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d),
        }[target]

    @classmethod
    def from_dict(cls, d: dict) -> "Architecture":
        d = dict(d)
        d["sliding_windows"] = tuple(d["sliding_windows"])
        return cls(**d)


# Which weights each piece reads (bias names only exist when the architecture has them).
PIECE_LINEARS = {1: ("q_proj", "k_proj", "v_proj"), 2: ("o_proj",), 3: ("gate_proj", "up_proj"), 4: ("down_proj",)}
PIECE_NORMS = {0: "input_layernorm", 2: "post_attention_layernorm"}


def has_bias(arch: Architecture, target: str) -> bool:
    if target in ("q_proj", "k_proj", "v_proj"):
        return arch.qkv_bias
    if target == "o_proj":
        return arch.o_bias
    return arch.mlp_bias


def layer_weight_names(arch: Architecture, piece: int) -> list[str]:
    """Base-model weight names (without layer prefix) that one piece reads."""
    names = [PIECE_NORMS[piece]] if piece in PIECE_NORMS else []
    for t in PIECE_LINEARS.get(piece, ()):
        names.append(f"{t}.w")
        if has_bias(arch, t):
            names.append(f"{t}.b")
    return names


def kind_weight_names(arch: Architecture, kind: SegmentKind) -> list[str]:
    """Graph weight inputs of a kind, named `l{relative layer}.{name}`.

    A kind that starts at a cut gets the base projections of its first piece
    precomputed (`xw`, see `projection_weight_names`), so it reads none of
    their weights.
    """
    names = []
    for i, (rel, piece) in enumerate(kind.pieces):
        projected = PIECE_LINEARS[piece] if i == 0 and kind.in_cut is not None else ()
        names += [f"l{rel}.{n}" for n in layer_weight_names(arch, piece) if n.split(".")[0] not in projected]
    if kind.in_cut is not None:
        names += [f"l0.B.{t}" for t in kind.in_cut.targets]
    if kind.out_cut is not None:
        rel_last = kind.pieces[-1][0]
        names.append(f"l{rel_last}.A.{kind.out_cut.stage}")
    return names


def kind_io(kind: SegmentKind) -> tuple[list[str], list[str]]:
    """(non-weight input names, output names) of a kind's graph, in call order.

    Attention inputs: `position_ids` [B, S] of the new tokens; `attention_mask` [B, S], 0 on padding among them;
    `past_length` [B], how many slots of the cache buffers `past_key`/`past_value` [B, kv heads, slots, head dim]
    hold keys (positions 0..past_length-1; the rest are free). Outputs `new_key`/`new_value`: the new tokens' only.
    """
    inputs = ["inputs_embeds"] if kind.in_cut is None else ["resid", "xw", "madx"]
    if kind.attention_layer is not None:
        inputs += ["position_ids", "attention_mask", "past_length", "window", "past_key", "past_value"]
    outputs = ["resid_out", "x_out", "ax"] if kind.out_cut is not None else ["hidden"]
    if kind.attention_layer is not None:
        outputs += ["new_key", "new_value"]
    return inputs, outputs


# -- projections ---------------------------------------------------------------
# At a cut the cloud waits for the edge's `M A x`, but the base projections that
# read the cut's input (`x @ W` of every linear at that stage, adapted or not)
# do not depend on it. A projection graph computes them, stacked on the last
# axis as `xw`, while the edge answers; the kind after the cut takes `xw`
# instead of `x`. So the round trip to the edge overlaps with compute.
def projection_name(stage: str) -> str:
    return f"project_{stage}"


def projection_linears(stage: str) -> tuple[str, ...]:
    """Every projection that reads the input of the cut at `stage`, in `xw` order."""
    return PIECE_LINEARS[STAGE_INDEX[stage]]


def projection_weight_names(arch: Architecture, stage: str) -> list[str]:
    """Graph weight inputs of a projection, named like those of the kind after the cut (`l0.{name}`)."""
    linears = projection_linears(stage)
    return [f"l0.{n}" for n in layer_weight_names(arch, STAGE_INDEX[stage]) if n.split(".")[0] in linears]


def projection_widths(arch: Architecture, stage: str) -> list[int]:
    """Width of each projection's slice of `xw`."""
    return [arch.target_dims(t)[1] for t in projection_linears(stage)]


def layer_weight_shapes(arch: Architecture, rank: int, cuts) -> dict[str, tuple[int, ...]]:
    """Shapes of one cloud layer's weights (names without the `layers.N.` prefix)."""
    shapes: dict[str, tuple[int, ...]] = {
        "input_layernorm": (arch.hidden_size,),
        "post_attention_layernorm": (arch.hidden_size,),
    }
    for piece in PIECE_LINEARS:
        for name in layer_weight_names(arch, piece):
            if "." not in name:
                continue
            target, kind = name.split(".")
            d_in, d_out = arch.target_dims(target)
            shapes[name] = (d_in, d_out) if kind == "w" else (d_out,)
    for cut in cuts:
        d_in = arch.target_dims(cut.targets[0])[0]
        shapes[f"A.{cut.stage}"] = (d_in, len(cut.targets) * rank)
        for t in cut.targets:
            shapes[f"B.{t}"] = (rank, arch.target_dims(t)[1])
    return shapes


def edge_weight_shapes(arch: Architecture) -> dict[str, tuple[int, ...]]:
    """Edge weights besides M. A tied model keeps only the head matrix and embeds by reading its columns."""
    shapes = {"norm": (arch.hidden_size,), "lm_head.w": (arch.hidden_size, arch.vocab_size)}
    if not arch.tie_word_embeddings:
        shapes["embed_tokens"] = (arch.vocab_size, arch.hidden_size)
    return shapes
