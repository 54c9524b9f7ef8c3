"""The edge side: tokenizer, embedding, every M, and the LM head. Needs no torch.

The edge answers each cut's `A x` with `M A x` and turns the last hidden state
into logits. Its M matrices come from the bundle (zeros after a split) or from
an adapter directory written by `plcli tune`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .arch import edge_weight_shapes
from .bundle import GRAPHS, TOKENIZER, WEIGHTS, BundleError, Manifest, is_int, loads_json, read_manifest
from .ort import make_session, read_weights

ADAPTER_CONFIG = "adapter.json"
ADAPTER_WEIGHTS = "adapter.safetensors"


class EdgeModel:
    def __init__(self, bundle_dir: str | Path, *, adapter: str | Path | None = None, threads: int | None = None):
        self.dir = Path(bundle_dir)
        self.manifest: Manifest = read_manifest(self.dir, side="edge")
        self.arch = self.manifest.architecture
        self.plan = self.manifest.plan
        weights = read_weights(self.dir / WEIGHTS)
        r = self.manifest.rank
        m_shapes = {f"layers.{layer}.{t}.M": (r, r)
                    for layer in range(self.arch.num_layers) for t in self.manifest.targets}
        for name, shape in {**edge_weight_shapes(self.arch), **m_shapes}.items():
            if name not in weights or tuple(weights[name].shape) != shape or weights[name].dtype != np.float32:
                raise BundleError(f"{self.dir}: weight {name} missing or not float32 of shape {shape}")
        self.norm = weights["norm"]
        self.lm_head = weights["lm_head.w"]  # [hidden, vocab]
        self.embed_tokens = weights.get("embed_tokens")  # [vocab, hidden]; None when tied to the head
        # One call per token, between waits for the cloud: threads spinning through those waits would only take the
        # cores of whatever else runs here (a cloud on the same machine decoded a third slower). Asleep, they still
        # share the head's work.
        self.head = make_session(self.dir / GRAPHS / self.manifest.graphs["head"], threads=threads, spin=False,
                                 feeds={"hidden": None, "norm": self.norm.shape, "lm_head.w": self.lm_head.shape})
        self.set_adapter(self._bundle_m(weights) if adapter is None else load_adapter(adapter, self.manifest))
        self._tokenizer = None

    # -- M -----------------------------------------------------------------
    def _bundle_m(self, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v for k, v in weights.items() if k.endswith(".M")}

    def set_adapter(self, m: dict[str, np.ndarray]) -> None:
        """Install M matrices given as `layers.{l}.{target}.M` -> [rank, rank]."""
        r = self.manifest.rank
        stacked = {}
        for layer in range(self.arch.num_layers):
            for cut in self.plan.cuts:
                mats = []
                for t in cut.targets:
                    key = f"layers.{layer}.{t}.M"
                    if key not in m or tuple(m[key].shape) != (r, r):
                        raise BundleError(f"adapter lacks {key} of shape ({r}, {r})")
                    mats.append(np.asarray(m[key], np.float32))
                # Stored transposed so that `ax @ Mt` is `M (A x)` per target in one batched matmul.
                stacked[(layer, cut.stage)] = np.ascontiguousarray(np.stack(mats).transpose(0, 2, 1))
        self._m_t = stacked

    def adapter_matrices(self) -> dict[str, np.ndarray]:
        out = {}
        for (layer, stage), mt in self._m_t.items():
            cut = next(c for c in self.plan.cuts if c.stage == stage)
            for i, t in enumerate(cut.targets):
                out[f"layers.{layer}.{t}.M"] = np.ascontiguousarray(mt[i].T)
        return out

    def apply_adapter(self, layer: int, stage: str, ax: np.ndarray) -> np.ndarray:
        """`M A x` for every target of a cut: ax [batch, seq, targets, rank] -> same shape."""
        mt = self._m_t[(layer, stage)]
        return np.matmul(ax[..., None, :], mt)[..., 0, :]

    # -- embedding and head ------------------------------------------------
    def embed(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        if ids.ndim != 2:
            raise ValueError("token ids must be [batch, seq]")
        if ids.size and (ids.min() < 0 or ids.max() >= self.arch.vocab_size):
            raise ValueError(f"token id out of range 0..{self.arch.vocab_size - 1}")
        if self.embed_tokens is not None:
            return self.embed_tokens[ids]
        return np.ascontiguousarray(np.moveaxis(self.lm_head[:, ids], 0, -1))

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        return self.head.run(["logits"], {"hidden": hidden, "norm": self.norm, "lm_head.w": self.lm_head})[0]

    # -- text --------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.dir / TOKENIZER)
        return self._tokenizer

    @property
    def vocab_limit(self) -> int:
        """Ids below this are the ones to sample: both the tokenizer's and the embedding's (see generate.Sampler)."""
        return min(self.arch.vocab_size, len(self.tokenizer))

    @property
    def eos_token_ids(self) -> list[int]:
        """Where generation stops: the generation config's end-of-text ids, as transformers' `generate` reads them
        (split keeps them), and none without, where `generate` runs to its token limit too."""
        return list(self.manifest.generation.get("eos_token_id") or [])


def load_tokenizer(directory: Path, *, named: Path | None = None):
    """The tokenizer in `directory` as the edge loads it; a failure is a BundleError that names `named` (or the
    directory). `plcli split` loads the checkpoint's the same way, so that it never writes a bundle the edge cannot use."""
    from transformers import AutoTokenizer

    if not Path(directory).is_dir():  # transformers would take the path for a Hub repo id, and say so
        raise BundleError(f"{named or directory}: the tokenizer directory is missing")
    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as e:  # transformers and tokenizers raise whatever the files trip (KeyError, ValueError, ...)
        reason = " ".join(str(e).split())  # transformers' reasons run over several lines
        raise BundleError(f"{named or directory}: cannot load the tokenizer ({type(e).__name__}: {reason})") from None


