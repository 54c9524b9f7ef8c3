"""`plcli tune` and `plcli export-peft`: exact gradients across the split, data handling, checkpoints, locality, peft.

Most tests run the cloud in this process (runtime/cloud_tune.py) behind the
`TrainLink` interface; the last ones run it behind a real server on loopback
(`RemoteTrainLink`), down to killing a `plcli serve-cloud` process mid-run.
References are transformers autograd on the checkpoint with `W + B M A`, and peft.
"""

from __future__ import annotations

import errno
import json
import os
import select
import shutil
import subprocess
import time
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import zmq
from typer.testing import CliRunner

from plcli.cli import app
from plcli.exporters.verify import merged_reference, random_adapter
from plcli.recipes.base import family_for
from plcli.runtime.bundle import BundleError
from plcli.runtime.client import CloudError, RemoteTrainLink
from plcli.runtime.cloud import CloudModel
from plcli.runtime.cloud_tune import TorchSegments
from plcli.runtime.edge import EdgeModel, forward, load_adapter
from plcli.runtime.plan import ALL_TARGETS
from plcli.runtime.server import CloudServer, running
from plcli.runtime.train_link import LinkError
from plcli.runtime.tune import AdamW, Tuner, TuneConfig, TuneError, TuneInterrupted, write_adapter
from plcli.runtime.tune_data import IGNORE, Batch, load_dataset
from processes import listening, spawn_plcli
from tcp_relay import TcpRelay

TOLERANCE = 1e-4
TEXT = ("Private notes stay on the edge. The cloud only sees activations of the frozen layers. " * 30).strip()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matmuls: extra threads only add synchronisation (and noise on a busy CI machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "train.txt").write_text(TEXT)
    (d / "pairs.jsonl").write_text("".join(json.dumps({"prompt": f"Code {i}:", "response": f" {i * 7919 % 10000}."}) + "\n"
                                           for i in range(12)))
    (d / "eval.txt").write_text("The edge keeps the private notes; the cloud sees activations.")
    return d


@pytest.fixture(scope="module")
def bias_all_targets_bundle(checkpoint_factory, bundle_factory):
    """Shared with test_split_parity: biases everywhere, all seven targets (four cuts per layer)."""
    ckpt = checkpoint_factory("llama-bias", "llama", attention_bias=True, mlp_bias=True)
    return ckpt, bundle_factory(ckpt, rank=8, targets=",".join(ALL_TARGETS))


def make_tuner(bundle, data_files, out, link=None, **config):
    edge = EdgeModel(bundle / "edge")
    link = link or TorchSegments(CloudModel(bundle / "cloud")).new_session()
    config = TuneConfig(**{"seq_len": 16, "batch_size": 3, "warmup": 2, "save_every": 0, "lr": 3e-2, **config})
    return Tuner(edge, link, data_files, config, out, eval_data=None)


# -- exactness ----------------------------------------------------------------


def reference_loss(model_dir, cloud: CloudModel, m: dict, batch: Batch):
    """transformers autograd: the checkpoint with W + B M A built from M leaves that require grad."""
    model = merged_reference(model_dir, cloud, {k: np.zeros_like(v) for k, v in m.items()})
    leaves = {k: torch.tensor(v, requires_grad=True) for k, v in m.items()}
    loss = summed_loss(model, cloud, leaves, batch)
    loss.backward()
    return loss.item(), {k: v.grad.numpy() for k, v in leaves.items()}


def summed_loss(model, cloud: CloudModel, leaves: dict, batch: Batch) -> torch.Tensor:
    """The transformers model's summed cross-entropy on `batch` with W + B M A, M the torch `leaves`."""
    family = family_for(model.config)
    weights = dict(model.named_parameters())
    r = cloud.manifest.rank
    merged = {}
    for layer in range(cloud.arch.num_layers):
        for cut in cloud.plan.cuts:
            a_stack = torch.from_numpy(cloud.weights[f"layers.{layer}.A.{cut.stage}"])
            for i, t in enumerate(cut.targets):
                a = a_stack[:, i * r:(i + 1) * r].T
                b = torch.from_numpy(cloud.weights[f"layers.{layer}.B.{t}"]).T
                name = family.hf_name(layer, f"{t}.w")
                merged[name] = weights[name].detach() + b @ leaves[f"layers.{layer}.{t}.M"] @ a
    logits = torch.func.functional_call(model, merged, (torch.from_numpy(batch.inputs),),
                                        {"attention_mask": torch.from_numpy(batch.attention_mask)}).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.from_numpy(batch.targets).flatten(),
                                             ignore_index=IGNORE, reduction="sum")


def padded_batch(vocab: int, seed: int = 0) -> Batch:
    """Three right-padded rows, one with its first targets ignored (a prompt)."""
    rng = np.random.default_rng(seed)
    inputs = rng.integers(0, vocab, (3, 12))
    mask = np.ones((3, 12), np.int64)
    mask[1, 8:] = 0
    mask[2, 5:] = 0
    targets = rng.integers(0, vocab, (3, 12))
    targets[mask == 0] = IGNORE
    targets[0, :4] = IGNORE
    return Batch(inputs, targets, mask)


@pytest.mark.parametrize("case", ["llama-qkv", "llama-bias-all-targets", "mistral-window"])
def test_gradient_of_m_matches_single_process_autograd(case, llama_checkpoint, llama_bundle, bias_all_targets_bundle,
                                                       checkpoint_factory, bundle_factory, data, tmp_path):
    if case == "llama-qkv":
        ckpt, bundle = llama_checkpoint, llama_bundle
    elif case == "llama-bias-all-targets":
        ckpt, bundle = bias_all_targets_bundle
    else:  # a window shorter than the batch: the backward must mask like the forward
        ckpt = checkpoint_factory("mistral-window", "mistral", sliding_window=8)
        bundle = bundle_factory(ckpt, rank=8)
    tuner = make_tuner(bundle, [data / "train.txt"], tmp_path / "out")
    m = random_adapter(tuner.edge, seed=1)
    for key, cut in tuner._cut_targets().items():
        tuner.m[key][...] = np.stack([m[f"layers.{key[0]}.{t}.M"] for t in cut.targets])
    batch = padded_batch(tuner.edge.arch.vocab_size)
    grads = {k: np.zeros_like(v) for k, v in tuner.m.items()}
    loss = tuner.forward_backward(batch, 1.0, grads)

    want_loss, want = reference_loss(ckpt, CloudModel(bundle / "cloud"), m, batch)
    assert loss == pytest.approx(want_loss, rel=1e-5)
    got = {}
    for key, cut in tuner._cut_targets().items():
        got.update({f"layers.{key[0]}.{t}.M": grads[key][i] for i, t in enumerate(cut.targets)})
    assert got.keys() == want.keys()
    for k in want:
        rel = np.linalg.norm(got[k] - want[k]) / np.linalg.norm(want[k])
        assert rel < TOLERANCE, (k, rel)


