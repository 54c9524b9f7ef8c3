"""The on-disk bundle format, shared by the exporter (writes) and the runtime (reads).

A bundle is a directory with `manifest.json`, weights in `weights.safetensors`
and ONNX graphs under `graphs/`. Linear weights are stored as [in, out] so the
graphs compute `x @ W` without transposing a weight on every call.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import socket
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from .arch import Architecture, projection_name
from .errors import PlcliError
from .plan import SplitPlan, normalize_targets

# 2: the cloud bundle has a projection graph per cut (see arch.projection_name).
# 3: attention graphs read preallocated KV caches and return only the new keys and values (see arch.kind_io).
FORMAT_VERSION = 3
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
GRAPHS = "graphs"
TOKENIZER = "tokenizer"  # edge: the checkpoint's tokenizer files
# What `plcli split` writes into OUT_DIR, and all it may replace there (an adapter tuned into EDGE_DIR/adapter is not).
SPLIT_LAYOUT = {"cloud": {MANIFEST: None, WEIGHTS: None, GRAPHS: None},
                "edge": {MANIFEST: None, WEIGHTS: None, GRAPHS: None, TOKENIZER: None}}


def cache_root() -> Path:
    """Where plcli caches exported graphs and demo bundles: $PLCLI_CACHE, else ~/.cache/plcli."""
    root = os.environ.get("PLCLI_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "plcli")
    return Path(root)


class BundleError(PlcliError):
    """A bundle or adapter that cannot be used; the message is meant for the user."""


@dataclass(frozen=True)
class Manifest:
    side: str  # "cloud" or "edge"
    architecture: Architecture
    rank: int
    targets: tuple[str, ...]
    dtype: str
    ab_fingerprint: str  # sha256 of the cloud's A and B: pairs an edge (and its M) with one cloud
    source_hash: str  # sha256 of the source checkpoint's config and weights
    graphs: dict[str, str]  # kind name -> file under graphs/
    seed: int
    generation: dict = field(default_factory=dict)  # edge: eos/bos/pad ids and defaults
    format_version: int = FORMAT_VERSION

    @property
    def plan(self) -> SplitPlan:
        return SplitPlan(self.architecture.num_layers, self.targets)

    @property
    def graph_names(self) -> set[str]:
        """The graphs this side runs: every segment kind and each cut's projection (cloud), or the head (edge)."""
        if self.side == "edge":
            return {"head"}
        return set(self.plan.kinds) | {projection_name(c.stage) for c in self.plan.cuts}

    def to_json(self) -> str:
        d = asdict(self)
        d["targets"] = list(self.targets)
        d["architecture"]["sliding_windows"] = list(self.architecture.sliding_windows)
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        """A manifest from its JSON, every field checked: a wrong type or value is a ValueError that names the field.

        Unchecked, a `"rank": "64"` or a `"graphs": {}` loads and fails later, deep inside the runtime.
        """
        d = dict(_fields_of(cls, d, "the manifest"))
        for name, ok, rule in (
            ("side", d["side"] in SIDES, "'cloud' or 'edge'"),
            ("rank", is_int(d["rank"]) and d["rank"] >= 1, "a positive integer"),
            ("targets", isinstance(d["targets"], list) and all(isinstance(t, str) for t in d["targets"]),
             "a list of projection names"),
            ("dtype", d["dtype"] in DTYPES, " or ".join(map(repr, DTYPES))),
            ("ab_fingerprint", isinstance(d["ab_fingerprint"], str), "a string"),
            ("source_hash", isinstance(d["source_hash"], str), "a string"),
            ("graphs", isinstance(d["graphs"], dict) and all(isinstance(v, str) and _is_file_name(v)
                                                             for v in d["graphs"].values()),
             f"an object of graph names to file names under {GRAPHS}/"),
            ("seed", is_int(d["seed"]) and d["seed"] >= 0, "an integer of 0 or more"),
            ("generation", isinstance(d["generation"], dict), "an object"),
        ):
            if not ok:
                raise ValueError(f"{name} must be {rule}, not {json.dumps(d[name])}")
        for name, ok, rule in GENERATION_FIELDS:
            if name in d["generation"] and not ok(d["generation"][name]):
                raise ValueError(f"generation.{name} must be {rule}, not {json.dumps(d['generation'][name])}")
        d["architecture"] = _architecture(d["architecture"])
        d["targets"] = normalize_targets(d["targets"])
        manifest = cls(**d)
        lacking = manifest.graph_names - set(manifest.graphs)
        if lacking:
            raise ValueError(f"graphs names no file for {', '.join(sorted(lacking))}")
        return manifest


