"""Tuning M on the edge: the training loop, in numpy, driving the cloud through a `TrainLink`.

Per step the edge embeds its own token ids, drives the cloud's forward cut by
cut (answering each `A x` with `M A x`), computes the final norm, LM head and
cross-entropy itself, sends the gradient at the last hidden state down, and
answers each cut's gradient at `M A x` with the gradient at `A x` while adding
up the gradient of M. Text, token ids, labels and the loss stay here; only M
changes, and only here. AdamW (decoupled weight decay), linear warmup then
cosine decay, gradient accumulation and global-norm clipping are a few lines
of numpy because M is tiny (targets x r x r per layer).

The output directory is an adapter (`adapter.json`, `adapter.safetensors`, as
`edge.load_adapter` reads) plus `training/` with the optimizer moments, step,
data position and RNG state. It is replaced as a whole, atomically, at every
checkpoint, so at any moment it is one consistent step that `--resume`
continues exactly and `run-edge --adapter` can use.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np

from .bundle import (atomic_directory, check_target, check_writable, foreign_entry, is_int, is_number, loads_json,
                     reported_writes)
from .edge import ADAPTER_CONFIG, ADAPTER_WEIGHTS, EdgeModel, load_adapter
from .errors import PlcliError
from .failover import is_loss
from .ort import read_weights
from .train_link import LinkError, TrainLink
from .wire import MAX_BATCH
from .tune_data import IGNORE, Batch, RowOrder, eval_batches, load_dataset, make_batch

T = TypeVar("T")
TRAINING = "training"
STATE_JSON = "state.json"
STATE_WEIGHTS = "state.safetensors"
ADAPTER_FORMAT = "plcli-adapter"
DEFAULT_ADAPTER = "adapter"  # `--out` default: EDGE_DIR/adapter
# What a checkpoint writes into --out, and all it may replace there.
ADAPTER_LAYOUT = {ADAPTER_CONFIG: None, ADAPTER_WEIGHTS: None, TRAINING: {STATE_JSON: None, STATE_WEIGHTS: None}}
BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
HEAD_CHUNK = 2048  # positions per LM-head matmul: bounds the logits buffer at chunk x vocab floats


class TuneError(PlcliError):
    """Bad options, data or output directory; the message is one line for the user."""


class TuneInterrupted(Exception):
    """Training stopped early (cloud lost or refusing a step, Ctrl-C); `saved_step` is what the output directory now holds."""

    def __init__(self, reason: str, failed_step: int, saved_step: int | None, out: Path, *, exit_code: int = 1):
        self.reason, self.failed_step, self.saved_step, self.out = reason, failed_step, saved_step, out
        self.exit_code = exit_code
        if exit_code == 2:  # refused: the same step would be refused again, so rerunning alone does not help
            where = f"{out} holds step {saved_step}" if saved_step else f"nothing was saved to {out}"
            super().__init__(f"step {failed_step}: {reason}; {where}")
            return
        where = (f"{out} holds step {saved_step}: rerun with --resume to continue from it" if saved_step
                 else f"nothing was saved to {out}: rerun to start again")
        super().__init__(f"{reason} during step {failed_step}; the step was not applied and {where}")


@dataclass
class TuneConfig:
    """Hyperparameters. Defaults were measured on the demo model (recipes/tune_quality.py)."""

    steps: int | None = None  # optimizer steps; None: from epochs
    epochs: float | None = None  # None with steps None: DEFAULT_EPOCHS
    lr: float = 1e-2
    batch_size: int = 8
    seq_len: int = 128
    grad_accum: int = 1
    warmup: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_every: int = 0  # 0: evaluate before and after only
    save_every: int = 50  # 0: save at the end (and when interrupted) only

    # What a resumed run must share with the run it continues (the rest only changes reporting).
    TRAJECTORY = ("lr", "batch_size", "seq_len", "grad_accum", "warmup", "weight_decay", "max_grad_norm", "seed")


DEFAULT_EPOCHS = 3.0


def check_config(c: TuneConfig, max_context: int) -> None:
    if c.steps is not None and c.epochs is not None:
        raise TuneError("give --steps or --epochs, not both")
    for name, value, ok, rule in (
        ("--steps", c.steps, c.steps is None or c.steps >= 1, "at least 1"),
        ("--epochs", c.epochs, c.epochs is None or 0 < c.epochs < math.inf, "positive"),
        ("--lr", c.lr, c.lr > 0 and math.isfinite(c.lr), "positive"),
        # A pass carries each row's length in its header: the cloud takes at most wire.MAX_BATCH rows.
        ("--batch-size", c.batch_size, 1 <= c.batch_size <= MAX_BATCH, f"1 to {MAX_BATCH} (the rows one pass carries)"),
        ("--seq-len", c.seq_len, c.seq_len >= 1, "at least 1"),
        ("--grad-accum", c.grad_accum, c.grad_accum >= 1, "at least 1"),
        ("--warmup", c.warmup, c.warmup >= 0, "0 or more"),
        ("--weight-decay", c.weight_decay, 0 <= c.weight_decay < math.inf, "0 or more"),
        ("--max-grad-norm", c.max_grad_norm, 0 <= c.max_grad_norm < math.inf, "0 (off) or more"),
        ("--eval-every", c.eval_every, c.eval_every >= 0, "0 (off) or more"),
        ("--save-every", c.save_every, c.save_every >= 0, "0 (off) or more"),
        ("--seed", c.seed, c.seed >= 0, "0 or more"),
    ):
        if not ok:
            raise TuneError(f"{name} {value} is out of range: must be {rule}")
    if c.seq_len > max_context:
        raise TuneError(f"--seq-len {c.seq_len} exceeds the model's context of {max_context} tokens")


def learning_rate(step: int, total: int, c: TuneConfig) -> float:
    """Linear warmup over `warmup` steps, then cosine decay towards 0 at `total`; `step` counts from 0."""
    if step < c.warmup:
        return c.lr * (step + 1) / c.warmup
    progress = (step - c.warmup) / max(1, total - c.warmup)
    return c.lr * 0.5 * (1 + math.cos(math.pi * progress))


# -- the edge's share of the math ------------------------------------------------


def head_loss(hidden: np.ndarray, targets: np.ndarray, norm: np.ndarray, lm_head: np.ndarray, eps: float,
              *, grad_scale: float | None = None) -> tuple[float, np.ndarray | None]:
    """Summed cross-entropy of the targets (IGNORE skipped) and, with `grad_scale`, its gradient at `hidden` times it.

    Final RMSNorm then `@ lm_head` ([hidden, vocab]), as decoder.HeadModule; the
    logits are only formed at positions with a target.
    """
    t = targets.reshape(-1)
    rows = np.flatnonzero(t != IGNORE)
    x = hidden.reshape(-1, hidden.shape[-1])[rows]
    rstd = 1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + np.float32(eps))
    normed = x * rstd * norm
    loss = 0.0
    grad_normed = np.empty_like(normed) if grad_scale is not None else None
    for lo in range(0, len(rows), HEAD_CHUNK):
        sl = slice(lo, lo + HEAD_CHUNK)
        logits = normed[sl] @ lm_head
        top = logits.max(-1, keepdims=True)
        probs = np.exp(logits - top)
        total = probs.sum(-1, keepdims=True)
        picked = np.arange(len(logits)), t[rows[sl]]
        loss += float((np.log(total[:, 0]) + top[:, 0] - logits[picked]).astype(np.float64).sum())
        if grad_normed is not None:
            probs /= total
            probs[picked] -= 1.0
            grad_normed[sl] = (probs * np.float32(grad_scale)) @ lm_head.T
    if grad_normed is None:
        return loss, None
    # RMSNorm backward: d/dh of w * h * rstd(h).
    g = grad_normed * norm
    grad = np.zeros((t.size, hidden.shape[-1]), np.float32)
    grad[rows] = rstd * g - x * (rstd ** 3) * (g * x).mean(-1, keepdims=True)
    return loss, grad.reshape(hidden.shape)


def apply_m(ax: np.ndarray, m: np.ndarray) -> np.ndarray:
    """`M A x` per target: ax [..., targets, r], m [targets, r, r]."""
    return np.einsum("...tj,tij->...ti", ax, m, optimize=True)


def grad_m(grad_madx: np.ndarray, ax: np.ndarray) -> np.ndarray:
    """dL/dM [targets, r, r] = sum over tokens of grad_madx ⊗ ax (madx = M ax)."""
    t, r = ax.shape[-2:]
    g, a = grad_madx.reshape(-1, t, r), ax.reshape(-1, t, r)
    return np.matmul(g.transpose(1, 2, 0), a.transpose(1, 0, 2))


def grad_ax(grad_madx: np.ndarray, m: np.ndarray) -> np.ndarray:
    """dL/d(A x) = M^T grad_madx per target."""
    return np.einsum("...ti,tij->...tj", grad_madx, m, optimize=True)


class AdamW:
    """torch.optim.AdamW's update (decoupled weight decay, bias correction), on a dict of arrays."""

    def __init__(self, params: dict, weight_decay: float):
        self.params, self.weight_decay = params, weight_decay
        self.exp_avg = {k: np.zeros_like(v) for k, v in params.items()}
        self.exp_avg_sq = {k: np.zeros_like(v) for k, v in params.items()}
        self.t = 0

    def step(self, grads: dict, lr: float) -> None:
        self.t += 1
        b1, b2 = BETAS
        c1, c2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        for k, p in self.params.items():
            g = grads[k]
            p *= np.float32(1 - lr * self.weight_decay)
            self.exp_avg[k] = b1 * self.exp_avg[k] + (1 - b1) * g
            self.exp_avg_sq[k] = b2 * self.exp_avg_sq[k] + (1 - b2) * g * g
            p -= (lr / c1) * self.exp_avg[k] / (np.sqrt(self.exp_avg_sq[k] / c2) + ADAM_EPS)


