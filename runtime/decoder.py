"""The split decoder's math in torch: one module per segment kind (see plan.py).

This is the single source of truth for what the cloud computes. The exporter
traces it into ONNX graphs; the cloud re-runs it with autograd when the edge
tunes M. Weights are inputs, not parameters, so one graph serves every layer.

It mirrors transformers' Llama-family decoder layer (RMSNorm in fp32, rotary
embedding with `rotate_half`, softmax in fp32) with four changes: each adapted
projection adds `B (M A x)`, where `M A x` arrives from the edge; the base
projections right after a cut come precomputed (`ProjectionModule`), so that
the cloud can compute them while the edge answers; attention reads the past
keys and values from a preallocated cache and returns only the new ones, which
the caller writes into it; and grouped-query attention folds query heads into
the sequence axis instead of repeating keys and values. So the graphs never copy
the KV cache, neither per head nor per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .arch import (Architecture, has_bias, kind_io, kind_weight_names, projection_linears, projection_weight_names,
                   projection_widths)
from .plan import ATTENTION_PIECE, SegmentKind

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    variance = x.pow(2).mean(-1, keepdim=True)
    # A division by the root, not transformers' product with rsqrt: exported at opset 18, only this form is one that
    # ONNX Runtime fuses into a single SimplifiedLayerNormalization kernel (rsqrt stays seven nodes).
    return weight * (x / torch.sqrt(variance + eps))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class SegmentModule(torch.nn.Module):
    """Runs one segment kind. `forward(*inputs, *weights)` in the order of kind_io + kind_weight_names."""

    def __init__(self, arch: Architecture, kind: SegmentKind, rank: int, inv_freq: torch.Tensor):
        super().__init__()
        self.arch, self.kind, self.rank = arch, kind, rank
        self.input_names, self.output_names = kind_io(kind)
        self.weight_names = kind_weight_names(arch, kind)
        self.register_buffer("inv_freq", inv_freq.to(torch.float32), persistent=False)
        self.act = ACTIVATIONS[arch.hidden_act]

    def forward(self, *args: torch.Tensor):
        n = len(self.input_names)
        io = dict(zip(self.input_names, args[:n]))
        w = dict(zip(self.weight_names, args[n:]))
        arch, kind = self.arch, self.kind

        if kind.in_cut is None:
            resid, x, madx, base = io["inputs_embeds"], None, None, {}
        else:
            # The first piece's projections arrive computed (`xw`, see ProjectionModule); madx is theirs too.
            resid, x, madx = io["resid"], None, io["madx"]
            stage = kind.in_cut.stage
            base = dict(zip(projection_linears(stage), io["xw"].split(projection_widths(arch, stage), dim=-1)))
        outputs: dict[str, torch.Tensor] = {}
        for i, (rel, piece) in enumerate(kind.pieces):
            p = f"l{rel}."
            delta = madx if i == 0 else None
            if piece == 0:
                x = rms_norm(resid, w[p + "input_layernorm"], arch.rms_norm_eps)
            elif piece == ATTENTION_PIECE:
                q, k, v = (self._linear(w, p, t, x, delta, base) for t in ("q_proj", "k_proj", "v_proj"))
                x, outputs["new_key"], outputs["new_value"] = self._attention(io, q, k, v)
            elif piece == 2:
                resid = resid + self._linear(w, p, "o_proj", x, delta, base)
                x = rms_norm(resid, w[p + "post_attention_layernorm"], arch.rms_norm_eps)
            elif piece == 3:
                x = self.act(self._linear(w, p, "gate_proj", x, delta, base)) * self._linear(w, p, "up_proj", x, delta, base)
            else:
                resid = resid + self._linear(w, p, "down_proj", x, delta, base)
                x = None
            base = {}

        if kind.out_cut is None:
            result = {"hidden": resid}
        else:
            a = w[f"l{kind.pieces[-1][0]}.A.{kind.out_cut.stage}"]
            ax = (x @ a).unflatten(-1, (len(kind.out_cut.targets), self.rank))
            result = {"resid_out": resid, "x_out": x, "ax": ax}
        result.update(outputs)
        return tuple(result[name] for name in self.output_names)

    def _linear(self, w, p, target, x, delta, base):
        """A projection (precomputed when in `base`), plus `B (M A x)` when `delta` is the in-cut's and adapts it."""
        y = base[target] if target in base else _project(self.arch, w, p, target, x)
        adapted = self.kind.in_cut.targets if delta is not None else ()
        if target in adapted:
            y = y + delta[..., adapted.index(target), :] @ w[f"l0.B.{target}"]
        return y

    def _attention(self, io, q, k, v):
        arch = self.arch
        bsz, seq = q.shape[0], q.shape[1]
        hd, kvh = arch.head_dim, arch.num_kv_heads
        groups = arch.num_heads // kvh
        q = q.view(bsz, seq, arch.num_heads, hd).transpose(1, 2)
        k = k.view(bsz, seq, kvh, hd).transpose(1, 2)
        v = v.view(bsz, seq, kvh, hd).transpose(1, 2)

        freqs = io["position_ids"][..., None].to(torch.float32) * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * arch.rope_attention_scaling)[:, None]
        sin = (emb.sin() * arch.rope_attention_scaling)[:, None]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin

        # The cache is a preallocated buffer (see cloud.CloudSession): slots below `past_length` hold the keys of
        # positions 0.., the rest are free. Attending to it and to the new keys separately, instead of to their
        # concatenation, spares copying the whole cache into a new tensor on every call; only the scores are joined.
        past_key, past_value = io["past_key"], io["past_value"]
        qpos = io["position_ids"][:, :, None]  # [B, S, 1]
        window = io["window"]
        slot = torch.arange(past_key.shape[2], device=q.device)[None, None, :]
        allowed_past = (slot < io["past_length"][:, None, None]) & (slot <= qpos) & (slot > qpos - window)
        kpos = io["position_ids"][:, None, :]  # [B, 1, S]: the new keys sit at the queries' positions
        allowed_new = (kpos <= qpos) & (kpos > qpos - window) & (io["attention_mask"][:, None, :] != 0)
        allowed = torch.cat((allowed_past, allowed_new), dim=-1)
        bias = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None, None]

        # [B, kvh, groups*S, hd] @ [B, kvh, hd, T]: query heads of a group share one K/V head.
        qg = q.reshape(bsz, kvh, groups * seq, hd)
        scores = torch.cat((qg @ past_key.transpose(2, 3), qg @ k.transpose(2, 3)), dim=-1)
        scores = scores.view(bsz, kvh, groups, seq, -1) * (hd**-0.5) + bias
        probs = torch.softmax(scores, dim=-1).view(bsz, kvh, groups * seq, -1)
        past = past_key.shape[2]
        out = probs[..., :past] @ past_value + probs[..., past:] @ v
        out = out.view(bsz, arch.num_heads, seq, hd).transpose(1, 2)
        return out.reshape(bsz, seq, arch.num_heads * hd), k, v


