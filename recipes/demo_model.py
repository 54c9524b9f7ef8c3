"""The embedded demo model: a tiny Llama trained on English that ships with CPython.

No model can be downloaded, so plcli carries its own. This file builds it from
nothing but the standard library's own prose (``pydoc_data.topics`` and the
docstrings of standard-library modules): a byte-level BPE tokenizer, then a
~2.2M-parameter Llama (grouped-query attention on purpose, so that the split
handles ``num_key_value_heads < num_attention_heads``), trained in plain torch
on the CPU and saved with ``save_pretrained`` in the ordinary Hugging Face
layout. The result is committed under ``recipes/assets/demo-llama/``.

Rebuild it (about 10 minutes on 2 CPU cores; not run in CI) with exactly:

    python -m plcli.recipes.demo_model --out recipes/assets/demo-llama

The build is deterministic for a given Python, torch and tokenizers version
(fixed seed, fixed module list, single process); a different CPython ships
slightly different docstrings and so gives a slightly different model.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REBUILD_COMMAND = "python -m plcli.recipes.demo_model --out recipes/assets/demo-llama"

SEED = 0
VOCAB_SIZE = 3072
HELDOUT_EVERY = 20  # every 20th document is held out: a 5% split that needs no RNG

# A fixed, sorted list rather than sys.stdlib_module_names: importing *every*
# stdlib module has side effects (antigravity opens a browser, this prints,
# tkinter/turtle want a display) and the set differs between platforms.
STDLIB_MODULES = sorted("""
abc argparse array ast asyncio base64 bisect builtins bz2 calendar cmath codecs
collections collections.abc concurrent.futures configparser contextlib copy csv
ctypes dataclasses datetime decimal difflib dis email enum filecmp fnmatch
fractions ftplib functools gc getopt gettext glob gzip hashlib heapq hmac html
html.parser http.client http.server imaplib importlib inspect io ipaddress
itertools json keyword linecache locale logging logging.handlers lzma mailbox
math mimetypes multiprocessing numbers operator optparse os os.path pathlib
pickle pkgutil platform plistlib poplib pprint profile pstats queue quopri
random re reprlib sched secrets selectors shelve shlex shutil signal smtplib
socket socketserver sqlite3 ssl stat statistics string struct subprocess
symtable sys sysconfig tarfile tempfile textwrap threading time timeit token
tokenize trace traceback types typing unicodedata unittest unittest.mock
urllib.parse urllib.request uuid warnings wave weakref xml.dom.minidom
xml.etree.ElementTree xmlrpc.client zipfile zipimport zlib
""".split())

MIN_DOC_CHARS = 40  # shorter docstrings are mostly "Return self." noise


# ---------------------------------------------------------------- corpus


def _module_docstrings(name: str) -> list[str]:
    """The module's docstring, then those of its public members and their methods."""
    try:
        module = importlib.import_module(name)
    except Exception:  # e.g. a CPython built without _ssl or _sqlite3
        return []
    docs = [inspect.getdoc(module) or ""]
    public = getattr(module, "__all__", None) or [k for k in dir(module) if not k.startswith("_")]
    for key in sorted(public):
        try:
            obj = getattr(module, key)
        except Exception:
            continue
        # Skip submodules and re-exports: they are documented where they live.
        if inspect.ismodule(obj) or (name != "builtins" and getattr(obj, "__module__", name) != name):
            continue
        docs.append(inspect.getdoc(obj) or "")
        if inspect.isclass(obj):
            for attr, value in sorted(vars(obj).items()):
                if not attr.startswith("_") and (callable(value) or isinstance(value, property)):
                    docs.append(inspect.getdoc(value) or "")
    return [d for d in docs if len(d) >= MIN_DOC_CHARS]


def collect_corpus() -> list[str]:
    """Every document, in a deterministic order: pydoc topics, then docstrings.

    Collected in a fresh ``python -I -S`` running this file: what an import
    finds depends on what was imported before (torch wraps inspect functions,
    transformers adds methods to logging.Logger), so in-process the corpus
    and with it the held-out split would depend on the caller.
    """
    out = subprocess.run(
        [sys.executable, "-I", "-S", str(Path(__file__).resolve()), "--print-corpus"],
        check=True, stdout=subprocess.PIPE,
    ).stdout
    return json.loads(out)


def _collect_corpus_here() -> list[str]:
    from pydoc_data.topics import topics

    docs = [topics[key] for key in sorted(topics)]
    for name in STDLIB_MODULES:
        docs.extend(_module_docstrings(name))
    # Inherited and re-exported docstrings repeat; keep the first of each, or the
    # held-out split would leak copies of training documents.
    seen: set[str] = set()
    return [d for d in map(str.strip, docs) if not (d in seen or seen.add(d))]


