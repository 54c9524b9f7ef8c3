"""Shared fixtures: small random checkpoints of each family and their split bundles.

Exported graphs are cached for the whole test session (graphs depend on shapes,
not weights), so many splits of the same shape cost one export.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

_SESSION_CACHE = tempfile.mkdtemp(prefix="plcli-test-cache-")
atexit.register(shutil.rmtree, _SESSION_CACHE, ignore_errors=True)  # a run leaves nothing behind, pass or fail
os.environ["PLCLI_CACHE"] = _SESSION_CACHE
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """make(name, family, **config_overrides) -> checkpoint dir, built once per name."""
    from plcli.recipes.checkpoints import make_random_checkpoint

    made: dict[str, Path] = {}

    def make(name: str, family: str = "llama", **overrides) -> Path:
        if name not in made:
            made[name] = make_random_checkpoint(tmp_path_factory.mktemp(f"ckpt-{name}"), family, **overrides)
        return made[name]

    return make


@pytest.fixture(scope="session")
def bundle_factory(tmp_path_factory):
    """split(checkpoint_dir, **split_options) -> split output dir, built once per (checkpoint, options)."""
    from plcli.exporters.split import split_checkpoint

    made: dict[tuple, Path] = {}

    def split(model_dir: Path, **options) -> Path:
        key = (str(model_dir), tuple(sorted((k, str(v)) for k, v in options.items())))
        if key not in made:
            out = tmp_path_factory.mktemp("bundle") / "out"
            split_checkpoint(model_dir, out, **options)
            made[key] = out
        return made[key]

    return split


@pytest.fixture(scope="session")
def llama_checkpoint(checkpoint_factory):
    """The default small Llama: GQA (4 heads / 2 kv heads), untied embeddings."""
    return checkpoint_factory("llama")


@pytest.fixture(scope="session")
def llama_bundle(bundle_factory, llama_checkpoint):
    return bundle_factory(llama_checkpoint, rank=8)