def _project(arch: Architecture, w, p: str, target: str, x: torch.Tensor) -> torch.Tensor:
    y = x @ w[p + target + ".w"]
    if has_bias(arch, target):
        y = y + w[p + target + ".b"]
    return y


class ProjectionModule(torch.nn.Module):
    """The base projections at a cut: `x @ W (+ b)` of every linear reading `x`, stacked as `xw`.

    `forward(x, *weights)`, weights in the order of projection_weight_names.
    """

    input_names = ["x"]
    output_names = ["xw"]

    def __init__(self, arch: Architecture, stage: str):
        super().__init__()
        self.arch, self.stage = arch, stage
        self.weight_names = projection_weight_names(arch, stage)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        x, w = args[0], dict(zip(self.weight_names, args[1:]))
        return torch.cat([_project(self.arch, w, "l0.", t, x) for t in projection_linears(self.stage)], dim=-1)


class HeadModule(torch.nn.Module):
    """Edge: final norm and LM head. `forward(hidden, norm, lm_head_w)` -> logits."""

    input_names = ["hidden"]
    output_names = ["logits"]
    weight_names = ["norm", "lm_head.w"]

    def __init__(self, arch: Architecture):
        super().__init__()
        self.eps = arch.rms_norm_eps

    def forward(self, *args: torch.Tensor):
        hidden, norm, lm_head_w = args
        return rms_norm(hidden, norm, self.eps) @ lm_head_w