def test_adamw_matches_torch():
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal((3, 4, 4)).astype(np.float32)
    params = {"m": p0.copy()}
    ours = AdamW(params, weight_decay=0.1)
    leaf = torch.tensor(p0.copy(), requires_grad=True)
    theirs = torch.optim.AdamW([leaf], lr=1.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    for step, lr in enumerate((1e-2, 5e-3, 2e-2)):
        g = rng.standard_normal((3, 4, 4)).astype(np.float32)
        ours.step({"m": g}, lr)
        theirs.param_groups[0]["lr"] = lr
        leaf.grad = torch.from_numpy(g.copy())
        theirs.step()
    np.testing.assert_allclose(params["m"], leaf.detach().numpy(), rtol=1e-6, atol=1e-7)


def test_a_run_matches_torch_adamw_clipping_and_the_transformers_cosine_schedule(llama_checkpoint, llama_bundle, data,
                                                                                  tmp_path):
    """Whole steps, against references no one here wrote: transformers autograd on W + B M A, torch's
    clip_grad_norm_ (clipping every step) and AdamW with weight decay, transformers' cosine schedule; micro-batches
    accumulated. (plcli's warmup takes its first step at lr/warmup, not at 0 as transformers' does: warmup 0 here.)"""
    from transformers import get_cosine_schedule_with_warmup

    from plcli.runtime.tune_data import RowOrder, make_batch

    tuner = make_tuner(llama_bundle, [data / "train.txt", data / "pairs.jsonl"], tmp_path / "out", steps=5, warmup=0,
                       grad_accum=2, max_grad_norm=1e-3, weight_decay=0.1)
    c, rows = tuner.config, tuner.train.rows
    summary = tuner.run()

    cloud = CloudModel(llama_bundle / "cloud")
    got = tuner.adapter_matrices()
    model = merged_reference(llama_checkpoint, cloud, {k: np.zeros_like(v) for k, v in got.items()})
    leaves = {k: torch.zeros(v.shape, requires_grad=True) for k, v in got.items()}
    optimizer = torch.optim.AdamW(list(leaves.values()), lr=c.lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=c.weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, 0, tuner.total_steps)
    order, losses = RowOrder(len(rows), c.seed), []  # the same rows in the same order: not what is checked here
    for _ in range(tuner.total_steps):
        batches = [make_batch([rows[i] for i in order.take(c.batch_size)], tuner.pad) for _ in range(c.grad_accum)]
        targets = sum(b.target_count for b in batches)
        optimizer.zero_grad()
        step_loss = 0.0
        for batch in batches:
            loss = summed_loss(model, cloud, leaves, batch)
            (loss / targets).backward()
            step_loss += loss.item()
        assert torch.nn.utils.clip_grad_norm_(list(leaves.values()), c.max_grad_norm) > c.max_grad_norm
        optimizer.step()
        schedule.step()
        losses.append(step_loss / targets)
    np.testing.assert_allclose(summary.losses, losses, rtol=1e-5)
    for k, leaf in leaves.items():
        want = leaf.detach().numpy()
        assert np.linalg.norm(got[k] - want) / np.linalg.norm(want) < TOLERANCE, k


def test_the_saved_adapter_gives_the_tuned_models_loss(llama_bundle, data, tmp_path):
    """What `tune` saves is what it tuned: the adapter loaded as run-edge loads it gives the run's last eval loss."""
    edge_dir = llama_bundle / "edge"
    link = TorchSegments(CloudModel(llama_bundle / "cloud")).new_session()
    config = TuneConfig(seq_len=16, batch_size=3, warmup=2, save_every=0, lr=3e-2, steps=3)
    tuner = Tuner(EdgeModel(edge_dir), link, [data / "train.txt"], config, tmp_path / "adapter",
                  eval_data=[data / "eval.txt"])
    summary = tuner.run()
    assert summary.eval_loss_after != pytest.approx(summary.eval_loss_before, rel=1e-3)  # M did change the model
    edge, cloud = EdgeModel(edge_dir, adapter=tmp_path / "adapter"), CloudModel(llama_bundle / "cloud")
    total = count = 0.0
    for batch in tuner.eval_set:  # right-padded rows: causal attention keeps the padding out of the real positions
        logits = forward(edge, cloud.new_session(), batch.inputs).astype(np.float64)
        kept = batch.targets != IGNORE
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        total -= np.take_along_axis(logp, np.where(kept, batch.targets, 0)[..., None], -1)[..., 0][kept].sum()
        count += kept.sum()
    assert total / count == pytest.approx(summary.eval_loss_after, rel=1e-5)


# -- data ---------------------------------------------------------------------


def test_packing_and_response_only_loss(llama_bundle, data):
    edge = EdgeModel(llama_bundle / "edge")
    tok = edge.tokenizer
    ds = load_dataset([data / "train.txt", data / "pairs.jsonl"], tok, seq_len=16, bos=0, eos=0)
    stream = [0] + tok(TEXT, add_special_tokens=False)["input_ids"]
    packed = [r for r in ds.rows if r.loss.all()]
    # Every token after the first is a target exactly once, in order.
    assert np.concatenate([r.ids[1:] for r in packed]).tolist() == stream[1:]
    assert all(len(r.ids) == 17 for r in packed[:-1])
    pairs = [r for r in ds.rows if not r.loss.all()]
    assert len(pairs) == ds.pairs == 12
    for i, r in enumerate(pairs):
        prompt = tok(f"Code {i}:", add_special_tokens=False)["input_ids"]
        response = tok(f" {i * 7919 % 10000}.", add_special_tokens=False)["input_ids"]
        assert r.ids.tolist() == [0, *prompt, *response, 0]
        # Loss on the response tokens and the closing eos only.
        assert r.ids[1:][r.loss].tolist() == [*response, 0]


def test_truncation_keeps_rows_with_a_response(llama_bundle, tmp_path):
    tok = EdgeModel(llama_bundle / "edge").tokenizer
    f = tmp_path / "long.jsonl"
    f.write_text(json.dumps({"prompt": "word " * 40, "response": "answer"}) + "\n"
                 + json.dumps({"prompt": "short", "response": " answer " * 40}) + "\n")
    ds = load_dataset([f], tok, seq_len=16, bos=0, eos=0)
    assert ds.truncated == 2 and ds.dropped == 1 and len(ds.rows) == 1 and len(ds.rows[0].ids) == 17
    # What was cut is said on stderr, also with --json, whose stdout stays the summary alone.
    code, stdout, err = run_cli("tune", llama_bundle / "edge", "--cloud", llama_bundle / "cloud", "--data", f,
                                "--eval-data", f, "--steps", 1, "--seq-len", 16, "--out", tmp_path / "out", "--json")
    assert code == 0 and json.loads(stdout)["steps"] == 1, err
    for what in ("training", "evaluation"):
        assert (f"2 of 2 prompt/response pairs of the {what} data are longer than --seq-len 16: cut to it, "
                "1 of them left out (the prompt alone fills the row)") in " ".join(err.split()), err


# -- bad input: one line, exit 2 ----------------------------------------------------


BAD_FILES = {
    "empty.txt": (b"  \n", "empty file"),
    "binary.txt": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary file"),
    "latin1.txt": ("caf\u00e9 cr\u00e8me".encode("latin-1"), "not UTF-8"),
    "missing.jsonl": (b'{"text": "fine"}\n{"prompt": "no response"}\n', "missing.jsonl:2: missing \"response\""),
    "other.jsonl": (b'{"title": "x"}\n', "missing \"text\""),
    "broken.jsonl": (b'{"text": "unterminated\n', "not valid JSON"),
    "notes.csv": (b"a,b\n", "unsupported data file"),
}


def test_a_byte_order_mark_is_no_text_and_a_directory_is_named_as_one(tmp_path):
    """Some editors begin UTF-8 files with U+FEFF: a .jsonl was refused ("decode using utf-8-sig") and a .txt trained
    on the mark as text. A directory without a suffix was an "unsupported data file"."""
    from plcli.runtime.tune_data import DataError, read_records

    for name, body in (("notes.txt", "Private notes."), ("notes.jsonl", '{"text": "Private notes."}\n')):
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + body.encode())
        assert read_records(tmp_path / name) == [body if name.endswith(".txt") else "Private notes."]
    (tmp_path / "notes").mkdir()
    with pytest.raises(DataError, match="notes: is a directory"):
        read_records(tmp_path / "notes")

