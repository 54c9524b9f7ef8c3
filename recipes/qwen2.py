"""Qwen2: biases on q, k, v (not on o), and per-layer `layer_types` that may use a sliding window."""

from .base import Family


def _windows(config):
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return tuple(config.sliding_window if t == "sliding_attention" else None for t in types)


FAMILY = Family(
    name="qwen2",
    model_types=("qwen2",),
    qkv_bias=lambda c: True,
    sliding_windows=_windows,
)
