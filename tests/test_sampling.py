"""Sampling (`run-edge --temperature --top-k --top-p`) against transformers' own logits warpers, in generate's order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

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


def test_greedy_never_picks_a_padding_row():
    logits = np.zeros(VOCAB, np.float32)
    logits[LIMIT + 2] = 9.0  # an untrained padding row that happens to score highest
    logits[11] = 1.0
    assert Sampler(Sampling(), vocab_limit=LIMIT)(logits) == 11


@pytest.mark.parametrize("field, value, says", [
    ("max_new_tokens", 0, "--max-new-tokens"), ("temperature", -0.5, "--temperature"), ("top_k", -1, "--top-k"),
    ("top_p", 0.0, "--top-p"), ("top_p", 1.5, "--top-p"),
])
def test_bad_settings_are_refused_by_flag_name(field, value, says):
    with pytest.raises(ValueError, match=says):
        Sampler(Sampling(**{field: value}), vocab_limit=LIMIT)
