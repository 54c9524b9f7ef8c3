"""What a bundle holds and what it costs on the wire, read from manifests and weight headers only."""

from __future__ import annotations

from pathlib import Path

from .bundle import GRAPHS, MANIFEST, TOKENIZER, WEIGHTS, BundleError, Manifest, read_manifest, readable

WIRE_BYTES = {"float32": 4, "float16": 2}


def _weights_size(path: Path) -> tuple[int, int]:
    from safetensors import safe_open

    params = 0
    readable(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            for k in f.keys():
                n = 1
                for d in f.get_slice(k).get_shape():
                    n *= d
                params += n
    except FileNotFoundError:
        raise BundleError(f"{path}: missing") from None
    except Exception as e:  # safetensors' own error types
        raise BundleError(f"{path}: unreadable weights ({e})") from None
    return params, path.stat().st_size


def _bundle_bytes(d: Path) -> int:
    """What split wrote: the manifest, weights, graphs and (edge) tokenizer, not an adapter `tune` put beside them."""
    files = [d / MANIFEST, d / WEIGHTS, *(p for sub in (GRAPHS, TOKENIZER) for p in (d / sub).rglob("*"))]
    return sum(p.stat().st_size for p in files if p.is_file())


def per_token_traffic(m: Manifest, wire_dtype: str = "float32") -> dict:
    """Tensor payload per decoded token: embedding up + `M A x` up per cut; `A x` down per cut + last hidden state."""
    b = WIRE_BYTES[wire_dtype]
    arch, plan = m.architecture, m.plan
    cut_values = sum(len(s.kind.out_cut.targets) * m.rank for s in plan.segments if s.kind.out_cut is not None)
    return {
        "bytes_up": (arch.hidden_size + cut_values) * b,
        "bytes_down": (cut_values + arch.hidden_size) * b,
        "round_trips": plan.round_trips_per_token,
        "wire_dtype": wire_dtype,
    }


def summarize(path: str | Path) -> dict:
    """Summary of a split output directory (cloud/ and edge/) or of one side's bundle."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"{path}: {'not a directory' if path.exists() else 'no such directory'}")
    sides = {}
    if (path / "manifest.json").is_file():
        m = read_manifest(path)
        sides[m.side] = (path, m)
    else:
        for side in ("cloud", "edge"):
            if (path / side).is_dir():
                sides[side] = (path / side, read_manifest(path / side, side=side))
    if not sides:
        raise BundleError(f"{path}: not a plcli bundle (no manifest.json, no cloud/ or edge/)")
    out: dict = {"path": str(path), "sides": {}}
    for side, (d, m) in sides.items():
        params, weight_bytes = _weights_size(d / WEIGHTS)
        out["sides"][side] = {
            "parameters": params, "weight_bytes": weight_bytes, "bundle_bytes": _bundle_bytes(d),
            "ab_fingerprint": m.ab_fingerprint, "source_hash": m.source_hash,
        }
    m = next(iter(sides.values()))[1]
    if len(sides) == 2:
        fps = {s["ab_fingerprint"] for s in out["sides"].values()}
        out["paired"] = len(fps) == 1
    arch = m.architecture
    out.update(
        family=arch.family, layers=arch.num_layers, hidden_size=arch.hidden_size, vocab_size=arch.vocab_size,
        rank=m.rank, targets=list(m.targets), dtype=m.dtype, format_version=m.format_version,
        per_token={dt: per_token_traffic(m, dt) for dt in WIRE_BYTES},
    )
    if "edge" in sides:
        out["generation"] = sides["edge"][1].generation
    return out