class held_interrupts:
    """From when it is made until its block ends, the signals that stop a command (SIGINT, SIGTERM, SIGHUP) wait,
    and then arrive as they would have: an optimizer step that is applied is applied whole, with its step count.

    Python runs signal handlers between any two bytecodes, so a Ctrl-C could land between updating one M and the
    next: a checkpoint would save half a step, and --resume would not go on as the run would have. Only the main
    thread can set handlers; elsewhere (where no signal lands anyway) this holds nothing.
    """

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))

    def __init__(self):
        self.caught: list[int] = []
        self.previous: dict = {}
        if threading.current_thread() is not threading.main_thread():
            return
        try:
            for s in self.SIGNALS:
                self.previous[s] = signal.signal(s, lambda signum, frame: self.caught.append(signum))
        except BaseException:
            self._restore()
            raise

    def _restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._restore()
        for s in dict.fromkeys(self.caught):
            signal.raise_signal(s)


# -- the loop ------------------------------------------------------------------


@dataclass
class StepReport:
    step: int  # 1-based, after the update
    loss: float
    lr: float
    grad_norm: float  # of M's gradient, before clipping to --max-grad-norm
    tokens_per_s: float


@dataclass
class TuneSummary:
    steps: int
    train_loss_first: float | None
    train_loss_last: float | None
    eval_loss_before: float | None
    eval_loss_after: float | None
    eval_perplexity_before: float | None
    eval_perplexity_after: float | None
    tokens_per_s: float
    train_tokens: int
    seconds: float
    resumed_from: int | None
    out: str
    losses: list[float] = field(repr=False, default_factory=list)
    evals: list[dict] = field(repr=False, default_factory=list)

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("losses")
        return d


