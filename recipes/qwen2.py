"""Qwen2: biases on q, k, v (not on o), and per-layer `layer_types` that may use a sliding window."""

from .base import Family, UnsupportedModel


def _windows(config):
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    if "sliding_attention" in types and config.sliding_window is None:
        # Qwen2Config drops the window unless use_sliding_window, but keeps layer_types that name sliding layers:
        # transformers then fails at the first forward, and there is no window to split with.
        raise UnsupportedModel(f"layer {types.index('sliding_attention')} is sliding_attention in layer_types, "
                               f"but sliding_window is null (use_sliding_window is {config.use_sliding_window})")
    return tuple(config.sliding_window if t == "sliding_attention" else None for t in types)


FAMILY = Family(
    name="qwen2",
    model_types=("qwen2",),
    qkv_bias=lambda c: True,
    sliding_windows=_windows,
)
