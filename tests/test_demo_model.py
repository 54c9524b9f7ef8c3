"""The committed demo model is a real language model, small enough to ship."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from plcli.recipes import demo_model as dm

MAX_BYTES = 10 * 1024 * 1024
EVAL_TOKENS = 4096


@pytest.fixture(scope="module")
def assets():
    path = dm.demo_model_dir()
    assert (path / "model.safetensors").is_file(), f"demo model missing; rebuild: {dm.REBUILD_COMMAND}"
    return path


@pytest.fixture(scope="module")
def tokenizer(assets):
    return AutoTokenizer.from_pretrained(assets)


def test_small_enough_to_commit(assets):
    assert (assets / "model.safetensors").stat().st_size < MAX_BYTES
    total = sum(p.stat().st_size for p in assets.rglob("*") if p.is_file())
    assert total < MAX_BYTES


def test_layout_and_metrics(assets):
    config = AutoConfig.from_pretrained(assets)
    assert config.model_type == "llama"
    assert config.num_key_value_heads < config.num_attention_heads  # GQA on purpose
    assert config.hidden_size >= 128  # the split's default rank 64 needs rank <= hidden/2
    metrics = json.loads((assets / "metrics.json").read_text())
    assert metrics["rebuild_command"] == dm.REBUILD_COMMAND
    assert metrics["untrained_perplexity"] / metrics["heldout_perplexity"] >= 20


def test_tokenizer_round_trips(tokenizer):
    text = "The list type is a mutable sequence; naïve café, 3.14 → π!\n\tdone."
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id  # prompts start like a document did in training
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == tokenizer.pad_token_id


def test_heldout_perplexity_beats_untrained_20x(assets, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(assets, dtype=torch.float32)
    assert next(model.parameters()).dtype == torch.float32
    _, held = dm.split_corpus(dm.collect_corpus())
    trained = dm.evaluate_perplexity(model, tokenizer, held, seq_len=256, max_tokens=EVAL_TOKENS)
    untrained_model = dm.init_model(model.config)
    untrained = dm.evaluate_perplexity(untrained_model, tokenizer, held, seq_len=256, max_tokens=EVAL_TOKENS)
    assert untrained / trained >= 20, (trained, untrained)


def test_greedy_generation_is_text(assets, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(assets, dtype=torch.float32)
    ids = tokenizer("The list", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=20, do_sample=False)
    text = tokenizer.decode(out[0], skip_special_tokens=True)
    assert text.startswith("The list") and len(text) > len("The list") + 20
    words = text.split()
    assert sum(w.strip(".,;:()'\"").isalpha() for w in words) >= len(words) // 2


def test_a_rebuild_that_fails_to_swap_in_keeps_the_model_it_replaces(tmp_path, monkeypatch):
    """`build` writes beside the old model and swaps; a failure between the two renames puts the old one back."""
    import errno
    import os

    docs = [f"Document {i} says that the list type is a mutable sequence of {i} items." for i in range(60)]
    monkeypatch.setattr(dm, "collect_corpus", lambda: docs)
    monkeypatch.setattr(dm, "train", lambda *args, **kwargs: None)  # the swap is under test, not the training
    monkeypatch.setattr(dm, "evaluate_perplexity", lambda *args, **kwargs: 1.0)
    out = tmp_path / "model"
    out.mkdir()
    (out / "metrics.json").write_text("old")
    real_rename, calls = os.rename, []

    def second_rename_fails(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", second_rename_fails)
    with pytest.raises(OSError):
        dm.build(out, steps=1)
    assert (out / "metrics.json").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["model"]
