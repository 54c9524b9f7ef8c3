"""Bad input to every command: one line on stderr, exit code 2, and nothing the user had is lost.

Each test here holds a case a sweep of paths, files and flags found wrong: an output that is also an input, JSON
nested past Python's recursion limit, an interrupt that reached a command through a library, and so on.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from plcli.cli import app
from plcli.exporters.verify import random_adapter
from plcli.runtime.edge import EdgeModel
from plcli.runtime.tune import write_adapter

TEXT = ("Private notes stay on the edge. The cloud only sees activations of the frozen layers. " * 20).strip()


def plcli(*args, input: str | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def assert_refused(result, *, says: str, code: int = 2) -> None:
    """Exit `code` with exactly one line on stderr that says `says`, nothing on stdout, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], result.stderr
    assert "Traceback" not in result.output and result.stdout == ""


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture
def bundle_with_adapter(llama_bundle, tmp_path):
    """A copy of the llama split whose edge holds a tuned adapter in its default place."""
    out = tmp_path / "split"
    shutil.copytree(llama_bundle, out)
    edge = EdgeModel(out / "edge")
    (out / "edge" / "adapter").mkdir()
    write_adapter(out / "edge" / "adapter", edge.manifest, random_adapter(edge, seed=1))
    return out


# -- outputs that are inputs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["edge", "cloud", "adapter", "split"])
def test_export_peft_never_replaces_what_it_reads(bundle_with_adapter, where):
    """`--out` with `--force` replaces a directory whole: the edge bundle, the cloud bundle or the adapter given as
    `--out` (or a directory that holds them) were replaced by the peft files."""
    split = bundle_with_adapter
    out = {"edge": split / "edge", "cloud": split / "cloud", "adapter": split / "edge" / "adapter", "split": split}[where]
    before = snapshot(split)
    assert_refused(plcli("export-peft", "--cloud", split / "cloud", "--edge", split / "edge", "--out", out, "--force"),
                   says="writing it would delete that")
    assert snapshot(split) == before



def test_split_force_never_deletes_what_split_did_not_write(bundle_with_adapter, llama_checkpoint, tmp_path):
    """--force replaced OUT_DIR whole: the adapter `tune` had saved in EDGE_DIR/adapter (its default place) went with
    it, and so did any directory given by mistake, exit 0 and no word."""
    split = bundle_with_adapter
    before = snapshot(split)
    assert_refused(plcli("split", llama_checkpoint, split, "--rank", 8, "--force"),
                   says=f"{split} holds {split / 'edge' / 'adapter'}, which replacing it would delete")
    assert snapshot(split) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text(TEXT)
    assert_refused(plcli("split", llama_checkpoint, mine, "--rank", 8, "--force"), says=f"holds {mine / 'notes.txt'}")
    assert_refused(plcli("export-peft", "--cloud", split / "cloud", "--edge", split / "edge", "--out", mine, "--force"),
                   says=f"holds {mine / 'notes.txt'}")
    assert (mine / "notes.txt").read_text() == TEXT


@pytest.mark.parametrize("target", ["a directory", "nothing"])
def test_outputs_that_are_symbolic_links_are_refused(llama_bundle, llama_checkpoint, tmp_path, target):
    """Replacing swapped the link for a directory (what it pointed to kept the old bundle) and left a stray link; a
    dangling one failed only after the whole split, naming a temporary directory."""
    link = tmp_path / "link"
    link.symlink_to(llama_bundle if target == "a directory" else tmp_path / "gone")
    assert_refused(plcli("split", llama_checkpoint, link, "--rank", 8, "--force"),
                   says=f"{link} is a symbolic link: give the directory it points to")
    assert link.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["link"]

def test_tune_never_replaces_its_own_data(llama_bundle, bundle_with_adapter, tmp_path):
    """A checkpoint replaces --out whole: a data file kept in it would be deleted by the first save."""
    out = bundle_with_adapter / "edge" / "adapter"
    (out / "notes.txt").write_text(TEXT)
    (tmp_path / "train.txt").write_text(TEXT)
    before = snapshot(out)
    for flag in ("--data", "--eval-data"):
        extra = () if flag == "--data" else ("--data", tmp_path / "train.txt")
        assert_refused(plcli("tune", bundle_with_adapter / "edge", "--cloud", bundle_with_adapter / "cloud", *extra,
                             flag, out / "notes.txt", "--steps", 1, "--seq-len", 16, "--out", out, "--force"),
                       says=f"holds the data file {out / 'notes.txt'}")
    assert snapshot(out) == before


