"""What every supported model family shares, and the registry that picks one.

A family file (llama.py, mistral.py, qwen2.py) states what differs: which
`model_type`s it covers, biases, and which layers use a sliding window. The
split itself only ever sees the resulting `Architecture` and weight names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from plcli.runtime.arch import Architecture
from plcli.runtime.errors import PlcliError

# Rope types whose frequencies depend on the running sequence length cannot be
# frozen into a graph; transformers recomputes them per call. `dynamic` is
# among the frozen ones because it rescales only past max_position_embeddings,
# which plcli never lets a context reach: up to there it is the default rope.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic")

# transformers' other names for activations the split decoder computes (runtime/decoder.py): the same formulas.
ACTIVATION_ALIASES = {"swish": "silu", "gelu_new": "gelu_pytorch_tanh", "gelu_fast": "gelu_pytorch_tanh"}


class UnsupportedModel(PlcliError):
    """The checkpoint is not something plcli can split; the message says why."""


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    qkv_bias: Callable[[object], bool]
    sliding_windows: Callable[[object], tuple[int | None, ...]]
    o_bias: Callable[[object], bool] = lambda c: False
    mlp_bias: Callable[[object], bool] = lambda c: False

    # Module names inside a transformers checkpoint of this family.
    layer_prefix: str = "model.layers.{layer}."
    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"

    def hf_name(self, layer: int, name: str) -> str:
        """Checkpoint key of a split weight name such as `q_proj.w` or `input_layernorm`."""
        prefix = self.layer_prefix.format(layer=layer)
        if name in ("input_layernorm", "post_attention_layernorm"):
            return f"{prefix}{name}.weight"
        module, kind = name.split(".")
        block = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        return f"{prefix}{block}.{module}.{'weight' if kind == 'w' else 'bias'}"

    def architecture(self, config) -> Architecture:
        from plcli.runtime.decoder import ACTIVATIONS

        act = ACTIVATION_ALIASES.get(config.hidden_act, config.hidden_act)
        if act not in ACTIVATIONS:
            known = sorted(set(ACTIVATIONS) | set(ACTIVATION_ALIASES))
            raise UnsupportedModel(f"activation {config.hidden_act!r} is not supported (supported: {', '.join(known)})")
        rope = dict(getattr(config, "rope_parameters", None) or {})
        rope_type = rope.get("rope_type", "default")
        if rope_type not in STATIC_ROPE_TYPES:
            raise UnsupportedModel(
                f"rope type {rope_type!r} is not supported (supported: {', '.join(STATIC_ROPE_TYPES)})"
            )
        head_dim = _head_dim(config)
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        if config.num_attention_heads % kv_heads:
            raise UnsupportedModel(f"num_attention_heads {config.num_attention_heads} is not a multiple of "
                                   f"num_key_value_heads {kv_heads}")
        try:
            inv_freq, attention_scaling = rope_frequencies(config)
        except (TypeError, ValueError, KeyError, ArithmeticError) as e:  # transformers checks keys, not their values
            raise UnsupportedModel(f"rope parameters {rope} are invalid ({type(e).__name__}: {e})") from None
        if 2 * len(inv_freq) != head_dim:
            # These families rotate whole heads: transformers accepts such a config, then fails at the first forward,
            # and the export would fail only after minutes of work.
            raise UnsupportedModel(f"rope rotates {2 * len(inv_freq)} dimensions of heads of {head_dim} "
                                   f"(partial_rotary_factor {rope.get('partial_rotary_factor', 1.0)}): "
                                   f"{self.name} rotates whole heads")
        return Architecture(
            family=self.name,
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=config.intermediate_size,
            vocab_size=config.vocab_size,
            rms_norm_eps=float(config.rms_norm_eps),
            hidden_act=act,
            qkv_bias=bool(self.qkv_bias(config)),
            o_bias=bool(self.o_bias(config)),
            mlp_bias=bool(self.mlp_bias(config)),
            rope_type=rope_type,
            rope_attention_scaling=float(attention_scaling),
            sliding_windows=tuple(self.sliding_windows(config)),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            max_position_embeddings=int(config.max_position_embeddings),
        )


def _head_dim(config) -> int:
    """As transformers reads it: the config's own, else hidden size over heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_frequencies(config):
    """(inv_freq, attention_scaling) exactly as transformers computes them for this config."""
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type == "default":
        head_dim = _head_dim(config)
        inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        return inv_freq, 1.0
    return ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")


def families() -> tuple[Family, ...]:
    """Every family plcli splits, one file of recipes/ each (imported here: each of them imports this module)."""
    from . import llama, mistral, qwen2

    return llama.FAMILY, mistral.FAMILY, qwen2.FAMILY


def family_for(config) -> Family:
    model_type = getattr(config, "model_type", None)
    for family in families():
        if model_type in family.model_types:
            return family
    supported = ", ".join(t for f in families() for t in f.model_types)
    architectures = getattr(config, "architectures", None) or []
    # GPT-2 style checkpoints name their causal head `...LMHeadModel`.
    if architectures and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        raise UnsupportedModel(
            f"model type {model_type!r} ({', '.join(architectures)}) is not a causal language model "
            f"(supported families: {supported})"
        )
    raise UnsupportedModel(f"model type {model_type!r} is not supported (supported families: {supported})")
