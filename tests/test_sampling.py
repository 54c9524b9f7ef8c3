"""Sampling (`run-edge --temperature --top-k --top-p --repetition-penalty`) against transformers' own logits
processors, in generate's order, and a checkpoint's generation config applied as generate applies it."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from plcli.runtime.generate import Sampler, Sampling

VOCAB, LIMIT = 64, 57  # embedding rows past the tokenizer's vocabulary are never sampled


def reference(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """What transformers' `generate(do_sample=True)` draws from: its warpers in its order, then softmax."""
    scores = torch.tensor(logits[None, :LIMIT], dtype=torch.float64)
    ids = torch.zeros((1, 1), dtype=torch.long)
    warpers = [TemperatureLogitsWarper(temperature)]
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    for warper in warpers:
        scores = warper(ids, scores)
    return torch.softmax(scores, dim=-1)[0].numpy()


def with_ties(rng) -> np.ndarray:
    logits = rng.standard_normal(VOCAB)
    logits[[3, 9, 17, 30]] = logits.max() + 0.5  # four tokens share the top, the k-th of top-k 2 among them
    return logits


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.9, 12, 0.6), (1.0, 2, 1.0), (2.0, 0, 1e-9), (1.0, 100, 0.95),
])
@pytest.mark.parametrize("draw", ["normal", "ties"])
def test_distribution_equals_transformers_warpers(temperature, top_k, top_p, draw):
    rng = np.random.default_rng(7)
    logits = (3 * rng.standard_normal(VOCAB) if draw == "normal" else with_ties(rng)).astype(np.float32)
    ours = Sampler(Sampling(temperature=temperature, top_k=top_k, top_p=top_p), vocab_limit=LIMIT).probabilities(logits)
    theirs = reference(logits, temperature, top_k, top_p)
    assert ours.shape == (LIMIT,)
    if draw == "ties" and top_p < 1:
        # Which of the tokens tied at the edge of the mass stay is arbitrary (transformers' sort is not stable):
        # the same probabilities, over as many tokens.
        ours, theirs = np.sort(ours), np.sort(theirs)
    np.testing.assert_array_equal(ours > 0, theirs > 0)  # the same tokens can be drawn
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-12)


def test_draws_stay_in_the_support_and_a_seed_repeats_them():
    logits = np.random.default_rng(1).standard_normal(VOCAB).astype(np.float32)
    sampling = Sampling(temperature=1.0, top_k=4, seed=3)
    draws = [Sampler(sampling, vocab_limit=LIMIT) for _ in range(2)]
    first, second = ([sampler(logits) for _ in range(400)] for sampler in draws)
    assert first == second
    assert set(first) == set(np.argsort(-logits[:LIMIT])[:4].tolist())


def test_a_temperature_near_zero_draws_the_likeliest_tokens():
    temperature = 1e-310  # 4 / temperature overflows
    logits = np.random.default_rng(2).standard_normal(VOCAB).astype(np.float32)
    logits[[6, 20]] = 4.0  # tied at the top: both stay as likely
    probs = Sampler(Sampling(temperature=temperature), vocab_limit=LIMIT).probabilities(logits)
    assert probs[6] == probs[20] == 0.5 and Sampler(Sampling(temperature=temperature, seed=0), vocab_limit=LIMIT)(logits) in (6, 20)


def test_greedy_never_picks_a_padding_row():
    logits = np.zeros(VOCAB, np.float32)
    logits[LIMIT + 2] = 9.0  # an untrained padding row that happens to score highest
    logits[11] = 1.0
    assert Sampler(Sampling(), vocab_limit=LIMIT)(logits) == 11


@pytest.mark.parametrize("field, value, says", [
    ("max_new_tokens", 0, "--max-new-tokens"), ("temperature", -0.5, "--temperature"),
    ("temperature", float("inf"), "--temperature"), ("temperature", float("nan"), "--temperature"), ("top_k", -1, "--top-k"),
    ("top_p", 0.0, "--top-p"), ("top_p", 1.5, "--top-p"), ("repetition_penalty", 0.0, "--repetition-penalty"),
    ("repetition_penalty", float("nan"), "--repetition-penalty"), ("seed", -1, "--seed"),
])
def test_bad_settings_are_refused_by_flag_name(field, value, says):
    with pytest.raises(ValueError, match=says):
        Sampler(Sampling(**{field: value}), vocab_limit=LIMIT)