def run_cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_data_is_one_line_exit_2(name, llama_bundle, data, tmp_path):
    content, message = BAD_FILES[name]
    (tmp_path / name).write_bytes(content)
    # `--data good bad`: the second path is read like the first.
    code, _, err = run_cli("tune", llama_bundle / "edge", "--cloud", llama_bundle / "cloud", "--data", data / "train.txt",
                           tmp_path / name, "--out", tmp_path / "out", "--steps", 1)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_bad_options_and_foreign_adapters_are_refused(llama_bundle, bundle_factory, llama_checkpoint, data, tmp_path):
    edge, cloud = llama_bundle / "edge", llama_bundle / "cloud"
    common = ("--data", data / "train.txt", "--steps", 2, "--seq-len", 16, "--batch-size", 2)
    code, _, err = run_cli("tune", edge, "--cloud", cloud, "--data", data / "train.txt", "--seq-len", 100000, "--out", tmp_path / "a")
    assert code == 2 and "exceeds the model's context" in err and len(err.strip().splitlines()) == 1
    for option, value in (("--weight-decay", "inf"), ("--max-grad-norm", "nan"), ("--epochs", "inf"), ("--seed", "-1")):
        given = common[:2] + common[4:] if option == "--epochs" else common  # not --steps and --epochs
        code, _, err = run_cli("tune", edge, "--cloud", cloud, *given, "--out", tmp_path / "c", option, value)
        assert code == 2 and f"{option} {value} is out of range" in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "c").exists()
    # A wire dtype there is none of, in this process or over a connection (refused before connecting), as run-edge does.
    for cloud_option in (("--cloud", cloud), ("--connect", "tcp://127.0.0.1:1")):
        code, _, err = run_cli("tune", edge, *cloud_option, *common, "--out", tmp_path / "c", "--wire-dtype", "bfloat16")
        assert code == 2 and "--wire-dtype must be float32 or float16" in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "c").exists()
    # In this process nothing crosses a wire: a wire dtype there would change nothing, silently.
    code, _, err = run_cli("tune", edge, "--cloud", cloud, *common, "--out", tmp_path / "c", "--wire-dtype", "float16")
    assert code == 2 and "an in-process --cloud sends nothing" in err and len(err.strip().splitlines()) == 1, err
    # `--data a b` reads both; a path after --eval-data's would be trained on, and is refused instead.
    code, _, err = run_cli("tune", edge, "--cloud", cloud, *common, "--eval-data", data / "eval.txt", data / "pairs.jsonl",
                           "--out", tmp_path / "c")
    assert code == 2 and "pairs.jsonl follows --eval-data's file" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "c").exists()
    # Periodic evaluation needs something held out to evaluate on.
    code, _, err = run_cli("tune", edge, "--cloud", cloud, *common, "--out", tmp_path / "c", "--eval-every", 1)
    assert code == 2 and "--eval-every 1 evaluates on --eval-data" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "c").exists()

    # An adapter tuned for another split of the same checkpoint (other A and B).
    other = bundle_factory(llama_checkpoint, rank=8, seed=1)
    foreign = tmp_path / "foreign"
    assert run_cli("tune", other / "edge", "--cloud", other / "cloud", *common, "--out", foreign)[0] == 0
    for args in (
        ("tune", edge, "--cloud", cloud, *common, "--out", foreign),  # would overwrite it
        ("tune", edge, "--cloud", cloud, *common, "--out", foreign, "--resume"),
        ("export-peft", "--cloud", cloud, "--edge", edge, "--adapter", foreign, "--out", tmp_path / "peft"),
    ):
        code, _, err = run_cli(*args)
        assert code == 2 and ("another bundle" in err or "belongs to A/B" in err), err
        assert len(err.strip().splitlines()) == 1
    with pytest.raises(BundleError, match="belongs to A/B"):
        EdgeModel(edge, adapter=foreign)
    # An M that is not finite would make every logit or loss NaN, far from its cause.
    broken = tmp_path / "nan"
    broken.mkdir()
    m = random_adapter(EdgeModel(edge), seed=2)
    next(iter(m.values()))[0, 0] = np.nan
    write_adapter(broken, EdgeModel(edge).manifest, m)
    for args in (("export-peft", "--cloud", cloud, "--edge", edge, "--adapter", broken, "--out", tmp_path / "peft"),
                 ("run-edge", edge, "--connect", "tcp://127.0.0.1:1", "--adapter", broken, "--prompt", "hi")):
        code, _, err = run_cli(*args)
        assert code == 2 and "not finite" in err and len(err.strip().splitlines()) == 1, (args, err)
    code, _, err = run_cli("tune", edge, "--cloud", other / "cloud", *common, "--out", tmp_path / "b")
    assert code == 2 and "not split together" in err


@pytest.mark.parametrize("damage, says", [
    (lambda config: [config], "adapter.json: not a JSON object"),
    (lambda config: {**config, "targets": 5}, "adapter rank/targets do not match the bundle"),
    (lambda config: {**config, "targets": None}, "adapter rank/targets do not match the bundle"),
    (lambda config: {**config, "rank": "8"}, "adapter rank/targets do not match the bundle"),
    (lambda config: {k: v for k, v in config.items() if k != "ab_fingerprint"}, "names no A/B fingerprint"),
], ids=["a list", "targets a number", "targets null", "rank a string", "no fingerprint"])
def test_commands_that_read_an_adapter_refuse_a_malformed_adapter_json(llama_bundle, tmp_path, damage, says):
    edge = EdgeModel(llama_bundle / "edge")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    write_adapter(adapter, edge.manifest, random_adapter(edge, seed=2))
    config = json.loads((adapter / "adapter.json").read_text())
    (adapter / "adapter.json").write_text(json.dumps(damage(config)))
    for args in (("run-edge", llama_bundle / "edge", "--adapter", adapter, "--connect", "tcp://127.0.0.1:1", "--prompt", "hi"),
                 ("export-peft", "--cloud", llama_bundle / "cloud", "--edge", llama_bundle / "edge", "--adapter", adapter,
                  "--out", tmp_path / "peft")):
        code, _, err = run_cli(*args)
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1, (args[0], err)
        assert "internal error" not in err


# -- checkpoints, resume, faults ----------------------------------------------------


class FailingLink:
    """Passes calls to the cloud until call number `fail_at`, which fails with `error` (a lost connection)."""

    def __init__(self, inner, fail_at: int, error: LinkError | None = None):
        self.inner, self.calls, self.fail_at = inner, 0, fail_at
        self.error = error or LinkError("connection reset")

    def __getattr__(self, name):
        fn = getattr(self.inner, name)

        def call(*args, **kwargs):
            if name != "abort":
                self.calls += 1
                if self.calls == self.fail_at:
                    raise self.error
            return fn(*args, **kwargs)

        return call


