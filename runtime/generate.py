"""Token generation on the edge: prefill, then one split step per new token.

Sampling happens on the edge, so generated tokens, like the prompt, never
leave the device; the cloud only sees embeddings of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .edge import EdgeModel, forward


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 is greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("--max-new-tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("--temperature must be >= 0")
        if self.top_k < 0:
            raise ValueError("--top-k must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("--top-p must be in (0, 1]")


class Sampler:
    def __init__(self, sampling: Sampling, vocab_limit: int):
        sampling.validate()
        self.s = sampling
        # Embedding rows past the tokenizer's vocabulary are padding in real checkpoints: never emit them.
        self.vocab_limit = vocab_limit
        self.rng = np.random.default_rng(sampling.seed)

    def __call__(self, logits: np.ndarray) -> int:
        logits = logits[: self.vocab_limit].astype(np.float64)
        if self.s.temperature == 0:
            return int(logits.argmax())
        logits = logits / self.s.temperature
        if self.s.top_k:
            kth = np.partition(logits, -min(self.s.top_k, logits.size))[-min(self.s.top_k, logits.size)]
            logits = np.where(logits < kth, -np.inf, logits)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if self.s.top_p < 1:
            order = np.argsort(-probs)
            keep = np.cumsum(probs[order]) - probs[order] < self.s.top_p
            mask = np.zeros_like(probs, dtype=bool)
            mask[order[keep]] = True
            probs = np.where(mask, probs, 0.0)
            probs /= probs.sum()
        return int(self.rng.choice(probs.size, p=probs))


def generate(edge: EdgeModel, session, prompt_ids: list[int], sampling: Sampling) -> Iterator[int]:
    """Yield new token ids one at a time; `session` keeps the KV cache, so a chat can continue it."""
    sampler = Sampler(sampling, vocab_limit=min(edge.arch.vocab_size, len(edge.tokenizer)))
    eos = set() if sampling.ignore_eos else set(edge.eos_token_ids)
    logits = forward(edge, session, np.asarray([prompt_ids], np.int64))[0, -1]
    text = ""
    for i in range(sampling.max_new_tokens):
        token = sampler(logits)
        if token in eos:
            return
        yield token
        if sampling.stop:
            text += edge.tokenizer.decode([token])
            if any(s in text for s in sampling.stop):
                return
        if i + 1 < sampling.max_new_tokens:
            logits = forward(edge, session, np.asarray([[token]], np.int64))[0, -1]