@pytest.mark.parametrize("penalty", [1.3, 1e300, 1e-300])  # the last two past float32's range, there as here
def test_repetition_penalty_equals_transformers_processor(penalty):
    logits = (3 * np.random.default_rng(5).standard_normal(VOCAB)).astype(np.float32)
    seen = [3, 3, 9, 40, 12, LIMIT + 3]  # repeats count once; a padding row's id penalizes nothing
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's overflow warnings would reach run-edge's stderr
        ours = Sampler(Sampling(repetition_penalty=penalty), vocab_limit=LIMIT).penalize(logits[:LIMIT], seen)
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([seen]), torch.tensor(logits[None, :LIMIT]))[0].numpy()
    assert not np.array_equal(ours, logits[:LIMIT])
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)


@pytest.mark.parametrize("generation, expected", [
    ({}, {}),
    ({"temperature": 0.6, "top_p": 0.9}, {}),  # without do_sample, generate is greedy and ignores them
    ({"do_sample": True}, {"temperature": 1.0, "top_k": 50, "top_p": 1.0}),  # transformers' defaults
    ({"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.05},
     {"temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.05}),
    ({"repetition_penalty": 1.2}, {"repetition_penalty": 1.2}),  # applies to greedy decoding too
])
def test_checkpoint_defaults_read_as_generate_reads_them(generation, expected):
    assert Sampling.checkpoint_defaults(generation) == expected


@pytest.mark.parametrize("generation", [{}, {"top_k": 20, "top_p": 0.8}])
def test_asked_to_sample_what_the_checkpoint_leaves_open_is_what_generate_would_use(generation):
    """`--temperature` on a checkpoint that does not sample: as `generate(do_sample=True, temperature=...)`, the
    config's top-k and top-p, else GenerationConfig's own defaults."""
    from transformers import GenerationConfig

    # What generate fills in for the fields a config leaves None (transformers 5 keeps them None until then).
    theirs = {**GenerationConfig._get_default_generation_params(), **generation}
    assert Sampling.checkpoint_defaults(generation, sampled=True) == {k: theirs[k] for k in ("temperature", "top_k", "top_p")}


def test_a_checkpoints_repetition_penalty_gives_generates_greedy_ids(llama_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    from plcli.exporters.split import split_checkpoint
    from plcli.runtime.cloud import CloudModel
    from plcli.runtime.edge import EdgeModel
    from plcli.runtime.generate import generate

    ckpt = shutil.copytree(llama_checkpoint, tmp_path / "ckpt")
    (ckpt / "generation_config.json").write_text(json.dumps({"repetition_penalty": 1.5, "pad_token_id": 0}))
    split_checkpoint(ckpt, tmp_path / "out", rank=8)
    edge, cloud = EdgeModel(tmp_path / "out" / "edge"), CloudModel(tmp_path / "out" / "cloud")
    prompt_ids = edge.tokenizer("the cloud never sees this text")["input_ids"]
    new_tokens = 24
    sampling = Sampling(max_new_tokens=new_tokens, ignore_eos=True, **Sampling.checkpoint_defaults(edge.manifest.generation))
    got = list(generate(edge, cloud.new_session(), prompt_ids, sampling))

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, local_files_only=True).eval()
    assert model.generation_config.repetition_penalty == 1.5  # generate reads it from the checkpoint, as we do
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        want = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens)[0, len(prompt_ids):].tolist()
    assert got == want
    plain = list(generate(edge, cloud.new_session(), prompt_ids, Sampling(max_new_tokens=new_tokens, ignore_eos=True)))
    assert plain != got  # the penalty changed the tokens, so the equality above tested it