def load_adapter(path: str | Path, manifest: Manifest) -> dict[str, np.ndarray]:
    """M matrices from an adapter directory, refused unless it belongs to this bundle's A/B."""
    path = Path(path)
    try:
        config = loads_json((path / ADAPTER_CONFIG).read_text())
    except FileNotFoundError:
        raise BundleError(f"{path}: not an adapter directory (no {ADAPTER_CONFIG})") from None
    except (OSError, ValueError) as e:
        raise BundleError(f"{path / ADAPTER_CONFIG}: unreadable ({e})") from None
    if not isinstance(config, dict):
        raise BundleError(f"{path / ADAPTER_CONFIG}: not a JSON object")
    if not isinstance(config.get("ab_fingerprint"), str):
        raise BundleError(f"{path / ADAPTER_CONFIG}: names no A/B fingerprint (ab_fingerprint), so it cannot be paired "
                          "with a bundle")
    if config.get("ab_fingerprint") != manifest.ab_fingerprint:
        raise BundleError(
            f"{path}: adapter belongs to A/B {config.get('ab_fingerprint')!r}, this bundle has {manifest.ab_fingerprint!r}"
        )
    targets = config.get("targets")
    if not (is_int(config.get("rank")) and config["rank"] == manifest.rank and isinstance(targets, list)
            and tuple(targets) == manifest.targets):
        raise BundleError(f"{path}: adapter rank/targets do not match the bundle")
    m = read_weights(path / ADAPTER_WEIGHTS)
    for name, value in m.items():  # a NaN would make every logit NaN, or every loss, far from its cause
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            raise BundleError(f"{path / ADAPTER_WEIGHTS}: {name} holds values that are not finite (NaN or infinite)")
    return m


def forward(edge: EdgeModel, session, ids: np.ndarray, *, last: bool = False) -> np.ndarray:
    """One step through the split: embed `ids`, answer every cut, return logits for every position.

    `session` is anything with `start(embeds)` and `resume(madx)`: a local
    CloudSession or a remote one behind the wire protocol. With `last`, only
    the last position's logits ([batch, 1, vocab]): all that sampling needs,
    and a prompt's worth of LM head less on the edge.
    """
    out = session.start(edge.embed(ids))
    while not out.done:
        out = session.resume(edge.apply_adapter(out.layer, out.stage, out.ax))
    return edge.logits(np.ascontiguousarray(out.hidden[:, -1:]) if last else out.hidden)