def test_grad_accum_builds_one_micro_batch_at_a_time_and_equals_one_big_batch(llama_bundle, data, tmp_path, monkeypatch):
    """A step built all its --grad-accum micro-batches before running the first, so a large --grad-accum held them all
    in memory at once (and a huge one never started). Now each is built as it runs; the step is unchanged: a token
    mean over all of them, the rows one big batch of the same size would take."""
    import plcli.runtime.tune as tune_module

    events = []
    real_make_batch = tune_module.make_batch
    monkeypatch.setattr(tune_module, "make_batch", lambda *a, **k: events.append("build") or real_make_batch(*a, **k))
    files = [data / "train.txt", data / "pairs.jsonl"]
    accumulated = make_tuner(llama_bundle, files, tmp_path / "accumulated", steps=2, batch_size=2, grad_accum=3)
    real_pass = accumulated.forward_backward
    accumulated.forward_backward = lambda *a: events.append("run") or real_pass(*a)
    summary = accumulated.run()
    assert events == ["build", "run"] * 6
    big = make_tuner(llama_bundle, files, tmp_path / "big", steps=2, batch_size=6).run()
    np.testing.assert_allclose(summary.losses, big.losses, rtol=1e-5)
    manifest = EdgeModel(llama_bundle / "edge").manifest
    got, want = load_adapter(tmp_path / "accumulated", manifest), load_adapter(tmp_path / "big", manifest)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-6, err_msg=k)


def resume_tuner(bundle, files, out, **config):
    edge = EdgeModel(bundle / "edge")
    link = TorchSegments(CloudModel(bundle / "cloud")).new_session()
    config = TuneConfig(**{"seq_len": 16, "batch_size": 3, "warmup": 2, "save_every": 0, "lr": 3e-2, **config})
    return Tuner(edge, link, files, config, out, resume=True)


def test_ctrl_c_as_a_step_updates_m_lands_before_or_after_the_update_never_inside(llama_bundle, data, tmp_path,
                                                                                   monkeypatch):
    """Python raises KeyboardInterrupt between any two bytecodes: one landing while a step updates M would save half
    a step (and skip its rows). The update holds it: the step is applied whole, saved, and --resume goes on exactly."""
    import signal

    files = [data / "train.txt"]
    whole = make_tuner(llama_bundle, files, tmp_path / "whole", steps=4).run()
    update = AdamW.step

    def ctrl_c_during_the_third_update(self, grads, lr):
        if self.t == 2:
            signal.raise_signal(signal.SIGINT)
        update(self, grads, lr)

    monkeypatch.setattr(AdamW, "step", ctrl_c_during_the_third_update)
    with pytest.raises(TuneInterrupted) as info:
        make_tuner(llama_bundle, files, tmp_path / "run", steps=4).run()
    monkeypatch.setattr(AdamW, "step", update)
    assert info.value.saved_step == 3
    resumed = resume_tuner(llama_bundle, files, tmp_path / "run", steps=4).run()
    np.testing.assert_array_equal(resumed.losses, whole.losses)
    manifest = EdgeModel(llama_bundle / "edge").manifest
    got, want = load_adapter(tmp_path / "run", manifest), load_adapter(tmp_path / "whole", manifest)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_lost_cloud_keeps_last_step_and_resume_continues_exactly(llama_bundle, data, tmp_path):
    files = [data / "train.txt", data / "pairs.jsonl"]
    options = dict(steps=6, grad_accum=2, save_every=2)
    whole = make_tuner(llama_bundle, files, tmp_path / "whole", **options).run()

    cuts = len(EdgeModel(llama_bundle / "edge").plan.segments) - 1
    calls_per_pass = 2 * cuts + 1  # forward_start + a resume per cut, backward_start + a resume per cut but the first
    # Fail inside step 4's second micro-batch: steps 1-3 are done, the last checkpoint is step 2.
    fail_at = 3 * 2 * calls_per_pass + calls_per_pass + 3
    inner = TorchSegments(CloudModel(llama_bundle / "cloud")).new_session()
    tuner = make_tuner(llama_bundle, files, tmp_path / "run", link=FailingLink(inner, fail_at), **options)
    with pytest.raises(TuneInterrupted, match="rerun with --resume") as info:
        tuner.run()
    assert (info.value.failed_step, info.value.saved_step) == (4, 3)
    assert inner.phase == "idle"  # the cloud dropped what it kept for the failed step
    state = json.loads((tmp_path / "run" / "training" / "state.json").read_text())
    assert state["step"] == 3 and state["losses"] == whole.losses[:3]

    resumed = resume_tuner(llama_bundle, files, tmp_path / "run", **options).run()
    assert resumed.resumed_from == 3
    assert resumed.losses == whole.losses  # the same curve, bit for bit
    manifest = EdgeModel(llama_bundle / "edge").manifest
    final, reference = load_adapter(tmp_path / "run", manifest), load_adapter(tmp_path / "whole", manifest)
    for k in reference:
        np.testing.assert_array_equal(final[k], reference[k])


def test_a_step_the_cloud_refuses_stops_with_exit_2_and_keeps_the_last_checkpoint(llama_bundle, data, tmp_path):
    cuts = len(EdgeModel(llama_bundle / "edge").plan.segments) - 1
    inner = TorchSegments(CloudModel(llama_bundle / "cloud")).new_session()
    refusal = CloudError("the cloud refused: a pass of 3 x 16 tokens exceeds this cloud's limits", "limit")
    tuner = make_tuner(llama_bundle, [data / "train.txt"], tmp_path / "run", link=FailingLink(inner, 2 * (2 * cuts + 1) + 1, refusal),
                       steps=4)
    with pytest.raises(TuneInterrupted) as info:
        tuner.run()
    # Not "lost the cloud ... rerun": the same step would be refused again, by any cloud with these limits.
    assert info.value.exit_code == 2
    assert str(info.value) == f"step 3: {refusal}; {tmp_path / 'run'} holds step 2"
    assert json.loads((tmp_path / "run" / "training" / "state.json").read_text())["step"] == 2


def test_resume_refuses_changed_options_or_data(llama_bundle, data, tmp_path):
    make_tuner(llama_bundle, [data / "train.txt"], tmp_path / "out", steps=2).run()
    with pytest.raises(TuneError, match="--lr 0.001 differs"):
        resume_tuner(llama_bundle, [data / "train.txt"], tmp_path / "out", steps=2, lr=1e-3)
    with pytest.raises(TuneError, match="training data changed"):
        resume_tuner(llama_bundle, [data / "train.txt", data / "eval.txt"], tmp_path / "out", steps=2)
    # Held-out data too: the loss before tuning, and every evaluation so far, were measured on the run's own.
    edge = EdgeModel(llama_bundle / "edge")
    config = TuneConfig(seq_len=16, batch_size=3, warmup=2, save_every=0, lr=3e-2, steps=2)
    link = TorchSegments(CloudModel(llama_bundle / "cloud")).new_session()
    Tuner(edge, link, [data / "train.txt"], config, tmp_path / "held", eval_data=[data / "eval.txt"]).run()
    Tuner(edge, link, [data / "train.txt"], config, tmp_path / "held", eval_data=[data / "eval.txt"], resume=True)
    for eval_data in ([data / "pairs.jsonl"], None):
        with pytest.raises(TuneError, match="held-out data differs"):
            Tuner(edge, link, [data / "train.txt"], config, tmp_path / "held", eval_data=eval_data, resume=True)


def snapshot(d) -> dict:
    return {str(f.relative_to(d)): f.read_bytes() for f in sorted(d.rglob("*")) if f.is_file()}


def interrupted_run(bundle, files, out, stop_after: int, **config):
    """A run stopped by Ctrl-C after `stop_after` of its steps: `out` holds that step, unfinished."""
    tuner = make_tuner(bundle, files, out, **config)

    def ctrl_c(report):
        if report.step == stop_after:
            raise KeyboardInterrupt

    with pytest.raises(TuneInterrupted):
        tuner.run(on_step=ctrl_c)