def special_ids(edge: EdgeModel) -> tuple[int, int, int]:
    """(bos, eos, pad) to frame documents and pad batches: the bundle's generation settings, else the tokenizer's."""
    gen, tok = edge.manifest.generation, edge.tokenizer
    eos_ids = edge.eos_token_ids or [i for i in (tok.eos_token_id,) if i is not None]
    if not eos_ids:
        raise TuneError(f"{edge.dir}: the model has no end-of-text token to separate documents with")
    eos = int(eos_ids[0])
    first = lambda *ids: next(int(i) for i in ids if i is not None)  # noqa: E731
    return first(gen.get("bos_token_id"), tok.bos_token_id, eos), eos, first(gen.get("pad_token_id"), tok.pad_token_id, eos)


class Tuner:
    """One tuning run: data on the edge, a cloud behind `link`, checkpoints in `out`."""

    def __init__(self, edge: EdgeModel, link: TrainLink, data: list[Path], config: TuneConfig, out: Path,
                 *, eval_data: list[Path] | None = None, resume: bool = False, force: bool = False, failover=None):
        # With a `failover` (failover.py), a lost cloud is replaced and the interrupted step or evaluation done again.
        self.edge, self.link, self.config, self.out, self.failover = edge, link, config, Path(out), failover
        manifest = edge.manifest
        check_config(config, edge.arch.max_position_embeddings)
        if config.eval_every and not eval_data:
            raise TuneError(f"--eval-every {config.eval_every} evaluates on --eval-data: give held-out text, or --eval-every 0")
        self.bos, self.eos, self.pad = special_ids(edge)
        opts = dict(seq_len=config.seq_len, bos=self.bos, eos=self.eos)
        self.train = load_dataset(data, edge.tokenizer, **opts)
        self.data_digest = self.train.digest()
        self.eval = load_dataset(eval_data, edge.tokenizer, **opts) if eval_data else None
        self.eval_digest = self.eval.digest() if self.eval else None
        self.eval_set = eval_batches(self.eval, config.batch_size, self.pad) if self.eval else []
        self.order = RowOrder(len(self.train.rows), config.seed)
        if config.steps is not None:
            self.total_steps = config.steps
        else:
            batches = (config.epochs or DEFAULT_EPOCHS) * self.order.batches_per_epoch(config.batch_size)
            self.total_steps = max(1, math.ceil(batches / config.grad_accum))
        # Forward visits the cuts in plan order, backward in reverse: anything else from the cloud is refused.
        self.cuts = [(s.cut_layer, s.kind.out_cut.stage) for s in edge.plan.segments if s.kind.out_cut is not None]
        self.m = {key: np.zeros((len(cut.targets), manifest.rank, manifest.rank), np.float32)
                  for key, cut in self._cut_targets().items()}
        self.optimizer = AdamW(self.m, config.weight_decay)
        self._row_targets = np.asarray([int(r.loss.sum()) for r in self.train.rows], np.int64)  # what make_batch counts
        self.step_count, self.tokens = 0, 0
        self.losses: list[float] = []
        self.evals: list[dict] = []
        self.eval_before: float | None = None
        self.resumed_from: int | None = None
        check_out(self.out, manifest, resume=resume, force=force)
        if resume:
            self._load()

    def _cut_targets(self) -> dict:
        return {(layer, stage): next(c for c in self.edge.plan.cuts if c.stage == stage) for layer, stage in self.cuts}

    # -- one step ------------------------------------------------------------
    def forward_backward(self, batch: Batch, grad_scale: float | None, grads: dict | None) -> float:
        """Forward (and with `grads`, backward) of one batch across the split; returns the summed loss.

        The backward adds `grad_scale` x d(summed loss)/dM into `grads[(layer, stage)]` ([targets, r, r]).
        """
        link, arch = self.link, self.edge.arch
        bsz, seq = batch.inputs.shape
        out = link.forward_start(self.edge.embed(batch.inputs), batch.attention_mask, train=grads is not None)
        kept: dict = {}
        for key in self.cuts:
            cut_ok = not out.done and (out.layer, out.stage) == key
            _expect(out.ax if cut_ok else None, (bsz, seq, self.m[key].shape[0], self.m[key].shape[1]), f"A x at cut {key}")
            if grads is not None:
                kept[key] = out.ax
            out = link.forward_resume(apply_m(out.ax, self.m[key]).astype(np.float32, copy=False))
        _expect(out.hidden if out.done else None, (bsz, seq, arch.hidden_size), "the last hidden state")
        loss, grad_hidden = head_loss(out.hidden, batch.targets, self.edge.norm, self.edge.lm_head, arch.rms_norm_eps,
                                      grad_scale=grad_scale if grads is not None else None)
        if grads is None:
            return loss
        back = link.backward_start(grad_hidden)
        for i, key in enumerate(reversed(self.cuts)):
            _expect(back.grad_madx if (back.layer, back.stage) == key else None, kept[key].shape, f"gradient at cut {key}")
            if back.last != (i == len(self.cuts) - 1):
                raise LinkError("the cloud ended the backward at the wrong cut")
            grads[key] += grad_m(back.grad_madx, kept.pop(key))
            if not back.last:
                back = link.backward_resume(grad_ax(back.grad_madx, self.m[key]).astype(np.float32, copy=False))
        return loss

    def step(self) -> StepReport:
        c = self.config
        started = time.perf_counter()
        before = self.order.state()
        try:
            # Token-mean over the whole accumulated batch, as one big batch would give. Its targets are counted on a
            # copy of the row order first, so that one micro-batch at a time is built: building all of them at once
            # held --grad-accum batches in memory.
            ahead = self.order.copy()
            targets = sum(int(self._row_targets[ahead.take(c.batch_size)].sum()) for _ in range(c.grad_accum))
            grads = {k: np.zeros_like(v) for k, v in self.m.items()}
            loss, tokens = 0.0, 0
            for _ in range(c.grad_accum):
                batch = make_batch([self.train.rows[i] for i in self.order.take(c.batch_size)], self.pad)
                loss += self.forward_backward(batch, 1.0 / targets, grads)
                tokens += batch.token_count
            loss /= targets
            norm = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values()))
            if not (math.isfinite(loss) and math.isfinite(norm)):
                raise TuneError(f"step {self.step_count + 1} diverged (loss {loss}, gradient norm {norm}); lower --lr")
            # Held from the last line of the step's work: a Ctrl-C or SIGTERM comes before the update or after it.
            held = held_interrupts()
        except BaseException:
            self.order.restore(before)  # the step never happened: its rows come again
            self._abort_link()
            raise
        with held:
            if c.max_grad_norm and norm > c.max_grad_norm:
                for g in grads.values():
                    g *= np.float32(c.max_grad_norm / (norm + 1e-6))
            lr = learning_rate(self.step_count, self.total_steps, c)
            self.optimizer.step(grads, lr)
            self.step_count += 1
            self.losses.append(loss)
            self.tokens += tokens
        return StepReport(self.step_count, loss, lr, norm, tokens / (time.perf_counter() - started))

    def evaluate(self) -> float | None:
        """Token-mean loss on the evaluation data with the current M (no gradients, the cloud keeps nothing)."""
        if not self.eval_set:
            return None
        total = sum(self.forward_backward(b, None, None) for b in self.eval_set)
        return total / sum(b.target_count for b in self.eval_set)

    def _surviving(self, work: Callable[[], T]) -> T:
        """`work()`, done again on a new cloud each time the failover replaces a lost one.

        A step that failed changed nothing (its rows come again, M was not
        touched), so doing it again applies it exactly once.
        """
        while True:
            try:
                result = work()
            except LinkError as e:
                if self.failover is None or not is_loss(e):
                    raise
                self.link.close()
                self.link = self.failover.recover(e)
                continue
            if self.failover is not None:
                self.failover.settled()
            return result

    # -- the run -------------------------------------------------------------
    def run(self, on_step: Callable[[StepReport], None] | None = None,
            on_eval: Callable[[int, float], None] | None = None) -> TuneSummary:
        c = self.config
        started = time.perf_counter()
        self.tokens, train_seconds = 0, 0.0
        saved = self.step_count if self.resumed_from is not None else None
        if self.resumed_from is None:
            self.eval_before = self._surviving(self.evaluate)
        try:
            while self.step_count < self.total_steps:
                t0 = time.perf_counter()
                report = self._surviving(self.step)
                train_seconds += time.perf_counter() - t0
                if on_step:
                    on_step(report)
                if c.eval_every and self.step_count % c.eval_every == 0 and self.step_count < self.total_steps:
                    loss = self._surviving(self.evaluate)
                    self.evals.append({"step": self.step_count, "loss": loss})
                    if on_eval:
                        on_eval(self.step_count, loss)
                if c.save_every and self.step_count % c.save_every == 0 and self.step_count < self.total_steps:
                    self.save()
                    saved = self.step_count
        except (LinkError, KeyboardInterrupt) as e:
            self._abort_link()
            if self.step_count and self.step_count != saved:
                self.save()  # the last completed step: nothing done is lost
                saved = self.step_count
            if isinstance(e, KeyboardInterrupt):
                reason, code = "interrupted", 130
            elif is_loss(e):
                reason, code = f"lost the cloud ({e})", 1
            else:  # refused: a pass over the cloud's limits would be refused again, whichever cloud
                reason, code = str(e), 2 if getattr(e, "code", None) in ("limit", "too_large") else 1
            raise TuneInterrupted(reason, self.step_count + 1, saved, self.out, exit_code=code) from None
        self.save()
        try:
            eval_after = self._surviving(self.evaluate)
        except LinkError as e:
            raise LinkError(f"{e}, during the final evaluation; the tuned adapter is saved in {self.out}") from None
        ppl = lambda x: None if x is None else math.exp(min(x, 700.0))  # noqa: E731
        return TuneSummary(
            steps=self.step_count,
            train_loss_first=self.losses[0] if self.losses else None,
            train_loss_last=self.losses[-1] if self.losses else None,
            eval_loss_before=self.eval_before, eval_loss_after=eval_after,
            eval_perplexity_before=ppl(self.eval_before), eval_perplexity_after=ppl(eval_after),
            tokens_per_s=self.tokens / train_seconds if train_seconds else 0.0, train_tokens=self.tokens,
            seconds=time.perf_counter() - started, resumed_from=self.resumed_from, out=str(self.out),
            losses=list(self.losses), evals=list(self.evals),
        )

    def _abort_link(self) -> None:
        try:
            self.link.abort()
        except LinkError:
            pass  # the cloud is gone: nothing of the step is left there to drop

    # -- the output directory ------------------------------------------------
    def adapter_matrices(self) -> dict[str, np.ndarray]:
        out = {}
        for key, cut in self._cut_targets().items():
            for i, t in enumerate(cut.targets):
                out[f"layers.{key[0]}.{t}.M"] = np.ascontiguousarray(self.m[key][i])
        return out

    def save(self) -> None:
        from safetensors.numpy import save_file

        manifest = self.edge.manifest
        with reported_writes(f"cannot write the adapter to {self.out}", TuneError), \
                atomic_directory(self.out, replace=True, layout=ADAPTER_LAYOUT) as tmp:
            write_adapter(tmp, manifest, self.adapter_matrices(), steps=self.step_count, total_steps=self.total_steps)
            (tmp / TRAINING).mkdir()
            moments = {f"{name}.{l}.{s}": v for name, table in (("exp_avg", self.optimizer.exp_avg),
                                                               ("exp_avg_sq", self.optimizer.exp_avg_sq))
                       for (l, s), v in table.items()}
            save_file(moments, str(tmp / TRAINING / STATE_WEIGHTS))
            (tmp / TRAINING / STATE_JSON).write_text(json.dumps({
                "ab_fingerprint": manifest.ab_fingerprint, "step": self.step_count, "total_steps": self.total_steps,
                "optimizer_steps": self.optimizer.t, "config": {f.name: getattr(self.config, f.name) for f in fields(self.config)},
                "data": self.data_digest, "eval_data": self.eval_digest, "data_position": self.order.state(),
                "losses": self.losses,
                "evals": self.evals, "eval_loss_before": self.eval_before,
            }) + "\n")

    def _load(self) -> None:
        state = read_state(self.out)
        if state.get("ab_fingerprint") != self.edge.manifest.ab_fingerprint:
            raise TuneError(f"{self.out}: the checkpoint belongs to another bundle (A/B {state.get('ab_fingerprint')})")
        saved = state["config"]
        for name in TuneConfig.TRAJECTORY:
            if saved.get(name) != getattr(self.config, name):
                raise TuneError(f"--{name.replace('_', '-')} {getattr(self.config, name)} differs from the checkpoint's "
                                f"{saved.get(name)}; resume with the same options")
        if state["total_steps"] != self.total_steps:
            raise TuneError(f"this run would take {self.total_steps} steps, the checkpoint's run {state['total_steps']}; "
                            "resume with the same --steps/--epochs")
        if state["data"] != self.data_digest:
            raise TuneError("the training data changed since the checkpoint; resume with the same --data files")
        if state.get("eval_data", self.eval_digest) != self.eval_digest:  # checkpoints before it was kept: not known
            raise TuneError("the held-out data differs from the checkpoint's (its evaluations so far, the loss before "
                            "tuning among them, are on that); resume with the same --eval-data files, or none as before")
        m = load_adapter(self.out, self.edge.manifest)
        moments = read_weights(self.out / TRAINING / STATE_WEIGHTS)
        for key, cut in self._cut_targets().items():
            try:
                self.m[key][...] = np.stack([m[f"layers.{key[0]}.{t}.M"] for t in cut.targets])
                for name, table in (("exp_avg", self.optimizer.exp_avg), ("exp_avg_sq", self.optimizer.exp_avg_sq)):
                    table[key][...] = moments[f"{name}.{key[0]}.{key[1]}"]
            except (KeyError, ValueError):
                raise TuneError(f"{self.out}: the checkpoint lacks or misshapes the state of cut {key}") from None
        self.optimizer.t = state["optimizer_steps"]
        try:
            self.order.restore(state["data_position"])
        except (KeyError, TypeError, ValueError):
            raise TuneError(f"{self.out / TRAINING / STATE_JSON}: malformed checkpoint (data_position)") from None
        self.step_count = self.resumed_from = state["step"]
        self.losses, self.evals, self.eval_before = state["losses"], state["evals"], state["eval_loss_before"]


