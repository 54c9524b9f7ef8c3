"""Llama (and Llama 2/3, TinyLlama, ...): no biases by default, full attention everywhere.

`attention_bias` in the config adds biases to q, k, v and o; `mlp_bias` to the MLP.
"""

from .base import Family

FAMILY = Family(
    name="llama",
    model_types=("llama",),
    qkv_bias=lambda c: getattr(c, "attention_bias", False),
    o_bias=lambda c: getattr(c, "attention_bias", False),
    mlp_bias=lambda c: getattr(c, "mlp_bias", False),
    sliding_windows=lambda c: (None,) * c.num_hidden_layers,
)