@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_a_kill_or_a_closed_terminal_saves_the_last_step_as_ctrl_c_does(llama_bundle, data, tmp_path, sig):
    """SIGTERM (a `kill`) and SIGHUP (the terminal closed) ended the run on the spot, every step since the last
    checkpoint lost, and nothing said."""
    import signal

    from processes import spawn_plcli

    out = tmp_path / "adapter"
    state = out / "training" / "state.json"
    # No checkpoint but the one the signal makes; the evaluation every 2 steps says how far it has got.
    tune = spawn_plcli("tune", llama_bundle / "edge", "--cloud", llama_bundle / "cloud", "--data", data / "train.txt",
                       "--seq-len", 16, "--batch-size", 1, "--steps", 100_000, "--save-every", 0,
                       "--eval-data", data / "eval.txt", "--eval-every", 2, "--out", out)
    try:
        deadline, said = time.monotonic() + 120, ""
        while "step 2: eval loss" not in said:
            assert tune.poll() is None and time.monotonic() < deadline, said
            if select.select([tune.stderr], [], [], 1.0)[0]:
                said += tune.stderr.readline()
        assert not state.exists()
        tune.send_signal(getattr(signal, sig))
        _, err = tune.communicate(timeout=60)
    finally:
        if tune.poll() is None:
            tune.kill()
            tune.wait()
    step = json.loads(state.read_text())["step"]
    assert tune.returncode == 130 and step >= 2, err
    assert err.strip().splitlines()[-1].startswith("error: interrupted during step ") and \
        f"{out} holds step {step}: rerun with --resume" in err, err

def test_an_adapter_in_out_is_kept_unless_force_and_an_unfinished_run_points_at_resume(llama_bundle, data, tmp_path):
    edge, cloud = llama_bundle / "edge", llama_bundle / "cloud"
    common = ("tune", edge, "--cloud", cloud, "--data", data / "train.txt", "--seq-len", 16, "--batch-size", 3,
              "--warmup", 2, "--lr", 0.03, "--save-every", 0)

    def refused(out, *args, says):
        before = snapshot(out)
        code, _, err = run_cli(*common, "--out", out, *args)
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
        assert snapshot(out) == before

    finished = tmp_path / "finished"
    assert run_cli(*common, "--steps", 2, "--out", finished)[0] == 0
    refused(finished, "--steps", 2, says=f"{finished} holds a finished adapter for this bundle (step 2 of 2); --force replaces it")
    code, stdout, err = run_cli(*common, "--steps", 1, "--out", finished, "--force", "--json")
    assert code == 0 and json.loads(stdout)["steps"] == 1, err
    assert json.loads((finished / "adapter.json").read_text())["steps"] == 1

    unfinished = tmp_path / "unfinished"
    interrupted_run(llama_bundle, [data / "train.txt"], unfinished, 2, steps=4)
    refused(unfinished, "--steps", 4,
            says=f"{unfinished} holds an unfinished run for this bundle (step 2 of 4): --resume continues it, --force starts over")
    refused(unfinished, "--steps", 4, "--resume", "--force", says="give --resume to continue the run in --out or --force")
    code, stdout, err = run_cli(*common, "--steps", 4, "--out", unfinished, "--resume", "--json")
    assert code == 0 and json.loads(stdout)["resumed_from"] == 2, err

    # What a checkpoint would delete, or a link it would swap for a directory: refused before a step is run.
    (unfinished / "notes.txt").write_text("mine")
    for args in (("--resume",), ("--force",)):
        refused(unfinished, "--steps", 4, *args, says=f"{unfinished} holds {unfinished / 'notes.txt'}, which a checkpoint would delete")
    (unfinished / "notes.txt").unlink()
    (tmp_path / "link").symlink_to(unfinished)
    refused(tmp_path / "link", "--steps", 4, "--resume", says="is a symbolic link")

    bare = tmp_path / "bare"  # an adapter without a training state, as export tools write them
    bare.mkdir()
    write_adapter(bare, EdgeModel(edge).manifest, random_adapter(EdgeModel(edge), seed=2))
    refused(bare, "--steps", 1, says=f"{bare} holds an adapter for this bundle; --force replaces it")


def disk_full(kind: str):
    """What a full disk raises from safetensors' writer: its own error type, or an OSError from the file system."""
    from safetensors import SafetensorError

    if kind == "safetensors":
        return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("kind", ["safetensors", "oserror"])
def test_a_full_disk_while_saving_is_one_line_and_keeps_the_last_checkpoint(llama_bundle, data, tmp_path, monkeypatch, kind):
    import safetensors.numpy

    out, real_save, kept = tmp_path / "run", safetensors.numpy.save_file, {}

    def full_from_the_second_checkpoint(tensors, path, *args, **kwargs):
        if (out / "training" / "state.json").is_file():  # the first checkpoint is complete
            kept.update(snapshot(out))
            raise disk_full(kind)
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(safetensors.numpy, "save_file", full_from_the_second_checkpoint)
    code, _, err = run_cli("tune", llama_bundle / "edge", "--cloud", llama_bundle / "cloud", "--data", data / "train.txt",
                           "--steps", 3, "--seq-len", 16, "--batch-size", 3, "--save-every", 1, "--out", out)
    assert code == 2 and err.strip().splitlines() == [f"error: cannot write the adapter to {out}: No space left on device"], err
    assert kept and snapshot(out) == kept and json.loads((out / "training" / "state.json").read_text())["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_full_disk_while_exporting_peft_is_one_line_and_keeps_the_last_export(llama_bundle, tmp_path, monkeypatch):
    import safetensors.numpy

    edge = EdgeModel(llama_bundle / "edge")
    (tmp_path / "adapter").mkdir()
    write_adapter(tmp_path / "adapter", edge.manifest, random_adapter(edge, seed=2))
    export = ("export-peft", "--cloud", llama_bundle / "cloud", "--edge", llama_bundle / "edge",
              "--adapter", tmp_path / "adapter", "--out", tmp_path / "peft", "--force")
    assert run_cli(*export)[0] == 0
    before = snapshot(tmp_path / "peft")

    def full(*args, **kwargs):
        raise disk_full("safetensors")

    monkeypatch.setattr(safetensors.numpy, "save_file", full)
    code, _, err = run_cli(*export)
    assert code == 2 and err.strip().splitlines() == [
        f"error: cannot write the peft adapter to {tmp_path / 'peft'}: No space left on device"], err
    assert snapshot(tmp_path / "peft") == before and sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "peft"]


def test_the_demo_tune_act_runs_again_over_the_adapter_of_its_last_run(llama_bundle, tmp_path):
    """`plcli demo` splits with the same seed every run, so its last adapter belongs to the new bundle: it is replaced."""
    from plcli.tune_commands import tune_demo

    config = TuneConfig(steps=1, seq_len=16, batch_size=2, save_every=0)
    for _ in range(2):
        link = TorchSegments(CloudModel(llama_bundle / "cloud")).new_session()
        assert tune_demo(llama_bundle, tmp_path, link, config=config, say=lambda *_: None)["steps"] == 1


