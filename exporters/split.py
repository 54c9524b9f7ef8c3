"""`plcli split`: a Hugging Face checkpoint -> a cloud bundle and an edge bundle.

Cloud: every decoder layer's weights plus the frozen random A and B of each
adapted projection. Edge: tokenizer, embedding, final norm, LM head and every M
(zeros, as in the paper). A and B are drawn so that each preserves the
root-mean-square of its input in expectation (A ~ N(0, 1/d_in), B ~ N(0, 1/r)):
the adapter path `B M A x` then has unit gain, and M alone sets its scale.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
from safetensors.numpy import save_file

from plcli.recipes.base import UnsupportedModel, family_for, rope_frequencies
from plcli.runtime.arch import layer_weight_shapes
from plcli.runtime.errors import PlcliError
from plcli.runtime.bundle import (GRAPHS, MANIFEST, SPLIT_LAYOUT, TOKENIZER, WEIGHTS, BundleError, Manifest,
                                 atomic_directory, check_target, fingerprint, is_int, is_number, loads_json,
                                 refuse_overlap, reported_writes)
from plcli.runtime.edge import load_tokenizer
from plcli.runtime.plan import ALL_TARGETS, DEFAULT_TARGETS, SplitPlan, normalize_targets

from .checkpoint import CheckpointError, CheckpointTensors, embedding_and_head, load_config, tokenizer_files
from .graphs import export_all, graph_count

Progress = Callable[[str, int, int], None]  # (phase, done, total)


class SplitError(PlcliError):
    """Bad input to split; the message is one line for the user."""


@dataclass
class SplitResult:
    cloud: Manifest
    edge: Manifest
    seconds: float


def draw_adapter_pair(seed: int, layer: int, target: str, d_in: int, d_out: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Frozen A (rank x d_in) and B (d_out x rank) of one projection, reproducible from (seed, layer, target)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, layer, ALL_TARGETS.index(target)]))
    a = rng.standard_normal((rank, d_in), dtype=np.float32) / np.float32(np.sqrt(d_in))
    b = rng.standard_normal((d_out, rank), dtype=np.float32) / np.float32(np.sqrt(rank))
    return a, b


def split_checkpoint(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    rank: int = 64,
    targets=DEFAULT_TARGETS,
    seed: int = 0,
    force: bool = False,
    progress: Progress | None = None,
) -> SplitResult:
    started = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    try:
        targets = normalize_targets(targets)
    except ValueError as e:
        raise SplitError(f"--targets: {e}") from None
    try:
        config = load_config(model_dir)
        family = family_for(config)
        arch = family.architecture(config)
    except (CheckpointError, UnsupportedModel) as e:
        raise SplitError(str(e)) from None
    if seed < 0:
        raise SplitError(f"--seed {seed} is out of range: must be 0 or more")
    if not 1 <= rank <= arch.hidden_size // 2:
        raise SplitError(f"--rank {rank} is out of range: use 1 to {arch.hidden_size // 2} (half the hidden size {arch.hidden_size})")
    refuse_overlap(out_dir, [("the checkpoint", model_dir)])  # with --force, replacing OUT_DIR would delete it
    check_target(out_dir, replace=force, layout=SPLIT_LAYOUT)
    tok_files = tokenizer_files(model_dir)
    if not tok_files:
        raise SplitError(f"{model_dir}: no tokenizer files (the edge bundle needs the tokenizer)")
    _check_tokenizer(model_dir, tok_files)
    generation = _generation_defaults(model_dir)
    try:
        tensors = CheckpointTensors(model_dir)
        source_hash = tensors.source_hash()
    except CheckpointError as e:
        raise SplitError(str(e)) from None

    plan = SplitPlan(arch.num_layers, targets)
    inv_freq, _ = rope_frequencies(config)
    notify = progress or (lambda *_: None)

    with atomic_directory(out_dir, replace=force, layout=SPLIT_LAYOUT) as tmp:
        cloud_dir, edge_dir = tmp / "cloud", tmp / "edge"
        cloud_dir.mkdir()
        edge_dir.mkdir()
        cloud_w: dict[str, np.ndarray] = {}
        edge_w: dict[str, np.ndarray] = {}
        shapes = layer_weight_shapes(arch, rank, plan.cuts)
        for layer in range(arch.num_layers):
            for name, shape in shapes.items():
                if name.startswith(("A.", "B.")):
                    continue
                w = tensors.get(family.hf_name(layer, name))
                cloud_w[f"layers.{layer}.{name}"] = _checked(np.ascontiguousarray(w.T if name.endswith(".w") else w), shape, name)
            for cut in plan.cuts:
                a_rows = []
                for t in cut.targets:
                    d_in, d_out = arch.target_dims(t)
                    a, b = draw_adapter_pair(seed, layer, t, d_in, d_out, rank)
                    a_rows.append(a)
                    cloud_w[f"layers.{layer}.B.{t}"] = np.ascontiguousarray(b.T)
                    edge_w[f"layers.{layer}.{t}.M"] = np.zeros((rank, rank), np.float32)
                # Stacked so that one matmul gives the whole cut's `A x`, laid out target by target.
                cloud_w[f"layers.{layer}.A.{cut.stage}"] = np.ascontiguousarray(np.concatenate(a_rows, 0).T)
            notify("layers", layer + 1, arch.num_layers)

        embed, lm_head = embedding_and_head(tensors, family, arch.tie_word_embeddings)
        arch = replace(arch, tie_word_embeddings=embed is None)
        if embed is not None:
            edge_w["embed_tokens"] = _checked(embed, (arch.vocab_size, arch.hidden_size), "embed_tokens")
        edge_w["lm_head.w"] = _checked(np.ascontiguousarray(lm_head.T), (arch.hidden_size, arch.vocab_size), "lm_head")
        edge_w["norm"] = _checked(tensors.get(family.final_norm), (arch.hidden_size,), "norm")

        ab = {k: v for k, v in cloud_w.items() if ".A." in k or ".B." in k}
        # Bound to the checkpoint too: another checkpoint of this shape, split with this seed, draws these A and B,
        # and its edge (embedding, head, M) must not run on this cloud's layers.
        ab_fp = fingerprint(ab, source=source_hash)
        with reported_writes(f"cannot write {out_dir}", SplitError):
            cloud_graphs, edge_graphs = export_all(
                arch, plan, rank, inv_freq, cloud_dir / GRAPHS, edge_dir / GRAPHS,
                progress=lambda done: notify("graphs", done, graph_count(plan)),
            )
        common = dict(architecture=arch, rank=rank, targets=targets, dtype="float32", ab_fingerprint=ab_fp,
                      source_hash=source_hash, seed=seed)
        cloud = Manifest(side="cloud", graphs=cloud_graphs, **common)
        edge = Manifest(side="edge", graphs=edge_graphs, generation=generation, **common)

        with reported_writes(f"cannot write {out_dir}", SplitError):
            save_file(cloud_w, str(cloud_dir / WEIGHTS), metadata={"format": "plcli-cloud"})
            save_file(edge_w, str(edge_dir / WEIGHTS), metadata={"format": "plcli-edge"})
            (cloud_dir / MANIFEST).write_text(cloud.to_json())
            (edge_dir / MANIFEST).write_text(edge.to_json())
            (edge_dir / TOKENIZER).mkdir()
            for f in tok_files:
                shutil.copyfile(f, edge_dir / TOKENIZER / f.name)
    return SplitResult(cloud, edge, time.perf_counter() - started)


def _check_tokenizer(model_dir: Path, files: list[Path]) -> None:
    """Refuse a tokenizer the edge could not load, trying exactly the files the edge bundle would get, alone in a
    folder: beside config.json, transformers can load some tokenizers that it cannot load without it."""
    with tempfile.TemporaryDirectory(prefix="plcli-tokenizer-") as tmp:
        with reported_writes(f"cannot copy the tokenizer to the temporary directory {tmp} to check it", SplitError):
            for f in files:
                shutil.copyfile(f, Path(tmp) / f.name)
        try:
            load_tokenizer(Path(tmp), named=model_dir)
        except BundleError as e:
            raise SplitError(f"{e}: the edge could not use it") from None


def _checked(w: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
    if tuple(w.shape) != tuple(shape):
        raise SplitError(f"weight {name} has shape {tuple(w.shape)}, the config implies {tuple(shape)}")
    return w


# What run-edge applies of a checkpoint's generation config (see generate.Sampling.checkpoint_defaults), with what
# it can use of each (generate.Sampling.validate, EdgeModel.eos_token_ids).
APPLIED_GENERATION = {
    "bos_token_id": ("a token id", is_int),  # any integer, as in transformers: Hub checkpoints store pad_token_id -1
    "eos_token_id": ("a token id or a list of them", lambda v: is_int(v) or (type(v) is list and all(map(is_int, v)))),
    "pad_token_id": ("a token id", is_int),
    "do_sample": ("true or false", lambda v: type(v) is bool),
    "temperature": ("a number >= 0", lambda v: is_number(v) and v >= 0),
    "top_k": ("an integer >= 0", lambda v: type(v) is int and v >= 0),
    "top_p": ("a number in (0, 1]", lambda v: is_number(v) and 0 < v <= 1),
    "repetition_penalty": ("a positive number", lambda v: is_number(v) and v > 0),
}
# Settings that change which token `generate` picks and that plcli does not apply, with the values that change
# nothing (transformers' defaults). A checkpoint that sets one is split all the same, with a note in the bundle.
UNAPPLIED_GENERATION = {
    "num_beams": (None, 1), "num_beam_groups": (None, 1), "penalty_alpha": (None,), "dola_layers": (None,),
    "no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,), "sequence_bias": (None,), "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,), "forced_bos_token_id": (None,), "forced_eos_token_id": (None,),
    "min_length": (None, 0), "min_new_tokens": (None, 0), "exponential_decay_length_penalty": (None,),
    "guidance_scale": (None, 1), "min_p": (None,), "top_h": (None,), "typical_p": (None, 1), "epsilon_cutoff": (None, 0),
    "eta_cutoff": (None, 0),
}


def _generation_defaults(model_dir: Path) -> dict:
    """Special token ids and generation settings, from generation_config.json or, without one, the config.

    As transformers reads them: a model loaded with a generation_config.json takes every setting from it alone
    (an eos_token_id only in config.json then stops nothing), and one without takes them from config.json.
    `unapplied` lists the settings there that would change `generate`'s tokens and that plcli does not apply.
    Read before the export, so that a damaged file is refused before minutes of work rather than after.
    """
    import json

    p = model_dir / "generation_config.json"
    if not p.is_file():
        p = model_dir / "config.json"
    try:
        values = loads_json(p.read_text())
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise SplitError(f"{p}: unreadable generation config ({e})") from None
    if not isinstance(values, dict):
        raise SplitError(f"{p}: not a generation config (a JSON object)")
    settings = {k: v for k, v in values.items() if v is not None}
    for k, (expected, ok) in APPLIED_GENERATION.items():
        if k in settings and not ok(settings[k]):
            raise SplitError(f"{p}: {k} is {json.dumps(settings[k])}: must be {expected}")
    gen = {k: settings[k] for k in APPLIED_GENERATION if k in settings}
    unapplied = {k: settings[k] for k, neutral in UNAPPLIED_GENERATION.items() if settings.get(k) not in neutral}
    if isinstance(gen.get("eos_token_id"), int):
        gen["eos_token_id"] = [gen["eos_token_id"]]
    if unapplied:
        gen["unapplied"] = unapplied
    return gen
