"""`plcli split`, `verify` and `inspect` from the command line: results on good input, one line and exit 2 on bad.

Every refusal must leave nothing behind: no OUT_DIR, no `.partial-` directory,
and an OUT_DIR that existed before is exactly as it was.
"""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import Result
from typer.testing import CliRunner

from plcli.cli import app
from plcli.runtime.bundle import BundleError
from plcli.runtime.edge import EdgeModel


def plcli(*args) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_refused(result: Result, *, says: str) -> None:
    """Exit 2 with exactly one non-empty line on stderr, nothing on stdout, no traceback anywhere."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr, result.exception)
    assert isinstance(result.exception, SystemExit)
    assert len(lines) == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert lines[0].startswith("error: ") and says in lines[0], lines[0]
    assert "Traceback" not in result.output and result.stdout == ""


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# -- checkpoints that are not something plcli can split ------------------------------------------------------


def _copy_without(src: Path, dst: Path, *, drop: tuple[str, ...]) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if not f.name.startswith(drop):
            shutil.copyfile(f, dst / f.name)
    return dst


def _bert(tmp: Path, llama: Path) -> Path:
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=100)).save_pretrained(tmp / "bert")
    return tmp / "bert"


def _gpt2(tmp: Path, llama: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100, bos_token_id=0,
                               eos_token_id=0)).save_pretrained(tmp / "gpt2")
    return tmp / "gpt2"


def _config_file(text: str):
    def make(tmp: Path, llama: Path) -> Path:
        (tmp / "ckpt").mkdir()
        (tmp / "ckpt" / "config.json").write_text(text)
        return tmp / "ckpt"

    return make


def _llama_config_with(**changes):
    """The small Llama's config.json with `changes`: a config that transformers may or may not take."""

    def make(tmp: Path, llama: Path) -> Path:
        config = json.loads((llama / "config.json").read_text())
        return _config_file(json.dumps({**config, **changes}))(tmp, llama)

    return make


def _untied_without_head(tmp: Path, llama: Path) -> Path:
    from safetensors.numpy import load_file, save_file

    d = _copy_without(llama, tmp / "ckpt", drop=())
    weights = load_file(d / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})
    return d


def _generation_config(text: str):
    def make(tmp: Path, llama: Path) -> Path:
        d = _copy_without(llama, tmp / "ckpt", drop=())
        (d / "generation_config.json").write_text(text)
        return d

    return make


def _damaged_tokenizer(tmp: Path, llama: Path) -> Path:
    d = _copy_without(llama, tmp / "ckpt", drop=())
    (d / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    return d


def _truncated_weights(tmp: Path, llama: Path) -> Path:
    d = _copy_without(llama, tmp / "ckpt", drop=())
    (d / "model.safetensors").write_bytes((llama / "model.safetensors").read_bytes()[:100])
    return d


def _reshaped_norm(tmp: Path, llama: Path) -> Path:
    """Weights that read fine but do not fit the config: the final norm has 10 entries, not 64."""
    from safetensors.numpy import load_file, save_file

    d = _copy_without(llama, tmp / "ckpt", drop=())
    weights = load_file(d / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"][:10]
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})
    return d


def _a_file(tmp: Path, llama: Path) -> Path:
    (tmp / "model").write_text("not a checkpoint")
    return tmp / "model"


def _empty_dir(tmp: Path, llama: Path) -> Path:
    (tmp / "model").mkdir()
    return tmp / "model"