def test_resume_finds_a_checkpoint_a_killed_save_left_aside(llama_bundle, data, tmp_path):
    """SIGKILL between a save's two renames leaves the checkpoint at .NAME.old-PID: --resume puts it back and goes on."""
    out = tmp_path / "run"
    interrupted_run(llama_bundle, [data / "train.txt"], out, 1, steps=2)
    out.rename(tmp_path / ".run.old-4242")
    code, stdout, err = run_cli("tune", llama_bundle / "edge", "--cloud", llama_bundle / "cloud", "--data", data / "train.txt",
                                "--steps", 2, "--seq-len", 16, "--batch-size", 3, "--warmup", 2, "--lr", 0.03,
                                "--save-every", 0, "--out", out, "--resume", "--json")
    assert code == 0 and json.loads(stdout)["resumed_from"] == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def _set(path, value):
    def damage(state):
        *parents, last = path.split(".")
        for key in parents:
            state = state[key]
        state[last] = value
    return damage


@pytest.mark.parametrize("damage, says", [
    (lambda state: [state], "not a JSON object"),
    (_set("step", "1"), "step must be an integer of 0 or more"),
    (_set("total_steps", True), "total_steps must be a positive integer"),
    (_set("config", []), "config must be an object"),
    (_set("config.lr", "fast"), "config.lr must be a number"),
    (_set("config.steps", 2.5), "config.steps must be an integer"),
    (_set("losses", ["low"]), "losses must be a list of numbers"),
    (_set("data_position.rng", 5), "malformed checkpoint (data_position)"),
    (_set("data_position.cursor", -5), "malformed checkpoint (data_position)"),
    (_set("data_position.cursor", 10 ** 6), "malformed checkpoint (data_position)"),
    (_set("data_position.cursor", 2.5), "malformed checkpoint (data_position)"),
], ids=["a list", "step", "total_steps", "config", "config.lr", "config.steps", "losses", "data_position",
        "cursor below", "cursor past the rows", "cursor a fraction"])
def test_a_malformed_training_state_is_one_line(llama_bundle, data, tmp_path, damage, says):
    out = tmp_path / "run"
    interrupted_run(llama_bundle, [data / "train.txt"], out, 1, steps=2)
    path = out / "training" / "state.json"
    state = json.loads(path.read_text())
    path.write_text(json.dumps(damage(state) or state))
    for resume in (("--resume",), ()):
        code, _, err = run_cli("tune", llama_bundle / "edge", "--cloud", llama_bundle / "cloud", "--data", data / "train.txt",
                               "--steps", 2, "--seq-len", 16, "--batch-size", 3, "--warmup", 2, "--lr", 0.03,
                               "--save-every", 0, "--out", out, *resume)
        if resume or "data_position" not in says:
            assert code == 2 and f"{path}: " in err and says in err and len(err.strip().splitlines()) == 1, err
        else:  # only a resume reads the data position: without it, the run is what it was, unfinished
            assert code == 2 and "holds an unfinished run for this bundle" in err and len(err.strip().splitlines()) == 1, err


# -- what crosses the split -----------------------------------------------------------


class RecordingLink:
    """Records every value that crosses the link, in both directions."""

    def __init__(self, inner):
        self.inner, self.sent, self.received = inner, [], []

    def __getattr__(self, name):
        fn = getattr(self.inner, name)

        def call(*args, **kwargs):
            self.sent += [(name, a) for a in (*args, *kwargs.values())]
            out = fn(*args, **kwargs)
            if out is not None:
                self.received += [(name, v) for v in vars(out).values()]
            return out

        return call


def test_only_activations_cross_never_ids_labels_or_loss(llama_bundle, data, tmp_path):
    inner = TorchSegments(CloudModel(llama_bundle / "cloud")).new_session()
    link = RecordingLink(inner)
    edge = EdgeModel(llama_bundle / "edge")
    config = TuneConfig(seq_len=16, batch_size=3, warmup=2, lr=3e-2, steps=2, save_every=0)
    tuner = Tuner(edge, link, [data / "train.txt", data / "pairs.jsonl"], config, tmp_path / "out",
                  eval_data=[data / "eval.txt"])
    summary = tuner.run()

    arch, r = edge.arch, edge.manifest.rank
    stages = {c.stage for c in edge.plan.cuts}
    masks = 0
    for name, value in link.sent + link.received:
        if isinstance(value, np.ndarray) and value.dtype == np.float32:
            b, s = value.shape[:2]
            assert value.shape in ((b, s, arch.hidden_size), (b, s, 3, r)), (name, value.shape)
            # Activations, not ids or labels cast to float (M A x is all zeros while M still is).
            assert not value.any() or not np.array_equal(value, np.round(value)), name
        elif isinstance(value, np.ndarray):  # the padding mask, edge -> cloud at forward_start
            assert name == "forward_start" and value.ndim == 2 and set(np.unique(value).tolist()) <= {0, 1}, (name, value)
            masks += 1
        else:  # the train flag; cut coordinates coming back. No Python number is ever a loss.
            assert value is None or isinstance(value, bool) or value in stages \
                or (type(value) is int and 0 <= value < arch.num_layers), (name, value)
    assert masks == summary.steps + 2  # one per forward: two training steps, eval before and after (one batch each)
    assert {n for n, _ in link.sent} == {"forward_start", "forward_resume", "backward_start", "backward_resume"}


# -- the adapter and peft -------------------------------------------------------------


def test_cli_tune_json_and_adapter_runs_in_the_split(llama_bundle, data, tmp_path):
    out = tmp_path / "adapter"
    code, stdout, err = run_cli("tune", llama_bundle / "edge", "--cloud", llama_bundle / "cloud",
                                "--data", data / "train.txt", data / "pairs.jsonl", "--eval-data", data / "eval.txt",
                                "--steps", 4, "--seq-len", 16, "--batch-size", 4, "--lr", 0.05, "--out", out, "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    for key in ("steps", "train_loss_first", "train_loss_last", "eval_loss_before", "eval_loss_after", "tokens_per_s"):
        assert key in summary
    assert summary["steps"] == 4 and summary["eval_loss_after"] < summary["eval_loss_before"]
    edge = EdgeModel(llama_bundle / "edge", adapter=out)
    assert any(np.abs(m).max() > 0 for m in edge.adapter_matrices().values())


def test_export_peft_matches_the_split(llama_checkpoint, llama_bundle, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    edge = EdgeModel(llama_bundle / "edge")
    m = random_adapter(edge, seed=2)
    (tmp_path / "adapter").mkdir()
    write_adapter(tmp_path / "adapter", edge.manifest, m)
    code, _, err = run_cli("export-peft", "--cloud", llama_bundle / "cloud", "--edge", llama_bundle / "edge",
                           "--adapter", tmp_path / "adapter", "--out", tmp_path / "peft")
    assert code == 0, err
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] == edge.manifest.rank

    edge.set_adapter(m)
    ids = np.random.default_rng(0).integers(0, edge.arch.vocab_size, (2, 9))
    got = forward(edge, CloudModel(llama_bundle / "cloud").new_session(), ids)
    base = AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32, local_files_only=True)
    model = PeftModel.from_pretrained(base, tmp_path / "peft")
    with torch.no_grad():
        want = model(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(got - want).max() / np.abs(want).max() < TOLERANCE


@pytest.mark.parametrize("force", [(), ("--force",)], ids=["plain", "force"])
def test_tune_and_export_peft_refuse_a_file_as_out(llama_bundle, data, tmp_path, force):
    edge, cloud = llama_bundle / "edge", llama_bundle / "cloud"
    (tmp_path / "adapter").mkdir()
    write_adapter(tmp_path / "adapter", EdgeModel(edge).manifest, random_adapter(EdgeModel(edge), seed=2))
    out = tmp_path / "out"
    out.write_text("mine")
    for args in (("tune", edge, "--cloud", cloud, "--data", data / "train.txt", "--steps", 1, "--seq-len", 16),
                 ("export-peft", "--cloud", cloud, "--edge", edge, "--adapter", tmp_path / "adapter")):
        code, _, err = run_cli(*args, "--out", out, *force)
        assert code == 2 and f"{out} exists and is not a directory" in err and len(err.strip().splitlines()) == 1, err
    assert out.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "out"]


