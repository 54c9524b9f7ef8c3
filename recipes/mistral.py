"""Mistral: the Llama layer without biases, with a sliding attention window on every layer when configured."""

from .base import Family

FAMILY = Family(
    name="mistral",
    model_types=("mistral",),
    qkv_bias=lambda c: False,
    sliding_windows=lambda c: (getattr(c, "sliding_window", None),) * c.num_hidden_layers,
)
