"""Token generation on the edge: prefill, then one split step per new token.

Sampling happens on the edge, so generated tokens, like the prompt, never
leave the device; the cloud only sees embeddings of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .edge import EdgeModel, forward
from .errors import PlcliError
from .failover import is_loss
from .train_link import LinkError


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 is greedy
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("--max-new-tokens must be at least 1")
        if not 0 <= self.temperature < float("inf"):
            raise ValueError("--temperature must be a finite number >= 0")
        if self.top_k < 0:
            raise ValueError("--top-k must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("--top-p must be in (0, 1]")
        if not 0 < self.repetition_penalty < float("inf"):
            raise ValueError("--repetition-penalty must be positive")
        if self.seed is not None and self.seed < 0:
            raise ValueError("--seed must be >= 0")

    @staticmethod
    def checkpoint_defaults(generation: dict, *, sampled: bool = False) -> dict:
        """The settings a bundle's generation config (the checkpoint's, see split) asks of generation, as fields.

        Read as transformers' `generate` reads them: temperature, top-k and top-p
        only when it samples (`do_sample`, or `sampled`: asked to by the caller,
        as `generate(do_sample=True)`), with transformers' defaults for those it
        leaves out (1.0, 50, 1.0); the repetition penalty either way.
        """
        out = {}
        if generation.get("do_sample") or sampled:
            out.update(temperature=generation.get("temperature", 1.0), top_k=generation.get("top_k", 50),
                       top_p=generation.get("top_p", 1.0))
        if "repetition_penalty" in generation:
            out["repetition_penalty"] = generation["repetition_penalty"]
        return out


def unapplied_note(generation: dict) -> str | None:
    """A line for people when a bundle's generation config sets what plcli does not apply (see split)."""
    unapplied = generation.get("unapplied")
    if not unapplied:
        return None
    settings = ", ".join(f"{k}={json.dumps(v)}" for k, v in unapplied.items())
    return (f"the checkpoint's generation config sets {settings}, which plcli does not apply: tokens can differ "
            f"from transformers' generate")


class Sampler:
    def __init__(self, sampling: Sampling, vocab_limit: int):
        sampling.validate()
        self.s = sampling
        # Embedding rows past the tokenizer's vocabulary are padding in real checkpoints: never emit them.
        self.vocab_limit = vocab_limit
        self.rng = np.random.default_rng(sampling.seed)

    def __call__(self, logits: np.ndarray, seen: list[int] = ()) -> int:
        """The next token after the ids `seen` so far (prompt and generated; the repetition penalty reads them)."""
        logits = self.penalize(logits[: self.vocab_limit], seen)
        if self.s.temperature == 0:
            return int(logits.argmax())
        probs = self.probabilities(logits)
        return int(self.rng.choice(probs.size, p=probs))

    def penalize(self, logits: np.ndarray, seen: list[int]) -> np.ndarray:
        """transformers' repetition penalty, in float32 as there: a seen token's logit divided by the penalty if
        positive, multiplied if negative, however often it was seen."""
        # A penalty past float32's range becomes infinity or 0 there too, and the scores 0, inf or -inf: no warnings.
        with np.errstate(over="ignore", under="ignore", divide="ignore"):
            penalty = np.float32(self.s.repetition_penalty)
            if penalty == 1 or not len(seen):
                return logits
            ids = np.unique(np.asarray(seen, np.int64))
            ids = ids[ids < logits.size]
            out = logits.astype(np.float32)  # a copy: the caller's logits stay as they were
            score = out[ids]
            out[ids] = np.where(score < 0, score * penalty, score / penalty)
        return out

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """The distribution a draw at a temperature above 0 picks from: temperature, top-k, then top-p, in
        transformers' order. Every token as likely as the k-th stays, as in transformers."""
        logits = logits[: self.vocab_limit].astype(np.float64)
        # Shifted before the division: a temperature near 0 overflowed logits / temperature to inf, and inf - inf
        # made the distribution NaN, where it should be all on the likeliest tokens. Shifted, what overflows goes to
        # -inf, a probability of 0, as it should.
        with np.errstate(over="ignore"):
            logits = (logits - logits.max()) / self.s.temperature
        if self.s.top_k:
            kth = np.partition(logits, -min(self.s.top_k, logits.size))[-min(self.s.top_k, logits.size)]
            logits = np.where(logits < kth, -np.inf, logits)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if self.s.top_p < 1:
            order = np.argsort(-probs, kind="stable")  # of tokens tied at the edge of the mass, the lowest ids stay
            keep = np.cumsum(probs[order]) - probs[order] < self.s.top_p
            mask = np.zeros_like(probs, dtype=bool)
            mask[order[keep]] = True
            probs = np.where(mask, probs, 0.0)
            probs /= probs.sum()
        return probs