def test_export_peft_refuses_a_bundle_of_a_family_it_cannot_name_modules_for(llama_bundle, tmp_path):
    bundle = shutil.copytree(llama_bundle, tmp_path / "bundle")
    manifest = json.loads((bundle / "cloud" / "manifest.json").read_text())
    manifest["architecture"]["family"] = "gpt2"
    (bundle / "cloud" / "manifest.json").write_text(json.dumps(manifest))
    (bundle / "edge" / "adapter").mkdir()
    write_adapter(bundle / "edge" / "adapter", EdgeModel(bundle / "edge").manifest, random_adapter(EdgeModel(bundle / "edge"), seed=2))
    code, _, err = run_cli("export-peft", "--cloud", bundle / "cloud", "--edge", bundle / "edge", "--out", tmp_path / "peft")
    assert code == 2 and "family 'gpt2' is none that plcli splits" in err and len(err.strip().splitlines()) == 1, err


# -- over the wire: the same tuning against a cloud server ----------------------------
# Servers bind 127.0.0.1 on a port the OS picks and are stopped by the test that started them.


@contextmanager
def remote_link(bundle, **server_options):
    """A RemoteTrainLink to a CloudServer serving `bundle` on loopback, in a thread; both closed on exit."""
    server = CloudServer(CloudModel(bundle / "cloud", threads=1), bind="tcp://127.0.0.1:*", threads=1, **server_options)
    with running(server) as endpoint, RemoteTrainLink(endpoint, EdgeModel(bundle / "edge").manifest, timeout=10) as link:
        yield link


def test_gradient_over_the_wire_equals_the_local_cloud_and_autograd(bias_all_targets_bundle, data, tmp_path):
    ckpt, bundle = bias_all_targets_bundle  # four cuts per layer, biases everywhere
    batch = padded_batch(EdgeModel(bundle / "edge").arch.vocab_size)
    results = []
    with remote_link(bundle) as link:
        for over in ("local", "wire"):
            tuner = make_tuner(bundle, [data / "train.txt"], tmp_path / over, link=link if over == "wire" else None)
            m = random_adapter(tuner.edge, seed=1)
            for key, cut in tuner._cut_targets().items():
                tuner.m[key][...] = np.stack([m[f"layers.{key[0]}.{t}.M"] for t in cut.targets])
            grads = {k: np.zeros_like(v) for k, v in tuner.m.items()}
            results.append((tuner.forward_backward(batch, 1.0, grads), grads))
            assert tuner.forward_backward(batch, None, None) == results[-1][0]  # an evaluation pass: same loss
    (local_loss, local), (wire_loss, remote) = results
    assert wire_loss == local_loss  # float32 crosses unchanged
    for key in local:  # torch's backward in the server's thread may sum in another order: the last bits may differ
        np.testing.assert_allclose(remote[key], local[key], rtol=1e-5, atol=1e-6)
    want_loss, want = reference_loss(ckpt, CloudModel(bundle / "cloud"), m, batch)
    assert wire_loss == pytest.approx(want_loss, rel=1e-5)
    for key, cut in tuner._cut_targets().items():
        for i, t in enumerate(cut.targets):
            w = want[f"layers.{key[0]}.{t}.M"]
            assert np.linalg.norm(remote[key][i] - w) / np.linalg.norm(w) < TOLERANCE


class FrameLog:
    """Wraps a link's socket: every multipart message sent and received, frame by frame."""

    def __init__(self, link):
        self.messages: list[tuple[str, list[bytes]]] = []
        sock = link._socket
        send, recv = sock.send, sock.recv
        pending: list[bytes] = []
        received: list[bytes] = []

        # Frame by frame, as they go to the socket (send_multipart also sends through `send`): a message ends
        # with the first frame sent without SNDMORE.
        def logged_send(frame, flags=0, *args, **kwargs):
            pending.append(bytes(memoryview(frame)))
            if not int(flags) & int(zmq.SNDMORE):
                self.messages.append(("up", pending[:]))
                pending.clear()
            return send(frame, flags, *args, **kwargs)

        # Frame by frame too, as wire.receive reads them: a message ends with the first frame that has no more.
        def logged_recv(*args, **kwargs):
            frame = recv(*args, **kwargs)
            received.append(bytes(memoryview(frame)))
            if not sock.getsockopt(zmq.RCVMORE):
                self.messages.append(("down", received[:]))
                received.clear()
            return frame

        sock.send, sock.recv = logged_send, logged_recv


def test_over_the_wire_only_activations_cross_never_text_ids_labels_or_loss(llama_bundle, data, tmp_path):
    edge = EdgeModel(llama_bundle / "edge")
    files = [data / "train.txt", data / "pairs.jsonl"]
    server = CloudServer(CloudModel(llama_bundle / "cloud", threads=1), bind="tcp://127.0.0.1:*", threads=1)
    with running(server) as endpoint:
        relay = TcpRelay(endpoint)
        try:
            link = RemoteTrainLink(relay.endpoint, edge.manifest, timeout=10)
            log = FrameLog(link)
            config = TuneConfig(seq_len=16, batch_size=3, warmup=2, lr=3e-2, steps=2, save_every=0)
            tuner = Tuner(edge, link, files, config, tmp_path / "out", eval_data=[data / "eval.txt"])
            summary = tuner.run()
            link.close()
        finally:
            relay.close()

    r, hidden = edge.manifest.rank, edge.arch.hidden_size
    allowed = {"v", "op", "session", "step", "cut", "layer", "stage", "shape", "lengths", "grad", "last"}
    ops = set()
    for direction, frames in log.messages:
        header = json.loads(frames[0])
        ops.add((direction, header["op"]))
        assert set(header) <= allowed, header
        assert all(type(n) is int and 1 <= n <= config.seq_len for n in header.get("lengths", [])), header
        if len(frames) == 2:
            x = np.frombuffer(frames[1], np.float32).reshape(header["shape"])
            b, s = x.shape[:2]
            assert x.shape in ((b, s, hidden), (b, s, 3, r)), header
            assert not x.any() or not np.array_equal(x, np.round(x)), header  # activations, not ids cast to float
        else:
            assert len(frames) == 1 and header["op"] in ("close", "closed"), header
    # (The handshake went before the log started: it carries the A/B fingerprint and the wire dtype.)
    assert ops == {("up", "train_step"), ("down", "ax"), ("up", "madx"), ("down", "hidden"), ("up", "grad_hidden"),
                   ("down", "grad"), ("up", "grad_ax"), ("up", "close"), ("down", "closed")}
    # What the relay saw on the TCP stream holds no text, no token ids (as 64- or 32-bit integers), no loss.
    stream = bytes(relay.up + relay.down)
    ids = tuner.train.rows[0].ids[:6]
    for needle in (TEXT[:24].encode(), ids.astype("<i8").tobytes(), ids.astype("<i4").tobytes(),
                   np.float32(summary.train_loss_first).tobytes(), np.float64(summary.train_loss_first).tobytes()):
        assert needle not in stream
    assert len(stream) > 100_000  # the relay did see the training traffic