@pytest.mark.parametrize("name", ["bundles", "tune-bundles"])
def test_demo_never_replaces_a_directory_it_did_not_write(tmp_path, name):
    """The demo replaces OUT/bundles and OUT/tune-bundles without --force, which is right for its own earlier
    splits only: a directory of the user's under that name in --out was deleted."""
    (tmp_path / name).mkdir()
    (tmp_path / name / "keep.txt").write_text("mine")
    assert_refused(plcli("demo", "--out", tmp_path), says=f"{tmp_path / name} exists and is not a split of an earlier demo")
    assert snapshot(tmp_path) == {f"{name}/keep.txt": b"mine"}


@pytest.mark.parametrize("mine", ["tune/keep.txt", "tune/notes/diary.txt", "tune/adapter/adapter.json"])
def test_demo_never_replaces_what_it_did_not_tune(tmp_path, mine):
    """OUT/tune is the demo's too: its notes were overwritten and an adapter there replaced, whoever's they were."""
    (tmp_path / mine).parent.mkdir(parents=True)
    (tmp_path / mine).write_bytes(b'{"targets": ["q_proj", "k_proj", "v_proj"]}')
    assert_refused(plcli("demo", "--out", tmp_path),
                   says=f"{tmp_path / 'tune'} exists and is not what an earlier demo tuned")
    assert snapshot(tmp_path) == {mine: b'{"targets": ["q_proj", "k_proj", "v_proj"]}'}


# -- JSON that Python's json cannot hold ------------------------------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000  # valid JSON, nested past Python's recursion limit


@pytest.mark.parametrize("where", ["manifest", "config", "generation_config", "adapter", "tune_state", "tune_data"])
def test_json_nested_too_deeply_is_one_line(llama_checkpoint, bundle_with_adapter, tmp_path, where):
    """json.loads raises RecursionError, which is no ValueError: each reader let it through as an internal error."""
    split, ckpt = bundle_with_adapter, tmp_path / "ckpt"
    shutil.copytree(llama_checkpoint, ckpt)
    (tmp_path / "train.txt").write_text(TEXT)
    tune = ("tune", split / "edge", "--cloud", split / "cloud", "--data", tmp_path / "train.txt", "--seq-len", 16)
    file, args = {
        "manifest": (split / "cloud" / "manifest.json", ("inspect", split)),
        "config": (ckpt / "config.json", ("split", ckpt, tmp_path / "out", "--rank", 8)),
        "generation_config": (ckpt / "generation_config.json", ("split", ckpt, tmp_path / "out", "--rank", 8)),
        "adapter": (split / "edge" / "adapter" / "adapter.json",
                    ("run-edge", split / "edge", "--adapter", split / "edge" / "adapter", "--prompt", "hi")),
        "tune_state": (split / "edge" / "adapter" / "training" / "state.json", (*tune, "--resume")),
        "tune_data": (tmp_path / "deep.jsonl", (*tune[:4], "--data", tmp_path / "deep.jsonl", "--out", tmp_path / "a")),
    }[where]
    file.parent.mkdir(exist_ok=True)
    file.write_text(DEEP)
    assert_refused(plcli(*args), says="nested too deeply")


@pytest.mark.parametrize("record", [{"text": "\ud800 notes"}, {"prompt": "Q\udfff", "response": "A."},
                                    {"prompt": "Q", "response": "\udbff"}])
def test_tune_refuses_a_lone_surrogate_escape_in_jsonl(llama_bundle, tmp_path, record):
    """JSON may escape half a UTF-16 pair; Python decodes it to a lone surrogate, which the tokenizer refused with a
    TypeError (an internal error)."""
    data = tmp_path / "notes.jsonl"
    data.write_text(json.dumps({"text": TEXT}) + "\n" + json.dumps(record) + "\n")  # json.dumps escapes it: ASCII
    assert_refused(plcli("tune", llama_bundle / "edge", "--cloud", llama_bundle / "cloud", "--data", data,
                         "--seq-len", 16, "--out", tmp_path / "adapter"), says=f"{data}:2: ")
    assert not (tmp_path / "adapter").exists()


# -- verify ---------------------------------------------------------------------------------------------------------


def test_verify_refuses_a_negative_seed(llama_bundle, llama_checkpoint):
    assert_refused(plcli("verify", llama_bundle, "--reference", llama_checkpoint, "--seed", -1),
                   says="--seed -1 is out of range: must be 0 or more")