def split_corpus(docs: list[str]) -> tuple[list[str], list[str]]:
    """(train, held_out): every HELDOUT_EVERY-th document is held out."""
    train = [d for i, d in enumerate(docs) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    held = [d for i, d in enumerate(docs) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    return train, held


# ---------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str]):
    # Like Llama, encoding prepends BOS (here the same token as EOS): training
    # packs documents as `EOS doc EOS doc ...`, so a prompt that starts with it
    # looks like the start of a document to the model.
    from .checkpoints import train_tokenizer as train_bpe  # here: --print-corpus runs this file bare, without its package

    return train_bpe(VOCAB_SIZE, texts, prepend_bos=True, model_max_length=512)


# ---------------------------------------------------------------- model


def model_config(tokenizer):
    """~2.2M parameters: fp32 model.safetensors stays under 9 MB.

    hidden 192 keeps rank <= hidden/2 for the split's default rank 64; 6 query
    heads share 2 key/value heads (GQA) so the split's GQA path is exercised.
    """
    from transformers import LlamaConfig

    eos = tokenizer.eos_token_id
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )


def init_model(config, seed: int = SEED):
    """The same seed gives the same untrained weights: the baseline we compare to."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def encode_stream(tokenizer, texts: list[str]) -> list[int]:
    """`EOS doc EOS doc ...` as one token stream (what both training and eval see)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    # The `tokenizers` backend directly: documents are longer than the model's
    # 512 positions (we chunk them ourselves), which the wrapper warns about.
    for enc in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.append(eos)
        ids.extend(enc.ids)
    return ids


def evaluate_perplexity(model, tokenizer, texts: list[str], seq_len: int = 256, max_tokens: int | None = None) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of the packed stream."""
    import torch

    ids = encode_stream(tokenizer, texts)
    if max_tokens is not None:
        ids = ids[: max_tokens + 1]
    data = torch.tensor(ids, dtype=torch.long)
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data) - 1, seq_len):
            chunk = data[start : start + seq_len + 1]
            if len(chunk) < 2:
                break
            logits = model(input_ids=chunk[None, :-1]).logits[0].float()
            nll += torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum").item()
            count += len(chunk) - 1
    model.train(was_training)
    return math.exp(nll / count)


def train(model, ids: list[int], steps: int, batch_size: int, seq_len: int, lr: float, log_every: int = 100):
    """AdamW + linear warmup + cosine decay on random windows of the packed stream."""
    import torch

    gen = torch.Generator().manual_seed(SEED)
    data = torch.tensor(ids, dtype=torch.long)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]  # no decay on norms
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95), eps=1e-8,
    )
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))  # floor at lr/10

    model.train()
    t0 = time.time()
    for step in range(steps):
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=gen)
        batch = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}/{steps}  loss {loss.item():.3f}  lr {lr_at(step):.2e}  {time.time() - t0:6.0f}s", flush=True)
    model.eval()
    return model


# ---------------------------------------------------------------- build


TRAIN = dict(steps=700, batch_size=16, seq_len=256, lr=3e-3)  # ~8.5 min on 2 idle cores
EVAL_SEQ_LEN = 256


def build(out_dir: str | os.PathLike, *, steps: int | None = None) -> dict:
    """Train tokenizer and model, save both into out_dir (atomically), return the metrics."""
    import torch
    from transformers import GenerationConfig

    from plcli.runtime.bundle import atomic_directory

    torch.set_num_threads(2)  # the reference machine has 2 cores; more threads only add noise
    torch.manual_seed(SEED)
    t_start = time.time()

    train_texts, held_texts = split_corpus(collect_corpus())
    tokenizer = train_tokenizer(train_texts)
    config = model_config(tokenizer)
    train_ids = encode_stream(tokenizer, train_texts)

    untrained = init_model(config)
    n_params = sum(p.numel() for p in untrained.parameters())  # tied head counted once
    untrained_ppl = evaluate_perplexity(untrained, tokenizer, held_texts, EVAL_SEQ_LEN)
    model = init_model(config)  # same seed: identical starting weights
    del untrained

    hp = dict(TRAIN, steps=steps or TRAIN["steps"])
    print(f"{n_params:,} parameters, {len(train_ids):,} train tokens, untrained ppl {untrained_ppl:.1f}", flush=True)
    train(model, train_ids, **hp)
    t_train = time.time() - t_start
    heldout_ppl = evaluate_perplexity(model, tokenizer, held_texts, EVAL_SEQ_LEN)
    eval_tokens = len(encode_stream(tokenizer, held_texts)) - 1

    eos = tokenizer.eos_token_id
    model.generation_config = GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    metrics = {
        "heldout_perplexity": round(heldout_ppl, 2),
        "untrained_perplexity": round(untrained_ppl, 2),
        "ratio": round(untrained_ppl / heldout_ppl, 2),
        "parameters": n_params,
        "train_tokens": len(train_ids),
        "eval_tokens": eval_tokens,
        "train_seconds": round(t_train, 1),
        "hyperparameters": hp,
        "python": ".".join(map(str, sys.version_info[:3])),
        "torch": torch.__version__.split("+")[0],
        "rebuild_command": REBUILD_COMMAND,
    }

    with atomic_directory(Path(out_dir).resolve(), replace=True) as tmp:
        model.save_pretrained(tmp)  # float32 safetensors, tied head stored once
        tokenizer.save_pretrained(tmp)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def demo_model_dir() -> Path:
    """Where the committed model lives (installed as package data)."""
    return Path(__file__).parent / "assets" / "demo-llama"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Rebuild plcli's embedded demo model.")
    parser.add_argument("--out", default=str(demo_model_dir()), help="output directory (replaced)")
    parser.add_argument("--steps", type=int, default=None, help=f"training steps (default {TRAIN['steps']})")
    parser.add_argument("--print-corpus", action="store_true", help=argparse.SUPPRESS)  # see collect_corpus
    args = parser.parse_args(argv)
    if args.print_corpus:
        json.dump(_collect_corpus_here(), sys.stdout)  # ensure_ascii: the pipe's encoding cannot matter
        return
    print(json.dumps(build(args.out, steps=args.steps), indent=2))


if __name__ == "__main__":
    main()