def test_tune_session_refuses_out_of_order_and_oversized_passes(llama_bundle):
    edge = EdgeModel(llama_bundle / "edge")
    local = TorchSegments(CloudModel(llama_bundle / "cloud")).new_session()
    embeds = edge.embed(np.asarray([[3, 4, 5, 6], [7, 8, 9, 9]]))
    mask = np.asarray([[1, 1, 1, 1], [1, 1, 0, 0]])
    with remote_link(llama_bundle, max_train_tokens=8) as link:
        # Over the cloud's message limit: refused before sending (libzmq would drop the connection without a word).
        too_many = link.max_message_bytes // (edge.arch.hidden_size * 4) + 1
        with pytest.raises(CloudError, match="--batch-size x --seq-len") as refused:
            link.forward_start(np.zeros((1, too_many, edge.arch.hidden_size), np.float32))
        assert refused.value.code == "too_large"
        with pytest.raises(CloudError) as refused:
            link.forward_start(edge.embed(np.ones((3, 4), np.int64)))  # 12 tokens > 8
        assert refused.value.code == "limit"
        with pytest.raises(ValueError, match="right-padded"):
            link.forward_start(embeds, np.asarray([[0, 1, 1, 1], [1, 1, 0, 0]]))
        out = link.forward_start(embeds, mask)
        with pytest.raises(CloudError) as refused:
            link.backward_start(np.zeros((2, 4, edge.arch.hidden_size), np.float32))  # the forward is not done
        assert refused.value.code == "out_of_order"
        with pytest.raises(CloudError) as refused:
            link.forward_resume(out.ax[:, :2])  # not the shape of the A x it answers
        assert refused.value.code == "bad_tensor"
        with pytest.raises(CloudError) as refused:
            link.forward_start(embeds, mask)  # the pass is open
        assert refused.value.code == "out_of_order"
        link.abort()
        # After the refusals and the abort a pass runs exactly like the local cloud's.
        out, want = link.forward_start(embeds, mask), local.forward_start(embeds, mask)
        while not out.done:
            np.testing.assert_array_equal(out.ax, want.ax)
            madx = edge.apply_adapter(out.layer, out.stage, out.ax)
            out, want = link.forward_resume(madx), local.forward_resume(madx)
        np.testing.assert_array_equal(out.hidden, want.hidden)
        grad, want = link.backward_start(out.hidden), local.backward_start(out.hidden)
        while True:
            np.testing.assert_array_equal(grad.grad_madx, want.grad_madx)
            assert (grad.layer, grad.stage, grad.last) == (want.layer, want.stage, want.last)
            if grad.last:
                break
            grad, want = link.backward_resume(grad.grad_madx), local.backward_resume(grad.grad_madx)


def _serve(bundle) -> tuple[subprocess.Popen, str]:
    server = spawn_plcli("serve-cloud", bundle / "cloud", "--bind", "tcp://127.0.0.1:*", "--threads", "1", "--json")
    return server, listening(server)["endpoint"]


def test_cli_tune_over_the_network_survives_a_killed_cloud_and_resumes_exactly(llama_checkpoint, llama_bundle, bundle_factory,
                                                                              data, tmp_path):
    common = ["--data", data / "train.txt", "--data", data / "pairs.jsonl", "--steps", 24, "--seq-len", 16,
              "--batch-size", 3, "--lr", 0.03, "--warmup", 2, "--save-every", 4, "--json"]
    procs: list[subprocess.Popen] = []
    try:
        # The uninterrupted run, with the cloud in this process (one thread, as the server's).
        code, stdout, err = run_cli("tune", llama_bundle / "edge", "--cloud", llama_bundle / "cloud", "--threads", 1,
                                    "--out", tmp_path / "whole", *common)
        assert code == 0, err
        whole = json.loads((tmp_path / "whole" / "training" / "state.json").read_text())["losses"]

        server, endpoint = _serve(llama_bundle)
        procs.append(server)
        out = tmp_path / "run"
        # No failover (tests/test_failover.py has it): the run stops, and the checkpoint is what --resume continues.
        tune = spawn_plcli("tune", llama_bundle / "edge", "--connect", endpoint, "--timeout", 2, "--reconnect-timeout", 0,
                      "--out", out, *common)
        procs.append(tune)
        deadline = time.monotonic() + 120
        while not (out / "training" / "state.json").is_file():  # the first checkpoint (step 4) is written
            assert tune.poll() is None and time.monotonic() < deadline, tune.stderr.read() if tune.poll() is not None else ""
            time.sleep(0.02)
        server.kill()  # kill -9 in the middle of a later step
        _, err = tune.communicate(timeout=60)
        assert tune.returncode == 1 and len(err.strip().splitlines()) == 1, err
        assert "lost the cloud" in err and "rerun with --resume" in err
        state = json.loads((out / "training" / "state.json").read_text())
        assert 4 <= state["step"] < 24 and state["losses"] == pytest.approx(whole[:state["step"]], rel=1e-6)

        server, endpoint = _serve(llama_bundle)  # a new cloud, on another port
        procs.append(server)
        resumed = spawn_plcli("tune", llama_bundle / "edge", "--connect", endpoint, "--out", out, "--resume", *common)
        procs.append(resumed)
        stdout, err = resumed.communicate(timeout=300)
        assert resumed.returncode == 0, err
        assert json.loads(stdout)["resumed_from"] == state["step"]
        losses = json.loads((out / "training" / "state.json").read_text())["losses"]
        assert losses == pytest.approx(whole, rel=1e-6)  # the curve of the uninterrupted run

        # A bundle split with other A/B is refused by the cloud, with a reason, exit 2.
        other = bundle_factory(llama_checkpoint, rank=8, seed=7)
        code, _, err = run_cli("tune", other / "edge", "--connect", endpoint, "--timeout", 5, "--out", tmp_path / "x",
                               "--data", data / "train.txt", "--steps", 1)
        assert code == 2 and "not split together" in err and len(err.strip().splitlines()) == 1, err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def test_an_epoch_sees_every_row_once_and_a_batch_never_holds_a_row_twice(llama_bundle, data, tmp_path, monkeypatch):
    """With fewer rows than --batch-size, a batch took the rows of the next epoch as well, so it held rows twice and
    --epochs counted rows seen: 3 epochs of 3 rows at batch 8 ran 2 steps, 16 rows. Now an epoch's last batch is
    smaller, as a shuffling DataLoader's without drop_last, and an epoch is a whole number of batches."""
    import plcli.runtime.tune as tune_module
    from plcli.runtime.tune_data import RowOrder

    order = RowOrder(10, seed=0)
    epochs = [[order.take(4) for _ in range(3)] for _ in range(3)]
    for batches in epochs:
        assert [len(b) for b in batches] == [4, 4, 2] and sorted(sum(batches, [])) == list(range(10))
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    assert [order.batches_per_epoch(n) for n in (4, 10, 16)] == [3, 1, 1]

    (data / "three.jsonl").write_text("".join(json.dumps({"prompt": f"Q{i}:", "response": f" {i}."}) + "\n" for i in range(3)))
    seen = []
    real_make_batch = tune_module.make_batch
    monkeypatch.setattr(tune_module, "make_batch",
                        lambda rows, pad: seen.append([r.ids.tobytes() for r in rows]) or real_make_batch(rows, pad))
    tuner = make_tuner(llama_bundle, [data / "three.jsonl"], tmp_path / "out", epochs=3, batch_size=8)
    assert len(tuner.train.rows) == 3 and tuner.total_steps == 3
    tuner.run()
    assert len(seen) == 3 and all(len(rows) == 3 == len(set(rows)) for rows in seen)