def test_verify_against_another_checkpoint_of_the_same_shape_is_bad_input(llama_bundle, checkpoint_factory):
    """The README: a reference that is not the checkpoint that was split is one line and exit 2. One of the same
    architecture passed every check and failed parity: exit 1, as if the split were wrong."""
    other = checkpoint_factory("llama-other-weights", seed=1)
    assert_refused(plcli("verify", llama_bundle, "--reference", other, "--decode-steps", 1),
                   says=f"{other}: not the checkpoint {llama_bundle} was split from")


# -- output paths that no directory can be made at ----------------------------------------------------------------


@pytest.mark.parametrize("out", [".", "", ".."])
def test_split_to_the_current_or_a_parent_directory_is_one_line(llama_checkpoint, tmp_path, monkeypatch, out):
    """`.` (and `""`, which the command line reads as `.`) crashed with "PosixPath('.') has an empty name"."""
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert_refused(plcli("split", llama_checkpoint, out, "--rank", 8, "--force"), says="give the directory to write a name")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["here"]


def test_outputs_below_a_file_say_so(llama_bundle, bundle_with_adapter, llama_checkpoint, tmp_path):
    """mkdir of a path below a file says "File exists", which named the file as if it were the problem's answer."""
    (tmp_path / "notes.txt").write_text(TEXT)
    below = tmp_path / "notes.txt" / "out"
    split = bundle_with_adapter
    for args in (("split", llama_checkpoint, below, "--rank", 8),
                 ("tune", split / "edge", "--cloud", split / "cloud", "--data", tmp_path / "notes.txt", "--out", below),
                 ("export-peft", "--cloud", split / "cloud", "--edge", split / "edge", "--out", below),
                 ("keys", "generate", below)):
        assert_refused(plcli(*args), says=f"cannot write {below}: {tmp_path / 'notes.txt'} is not a directory")
    assert (tmp_path / "notes.txt").read_text() == TEXT


def test_tune_refuses_an_out_it_could_not_write_before_it_trains(llama_bundle, tmp_path):
    """The adapter is first written after --save-every steps or at the end: an --out in a directory that takes no new
    entries (/proc refuses them even to root) failed only then, the training lost. (The data here is empty: a run
    that got as far as reading it would say so instead.)"""
    (tmp_path / "notes.txt").write_text("")
    assert_refused(plcli("tune", llama_bundle / "edge", "--cloud", llama_bundle / "cloud", "--data",
                         tmp_path / "notes.txt", "--seq-len", 16, "--out", "/proc/plcli-adapter"),
                   says="cannot write the adapter to /proc/plcli-adapter")


@pytest.mark.parametrize("plot", ["dir", "below-a-file", "unwritable", "empty", "no-matplotlib"])
def test_bench_refuses_a_plot_it_could_not_write_before_it_measures(llama_checkpoint, tmp_path, monkeypatch, plot):
    import importlib.util

    (tmp_path / "notes.txt").write_text(TEXT)
    monkeypatch.chdir(tmp_path)
    path, says = {"dir": (tmp_path, "is a directory"), "empty": ("", "is a directory"),
                  "below-a-file": (tmp_path / "notes.txt" / "x.png", "is not a directory"),
                  "unwritable": ("/proc/plcli.png", "cannot write the plot to /proc/plcli.png"),
                  "no-matplotlib": (tmp_path / "rank.png", "--plot needs matplotlib")}[plot]
    if plot == "no-matplotlib":  # an install without the `plot` extra
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else find_spec(name, *a))
    assert_refused(plcli("bench", "decode", llama_checkpoint, "--rank", 8, "--plot", path), says=says)


def test_keys_generate_refuses_a_directory_in_place_of_a_key_file(tmp_path):
    (tmp_path / "edge.key_secret").mkdir()
    assert_refused(plcli("keys", "generate", tmp_path / "edge", "--force"),
                   says=f"{tmp_path / 'edge.key_secret'} exists and is not a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edge.key_secret"]


# -- standard streams ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("closed, args, says", [
    (0, (), "standard input is closed: give --prompt TEXT"),
    (1, ("--prompt", "hi"), "standard output is closed"),
])
def test_run_edge_with_a_closed_standard_stream_is_one_line(llama_bundle, closed, args, says):
    """Started with stdin (`<&-`) or stdout (`>&-`) closed, Python has None there: chat and the generated text then
    failed with "'NoneType' object has no attribute ..." as an internal error. Refused before any cloud is asked."""
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "plcli.cli", "run-edge", str(llama_bundle / "edge"),
                           "--connect", "tcp://127.0.0.1:1", "--timeout", "1", *args],
                          stdin=subprocess.DEVNULL, stdout=None if closed == 1 else subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=120, preexec_fn=lambda: os.close(closed))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and says in lines[0], done.stderr





