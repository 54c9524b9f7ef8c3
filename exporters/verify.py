"""`plcli verify`: the split pipeline against transformers' own model with `B M A` merged.

The pipeline runs in one process (ONNX Runtime graphs, no network) with a
random non-zero M; the reference is the original checkpoint loaded by
transformers, each target weight W replaced by W + B M A. Compared: logits of
the prompt (prefill), then of several single-token steps through the KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from plcli.recipes.base import UnsupportedModel, family_for
from plcli.runtime.bundle import read_pair
from plcli.runtime.cloud import CloudModel
from plcli.runtime.edge import EdgeModel, forward
from plcli.runtime.errors import PlcliError

from .checkpoint import CheckpointError, CheckpointTensors, embedding_and_head, load_config

PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Return a list of the words in the string, using sep as the delimiter string.",
    "In the beginning",
)
TOLERANCE = 1e-4


class VerifyError(PlcliError):
    """Bad input to verify; the message is one line for the user."""


@dataclass
class Comparison:
    prompt: int
    phase: str  # "prefill" or "decode N"
    tokens: int
    max_abs_error: float
    rel_error: float
    same_argmax: bool

    @property
    def ok(self) -> bool:
        return self.rel_error < TOLERANCE and self.same_argmax


def random_adapter(edge: EdgeModel, seed: int) -> dict[str, np.ndarray]:
    """M with entries N(0, (0.5/sqrt(r))^2): with unit-gain A and B the adapter adds about half the input's RMS."""
    rng = np.random.default_rng(seed)
    r = edge.manifest.rank
    return {k: (rng.standard_normal((r, r)) * (0.5 / np.sqrt(r))).astype(np.float32) for k in edge.adapter_matrices()}


def merged_reference(model_dir: str | Path, cloud: CloudModel, m: dict[str, np.ndarray]):
    """transformers' model from the checkpoint with W += B M A on every target."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: a weight whose shape is not its config's
        raise CheckpointError(f"{model_dir}: transformers cannot load the checkpoint ({' '.join(str(e).split())})") from None
    model.eval()
    family = family_for(model.config)
    state = model.state_dict()
    r = cloud.manifest.rank
    with torch.no_grad():
        for layer in range(cloud.arch.num_layers):
            for cut in cloud.plan.cuts:
                a_stack = cloud.weights[f"layers.{layer}.A.{cut.stage}"]  # [in, n*r]
                for i, t in enumerate(cut.targets):
                    a = a_stack[:, i * r:(i + 1) * r].T  # [r, in]
                    b = cloud.weights[f"layers.{layer}.B.{t}"].T  # [out, r]
                    delta = b.astype(np.float64) @ m[f"layers.{layer}.{t}.M"].astype(np.float64) @ a.astype(np.float64)
                    state[family.hf_name(layer, f"{t}.w")] += torch.from_numpy(delta.astype(np.float32))
    return model


def verify(bundle_dir: str | Path, model_dir: str | Path, *, decode_steps: int = 4, seed: int = 0, zero_m: bool = False) -> list[Comparison]:
    import torch

    if decode_steps < 1:
        raise VerifyError(f"--decode-steps {decode_steps} is out of range: must be at least 1")
    if seed < 0:  # numpy seeds its generators with integers of 0 or more
        raise VerifyError(f"--seed {seed} is out of range: must be 0 or more")
    bundle_dir = Path(bundle_dir)
    read_pair(bundle_dir / "cloud", bundle_dir / "edge")
    cloud = CloudModel(bundle_dir / "cloud")
    edge = EdgeModel(bundle_dir / "edge")
    config = load_config(model_dir)
    try:
        family = family_for(config)
        reference_arch = family.architecture(config)
    except UnsupportedModel as e:
        raise CheckpointError(f"{model_dir}: {e}") from None
    # A damaged weight file in one line, before transformers loads the model; and whether the embeddings are tied,
    # which the checkpoint decides as much as the config (see embedding_and_head).
    tensors = CheckpointTensors(model_dir)
    embed, _ = embedding_and_head(tensors, family, reference_arch.tie_word_embeddings)
    reference_arch = replace(reference_arch, tie_word_embeddings=embed is None)
    if reference_arch != cloud.arch:
        raise CheckpointError(f"{model_dir}: not the checkpoint {bundle_dir} was split from (the architecture differs)")
    prompts = [np.asarray([_encode(edge, text, seed + p)], np.int64) for p, text in enumerate(PROMPTS)]
    longest, positions = max(ids.shape[1] for ids in prompts), cloud.arch.max_position_embeddings
    if decode_steps > positions - longest:
        raise VerifyError(f"--decode-steps {decode_steps} is out of range: at most {positions - longest} (the model's "
                          f"{positions} positions less the longest prompt's {longest} tokens)")
    m = {k: np.zeros_like(v) for k, v in edge.adapter_matrices().items()} if zero_m else random_adapter(edge, seed)
    edge.set_adapter(m)
    reference = merged_reference(model_dir, cloud, m)

    results = []
    for p, ids in enumerate(prompts):
        session = cloud.new_session()
        got = forward(edge, session, ids)
        with torch.no_grad():
            want = reference(torch.from_numpy(ids)).logits.numpy()
        results.append(_compare(p, "prefill", ids.shape[1], got, want))
        for step in range(decode_steps):
            nxt = np.asarray([[int(want[0, -1].argmax())]], np.int64)
            ids = np.concatenate([ids, nxt], axis=1)
            got = forward(edge, session, nxt)
            with torch.no_grad():
                want = reference(torch.from_numpy(ids)).logits.numpy()[:, -1:]
            results.append(_compare(p, f"decode {step + 1}", ids.shape[1], got, want))
    if not all(r.ok for r in results) and tensors.source_hash() != cloud.manifest.source_hash:
        # Another checkpoint of the same architecture: its logits differ, and that says nothing of the split. (The same
        # weights stored otherwise, in shards, say, hash differently and compare equal: those pass.)
        raise CheckpointError(f"{model_dir}: not the checkpoint {bundle_dir} was split from (its files and its logits "
                              "differ from the split's)")
    return results


def _encode(edge: EdgeModel, text: str, seed: int) -> list[int]:
    ids = edge.tokenizer(text)["input_ids"]
    if len(ids) >= 2 and max(ids) < edge.arch.vocab_size:
        return ids
    # A tokenizer that does not fit the embedding (random test checkpoints): random ids instead.
    return list(np.random.default_rng(seed).integers(0, edge.arch.vocab_size, size=8))


def _compare(prompt: int, phase: str, tokens: int, got: np.ndarray, want: np.ndarray) -> Comparison:
    err = float(np.abs(got - want).max())
    scale = float(np.abs(want).max()) or 1.0
    same = bool((got.argmax(-1) == want.argmax(-1)).all())
    return Comparison(prompt, phase, tokens, err, err / scale, same)