class Conversation:
    """Generation over one session, turn after turn; the session's KV cache keeps every token fed so far.

    A turn ends right after sampling a token, so that token (an EOS too) has not
    been through the model yet: the next turn feeds it first, then its prompt.
    `session` is anything with `start`/`resume`, `position` and `max_context`.

    The conversation keeps the ids it has fed (`fed`), so with a `failover`
    (failover.py) a lost session is replaced: the new one gets all of them as
    one prefill, which rebuilds the cloud's KV cache at the same position, and
    the interrupted step is done there.
    """

    def __init__(self, edge: EdgeModel, session, sampling: Sampling, failover=None):
        self.edge, self.session, self.sampling, self.failover = edge, session, sampling, failover
        self.sampler = Sampler(sampling, vocab_limit=edge.vocab_limit)
        self.eos = set() if sampling.ignore_eos else set(edge.eos_token_ids)
        self.unfed: list[int] = []
        self.fed: list[int] = []
        self.stop_reason: str | None = None  # why the last turn ended: eos, stop, length or context
        self._retired = (0, 0, 0)  # bytes up, bytes down, round trips of sessions lost so far

    @property
    def traffic(self) -> tuple[int, int, int]:
        """Bytes up, bytes down and round trips of every session this conversation used."""
        s = self.session
        return (self._retired[0] + s.bytes_up, self._retired[1] + s.bytes_down, self._retired[2] + s.round_trips)

    def _feed(self, ids: list[int]) -> np.ndarray:
        """Feed `ids` through the split; the last position's logits."""
        try:
            logits = forward(self.edge, self.session, np.asarray([ids], np.int64), last=True)
        except LinkError as lost:
            if self.failover is None:
                raise
            logits = self._replay(lost, ids)
        self.fed += ids
        # The remote session refuses a non-finite hidden state, an in-process one cannot (a bundle whose weights
        # overflow): NaN logits would make greedy decoding pick token 0 for ever, silently.
        if not np.isfinite(logits[0, -1]).all():
            raise PlcliError("the model gave NaN or infinite logits: its weights (or the cloud's) are broken")
        return logits[0, -1]

    def _replay(self, error: LinkError, ids: list[int]) -> np.ndarray:
        while True:
            if not is_loss(error):
                raise error
            self._retire()
            self.session = self.failover.recover(error)
            try:
                logits = forward(self.edge, self.session, np.asarray([self.fed + ids], np.int64), last=True)
            except LinkError as e:
                error = e
                continue
            self.failover.settled()
            return logits

    def _retire(self) -> None:
        self._retired = self.traffic
        self.session.close()

    def turn(self, prompt_ids: list[int]) -> Iterator[int]:
        """Yield this turn's new token ids one at a time."""
        ids = self.unfed + list(prompt_ids)
        room = self.session.max_context - self.session.position
        if not ids:
            raise ValueError("nothing to generate from: the prompt is empty")
        if len(ids) > room:
            raise ValueError(f"the context is full: {len(ids)} new tokens, room for {room} (max context {self.session.max_context})")
        logits = self._feed(ids)
        self.unfed = []
        generated: list[int] = []
        for i in range(self.sampling.max_new_tokens):
            token = self.sampler(logits, self.fed)
            self.unfed = [token]
            if token in self.eos:
                self.stop_reason = "eos"
                return
            yield token
            generated.append(token)
            if self.sampling.stop and _find_stop(self.edge.tokenizer.decode(generated), self.sampling.stop) is not None:
                self.stop_reason = "stop"
                return
            if i + 1 == self.sampling.max_new_tokens:
                self.stop_reason = "length"
                return
            if self.session.position >= self.session.max_context:
                self.stop_reason = "context"
                return
            logits = self._feed([token])
            self.unfed = []


def generate(edge: EdgeModel, session, prompt_ids: list[int], sampling: Sampling) -> Iterator[int]:
    """Yield new token ids one at a time (one turn of a new conversation)."""
    yield from Conversation(edge, session, sampling).turn(prompt_ids)


def _find_stop(text: str, stops: list[str]) -> int | None:
    """Where the earliest stop string begins in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


class TextStream:
    """The text of a growing list of tokens, handed out only once it is final.

    Held back: a trailing incomplete character (decoded as U+FFFD) and any tail
    that could still become a stop string; the stop string itself never shows.

    Text once shown stays shown, and the stream goes on from its length, as
    transformers' TextStreamer does: a decoder can rewrite text it already gave
    (byte fallback, as in Llama 2 and Mistral, turns a whole run of byte tokens
    into U+FFFD once the run ends in a broken character, the valid ones before
    it too), and nothing new would show again if the stream waited for the text
    to extend what it showed.
    """

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.shown = 0  # characters handed out

    @property
    def text(self) -> str:
        """All text so far, cut where a stop string begins."""
        text = self.tokenizer.decode(self.ids)
        at = _find_stop(text, self.stop)
        return text if at is None else text[:at]

    def push(self, token: int) -> str:
        """Add a token; return the newly final text."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if _find_stop(text, self.stop) is None:
            text = text.rstrip("\ufffd")
            text = text[: len(text) - self._stop_prefix(text)]
        else:
            text = self.text
        return self._advance(text)

    def finish(self) -> str:
        """The rest of the text, once no more tokens come."""
        return self._advance(self.text)

    def _stop_prefix(self, text: str) -> int:
        """Length of the longest tail of `text` that begins some stop string."""
        return max([n for s in self.stop for n in range(min(len(s) - 1, len(text)), 0, -1) if s.startswith(text[-n:])] + [0])

    def _advance(self, text: str) -> str:
        new = text[self.shown:]
        self.shown += len(new)
        return new