def test_flags_that_would_be_dropped_or_written_as_given_are_refused(bundle_with_adapter, tmp_path):
    """tune --threads with --connect was silently ignored; export-peft wrote a --base-model that is not UTF-8 into
    adapter_config.json as an escaped lone surrogate."""
    split = bundle_with_adapter
    assert_refused(plcli("tune", split / "edge", "--connect", "tcp://127.0.0.1:1", "--threads", 2, "--data",
                         tmp_path / "never-read.txt"), says="--threads sets the threads of an in-process --cloud")
    assert_refused(plcli("export-peft", "--cloud", split / "cloud", "--edge", split / "edge", "--out", tmp_path / "peft",
                         "--base-model", "caf\udcff"), says="--base-model is not UTF-8 text")
    assert not (tmp_path / "peft").exists()

@pytest.mark.parametrize("args", [["--version"], ["split", "--help"], []])
def test_help_and_version_that_stdout_cannot_take_are_one_line(args):
    """A full disk (/dev/full) or a closed pipe under --help or --version ended in a traceback."""
    import subprocess
    import sys

    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "plcli.cli", *args], stdout=full, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.splitlines() == [
        "error: cannot write to standard output: No space left on device"], done.stderr

@pytest.mark.parametrize("as_json", [False, True])
def test_serve_cloud_with_stdout_closed_is_one_line_before_it_loads_or_binds(llama_bundle, as_json):
    """Its log goes to stdout: started with it closed, it failed with an AttributeError once the model had loaded."""
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "plcli.cli", "serve-cloud", str(llama_bundle / "cloud"), "--bind",
                           "tcp://127.0.0.1:*", *(["--json"] if as_json else [])], stdin=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, timeout=120, preexec_fn=lambda: os.close(1))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and lines == ["error: standard output is closed: there is nowhere to write the result"], \
        done.stderr




