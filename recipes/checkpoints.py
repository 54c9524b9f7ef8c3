"""Random-weight checkpoints of any supported family, in the real Hugging Face layout.

Tests, benchmarks and the README's size report build their models here (config
+ `save_pretrained` + a tokenizer trained locally), so that they exercise the
same loading code as a real checkpoint on disk.
"""

from __future__ import annotations

from pathlib import Path

SAMPLE_TEXT = (
    "The cloud runs the decoder layers while the edge keeps the embedding, the head and the adapter. "
    "Private text never leaves the device; only activations cross the network. "
    "Return a list of the words in the string, using sep as the delimiter string. "
) * 8


def train_tokenizer(vocab_size: int, texts: list[str] | None = None, *, prepend_bos: bool = False,
                    model_max_length: int | None = None):
    """A byte-level BPE tokenizer (GPT-2 style: any string encodes, nothing maps to <unk>) with `<|endoftext|>`,
    id 0, as bos/eos/pad, as a transformers fast tokenizer. `prepend_bos` makes encoding start with it, as Llama's
    does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = "<|endoftext|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[special], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts or [SAMPLE_TEXT], trainer=trainer)
    if prepend_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{special} $A", pair=f"{special} $A {special} $B:1",
            special_tokens=[(special, tok.token_to_id(special))],
        )
    extra = {} if model_max_length is None else {"model_max_length": model_max_length}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=special, eos_token=special, pad_token=special,
                                   clean_up_tokenization_spaces=False, **extra)


def make_config(family: str, **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    base = dict(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=320, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    base.update(overrides)
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family]
    return cls(**base)


def make_random_checkpoint(out_dir: str | Path, family: str = "llama", *, seed: int = 0, tokenizer_vocab: int | None = None, **config_overrides) -> Path:
    """Save a randomly initialised causal LM of `family` and a tokenizer into `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    config = make_config(family, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Small-std init makes every logit near zero; larger weights exercise the numerics like a trained model.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.08)
            elif "norm" in name:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0.0, 0.05)
    model.save_pretrained(out_dir)
    tokenizer = train_tokenizer(min(tokenizer_vocab or config.vocab_size, config.vocab_size))
    tokenizer.save_pretrained(out_dir)
    return out_dir


# The two shapes `plcli bench decode` is held to (README, Performance): random weights, fp32.
BENCH_SHAPES = {
    "bench-512": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=8000, max_position_embeddings=1024),
    "bench-1024": dict(hidden_size=1024, intermediate_size=2752, num_hidden_layers=16, num_attention_heads=16,
                       num_key_value_heads=16, vocab_size=16000, max_position_embeddings=1024),
}


def main(argv: list[str] | None = None) -> None:
    """python -m plcli.recipes.checkpoints OUT_DIR --shape bench-512 [--family llama] [--seed 0]"""
    import argparse

    p = argparse.ArgumentParser(description="Write a random-weight checkpoint of a named shape in the Hugging Face layout.")
    p.add_argument("out", type=Path)
    p.add_argument("--shape", choices=sorted(BENCH_SHAPES), required=True)
    p.add_argument("--family", default="llama", choices=["llama", "mistral", "qwen2"])
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(make_random_checkpoint(a.out, a.family, seed=a.seed, **BENCH_SHAPES[a.shape]))


if __name__ == "__main__":
    main()
