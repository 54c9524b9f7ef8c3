"""Reading a Hugging Face checkpoint directory without instantiating the model.

Tensors are read one at a time from safetensors (or torch .bin) files, so a
split needs little more memory than the bundle it writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from plcli.runtime.bundle import BundleError, hash_files, readable
from plcli.runtime.errors import PlcliError

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
)


class CheckpointError(PlcliError):
    """The directory is not a checkpoint plcli can read; the message says why."""


# Sizes the split allocates from or divides by (null: transformers' default). transformers takes 0 or a negative for
# some without a word, then a split writes a bundle that cannot run, and divides by others before it validates them.
POSITIVE_FIELDS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                   "head_dim", "vocab_size", "max_position_embeddings", "sliding_window")


def load_config(model_dir: str | Path):
    from huggingface_hub.errors import StrictDataclassError  # transformers' own dependency
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: {'not a directory' if model_dir.exists() else 'no such directory'}")
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"{model_dir}: not a Hugging Face checkpoint (no config.json)")
    try:
        raw = json.loads((model_dir / "config.json").read_text())
        for key in POSITIVE_FIELDS if isinstance(raw, dict) else ():
            value = raw.get(key)
            if value is not None and (type(value) is not int or value < 1):
                raise CheckpointError(f"{model_dir / 'config.json'}: {key} is {value!r}: must be a positive integer")
        return AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except RecursionError:  # json nests arrays and objects on Python's stack
        raise CheckpointError(f"{model_dir / 'config.json'}: unreadable config (JSON nested too deeply)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{model_dir / 'config.json'}: unreadable config ({first_line})") from None
    except StrictDataclassError as e:
        # transformers' config classes validate their fields (huggingface_hub's strict dataclasses): the cause names
        # the field, the wrapper only says which validator ran.
        reason = e.__cause__ or e
        raise CheckpointError(f"{model_dir / 'config.json'}: invalid config ({type(reason).__name__}: {reason})") from None


class CheckpointTensors:
    """Name -> float32 numpy array, read lazily from the checkpoint's weight files."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        self.files = sorted(self.dir.glob("*.safetensors"))
        self._index: dict[str, Path] = {}
        self._bin: dict[str, object] = {}
        if self.files:
            from safetensors import safe_open

            for f in self.files:
                try:
                    readable(f)
                except BundleError as e:
                    raise CheckpointError(str(e)) from None
                try:
                    with safe_open(f, framework="pt") as handle:
                        for k in handle.keys():
                            self._index[k] = f
                except Exception as e:  # safetensors raises its own error types
                    raise CheckpointError(f"{f}: unreadable weights ({e})") from None
        else:
            self.files = sorted(self.dir.glob("pytorch_model*.bin"))
            if not self.files:
                raise CheckpointError(f"{self.dir}: no weights (*.safetensors or pytorch_model*.bin)")
            import torch

            for f in self.files:
                try:
                    sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                except Exception as e:
                    raise CheckpointError(f"{f}: unreadable weights ({e})") from None
                self._bin.update(sd)
            self._index = {k: Path("bin") for k in self._bin}

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def get(self, name: str) -> np.ndarray:
        import torch
        from safetensors import safe_open

        if name not in self._index:
            raise CheckpointError(f"{self.dir}: weight {name!r} is missing from the checkpoint")
        if self._bin:
            t = self._bin[name]
        else:
            with safe_open(self._index[name], framework="pt") as handle:
                t = handle.get_tensor(name)
        return t.to(torch.float32).numpy()

    def source_hash(self) -> str:
        return hash_files([self.dir / "config.json", *self.files])


def embedding_and_head(tensors: CheckpointTensors, family, tied: bool) -> tuple[np.ndarray | None, np.ndarray]:
    """(token embedding, LM head weight), both [vocab, hidden], as transformers loads them; the embedding is None
    when it is the head's matrix.

    A config that ties them is overruled by the checkpoint, as in transformers: a checkpoint that holds both, and
    different ones, is run with both (transformers only warns), and one that holds only the head embeds with it.
    """
    if not tied:
        # An untied checkpoint without its head is damaged: its embedding is no stand-in for the head it trained.
        return tensors.get(family.embed), tensors.get(family.lm_head)
    if family.lm_head not in tensors:
        return None, tensors.get(family.embed)
    head = tensors.get(family.lm_head)
    if family.embed not in tensors:
        return None, head
    embed = tensors.get(family.embed)
    return (None, head) if np.array_equal(embed, head) else (embed, head)


def tokenizer_files(model_dir: Path) -> list[Path]:
    return [model_dir / n for n in TOKENIZER_FILES if (model_dir / n).is_file()]