@pytest.mark.parametrize("args", [["estimate", "--paper"], ["estimate", "--paper", "--json"], ["split", "--help"]])
def test_a_reader_that_goes_away_ends_the_command_quietly(args):
    """`plcli ... | head`: a table stopped quietly (rich's way), the same output as JSON said "error: Broken pipe"
    with exit 2, and --help ended in a traceback."""
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # the reader is gone before a byte is written
    try:
        done = subprocess.run([sys.executable, "-m", "plcli.cli", *args], stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (1, ""), done.stderr

@pytest.mark.parametrize("command", [["inspect", "{bundle}"], ["estimate", "--paper"], ["keys", "generate", "{tmp}/k"]])
def test_any_command_with_stdout_closed_is_one_line_and_does_nothing(llama_bundle, tmp_path, command):
    """inspect printed its table into nothing and exited 0; keys wrote a key pair no one was told of."""
    import os
    import subprocess
    import sys

    args = [a.format(bundle=llama_bundle, tmp=tmp_path) for a in command]
    done = subprocess.run([sys.executable, "-m", "plcli.cli", *args], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, timeout=120, preexec_fn=lambda: os.close(1))
    assert done.returncode == 2 and done.stderr.splitlines() == [
        "error: standard output is closed: there is nowhere to write the result"], done.stderr
    assert list(tmp_path.iterdir()) == []

@pytest.mark.parametrize("command", ["serve-cloud", "run-edge", "tune"])
def test_a_wire_dtype_of_no_known_kind_is_refused_before_anything_loads(tmp_path, command):
    """serve-cloud refused it only once the model (and, for tuning, torch) had loaded. Given no bundle at all, a
    command that loaded first would say so instead."""
    rest = {"serve-cloud": ["--bind", "tcp://127.0.0.1:*"], "run-edge": ["--prompt", "hi"],
            "tune": ["--connect", "tcp://127.0.0.1:1", "--data", tmp_path / "notes.txt", "--out", tmp_path / "adapter"]
            }[command]
    assert_refused(plcli(command, tmp_path / "no-bundle", "--wire-dtype", "bfloat16", *rest),
                   says="--wire-dtype must be float32 or float16, not 'bfloat16'")

def test_tune_refuses_more_rows_per_pass_than_the_wire_carries(llama_bundle, tmp_path):
    """The cloud takes at most 256 rows a pass: 300 failed at the first step with the cloud's "invalid lengths", and
    a huge --batch-size (in-process too) built an index list until memory ran out."""
    (tmp_path / "notes.txt").write_text(TEXT)
    for rows in (257, 10**11):
        assert_refused(plcli("tune", llama_bundle / "edge", "--cloud", llama_bundle / "cloud", "--data",
                             tmp_path / "notes.txt", "--batch-size", rows, "--out", tmp_path / "adapter"),
                       says=f"--batch-size {rows} is out of range: must be 1 to 256")


# -- Ctrl-C ------------------------------------------------------------------------------------------------------


def test_an_interrupt_that_a_library_wrapped_is_reported_as_an_interrupt(capsys):
    """Ctrl-C while onnxruntime's extension loads (its first import, inside a command) comes out of the import as
    "ImportError: initialization failed", raised from the KeyboardInterrupt: it was an internal error, exit 1."""
    import typer

    from plcli.app import reports_errors

    @reports_errors
    def command():
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise ImportError("initialization failed") from e

    with pytest.raises(typer.Exit) as exit_:
        command()
    assert exit_.value.exit_code == 130 and capsys.readouterr().err.strip() == "error: interrupted"


def test_an_interrupt_while_the_commands_load_is_one_line(monkeypatch, capsys):
    """The commands' modules (typer, rich, ...) load in a few tenths of a second after start: a Ctrl-C then was a
    traceback of the import."""
    import plcli.cli as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_register", interrupted)
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 130 and capsys.readouterr().err.strip() == "error: interrupted"


def test_an_interrupt_typer_turned_into_exit_130_is_one_line(monkeypatch, capsys):
    """typer turns a Ctrl-C outside the command's own handling (while it parses, say) into exit code 130, silently."""
    import plcli.cli as cli

    monkeypatch.setattr(cli, "_register", lambda: (lambda **_: 130))
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 130 and capsys.readouterr().err.strip() == "error: interrupted"


# -- files this user may not read -------------------------------------------------------------------------------------


def _as_a_user_files_bind(args: list[str]):
    """Run plcli with file permissions in force: as root, without the capabilities that override them (setpriv)."""
    import os
    import subprocess
    import sys

    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root without setpriv: file permissions do not bind")
        caps = "-dac_override,-dac_read_search"
        prefix = ["setpriv", "--bounding-set", caps, "--inh-caps", caps]
    return subprocess.run([*prefix, sys.executable, "-m", "plcli.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("what", ["weights", "graph", "checkpoint"])
def test_a_file_that_cannot_be_read_is_not_called_missing_or_damaged(llama_bundle, llama_checkpoint, tmp_path, what):
    """safetensors words a file it may not open as missing, and ONNX Runtime as an invalid graph to split again."""
    split, ckpt = shutil.copytree(llama_bundle, tmp_path / "split"), shutil.copytree(llama_checkpoint, tmp_path / "ckpt")
    file, args = {"weights": (split / "cloud" / "weights.safetensors", ["inspect", split]),
                  "graph": (split / "edge" / "graphs" / "head.onnx", ["run-edge", split / "edge", "--prompt", "hi"]),
                  "checkpoint": (ckpt / "model.safetensors", ["split", ckpt, tmp_path / "out", "--rank", 8])}[what]
    file.chmod(0)
    done = _as_a_user_files_bind(args)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0] == f"error: {file}: cannot read it (Permission denied)", lines[0]


# -- endpoints ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["", "foo", "tcp://", "127.0.0.1:5555"])
def test_an_endpoint_without_a_transport_is_named_as_such(llama_bundle, endpoint):
    """serve-cloud took `--bind foo` (or nothing) for a non-loopback address ("foo is reachable from other machines"),
    and run-edge passed it to ZeroMQ, which says only "Invalid argument"."""
    says = f"{endpoint!r} is not an endpoint: give TRANSPORT://ADDRESS"
    assert_refused(plcli("serve-cloud", llama_bundle / "cloud", "--bind", endpoint), says=f"--bind {says}")
    if endpoint:  # an empty --connect names no endpoint at all (its own message)
        assert_refused(plcli("run-edge", llama_bundle / "edge", "--connect", endpoint, "--prompt", "hi"),
                       says=f"--connect {says}")


def test_an_unwritable_key_directory_names_the_pair_not_a_temporary_one(tmp_path):
    """/proc refuses new entries even to root: the message named `.k.RANDOM`, the staging directory."""
    assert_refused(plcli("keys", "generate", "/proc/plcli-k"), says="cannot write /proc/plcli-k: ")