def check_out(out: Path, manifest, *, resume: bool, force: bool) -> None:
    """Refuse an --out this run must not write: a file, a directory that is no adapter, or an adapter that is kept.

    An adapter of this bundle is kept unless `force`; an unfinished run of it is what `resume` continues. What a
    save killed mid-replacement left beside `out` is put back first (bundle.restore_interrupted), so that neither
    the check nor --resume misses the checkpoint.
    """
    out = Path(out)
    if resume and force:
        raise TuneError("give --resume to continue the run in --out or --force to replace it, not both")
    # The first checkpoint comes after --save-every steps, or at the end: an --out it could not write is refused now.
    check_writable(out, "the adapter")
    check_target(out, replace=True)  # after putting back what a killed save left aside; refuses a link or a file
    if resume:
        if not (out / TRAINING / STATE_JSON).is_file():
            raise TuneError(f"{out}: nothing to resume (no {TRAINING}/{STATE_JSON}); run without --resume to start")
    elif not out.is_dir() or not any(out.iterdir()):
        return
    elif not (out / ADAPTER_CONFIG).is_file():
        raise TuneError(f"{out} exists and is not an adapter directory; choose another --out")
    foreign = foreign_entry(out, ADAPTER_LAYOUT)
    if foreign:
        raise TuneError(f"{out} holds {foreign}, which a checkpoint would delete (it replaces the directory whole) and "
                        "which tune does not write: move it elsewhere first, or choose another --out")
    if resume or force:
        return
    theirs = _read_json(out / ADAPTER_CONFIG).get("ab_fingerprint")
    if theirs != manifest.ab_fingerprint:
        raise TuneError(f"{out} holds an adapter for another bundle (A/B {theirs}); choose another --out, "
                        "or --force to replace it")
    if not (out / TRAINING / STATE_JSON).is_file():
        raise TuneError(f"{out} holds an adapter for this bundle; --force replaces it, or choose another --out")
    state = read_state(out)
    step, total = state["step"], state["total_steps"]
    if step < total:
        raise TuneError(f"{out} holds an unfinished run for this bundle (step {step} of {total}): --resume continues "
                        "it, --force starts over")
    raise TuneError(f"{out} holds a finished adapter for this bundle (step {step} of {total}); --force replaces it, "
                    "or choose another --out")