BAD_CHECKPOINTS = {
    "missing directory": (lambda tmp, llama: tmp / "nowhere", "no such directory"),
    "a path that looks like markup": (lambda tmp, llama: tmp / "[/]x[bold]y\x1b[31m", "[/]x[bold]y\\x1b[31m: no such directory"),
    "a file": (_a_file, "not a directory"),
    "no config.json": (_empty_dir, "no config.json"),
    "garbage config.json": (_config_file("{not json"), "unreadable config"),
    "config without model_type": (_config_file('{"hidden_size": 64}'), "unreadable config"),
    "bert (not a causal LM)": (_bert, "is not a causal language model"),
    "gpt2 (unsupported family)": (_gpt2, "model type 'gpt2' is not supported"),
    # longrope switches frequencies at original_max_position_embeddings, inside the context
    "longrope": (_llama_config_with(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8,
                                                     "long_factor": [2.0] * 8, "original_max_position_embeddings": 128}),
                 "rope type 'longrope' is not supported (supported: default, linear, llama3, yarn, dynamic)"),
    # transformers builds these models and fails at their first forward
    "partial rotary embedding": (
        _llama_config_with(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0,
                                            "partial_rotary_factor": 0.5}),
        "rope rotates 8 dimensions of heads of 16 (partial_rotary_factor 0.5): llama rotates whole heads"),
    "odd head dim": (_llama_config_with(head_dim=3),
                     "rope rotates 4 dimensions of heads of 3 (partial_rotary_factor 1.0)"),
    "qwen2 sliding layers without a window": (
        _llama_config_with(model_type="qwen2", architectures=["Qwen2ForCausalLM"], use_sliding_window=False,
                           sliding_window=8, layer_types=["full_attention", "sliding_attention"]),
        "layer 1 is sliding_attention in layer_types, but sliding_window is null (use_sliding_window is False)"),
    "unknown activation": (_llama_config_with(hidden_act="mish"),
                           "activation 'mish' is not supported (supported: gelu, gelu_fast"),
    # transformers' strict config validation, and what it lets through
    "no layers": (_llama_config_with(num_hidden_layers=0), "config.json: num_hidden_layers is 0: must be a positive integer"),
    "no attention heads": (_llama_config_with(num_attention_heads=0), "num_attention_heads is 0: must be a positive"),
    "negative hidden size": (_llama_config_with(hidden_size=-1), "hidden_size is -1: must be a positive integer"),
    "fractional head dim": (_llama_config_with(head_dim=16.5), "head_dim is 16.5: must be a positive integer"),
    "heads that do not divide hidden": (_llama_config_with(num_attention_heads=5),
                                        "invalid config (ValueError: The hidden size (64) is not a multiple"),
    "kv heads that do not divide heads": (_llama_config_with(num_key_value_heads=3),
                                          "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    "rope_scaling nonsense": (_llama_config_with(rope_scaling="nonsense"),
                              "invalid config (TypeError: Field 'rope_parameters' with value 'nonsense'"),
    "rope factor not a number": (_llama_config_with(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": "x"}),
                                 "rope parameters {'rope_type': 'yarn'"),
    "field of the wrong type": (_llama_config_with(tie_word_embeddings="yes"),
                                "invalid config (TypeError: Field 'tie_word_embeddings' expected bool"),
    "untied, no lm_head": (_untied_without_head, "weight 'lm_head.weight' is missing from the checkpoint"),
    "no tokenizer": (lambda tmp, llama: _copy_without(llama, tmp / "ckpt", drop=("tokenizer",)), "no tokenizer files"),
    "no weights": (lambda tmp, llama: _copy_without(llama, tmp / "ckpt", drop=("model.",)), "no weights"),
    "truncated weights": (_truncated_weights, "unreadable weights"),
    "tokenizer the edge cannot load": (_damaged_tokenizer, "cannot load the tokenizer (KeyError: 'added_tokens')"),
    "tokenizer config without its vocabulary": (
        lambda tmp, llama: _copy_without(llama, tmp / "ckpt", drop=("tokenizer.json",)),
        "cannot load the tokenizer (ValueError: Couldn't instantiate the backend tokenizer"),
    "truncated generation config": (_generation_config('{"do_sample": true, "temperature": '),
                                    "generation_config.json: unreadable generation config (Expecting value"),
    "generation config not an object": (_generation_config("[1, 2]"), "generation_config.json: not a generation config"),
    "generation setting of the wrong type": (_generation_config('{"temperature": "hot"}'),
                                             'generation_config.json: temperature is "hot": must be a number >= 0'),
    "eos of the wrong type": (_generation_config('{"eos_token_id": ["2"]}'),
                              'generation_config.json: eos_token_id is ["2"]: must be a token id or a list of them'),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_split_refuses_bad_checkpoint(case, tmp_path, llama_checkpoint, monkeypatch):
    """Refused before the graphs are exported: that export is the minutes of a split of a real model."""
    from plcli.exporters import split

    def no_export(*args, **kwargs):
        raise AssertionError("the export ran before the refusal")

    monkeypatch.setattr(split, "export_all", no_export)
    make, says = BAD_CHECKPOINTS[case]
    model_dir = make(tmp_path, llama_checkpoint)
    out = tmp_path / "out"
    assert_refused(plcli("split", model_dir, out, "--rank", "8"), says=says)
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("options, says", [
    (["--rank", "0"], "--rank 0 is out of range: use 1 to 32"),
    (["--rank", "-3"], "--rank -3 is out of range"),
    (["--rank", "33"], "--rank 33 is out of range: use 1 to 32"),  # hidden 64: at most 32
    (["--rank", "8", "--targets", "q_proj,qq_proj"], "unknown target(s) qq_proj"),
    (["--rank", "8", "--targets", ""], "no targets given"),
    (["--rank", "8", "--targets", " , "], "no targets given"),
    (["--rank", "8", "--targets", "v_proj,v_proj"], "targets repeat a name"),
    (["--rank", "8", "--seed", "-1"], "--seed -1 is out of range: must be 0 or more"),
])
def test_split_refuses_bad_rank_or_targets(options, says, tmp_path, llama_checkpoint):
    out = tmp_path / "out"
    assert_refused(plcli("split", llama_checkpoint, out, *options), says=says)
    assert not out.exists() and leftovers(tmp_path) == []


def test_split_keeps_existing_out_dir_without_force(tmp_path, llama_checkpoint):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_refused(plcli("split", llama_checkpoint, out, "--rank", "8"), says="exists (use --force to replace it)")
    assert snapshot(out) == {"keep.txt": b"mine"} and leftovers(tmp_path) == []


@pytest.mark.parametrize("force", [(), ("--force",)], ids=["plain", "force"])
def test_split_refuses_a_file_as_out_dir(tmp_path, llama_checkpoint, force):
    out = tmp_path / "out"
    out.write_text("mine")
    assert_refused(plcli("split", llama_checkpoint, out, "--rank", "8", *force), says=f"{out} exists and is not a directory")
    assert out.read_text() == "mine" and leftovers(tmp_path) == []


def test_split_never_replaces_its_own_checkpoint(tmp_path, llama_checkpoint):
    ckpt = _copy_without(llama_checkpoint, tmp_path / "ckpt", drop=())
    before = snapshot(ckpt)
    for out in (ckpt, tmp_path):
        assert_refused(plcli("split", ckpt, out, "--rank", "8", "--force"), says="the checkpoint")
    assert snapshot(ckpt) == before and leftovers(tmp_path) == []


def test_split_reports_unwritable_out_dir(tmp_path, llama_checkpoint):
    # /proc refuses new directories even to root.
    # The message names OUT_DIR, not the directory above it or the temporary one beside it that the split makes.
    for out in ("/proc/plcli-no-such-dir/out", "/proc/plcli-out"):
        assert_refused(plcli("split", llama_checkpoint, out, "--rank", "8"),
                       says=f"cannot write {out}: No such file or directory")


@pytest.fixture
def good_bundle(tmp_path, llama_checkpoint):
    out = tmp_path / "out"
    result = plcli("split", llama_checkpoint, out, "--rank", "8", "--json")
    assert result.exit_code == 0, result.output
    return out


def test_force_replaces_a_bundle_on_success(good_bundle, llama_checkpoint):
    before = json.loads((good_bundle / "cloud" / "manifest.json").read_text())
    result = plcli("split", llama_checkpoint, good_bundle, "--rank", "8", "--seed", "5", "--force", "--json")
    assert result.exit_code == 0, result.output
    after = json.loads((good_bundle / "cloud" / "manifest.json").read_text())
    assert (after["seed"], before["seed"]) == (5, 0) and after["ab_fingerprint"] != before["ab_fingerprint"]
    assert leftovers(good_bundle.parent) == []


def test_failed_forced_split_keeps_the_old_bundle(good_bundle, llama_checkpoint, monkeypatch):
    """A write that fails last (the tokenizer copy) still leaves the previous bundle exactly as it was."""
    before = snapshot(good_bundle)
    real_copy = shutil.copyfile

    def disk_full_for_tokenizer(src, dst, *args, **kwargs):
        if Path(dst).parent.name == "tokenizer":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_copy(src, dst, *args, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", disk_full_for_tokenizer)
    result = plcli("split", llama_checkpoint, good_bundle, "--rank", "8", "--seed", "5", "--force")
    assert_refused(result, says=f"cannot write {good_bundle}: No space left on device")
    assert snapshot(good_bundle) == before and leftovers(good_bundle.parent) == []


@pytest.mark.parametrize("fails", ["graphs", "weights"])
def test_disk_error_mid_write_in_a_real_process(good_bundle, llama_checkpoint, fails):
    """A file size limit makes the kernel fail a write part way (EFBIG), as a full disk would: the weights, or a
    graph copied from the cache (whose error named the cache file, as if the source were at fault).

    Run as a real process, so this also shows what reaches a terminal: one line, no traceback.
    """
    before = snapshot(good_bundle)
    biggest_graph = max(p.stat().st_size for p in good_bundle.rglob("*.onnx"))
    biggest_tokenizer_file = max(p.stat().st_size for p in (good_bundle / "edge" / "tokenizer").iterdir())
    cloud_weights = (good_bundle / "cloud" / "weights.safetensors").stat().st_size
    if fails == "graphs":  # the tokenizer, checked first, fits
        limit = (biggest_tokenizer_file + biggest_graph) // 2
        assert biggest_tokenizer_file < limit < biggest_graph
    else:  # graphs fit, the cloud weights stop half way
        limit = (max(biggest_graph, biggest_tokenizer_file) + cloud_weights) // 2
        assert max(biggest_graph, biggest_tokenizer_file) < limit < cloud_weights

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = subprocess.run(
        [sys.executable, "-m", "plcli.cli", "split", str(llama_checkpoint), str(good_bundle), "--rank", "8",
         "--seed", "5", "--force"],
        capture_output=True, text=True, preexec_fn=limit_file_size, timeout=600,
    )
    assert done.returncode == 2, done.stderr
    assert done.stdout == "" and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [f"error: cannot write {good_bundle}: File too large"], done.stderr
    assert snapshot(good_bundle) == before and leftovers(good_bundle.parent) == []


def test_installed_command_reports_one_line(tmp_path):
    exe = shutil.which("plcli")
    assert exe, "the plcli console script is not installed"
    done = subprocess.run([exe, "split", str(tmp_path / "nowhere"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.strip().splitlines() == [f"error: {tmp_path / 'nowhere'}: no such directory"]


def test_version_names_the_formats_it_speaks():
    from importlib.metadata import version

    from plcli.runtime.bundle import FORMAT_VERSION
    from plcli.runtime.wire import PROTOCOL_VERSION

    result = plcli("--version")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"plcli {version('plcli')} (bundle format {FORMAT_VERSION}, wire protocol {PROTOCOL_VERSION})"



def test_a_change_to_any_module_that_shapes_a_graph_misses_the_graph_cache(tmp_path, monkeypatch):
    """The runtime feeds a graph by the input names arch.py and plan.py give it: graphs cached before a change
    there would no longer take what the runtime feeds them."""
    from plcli.exporters import graphs

    before = graphs._code_version()
    for module in (graphs.decoder, graphs.arch_module, graphs.plan_module):
        changed = tmp_path / Path(module.__file__).name
        changed.write_bytes(Path(module.__file__).read_bytes() + b"\n# changed\n")
        with monkeypatch.context() as patch:
            patch.setattr(module, "__file__", str(changed))
            assert graphs._code_version() != before, module.__name__
    assert graphs._code_version() == before


def test_a_damaged_graph_in_the_cache_is_exported_again_not_copied(tmp_path, llama_checkpoint, monkeypatch):
    """A truncated cached graph went into every later split, and `verify`'s advice, split again, copied it again."""
    monkeypatch.setenv("PLCLI_CACHE", str(tmp_path / "cache"))  # a cache of its own, to damage
    assert plcli("split", llama_checkpoint, tmp_path / "first", "--rank", 8).exit_code == 0
    cached = sorted((tmp_path / "cache" / "graphs").glob("*.onnx"))
    assert cached
    for graph in cached:
        graph.write_bytes(graph.read_bytes()[:100])
    assert plcli("split", llama_checkpoint, tmp_path / "second", "--rank", 8).exit_code == 0
    verify = plcli("verify", tmp_path / "second", "--reference", llama_checkpoint, "--decode-steps", 1)
    assert verify.exit_code == 0, verify.output

# -- inspect and verify on things that are not (matching) bundles ----------------------------------------------


def _corrupt_manifest(bundle: Path) -> None:
    m = json.loads((bundle / "edge" / "manifest.json").read_text())
    m["format_version"] = 99
    (bundle / "edge" / "manifest.json").write_text(json.dumps(m))


def _manifest_a_list(bundle: Path) -> None:
    (bundle / "edge" / "manifest.json").write_text("[]")


def _truncate_weights(bundle: Path) -> None:
    w = bundle / "cloud" / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:64])


@pytest.mark.parametrize("damage, target, says", [
    (None, lambda b: b.parent / "nowhere", "no such directory"),
    (None, lambda b: b / "cloud" / "graphs", "not a plcli bundle"),
    (_corrupt_manifest, lambda b: b, "bundle format version 99"),
    (_manifest_a_list, lambda b: b, "malformed manifest (not a JSON object)"),  # was "format version None"
    (_truncate_weights, lambda b: b, "unreadable weights"),
])
def test_inspect_refuses_non_bundles(good_bundle, damage, target, says):
    if damage:
        damage(good_bundle)
    assert_refused(plcli("inspect", target(good_bundle)), says=says)


def test_commands_that_load_a_bundle_refuse_a_damaged_or_wrong_side_one(llama_bundle, tmp_path):
    """`serve-cloud`, `run-edge` and `tune`: one line and exit 2 before anything listens or connects."""
    damaged = tmp_path / "damaged"
    shutil.copytree(llama_bundle, damaged)
    for side in ("cloud", "edge"):
        w = damaged / side / "weights.safetensors"
        w.write_bytes(w.read_bytes()[:64])
    truncated = shutil.copytree(llama_bundle, tmp_path / "truncated")
    for graph in truncated.rglob("*.onnx"):
        graph.write_bytes(graph.read_bytes()[:200])
    data = tmp_path / "notes.txt"
    data.write_text("private text\n" * 50)

    def serve_cloud(bundle: Path) -> subprocess.CompletedProcess:
        # A process of its own: were the bundle accepted, it would serve until the timeout kills it.
        return subprocess.run([sys.executable, "-m", "plcli.cli", "serve-cloud", str(bundle), "--bind", "tcp://127.0.0.1:*",
                               "--no-tune"], capture_output=True, text=True, timeout=120)

    for done, says in ((serve_cloud(damaged / "cloud"), "unreadable weights"),
                       (serve_cloud(llama_bundle / "edge"), "expected the cloud bundle"),
                       # served with grouping, the graphs are read with onnx before ONNX Runtime sees them
                       (serve_cloud(truncated / "cloud"), "not a valid ONNX graph (Error parsing message")):
        assert (done.returncode, done.stdout) == (2, ""), done
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], done.stderr

    nowhere = "tcp://127.0.0.1:1"  # refused before any connection is tried
    assert_refused(plcli("run-edge", damaged / "edge", "--connect", nowhere, "--prompt", "hi"), says="unreadable weights")
    assert_refused(plcli("run-edge", truncated / "edge", "--connect", nowhere, "--prompt", "hi"),
                   says=f"{truncated / 'edge' / 'graphs' / 'head.onnx'}: not a valid ONNX graph ([ONNXRuntimeError]")
    assert_refused(plcli("run-edge", llama_bundle / "cloud", "--connect", nowhere, "--prompt", "hi"),
                   says="expected the edge bundle")
    assert_refused(plcli("tune", damaged / "edge", "--connect", nowhere, "--data", data), says="unreadable weights")


def test_a_bundle_whose_graphs_or_weights_are_not_its_own_is_one_line(llama_bundle, bundle_factory, llama_checkpoint,
                                                                        tmp_path):
    """Graphs swapped or from a split of another rank, edge weights of another dtype, an edge M of another rank:
    each loaded, and failed as an internal error at the first call or blamed an adapter nobody gave."""
    from safetensors.numpy import load_file, save_file

    other_rank = bundle_factory(llama_checkpoint, rank=4)

    def damaged(name: str, damage) -> Path:
        bundle = shutil.copytree(llama_bundle, tmp_path / name)
        damage(bundle)
        return bundle

    def swap(a: Path, b: Path) -> None:
        a_bytes = a.read_bytes()
        a.write_bytes(b.read_bytes())
        b.write_bytes(a_bytes)

    def edit_edge_weights(edit) -> callable:
        def damage(bundle: Path) -> None:
            path = bundle / "edge" / "weights.safetensors"
            weights = load_file(path)
            edit(weights)
            save_file(weights, path)
        return damage

    graphs = lambda b: b / "cloud" / "graphs"  # noqa: E731
    cases = {
        "swapped": ("cloud", lambda b: swap(graphs(b) / "first.onnx", graphs(b) / "last.onnx"),
                    "the graph's inputs are not those its bundle feeds it"),
        "other rank": ("cloud", lambda b: [shutil.copy(g, graphs(b) / g.name) for g in graphs(other_rank).iterdir()],
                       "takes l0.A.attn_in of shape [64, 12], its bundle's is [64, 24]"),
        "float64 norm": ("edge", edit_edge_weights(lambda w: w.update(norm=w["norm"].astype("float64"))),
                         "weight norm missing or not float32"),
        "M of rank 4": ("edge", edit_edge_weights(lambda w: w.update({"layers.0.q_proj.M": w["layers.0.q_proj.M"][:4, :4]})),
                        "weight layers.0.q_proj.M missing or not float32 of shape (8, 8)"),
    }
    for name, (side, damage, says) in cases.items():
        bundle = damaged(name, damage)
        if side == "cloud":
            for grouped in ("1", "4"):  # graphs fed their weights, and bound to them
                done = subprocess.run([sys.executable, "-m", "plcli.cli", "serve-cloud", str(bundle / "cloud"), "--bind",
                                       "tcp://127.0.0.1:*", "--no-tune", "--max-group", grouped],
                                      capture_output=True, text=True, timeout=120)
                lines = done.stderr.strip().splitlines()
                assert done.returncode == 2 and len(lines) == 1 and says in lines[0], (name, grouped, done.stderr)
        else:
            assert_refused(plcli("run-edge", bundle / "edge", "--connect", "tcp://127.0.0.1:1", "--prompt", "hi"),
                           says=says)

def _set(path: str, value):
    """Set the manifest field at `path` ("architecture.hidden_size"); `...` deletes it."""
    def edit(manifest: dict) -> None:
        *parents, last = path.split(".")
        for key in parents:
            manifest = manifest[key]
        if value is ...:
            del manifest[last]
        else:
            manifest[last] = value
    return edit


# (side, edit, what the one line says). Each loaded before, and failed later with an internal error or not at all.
BAD_MANIFESTS = {
    "rank a string": ("cloud", _set("rank", "64"), 'rank must be a positive integer, not "64"'),
    "rank a bool": ("edge", _set("rank", True), "rank must be a positive integer, not true"),
    "rank zero": ("cloud", _set("rank", 0), "rank must be a positive integer, not 0"),
    "generation a string": ("edge", _set("generation", "x"), 'generation must be an object, not "x"'),
    "eos an int": ("edge", _set("generation.eos_token_id", 2), "generation.eos_token_id must be a list of token ids, not 2"),
    "graphs empty": ("cloud", _set("graphs", {}), "graphs names no file for first, from_attn_in, last, project_attn_in"),
    "no head graph": ("edge", _set("graphs", {"first": "first.onnx"}), "graphs names no file for head"),
    "graph outside": ("edge", _set("graphs.head", "../../cloud/graphs/last.onnx"), "graphs must be an object of graph names"),
    "targets a number": ("cloud", _set("targets", 5), "targets must be a list of projection names, not 5"),
    "seed a string": ("cloud", _set("seed", "a"), 'seed must be an integer of 0 or more, not "a"'),
    "side unknown": ("edge", _set("side", "both"), "side must be 'cloud' or 'edge', not \"both\""),
    "dtype unknown": ("cloud", _set("dtype", "int4"), "dtype must be 'float32', not \"int4\""),
    "fingerprint a list": ("edge", _set("ab_fingerprint", []), "ab_fingerprint must be a string, not []"),
    "no rank": ("cloud", _set("rank", ...), "the manifest lacks rank"),
    "unknown field": ("cloud", _set("ranks", 8), "the manifest has unknown fields ranks"),
    "architecture a list": ("cloud", _set("architecture", []), "architecture is not a JSON object"),
    "hidden size a string": ("edge", _set("architecture.hidden_size", "64"), "architecture.hidden_size must be a positive integer"),
    "eps negative": ("cloud", _set("architecture.rms_norm_eps", -1e-6), "architecture.rms_norm_eps must be a positive number"),
    "windows short": ("cloud", _set("architecture.sliding_windows", [None]),
                      "architecture.sliding_windows must be a list of num_layers (2) windows"),
}


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_commands_refuse_a_manifest_with_wrong_types_or_values(llama_bundle, tmp_path, case):
    side, edit, says = BAD_MANIFESTS[case]
    bundle = shutil.copytree(llama_bundle, tmp_path / "bundle")
    path = bundle / side / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    line = f"{path}: malformed manifest ({says}"
    assert_refused(plcli("inspect", bundle), says=line)
    if side == "edge":
        assert_refused(plcli("run-edge", bundle / "edge", "--connect", "tcp://127.0.0.1:1", "--prompt", "hi"), says=line)
    else:
        from plcli.runtime.cloud import CloudModel  # what serve-cloud loads first

        with pytest.raises(BundleError, match=re.escape(line)):
            CloudModel(bundle / "cloud")


def test_commands_refuse_a_bundle_without_a_graph_its_manifest_names(llama_bundle, tmp_path):
    bundle = shutil.copytree(llama_bundle, tmp_path / "bundle")
    (bundle / "cloud" / "graphs" / "last.onnx").unlink()
    assert_refused(plcli("inspect", bundle), says=f"{bundle / 'cloud'}: graph last (graphs/last.onnx) is missing")
def test_a_bundle_whose_tokenizer_the_edge_cannot_load_is_one_line(llama_bundle, llama_checkpoint, tmp_path):
    damaged = shutil.copytree(llama_bundle, tmp_path / "damaged")
    (damaged / "edge" / "tokenizer" / "tokenizer.json").write_text("{}")
    assert_refused(plcli("verify", damaged, "--reference", llama_checkpoint),
                   says=f"{damaged / 'edge' / 'tokenizer'}: cannot load the tokenizer (KeyError")
    shutil.rmtree(damaged / "edge" / "tokenizer")  # transformers took the path for a Hub repo id, and said so
    assert_refused(plcli("verify", damaged, "--reference", llama_checkpoint),
                   says=f"{damaged / 'edge' / 'tokenizer'}: the tokenizer directory is missing")


def test_verify_refuses_missing_or_mismatched_inputs(good_bundle, llama_checkpoint, checkpoint_factory,
                                                     bundle_factory, tmp_path):
    missing = tmp_path / "nowhere"
    assert_refused(plcli("verify", missing, "--reference", llama_checkpoint), says="no cloud/ bundle")
    assert_refused(plcli("verify", good_bundle / "edge", "--reference", llama_checkpoint), says="no cloud/ bundle")
    assert_refused(plcli("verify", good_bundle, "--reference", missing), says="no such directory")
    other_shape = checkpoint_factory("llama-tied", tie_word_embeddings=True)
    assert_refused(plcli("verify", good_bundle, "--reference", other_shape), says="architecture differs")
    (tmp_path / "truncated").mkdir()
    truncated = _truncated_weights(tmp_path / "truncated", llama_checkpoint)
    assert_refused(plcli("verify", good_bundle, "--reference", truncated), says="model.safetensors: unreadable weights")
    (tmp_path / "reshaped").mkdir()
    assert_refused(plcli("verify", good_bundle, "--reference", _reshaped_norm(tmp_path / "reshaped", llama_checkpoint)),
                   says="transformers cannot load the checkpoint")
    for steps, says in (("-1", "--decode-steps -1 is out of range: must be at least 1"), ("0", "must be at least 1"),
                        ("100000", "--decode-steps 100000 is out of range: at most ")):
        assert_refused(plcli("verify", good_bundle, "--reference", llama_checkpoint, "--decode-steps", steps), says=says)

    mixed = tmp_path / "mixed"
    shutil.copytree(good_bundle / "edge", mixed / "edge")
    shutil.copytree(bundle_factory(llama_checkpoint, rank=8, seed=1) / "cloud", mixed / "cloud")
    assert_refused(plcli("verify", mixed, "--reference", llama_checkpoint), says="not split together")
    assert_refused(plcli("inspect", mixed / "nowhere"), says="no such directory")
    (tmp_path / "a-file").write_text("x")
    assert_refused(plcli("inspect", tmp_path / "a-file"), says="a-file: not a directory")
    table = plcli("inspect", mixed)
    assert table.exit_code == 0 and "not split together" in table.stdout


# -- good input -------------------------------------------------------------------------------------------------


def test_split_inspect_verify_json(tmp_path, llama_checkpoint):
    out = tmp_path / "out"
    split = plcli("split", llama_checkpoint, out, "--rank", "8", "--targets", "v_proj,q_proj,k_proj", "--json")
    assert split.exit_code == 0 and split.stderr == "", split.output
    s = json.loads(split.stdout)
    assert s["paired"] is True and s["seconds"] > 0
    assert "unapplied" not in s["generation"]
    assert (s["family"], s["rank"], s["targets"], s["layers"]) == ("llama", 8, ["q_proj", "k_proj", "v_proj"], 2)
    assert set(s["sides"]) == {"cloud", "edge"}
    for side in s["sides"].values():
        assert side["parameters"] > 0 and side["bundle_bytes"] >= side["weight_bytes"] > 0
    assert s["per_token"]["float32"] == {"bytes_up": (64 + 2 * 3 * 8) * 4, "bytes_down": (64 + 2 * 3 * 8) * 4,
                                         "round_trips": 3, "wire_dtype": "float32"}

    inspect = plcli("inspect", out, "--json")
    assert inspect.exit_code == 0
    assert json.loads(inspect.stdout) == {k: v for k, v in s.items() if k != "seconds"}

    verify = plcli("verify", out, "--reference", llama_checkpoint, "--decode-steps", "1", "--json")
    assert verify.exit_code == 0, verify.output
    v = json.loads(verify.stdout)
    assert v["ok"] is True and v["tolerance"] == 1e-4
    assert len(v["comparisons"]) == 3 * 2
    assert {c["phase"] for c in v["comparisons"]} == {"prefill", "decode 1"}
    assert all(c["ok"] and c["same_argmax"] and c["rel_error"] < 1e-4 for c in v["comparisons"])

    table = plcli("verify", out, "--reference", llama_checkpoint, "--decode-steps", "1")
    assert table.exit_code == 0 and "parity holds" in table.stdout


def test_verify_fails_a_split_whose_numbers_are_wrong(tmp_path, llama_bundle, llama_checkpoint):
    """Parity can fail: one cloud weight off by 1% (shapes, manifest and fingerprints all intact) is exit 1."""
    from safetensors.numpy import load_file, save_file

    out = tmp_path / "out"
    shutil.copytree(llama_bundle, out)
    weights = load_file(out / "cloud" / "weights.safetensors")
    name = next(k for k in sorted(weights) if k.startswith("layers.1.") and ".A." not in k and ".B." not in k)
    weights[name] = weights[name] * np.float32(1.01)
    save_file(weights, out / "cloud" / "weights.safetensors")

    verify = plcli("verify", out, "--reference", llama_checkpoint, "--decode-steps", "1", "--json")
    assert verify.exit_code == 1, verify.output
    v = json.loads(verify.stdout)
    assert v["ok"] is False and not all(c["ok"] for c in v["comparisons"]), (name, v)
    assert max(c["rel_error"] for c in v["comparisons"]) > v["tolerance"]
    table = plcli("verify", out, "--reference", llama_checkpoint, "--decode-steps", "1")
    assert table.exit_code == 1 and "parity FAILED" in table.stdout


@pytest.mark.parametrize("generation_config", [None, {"do_sample": False}, {"eos_token_id": [3, 4], "top_k": 7},
                                               {"eos_token_id": 2, "pad_token_id": -1}],  # as Hub checkpoints store it
                         ids=["none", "without-eos", "own-eos", "pad-minus-one"])
def test_generation_settings_come_from_where_transformers_takes_them(tmp_path, llama_checkpoint, generation_config):
    from transformers import AutoModelForCausalLM

    ckpt = shutil.copytree(llama_checkpoint, tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "eos_token_id": 2, "bos_token_id": 1}))
    (ckpt / "generation_config.json").unlink(missing_ok=True)
    if generation_config is not None:  # then transformers reads it alone: config.json's eos stops nothing
        (ckpt / "generation_config.json").write_text(json.dumps(generation_config))
    split = plcli("split", ckpt, tmp_path / "out", "--rank", "8", "--json")
    assert split.exit_code == 0, split.output
    got = json.loads(split.stdout)["generation"]
    want = AutoModelForCausalLM.from_pretrained(ckpt, local_files_only=True).generation_config
    eos = want.eos_token_id
    assert got.get("eos_token_id") == (None if eos is None else [eos] if isinstance(eos, int) else list(eos))
    assert (got.get("bos_token_id"), got.get("top_k")) == (want.bos_token_id, want.top_k)
    assert EdgeModel(tmp_path / "out" / "edge").eos_token_ids == list(got.get("eos_token_id") or [])


def test_generation_settings_plcli_does_not_apply_are_named_not_dropped(tmp_path, llama_checkpoint):
    ckpt = shutil.copytree(llama_checkpoint, tmp_path / "ckpt")
    (ckpt / "generation_config.json").write_text(json.dumps(
        {"num_beams": 4, "no_repeat_ngram_size": 3, "min_length": 0, "repetition_penalty": 1.1, "eos_token_id": 2}))
    out = tmp_path / "out"
    split = plcli("split", ckpt, out, "--rank", "8", "--json")
    assert split.exit_code == 0, split.output
    generation = json.loads(split.stdout)["generation"]
    # min_length 0 changes nothing; the penalty and eos are applied (tests/test_sampling.py)
    assert (generation["eos_token_id"], generation["repetition_penalty"]) == ([2], 1.1)
    assert generation["unapplied"] == {"num_beams": 4, "no_repeat_ngram_size": 3}
    table = plcli("inspect", out)
    assert table.exit_code == 0
    assert ("note: the checkpoint's generation config sets no_repeat_ngram_size=3, num_beams=4, which plcli does not "
            "apply") in " ".join(table.stdout.split())
