"""Tracing the decoder's segment kinds and the edge head into ONNX graphs.

Graphs take weights as inputs, so a graph depends only on the architecture's
shapes and constants, never on weight values: an exported graph is cached
under a key of everything that shapes it (and the exporter's own source), and
re-splitting a checkpoint of the same shape reuses it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from plcli.runtime import arch as arch_module
from plcli.runtime import decoder
from plcli.runtime import plan as plan_module
from plcli.runtime.arch import Architecture, layer_weight_shapes, projection_name, projection_widths
from plcli.runtime.bundle import cache_root, reported_writes
from plcli.runtime.plan import Cut, SegmentKind, SplitPlan

OPSET = 18
# Sample sizes for tracing; every one is >= 2 so that no axis specialises to 1.
_BATCH, _SEQ, _PAST = 2, 3, 4


def cache_dir() -> Path:
    return cache_root() / "graphs"


def _code_version() -> str:
    """What a graph is made by besides its key: the modules that trace it and name its inputs (arch.py and plan.py
    name and order them, and the runtime feeds them by those names), and the exporter's packages."""
    import onnx
    import onnxscript

    h = hashlib.sha256(" ".join(m.__version__ for m in (torch, onnx, onnxscript)).encode())
    for source in (decoder.__file__, arch_module.__file__, plan_module.__file__, __file__):
        h.update(Path(source).read_bytes())
    return h.hexdigest()[:16]


def _sample(arch: Architecture, name: str, kind: SegmentKind, rank: int) -> torch.Tensor:
    b, s, p = _BATCH, _SEQ, _PAST
    kv = (b, arch.num_kv_heads, p, arch.head_dim)
    if name in ("inputs_embeds", "resid"):
        return torch.randn(b, s, arch.hidden_size)
    if name == "xw":
        return torch.randn(b, s, sum(projection_widths(arch, kind.in_cut.stage)))
    if name == "madx":
        return torch.randn(b, s, len(kind.in_cut.targets), rank)
    if name == "position_ids":
        return torch.arange(p, p + s).expand(b, s).contiguous()
    if name == "attention_mask":
        return torch.ones(b, s, dtype=torch.int64)
    if name == "past_length":
        return torch.full((b,), p - 1, dtype=torch.int64)
    if name == "window":
        return torch.tensor(1 << 62, dtype=torch.int64)
    if name in ("past_key", "past_value"):
        return torch.randn(*kv)
    if name == "hidden":
        return torch.randn(b, s, arch.hidden_size)
    raise KeyError(name)


def _dynamic(name: str):
    from torch.export import Dim

    batch, seq = Dim("batch", min=1, max=1 << 16), Dim("seq", min=1, max=1 << 20)
    past = Dim("past", min=0, max=1 << 20)
    return {
        "inputs_embeds": {0: batch, 1: seq}, "resid": {0: batch, 1: seq}, "x": {0: batch, 1: seq},
        "xw": {0: batch, 1: seq}, "madx": {0: batch, 1: seq}, "position_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: seq}, "past_length": {0: batch}, "window": {}, "past_key": {0: batch, 2: past},
        "past_value": {0: batch, 2: past}, "hidden": {0: batch, 1: seq},
    }[name]


def _export(module: torch.nn.Module, inputs: list[torch.Tensor], weights: list[torch.Tensor], path: Path) -> None:
    names = module.input_names + module.weight_names
    dynamic = tuple([_dynamic(n) for n in module.input_names] + [{} for _ in module.weight_names])
    module.eval()
    # The exporter narrates every stage and warns about unused axis names; none of it is for our user.
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logger.setLevel(logging.ERROR)
        try:
            program = torch.onnx.export(
                module, tuple(inputs + weights), input_names=names, output_names=module.output_names,
                dynamic_shapes=(dynamic,), dynamo=True, opset_version=OPSET, verbose=False,
            )
        finally:
            logger.setLevel(level)
    tmp = path.with_suffix(".tmp")
    program.save(str(tmp))
    os.replace(tmp, path)