def is_int(v) -> bool:
    """A JSON integer: Python's bools are ints too, but `true` is no rank or step count."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return (is_int(v) or isinstance(v, float)) and math.isfinite(v)


SIDES = ("cloud", "edge")
DTYPES = ("float32",)  # what split writes and the graphs compute in
# The generation settings the edge reads (see split.APPLIED_GENERATION), as split writes them. Any integer is an id
# here as there: Hub checkpoints do store pad_token_id -1, and transformers only warns.
GENERATION_FIELDS = (
    ("eos_token_id", lambda v: isinstance(v, list) and all(map(is_int, v)), "a list of token ids"),
    ("bos_token_id", is_int, "a token id"),
    ("pad_token_id", is_int, "a token id"),
    ("do_sample", lambda v: isinstance(v, bool), "true or false"),
    ("temperature", lambda v: is_number(v), "a number"),
    ("top_k", lambda v: is_int(v), "an integer"),
    ("top_p", lambda v: is_number(v), "a number"),
    ("repetition_penalty", lambda v: is_number(v), "a number"),
    ("unapplied", lambda v: isinstance(v, dict), "an object"),
)


def _fields_of(cls, d, what: str) -> dict:
    """`d` if it is a JSON object with every field of the dataclass `cls` that has no default, and no others."""
    if not isinstance(d, dict):
        raise ValueError(f"{what} is not a JSON object")
    known = {f.name for f in fields(cls)}
    required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
    for names, problem in ((required - d.keys(), "lacks"), (d.keys() - known, "has unknown fields")):
        if names:
            raise ValueError(f"{what} {problem} {', '.join(sorted(names))}")
    return d


# What each type of Architecture field must hold; every size and scale in it is positive.
_ARCHITECTURE_TYPES = {
    "str": (lambda v: isinstance(v, str) and v != "", "a string"),
    "int": (lambda v: is_int(v) and v >= 1, "a positive integer"),
    "float": (lambda v: is_number(v) and v > 0, "a positive number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
}


def _architecture(d) -> Architecture:
    d = _fields_of(Architecture, d, "architecture")
    for f in fields(Architecture):
        if f.name == "sliding_windows":
            continue
        ok, rule = _ARCHITECTURE_TYPES[f.type]
        if not ok(d[f.name]):
            raise ValueError(f"architecture.{f.name} must be {rule}, not {json.dumps(d[f.name])}")
    windows = d["sliding_windows"]
    if not (isinstance(windows, list) and len(windows) == d["num_layers"]
            and all(w is None or (is_int(w) and w >= 1) for w in windows)):
        raise ValueError(f"architecture.sliding_windows must be a list of num_layers ({d['num_layers']}) windows, "
                         f"each a positive integer or null, not {json.dumps(windows)}")
    return Architecture.from_dict(d)


def _is_file_name(name: str) -> bool:
    # A graph file lives in graphs/: a path that leads elsewhere is no bundle's.
    return name not in ("", ".", "..") and Path(name).name == name


def read_pair(cloud_dir: str | Path, edge_dir: str | Path) -> tuple[Manifest, Manifest]:
    """The manifests of a cloud and an edge bundle, refused unless they were split together: an M is of no use with
    other A and B, and an edge's embedding and head with another checkpoint's layers."""
    cloud, edge = read_manifest(cloud_dir, side="cloud"), read_manifest(edge_dir, side="edge")
    if cloud.ab_fingerprint != edge.ab_fingerprint:
        raise BundleError(f"{cloud_dir} and {edge_dir} were not split together (A/B fingerprints differ)")
    return cloud, edge


def read_manifest(bundle_dir: str | Path, side: str | None = None) -> Manifest:
    path = Path(bundle_dir) / MANIFEST
    if not Path(bundle_dir).is_dir():
        raise BundleError(f"{bundle_dir}: no such bundle directory")
    try:
        raw = loads_json(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{bundle_dir}: not a plcli bundle (no {MANIFEST})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(raw, dict):
        raise BundleError(f"{path}: malformed manifest (not a JSON object)")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format version {version!r}, this plcli reads version {FORMAT_VERSION}: "
                          f"split the checkpoint again with this plcli")
    try:
        manifest = Manifest.from_dict(raw)
    except (TypeError, KeyError, ValueError) as e:
        raise BundleError(f"{path}: malformed manifest ({e})") from None
    if side is not None and manifest.side != side:
        raise BundleError(f"{bundle_dir}: this is the {manifest.side} bundle, expected the {side} bundle")
    for name in sorted(manifest.graph_names):
        if not (Path(bundle_dir) / GRAPHS / manifest.graphs[name]).is_file():
            raise BundleError(f"{bundle_dir}: graph {name} ({GRAPHS}/{manifest.graphs[name]}) is missing")
    return manifest


def loads_json(text: str):
    """json.loads, where a document nested past Python's recursion limit (json nests on Python's stack) is the
    JSONDecodeError it is to a reader, not a RecursionError that every caller would have to catch too."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("JSON nested too deeply", text, 0) from None