def write_adapter(directory: Path, manifest, m: dict[str, np.ndarray], **info) -> None:
    """`adapter.safetensors` (`layers.{l}.{target}.M`) and `adapter.json` (what `edge.load_adapter` checks, plus `info`)."""
    from safetensors.numpy import save_file

    save_file(m, str(Path(directory) / ADAPTER_WEIGHTS), metadata={"format": ADAPTER_FORMAT})
    (Path(directory) / ADAPTER_CONFIG).write_text(json.dumps({
        "format": ADAPTER_FORMAT, "rank": manifest.rank, "targets": list(manifest.targets),
        "ab_fingerprint": manifest.ab_fingerprint, "source_hash": manifest.source_hash, **info,
    }, indent=2) + "\n")


def resume_config(out: Path, given: dict) -> TuneConfig:
    """The checkpoint's hyperparameters, with the options given on this command line on top."""
    state = read_state(out) if (Path(out) / TRAINING / STATE_JSON).is_file() else {}
    saved = {k: v for k, v in state.get("config", {}).items() if k in {f.name for f in fields(TuneConfig)}}
    if "steps" in given or "epochs" in given:
        saved.pop("steps", None), saved.pop("epochs", None)
    return TuneConfig(**{**saved, **given})


# What each field of training/state.json must be, so that a damaged checkpoint is one line, not a crash mid-resume.
STATE_FIELDS = {
    "ab_fingerprint": (lambda v: isinstance(v, str), "a string"),
    "step": (lambda v: is_int(v) and v >= 0, "an integer of 0 or more"),
    "total_steps": (lambda v: is_int(v) and v >= 1, "a positive integer"),
    "optimizer_steps": (lambda v: is_int(v) and v >= 0, "an integer of 0 or more"),
    "config": (lambda v: isinstance(v, dict), "an object"),
    "data": (lambda v: isinstance(v, str), "a string"),
    "data_position": (lambda v: isinstance(v, dict), "an object"),
    "losses": (lambda v: isinstance(v, list) and all(map(is_number, v)), "a list of numbers"),
    "evals": (lambda v: isinstance(v, list) and all(isinstance(e, dict) for e in v), "a list of objects"),
    "eval_loss_before": (lambda v: v is None or is_number(v), "a number or null"),
}