def _cached_export(key: dict, build, path: Path) -> None:
    digest = hashlib.sha256(json.dumps({**key, "code": _code_version()}, sort_keys=True).encode()).hexdigest()[:32]
    cached = cache_dir() / f"{digest}.onnx"
    recorded = cached.with_suffix(".sha256")  # the graph's own hash, written after it: a damaged copy is made again
    if not (cached.is_file() and recorded.is_file() and recorded.read_text() == _file_hash(cached)):
        # Named as the cache: a full disk there is no fault of the output's (a copy's error names its source).
        with reported_writes(f"cannot write to plcli's graph cache {cache_dir()} (set PLCLI_CACHE to move it)"):
            cached.parent.mkdir(parents=True, exist_ok=True)
            build(cached)
            tmp = recorded.with_suffix(".sha256.tmp")
            tmp.write_text(_file_hash(cached))
            os.replace(tmp, recorded)
    shutil.copyfile(cached, path)


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export_segment_kind(arch: Architecture, kind: SegmentKind, rank: int, inv_freq: torch.Tensor, path: Path) -> None:
    def build(dest: Path):
        module = decoder.SegmentModule(arch, kind, rank, inv_freq)
        plan_cuts = [c for c in (kind.in_cut, kind.out_cut) if c is not None]
        shapes = layer_weight_shapes(arch, rank, plan_cuts)
        inputs = [_sample(arch, n, kind, rank) for n in module.input_names]
        weights = [torch.randn(*shapes[n.split(".", 1)[1]]) * 0.02 for n in module.weight_names]
        _export(module, inputs, weights, dest)

    key = {"what": "segment", "arch": _shape_key(arch), "kind": asdict(kind), "rank": rank,
           "inv_freq": inv_freq.to(torch.float32).numpy().tobytes().hex()}
    _cached_export(key, build, path)


def export_projection(arch: Architecture, cut: Cut, rank: int, path: Path) -> None:
    def build(dest: Path):
        module = decoder.ProjectionModule(arch, cut.stage)
        shapes = layer_weight_shapes(arch, rank, [cut])
        x = torch.randn(_BATCH, _SEQ, arch.target_dims(cut.targets[0])[0])
        weights = [torch.randn(*shapes[n.split(".", 1)[1]]) * 0.02 for n in module.weight_names]
        _export(module, [x], weights, dest)

    _cached_export({"what": "projection", "arch": _shape_key(arch), "stage": cut.stage}, build, path)


def export_head(arch: Architecture, path: Path) -> None:
    def build(dest: Path):
        module = decoder.HeadModule(arch)
        hidden = torch.randn(_BATCH, _SEQ, arch.hidden_size)
        weights = [torch.ones(arch.hidden_size), torch.randn(arch.hidden_size, arch.vocab_size) * 0.02]
        _export(module, [hidden], weights, dest)

    _cached_export({"what": "head", "arch": _shape_key(arch)}, build, path)


def _shape_key(arch: Architecture) -> dict:
    # Layer count, windows and context length are runtime inputs, not graph structure.
    d = asdict(arch)
    for k in ("num_layers", "sliding_windows", "max_position_embeddings", "family", "tie_word_embeddings"):
        d.pop(k)
    return d


def export_all(arch: Architecture, plan: SplitPlan, rank: int, inv_freq: torch.Tensor, cloud_graphs: Path, edge_graphs: Path, progress=None) -> tuple[dict, dict]:
    """Write every kind's graph, each cut's projection graph and the head graph; return (cloud, edge) name -> file maps.

    `progress(done)` counts graphs up to `graph_count(plan)`.
    """
    cloud_graphs.mkdir(parents=True, exist_ok=True)
    edge_graphs.mkdir(parents=True, exist_ok=True)
    exports = [(kind.name, lambda path, kind=kind: export_segment_kind(arch, kind, rank, inv_freq, path))
               for kind in plan.kinds.values()]
    exports += [(projection_name(cut.stage), lambda path, cut=cut: export_projection(arch, cut, rank, path))
                for cut in plan.cuts]
    cloud = {}
    for done, (name, export) in enumerate(exports, 1):
        cloud[name] = f"{name}.onnx"
        export(cloud_graphs / cloud[name])
        if progress:
            progress(done)
    export_head(arch, edge_graphs / "head.onnx")
    if progress:
        progress(len(exports) + 1)
    return cloud, {"head": "head.onnx"}


def graph_count(plan: SplitPlan) -> int:
    return len(plan.kinds) + len(plan.cuts) + 1
