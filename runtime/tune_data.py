"""Training text on the edge: files -> token rows -> shuffled, padded batches. Never leaves the device.

Inputs:
- `.txt`: plain text, one document per file, packed with the other documents
  into one token stream cut into rows of `seq_len + 1` tokens (every token is a
  target exactly once);
- `.jsonl`: one object per line, either `{"text": ...}` (a document, packed
  like `.txt`) or `{"prompt": ..., "response": ...}` (a row of its own, loss on
  the response and the closing end-of-text only).

A document is `bos + text (+ eos when eos differs from bos)`, which for the
demo model (bos = eos) is exactly the `EOS doc EOS doc ...` stream it was
trained on. Bad input raises `DataError` with a one-line message.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bundle import loads_json
from .errors import PlcliError

IGNORE = -1  # target id of a position without loss
SUFFIXES = (".txt", ".jsonl")


class DataError(PlcliError):
    """Training or evaluation data that cannot be used; the message is one line for the user."""


@dataclass
class Row:
    """`ids[:-1]` are the inputs, `ids[1:]` the targets; `loss[i]` says whether target i counts."""

    ids: np.ndarray  # int64 [n + 1]
    loss: np.ndarray  # bool [n]


@dataclass
class Batch:
    inputs: np.ndarray  # int64 [batch, seq], right-padded
    targets: np.ndarray  # int64 [batch, seq], IGNORE where there is no loss (and on padding)
    attention_mask: np.ndarray  # int64 [batch, seq], 0 on padding

    @property
    def target_count(self) -> int:
        return int((self.targets != IGNORE).sum())

    @property
    def token_count(self) -> int:
        return int(self.attention_mask.sum())


@dataclass
class Dataset:
    rows: list[Row]
    pairs: int
    truncated: int  # prompt/response pairs cut at seq_len + 1 tokens
    dropped: int  # of those, pairs left out because the cut left no response

    def cut_note(self, what: str, seq_len: int) -> str | None:
        """What the cut did to the pairs, for the user: a pair cut short is silently less to learn from."""
        if not self.truncated:
            return None
        note = f"{self.truncated} of {self.pairs} prompt/response pairs of the {what} data are longer than --seq-len {seq_len}: cut to it"
        return note + (f", {self.dropped} of them left out (the prompt alone fills the row)" if self.dropped else "")

    @property
    def target_count(self) -> int:
        return int(sum(r.loss.sum() for r in self.rows))

    def digest(self) -> str:
        """sha256 of every row: a resumed run refuses data that changed."""
        h = hashlib.sha256()
        for r in self.rows:
            h.update(r.ids.astype("<i8").tobytes() + b"|" + np.packbits(r.loss).tobytes() + b";")
        return "sha256:" + h.hexdigest()


def read_records(path: Path) -> list[str | tuple[str, str]]:
    """Documents (str) and prompt/response pairs (tuple) of one file, validated."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a .txt or .jsonl file")
    if path.suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported data file (use .txt or .jsonl)")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if b"\x00" in raw:
        raise DataError(f"{path}: binary file (contains NUL bytes), expected UTF-8 text")
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark some editors write is no text to learn, nor JSON
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None
    if not text.strip():
        raise DataError(f"{path}: empty file")
    if path.suffix == ".txt":
        return [text]
    records: list[str | tuple[str, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = loads_json(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object with \"text\", or \"prompt\" and \"response\"")
        for key in ("text", "prompt", "response"):
            if isinstance(obj.get(key), str) and not _is_text(obj[key]):
                # JSON can escape half of a UTF-16 pair ("\ud800"): Python decodes it to a lone surrogate, which is
                # no Unicode text and which the tokenizer refuses with an error of its own.
                raise DataError(f"{where}: \"{key}\" holds a lone surrogate escape (\\ud800-\\udfff), not text")
        if "text" in obj:
            if not isinstance(obj["text"], str) or not obj["text"].strip():
                raise DataError(f"{where}: \"text\" must be a non-empty string")
            records.append(obj["text"])
        elif "prompt" in obj and "response" in obj:
            if not all(isinstance(obj[k], str) for k in ("prompt", "response")) or not obj["response"].strip():
                raise DataError(f"{where}: \"prompt\" and \"response\" must be strings, the response non-empty")
            records.append((obj["prompt"], obj["response"]))
        else:
            missing = "\"response\"" if "prompt" in obj else "\"prompt\"" if "response" in obj else "\"text\" (or \"prompt\" and \"response\")"
            raise DataError(f"{where}: missing {missing}")
    if not records:
        raise DataError(f"{path}: no records")
    return records


def _is_text(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def load_dataset(paths: list[Path], tokenizer, *, seq_len: int, bos: int, eos: int) -> Dataset:
    records = [r for p in paths for r in read_records(p)]
    docs = [r for r in records if isinstance(r, str)]
    pairs = [r for r in records if isinstance(r, tuple)]
    rows: list[Row] = []

    stream: list[int] = []
    tail = [eos] if eos != bos else []
    for ids in _encode(tokenizer, docs):
        stream += [bos, *ids, *tail]
    # Rows overlap by one token so that every token but the first is a target exactly once.
    for start in range(0, len(stream) - 1, seq_len):
        chunk = np.asarray(stream[start:start + seq_len + 1], np.int64)
        if len(chunk) >= 2:
            rows.append(Row(chunk, np.ones(len(chunk) - 1, bool)))

    truncated = dropped = 0
    prompts = _encode(tokenizer, [p for p, _ in pairs])
    responses = _encode(tokenizer, [r for _, r in pairs])
    for p_ids, r_ids in zip(prompts, responses):
        ids = [bos, *p_ids, *r_ids, eos]
        loss = np.zeros(len(ids) - 1, bool)
        loss[len(p_ids):] = True  # targets from the first response token through the closing eos
        if len(ids) > seq_len + 1:
            truncated += 1
            ids, loss = ids[:seq_len + 1], loss[:seq_len]
        if loss.any():
            rows.append(Row(np.asarray(ids, np.int64), loss))
        else:
            dropped += 1
    dataset = Dataset(rows, len(pairs), truncated, dropped)
    if not rows or dataset.target_count == 0:
        raise DataError("the data has no tokens to train on (every response is cut off by --seq-len?)")
    return dataset


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def make_batch(rows: list[Row], pad_id: int) -> Batch:
    seq = max(len(r.ids) - 1 for r in rows)
    inputs = np.full((len(rows), seq), pad_id, np.int64)
    targets = np.full((len(rows), seq), IGNORE, np.int64)
    mask = np.zeros((len(rows), seq), np.int64)
    for i, r in enumerate(rows):
        n = len(r.ids) - 1
        inputs[i, :n] = r.ids[:-1]
        targets[i, :n] = np.where(r.loss, r.ids[1:], IGNORE)
        mask[i, :n] = 1
    return Batch(inputs, targets, mask)


def eval_batches(dataset: Dataset, batch_size: int, pad_id: int) -> list[Batch]:
    """Evaluation batches, longest rows together so that little of each is padding."""
    order = sorted(range(len(dataset.rows)), key=lambda i: -len(dataset.rows[i].ids))
    return [make_batch([dataset.rows[i] for i in order[k:k + batch_size]], pad_id) for k in range(0, len(order), batch_size)]


class RowOrder:
    """An endless stream of row indices: one seeded permutation per epoch.

    A batch never crosses an epoch's end: the last one of each is smaller when
    the rows do not divide evenly, so that an epoch sees every row exactly once
    (as a shuffling DataLoader without drop_last) and a batch never holds a row
    twice. Its position (epoch, cursor, the generator's state at the start of
    the epoch) is all a checkpoint needs to continue the stream exactly.
    """

    def __init__(self, n_rows: int, seed: int):
        self.n_rows = n_rows
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.epoch, self.cursor = 0, 0
        self._start_epoch()

    def _start_epoch(self) -> None:
        self.epoch_rng_state = self.rng.bit_generator.state
        self.perm = self.rng.permutation(self.n_rows)

    def take(self, n: int) -> list[int]:
        """The next batch: `n` rows, or the rest of this epoch where fewer are left."""
        if self.cursor == self.n_rows:
            self.epoch, self.cursor = self.epoch + 1, 0
            self._start_epoch()
        out = self.perm[self.cursor:self.cursor + n].tolist()
        self.cursor += len(out)
        return out

    def batches_per_epoch(self, n: int) -> int:
        return math.ceil(self.n_rows / n)

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "rng": self.epoch_rng_state}

    def copy(self) -> "RowOrder":
        """An order that goes on from here as this one will, on its own generator: to look ahead without moving."""
        twin = RowOrder.__new__(RowOrder)
        twin.n_rows, twin.epoch, twin.cursor = self.n_rows, self.epoch, self.cursor
        twin.epoch_rng_state, twin.perm = self.epoch_rng_state, self.perm  # a new epoch makes a new perm, never edits it
        twin.rng = np.random.Generator(np.random.PCG64())
        twin.rng.bit_generator.state = self.rng.bit_generator.state
        return twin

    def restore(self, state: dict) -> None:
        """Go on from `state()`; ValueError where it is not one this data could have given."""
        epoch, cursor = state["epoch"], state["cursor"]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (epoch, cursor)) \
                or epoch < 0 or not 0 <= cursor <= self.n_rows:
            raise ValueError(f"epoch and cursor must be integers, the cursor within the {self.n_rows} rows")
        self.rng.bit_generator.state = state["rng"]
        self._start_epoch()
        self.epoch, self.cursor = epoch, cursor