def readable(path: str | Path) -> None:
    """Raise BundleError for a file that is missing or that this user cannot open. safetensors and ONNX Runtime
    word a file they may not read as missing, or as a damaged graph that a new split would mend."""
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise BundleError(f"{path}: missing") from None
    except OSError as e:
        raise BundleError(f"{path}: cannot read it ({e.strerror or e})") from None


def fingerprint(tensors: dict[str, np.ndarray], *, source: str = "") -> str:
    """sha256 over `source` (a checkpoint's hash, when given), then names, dtypes, shapes and bytes in sorted name order.

    A and B are drawn from the seed and the shapes alone, so two checkpoints of one shape split with one seed get the
    same A and B; `split` passes its checkpoint's hash, so that their halves still pair only with each other.
    """
    h = hashlib.sha256()
    if source:
        h.update(f"source|{source}|".encode())
    for name in sorted(tensors):
        t = np.ascontiguousarray(tensors[name])
        h.update(f"{name}|{t.dtype.str}|{t.shape}|".encode())
        h.update(t.tobytes())
    return "sha256:" + h.hexdigest()


def hash_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return "sha256:" + h.hexdigest()


@contextmanager
def reported_writes(message: str, error: type[PlcliError] = BundleError):
    """Turn a write that fails in the block (a full disk, a file size limit) into `error`: one line, MESSAGE: REASON."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as e:
        raise error(f"{message}: {_write_failure(e)}") from None


def _write_failure(e: Exception) -> str:
    if isinstance(e, OSError):
        return e.strerror or str(e)
    # safetensors words the OS's reason as "Error while serializing: I/O error: No space left on device (os error 28)".
    found = re.search(r"I/O error: (.+?) \(os error \d+\)", str(e))
    return found.group(1) if found else str(e)


def restore_interrupted(final: Path) -> None:
    """Put back what a replacement killed between its two renames (SIGKILL, a power cut) left beside `final`.

    `atomic_directory` moves the old `final` aside to `.NAME.old-PID` before it
    renames the new one into place. A process killed in between leaves no
    `final` and the only good copy hidden under that name; any error or Ctrl-C
    there is rolled back by the process itself. Here, with `final` missing:
    one such copy is renamed back to `final`, so the result is where the user
    left it, and several are refused (which one is newest cannot be told).
    With `final` present, they are older copies the killed process was about
    to delete, and are deleted. So are the temporary directories of writers of
    `final` on this host that were killed mid-write (their process is gone);
    a live writer's, and other hosts' on a shared filesystem, are left alone.
    """
    final = Path(final)
    _remove_dead_partials(final)
    left = sorted(final.parent.glob(f".{glob.escape(final.name)}.old-*"))
    if not left:
        return
    if final.exists():
        for old in left:
            _remove(old)
    elif len(left) == 1:
        os.rename(left[0], final)
    else:
        raise BundleError(f"{final} is missing and interrupted replacements left {len(left)} earlier copies "
                          f"({', '.join(p.name for p in left)}): rename the one to keep to {final.name}")


def _partial_prefix(final: Path, pid: int | None = None) -> str:
    """How the temporary directories of writers of `final` on this host start: the writer's pid follows, so that a
    later write can tell a dead writer's leftovers from a live one's."""
    host = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]  # a host name could make the name too long
    return f".{final.name}.partial-{host}-" + ("" if pid is None else f"{pid}-")


def _remove_dead_partials(final: Path) -> None:
    prefix = _partial_prefix(final)
    for path in final.parent.glob(glob.escape(prefix) + "*"):
        pid = path.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            _remove(path)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists but is not ours (EPERM), or the answer is unclear: keep what it may be writing
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_directory(final: Path, *, replace: bool, layout: dict | None = None):
    """Yield a temporary directory beside `final`; move it into place only if the block succeeds.

    A half-written result never replaces a good one: on any error the temporary
    directory is removed and `final` is untouched. Replacing renames the old
    `final` aside, the new one into place, then deletes the old; an error or
    Ctrl-C between the two renames puts the old one back. What a process
    killed there leaves is put back by the next call (`restore_interrupted`).
    Only directories are replaced: a file at `final` is refused, never deleted, and so is a directory that holds
    anything `layout` does not name (see `foreign_entry`), where one is given.
    """
    final = Path(final)
    check_parent(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BundleError(f"cannot write {final}: {e.strerror or e}") from None
    check_target(final, replace=replace, layout=layout)
    try:
        tmp = _fresh_directory(final.parent, _partial_prefix(final, os.getpid()))
    except OSError as e:  # named after `final`, not the temporary name the user never gave
        raise BundleError(f"cannot write {final}: {e.strerror or e}") from None
    try:
        yield tmp
        _refuse(final, replace, layout)  # something may have appeared there while the block ran
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            try:
                os.rename(final, old)
                os.rename(tmp, final)
            except BaseException:
                # Judged by what is on disk, not by which call raised: an interrupt can land between a rename
                # returning and the next line.
                if old.exists() and not final.exists():
                    os.rename(old, final)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _fresh_directory(parent: Path, prefix: str) -> Path:
    """A new directory PREFIX+random in `parent`, made as `mkdir` makes one: mkdtemp's would be 0700 whatever the
    umask, and the result is a bundle or adapter to copy and serve like any other directory."""
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def refuse_overlap(out: str | Path, inputs) -> None:
    """Refuse an output directory that is one of the inputs, or holds one: writing it replaces the whole directory,
    which would delete what is being read (`inputs`: pairs of what each is, for the message, and its path or None)."""
    target = Path(out).resolve()
    for what, path in inputs:
        if path is not None and (Path(path).resolve() == target or target in Path(path).resolve().parents):
            held = "is" if Path(path).resolve() == target else "holds"
            raise BundleError(f"{out} {held} {what} {path}: writing it would delete that; choose another output directory")


def check_target(final: Path, *, replace: bool, layout: dict | None = None) -> None:
    """Refuse `final` unless it is missing, or a directory and `replace`; after `restore_interrupted`.

    `atomic_directory` checks on entry; callers with long work before it call this first, to refuse before the work.
    """
    check_parent(final)
    restore_interrupted(final)
    _refuse(final, replace, layout)


def nearest_existing(path: Path) -> Path:
    """`path` or the nearest of its parents that exists: where a write below it would first have to make something."""
    path = Path(os.path.abspath(path))
    return next((p for p in (path, *path.parents) if p.exists()), Path(path.anchor))


def check_parent(final: Path) -> None:
    """Refuse a path no directory can be made at: one named `.`, `..` or nothing (the root), or one below a file
    (where mkdir says only "File exists")."""
    final = Path(final)
    if final.name in ("", ".", ".."):
        raise BundleError(f"{final}: give the directory to write a name of its own (not ., .. or /)")
    above = nearest_existing(final.parent)
    if not above.is_dir():
        raise BundleError(f"cannot write {final}: {above} is not a directory")


def check_writable(final: Path, what: str) -> None:
    """Refuse now an output that only a later write would find unwritable (a read-only directory, a file on the way):
    a directory is made and removed where `final` would go, as the write will make its temporary one."""
    check_parent(final)
    try:
        _fresh_directory(nearest_existing(Path(final).parent), f".{Path(final).name}.probe-").rmdir()
    except OSError as e:
        raise BundleError(f"cannot write {what} to {final}: {e.strerror or e}") from None


def _refuse(final: Path, replace: bool, layout: dict | None) -> None:
    check_parent(final)
    if final.is_symlink():  # replacing would swap the link for a directory, and leave what it points to as it was
        raise BundleError(f"{final} is a symbolic link: give the directory it points to, or another name")
    if final.exists() and not final.is_dir():
        raise BundleError(f"{final} exists and is not a directory")
    if final.exists() and not replace:
        raise BundleError(f"{final} exists (use --force to replace it)")
    foreign = final.is_dir() and layout is not None and foreign_entry(final, layout)
    if foreign:
        raise BundleError(f"{final} holds {foreign}, which replacing it would delete and which this command does not "
                          "write: move it elsewhere first, or choose another directory")


def foreign_entry(directory: Path, layout: dict) -> Path | None:
    """The first entry below `directory` that `layout` does not name, or None.

    `layout` maps each name a writer puts in a directory to None (a file, or a folder it owns whole) or to the
    layout of that folder. A replace deletes the directory whole: what else is in it is someone else's.
    """
    for entry in sorted(directory.iterdir()):
        if entry.name not in layout:
            return entry
        inner = layout[entry.name]
        if inner is not None:
            found = entry.is_dir() and not entry.is_symlink() and foreign_entry(entry, inner)
            if found or not entry.is_dir():
                return found or entry
    return None