def read_state(out: Path) -> dict:
    """`training/state.json` of the adapter directory `out`, every field it is read for checked."""
    path = Path(out) / TRAINING / STATE_JSON
    state = _read_json(path)
    for name, (ok, what) in STATE_FIELDS.items():
        if name not in state or not ok(state[name]):
            raise TuneError(f"{path}: malformed checkpoint ({name} must be {what})")
    for f in fields(TuneConfig):
        value = state["config"].get(f.name)
        kind, _, optional = f.type.partition(" | ")  # "int", "float", "int | None", "float | None"
        if f.name in state["config"] and not ((value is None and optional == "None")
                                               or (is_int(value) if kind == "int" else is_number(value))):
            raise TuneError(f"{path}: malformed checkpoint (config.{f.name} must be {'an integer' if kind == 'int' else 'a number'})")
    return state


def _expect(a: np.ndarray | None, shape: tuple[int, ...], what: str) -> None:
    if a is None or not isinstance(a, np.ndarray) or a.dtype != np.float32 or tuple(a.shape) != tuple(shape):
        raise LinkError(f"the cloud sent something other than {what} of shape {list(shape)}")


def _read_json(path: Path) -> dict:
    try:
        d = loads_json(path.read_text())
    except (OSError, ValueError) as e:
        raise TuneError(f"{path}: unreadable ({e})") from None
    if not isinstance(d, dict):
        raise TuneError(f"{path}: not a JSON object")
    return d


def default_adapter_dir(edge_dir: str | Path) -> Path:
    return Path(edge_dir) / DEFAULT_ADAPTER
