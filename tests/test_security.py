"""CURVE: key files, an encrypted cloud that serves only authorized edges, sessions bound to keys, the CLI's refusals.

Every server binds 127.0.0.1 on a port the OS picks (one refusal check binds
0.0.0.0 for a moment) and is stopped by the test that started it (threads
through `running`, subprocesses in a finally).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import zmq
import zmq.auth

from plcli.runtime import wire
from plcli.runtime.client import CloudError, RemoteCloudSession, cloud_status
from plcli.runtime.cloud import CloudModel
from plcli.runtime.edge import EdgeModel, forward
from plcli.runtime.generate import Sampling, generate
from plcli.runtime.secure import ClientKeys, ServerKeys, generate_key_pair
from plcli.runtime.server import CloudServer, running
from processes import SLOW_MACHINE_S, listening, spawn_plcli, stop

PROMPT = "The cloud runs the decoder layers"
TIMEOUT = 5.0
REFUSED_TIMEOUT = 1.5  # a refused handshake is silence: the edge waits this long, then reports


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    """server, edge and other-edge (both authorized), stranger (not): key pairs in one directory."""
    d = tmp_path_factory.mktemp("keys")
    (d / "authorized").mkdir()
    for name in ("server", "edge", "other-edge", "stranger"):
        generate_key_pair(d / name)
    for name in ("edge", "other-edge"):
        shutil.copy(d / f"{name}.key", d / "authorized")
    return d


def server_keys(keys: Path) -> ServerKeys:
    return ServerKeys.load(keys / "server.key_secret", keys / "authorized")


def client_keys(keys: Path, name: str, server: str = "server") -> ClientKeys:
    return ClientKeys.load(keys / f"{name}.key_secret", keys / f"{server}.key")


@pytest.fixture(scope="module")
def cloud(llama_bundle) -> CloudModel:
    return CloudModel(llama_bundle / "cloud", threads=1)


@contextmanager
def serve(cloud: CloudModel, curve: ServerKeys | None, **options):
    server = CloudServer(cloud, bind="tcp://127.0.0.1:*", curve=curve, tune=False, **options)
    with running(server) as endpoint:
        yield server, endpoint


def _invoke(*args: str):
    from typer.testing import CliRunner

    from plcli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output, result.output
    return result.stderr


# -- key files ------------------------------------------------------------------------------
def test_generated_pair_is_what_zmq_auth_reads_with_a_0600_secret_and_is_never_overwritten(tmp_path):
    made = _invoke("keys", "generate", tmp_path / "keys" / "edge", "--json")
    assert made.exit_code == 0, made.output
    report = json.loads(made.stdout)
    public_file, secret_file = Path(report["public_key_file"]), Path(report["secret_key_file"])
    assert (public_file.name, secret_file.name) == ("edge.key", "edge.key_secret")
    assert sorted(os.listdir(tmp_path / "keys")) == ["edge.key", "edge.key_secret"]  # no staging left behind
    public, no_secret = zmq.auth.load_certificate(public_file)
    same_public, secret = zmq.auth.load_certificate(secret_file)
    assert no_secret is None and public == same_public == report["public_key"].encode()
    assert zmq.curve_public(secret) == public  # a real pair
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600

    again = _invoke("keys", "generate", tmp_path / "keys" / "edge")
    assert "already exist" in _one_line_error(again) and "--force" in again.stderr
    assert zmq.auth.load_certificate(secret_file) == (public, secret)  # untouched
    replaced = _invoke("keys", "generate", tmp_path / "keys" / "edge", "--force", "--json")
    assert replaced.exit_code == 0 and json.loads(replaced.stdout)["public_key"] != report["public_key"]
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    # A directory names no pair: `keys generate keys/` wrote keys.key and keys.key_secret beside `keys`, not in it.
    for directory in (tmp_path / "keys", f"{tmp_path / 'keys'}/"):
        assert "give the key pair a name" in _one_line_error(_invoke("keys", "generate", directory))
    assert sorted(os.listdir(tmp_path)) == ["keys"] and sorted(os.listdir(tmp_path / "keys")) == ["edge.key", "edge.key_secret"]


def test_a_full_disk_while_keys_are_written_names_the_pair_and_keeps_the_old_one(tmp_path, monkeypatch):
    """The error named the temporary directory's file, or nothing."""
    import errno

    generate_key_pair(tmp_path / "edge")
    before = sorted((f.name, f.read_bytes()) for f in tmp_path.iterdir())

    def full(directory, name):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(directory) / f"{name}.key"))

    monkeypatch.setattr("plcli.runtime.secure.zmq.auth.create_certificates", full)
    result = _invoke("keys", "generate", tmp_path / "edge", "--force")
    assert _one_line_error(result).strip() == f"error: cannot write {tmp_path / 'edge'}: No space left on device"
    assert sorted((f.name, f.read_bytes()) for f in tmp_path.iterdir()) == before

def test_a_replacement_cut_short_between_its_two_renames_keeps_the_old_pair(tmp_path, monkeypatch):
    generate_key_pair(tmp_path / "edge")
    files = [tmp_path / "edge.key", tmp_path / "edge.key_secret"]
    before = [f.read_bytes() for f in files]
    renames = []

    def replace(src, dst):
        renames.append(dst)
        if len(renames) == 2:  # the public key is in place, the secret one is not yet
            raise KeyboardInterrupt
        return os.rename(src, dst)

    monkeypatch.setattr("plcli.runtime.secure.os.replace", replace)
    with pytest.raises(KeyboardInterrupt):
        generate_key_pair(tmp_path / "edge", force=True)
    assert [f.read_bytes() for f in files] == before  # still a pair, not a new public key beside the old secret
    assert sorted(os.listdir(tmp_path)) == ["edge.key", "edge.key_secret"]


def test_missing_malformed_or_mixed_up_key_files_are_one_line_errors(keys, llama_bundle, tmp_path):
    edge, cloud_dir = llama_bundle / "edge", llama_bundle / "cloud"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "edge.key").write_text('public-key = "not a key"\n')
    (tmp_path / "empty").mkdir()
    serve_cases = {
        "go together": ["--curve-secret", keys / "server.key_secret"],
        "no such key file": ["--curve-secret", tmp_path / "missing.key_secret", "--authorized-keys", keys / "authorized"],
        "holds no secret key": ["--curve-secret", keys / "server.key", "--authorized-keys", keys / "authorized"],
        "not 40 z85 characters": ["--curve-secret", keys / "server.key_secret", "--authorized-keys", tmp_path / "bad"],
        "holds no *.key file": ["--curve-secret", keys / "server.key_secret", "--authorized-keys", tmp_path / "empty"],
        "no such directory": ["--curve-secret", keys / "server.key_secret", "--authorized-keys", tmp_path / "nowhere"],
        "contradicts": ["--curve-secret", keys / "server.key_secret", "--authorized-keys", keys / "authorized", "--insecure"],
    }
    for expected, options in serve_cases.items():  # all refused before anything is loaded or bound
        assert expected in _one_line_error(_invoke("serve-cloud", cloud_dir, "--bind", "tcp://127.0.0.1:*", *options))
    edge_cases = {
        "go together": ["--server-key", keys / "server.key"],
        "is a secret key file": ["--curve-secret", keys / "edge.key_secret", "--server-key", keys / "server.key_secret"],
    }
    for expected, options in edge_cases.items():
        assert expected in _one_line_error(_invoke("run-edge", edge, "--prompt", PROMPT, *options))
        assert expected in _one_line_error(_invoke("tune", edge, "--data", tmp_path, "--connect", "tcp://127.0.0.1:1", *options))
    in_process = _invoke("tune", edge, "--data", tmp_path, "--cloud", cloud_dir, "--curve-secret", keys / "edge.key_secret",
                         "--server-key", keys / "server.key")
    assert "secure a --connect" in _one_line_error(in_process)


# -- the cloud over CURVE -------------------------------------------------------------------
def test_an_authorized_edge_generates_exactly_what_it_generates_without_curve(llama_bundle, cloud, keys):
    edge = EdgeModel(llama_bundle / "edge", threads=1)
    prompt_ids = edge.tokenizer(PROMPT)["input_ids"]
    sampling = Sampling(max_new_tokens=16, ignore_eos=True)
    with serve(cloud, None) as (_, endpoint), RemoteCloudSession(endpoint, edge.manifest, timeout=TIMEOUT) as session:
        plain = list(generate(edge, session, prompt_ids, sampling))
    curve = client_keys(keys, "edge")
    with serve(cloud, server_keys(keys)) as (_, endpoint):
        with RemoteCloudSession(endpoint, edge.manifest, timeout=TIMEOUT, curve=curve) as session:
            secured = list(generate(edge, session, prompt_ids, sampling))
            assert cloud_status(endpoint, timeout=TIMEOUT, curve=client_keys(keys, "other-edge"))["sessions"] == 1
    assert secured == plain == list(generate(edge, cloud.new_session(), prompt_ids, sampling))


def test_an_unknown_key_or_a_wrong_server_key_times_out_with_the_likely_cause_and_the_cloud_serves_on(llama_bundle, cloud,
                                                                                                    keys):
    edge = EdgeModel(llama_bundle / "edge", threads=1)
    ids = np.asarray([[4, 5, 6]])
    refused = {"unauthorized key": client_keys(keys, "stranger"), "wrong server key": client_keys(keys, "edge", "stranger"),
               "no CURVE at all": None}
    with serve(cloud, server_keys(keys)) as (server, endpoint):
        for case, curve in refused.items():
            started = time.monotonic()
            with pytest.raises(CloudError) as error:
                RemoteCloudSession(endpoint, edge.manifest, timeout=REFUSED_TIMEOUT, curve=curve)
            assert error.value.code == "timeout", case
            assert time.monotonic() - started < REFUSED_TIMEOUT + SLOW_MACHINE_S, case
            assert f"no answer from the cloud at {endpoint} within {REFUSED_TIMEOUT:g} s" in str(error.value)
            if curve is not None:
                assert "authorize this edge's key" in str(error.value) and "--server-key" in str(error.value)
        with RemoteCloudSession(endpoint, edge.manifest, timeout=TIMEOUT, curve=client_keys(keys, "edge")) as session:
            np.testing.assert_array_equal(forward(edge, session, ids), forward(edge, cloud.new_session(), ids))
        assert server.stats()["rejected"] == 0  # a refused handshake never reaches the protocol


class CurveDealer:
    """A raw DEALER with an edge's CURVE keys and, optionally, a routing id of its choosing."""

    def __init__(self, endpoint: str, curve: ClientKeys, routing_id: bytes | None = None):
        from plcli.runtime.secure import secure_client

        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        secure_client(self.socket, curve)
        if routing_id is not None:
            self.socket.setsockopt(zmq.ROUTING_ID, routing_id)
        self.socket.connect(endpoint)

    def ask(self, frames: list) -> dict:
        self.socket.send_multipart(frames)
        assert self.socket.poll(int(TIMEOUT * 1000)), "no reply"
        header, _ = wire.decode(self.socket.recv_multipart(), wire.REPLIES, max_message_bytes=1 << 24)
        return header

    def close(self) -> None:
        self.socket.close()


def dealer_on(endpoint: str, curve: ClientKeys, routing_id: bytes) -> CurveDealer:
    """A dealer on `routing_id` once the cloud has let go of the connection that held it last: until it notices that
    one closed, ZeroMQ ignores a new peer of the same id, silently."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        dealer = CurveDealer(endpoint, curve, routing_id)
        dealer.socket.send_multipart(wire.encode("status", {}))
        if dealer.socket.poll(200):
            dealer.socket.recv_multipart()
            return dealer
        dealer.close()
        assert time.monotonic() < deadline, "the cloud never let go of the routing id"


def test_a_session_answers_only_the_key_that_opened_it_even_on_its_routing_id(llama_bundle, cloud, keys):
    edge = EdgeModel(llama_bundle / "edge", threads=1)
    x = edge.embed(np.asarray([[5, 6, 7]]))
    open_ = wire.encode("open", {"ab_fingerprint": edge.manifest.ab_fingerprint, "wire_dtype": "float32", "batch": 1,
                                 "mode": "generate"})
    mine, theirs = client_keys(keys, "edge"), client_keys(keys, "other-edge")
    dealers: list[CurveDealer] = []
    try:
        with serve(cloud, server_keys(keys)) as (server, endpoint):
            owner = CurveDealer(endpoint, mine, b"edge-1")
            dealers.append(owner)
            sid = owner.ask(open_)["session"]
            assert server.sessions[sid].key == mine.public.decode()
            step = wire.encode("step", {"session": sid, "step": 0}, x)

            other = CurveDealer(endpoint, theirs)  # another authorized edge that learned the session id
            dealers.append(other)
            assert other.ask(step)["code"] == "unknown_session"
            # The owner goes away (its session lives on until it expires) and the other edge takes over its routing id:
            # ZeroMQ lets it, so only the key stops it.
            owner.close()
            impostor = dealer_on(endpoint, theirs, b"edge-1")
            dealers.append(impostor)
            assert impostor.ask(step)["code"] == "unknown_session"
            impostor.close()
            back = dealer_on(endpoint, mine, b"edge-1")  # the owner's key on that routing id: served, nothing changed
            dealers.append(back)
            assert back.ask(step)["op"] == "ax"
    finally:
        for dealer in dealers:
            dealer.close()


def test_tune_over_curve_from_the_command_line_matches_the_in_process_cloud(llama_bundle, keys, tmp_path):
    (tmp_path / "train.txt").write_text("Private notes stay on the edge. The cloud only sees activations. " * 20)
    common = ["--data", tmp_path / "train.txt", "--steps", 3, "--seq-len", 16, "--batch-size", 2, "--warmup", 1,
              "--save-every", 0, "--json"]
    local = _invoke("tune", llama_bundle / "edge", "--cloud", llama_bundle / "cloud", "--threads", 1,
                    "--out", tmp_path / "local", *common)
    assert local.exit_code == 0, local.output
    server = CloudServer(CloudModel(llama_bundle / "cloud", threads=1), bind="tcp://127.0.0.1:*", threads=1,
                         curve=server_keys(keys))
    with running(server) as endpoint:
        secured = _invoke("tune", llama_bundle / "edge", "--connect", endpoint, "--curve-secret", keys / "edge.key_secret",
                          "--server-key", keys / "server.key", "--out", tmp_path / "curve", *common)
        stranger = _invoke("tune", llama_bundle / "edge", "--connect", endpoint, "--curve-secret",
                           keys / "stranger.key_secret", "--server-key", keys / "server.key", "--timeout", REFUSED_TIMEOUT,
                           "--out", tmp_path / "stranger", *common)
    assert secured.exit_code == 0, secured.output
    want, got = json.loads(local.stdout), json.loads(secured.stdout)
    assert got["steps"] == 3
    assert got["train_loss_first"] == pytest.approx(want["train_loss_first"], rel=1e-6)
    assert got["train_loss_last"] == pytest.approx(want["train_loss_last"], rel=1e-5)
    assert "authorize this edge's key" in _one_line_error(stranger)


# -- serve-cloud and run-edge as commands ----------------------------------------------------
def test_serve_cloud_refuses_an_open_address_without_curve_and_warns_with_insecure(llama_bundle):
    cloud_dir = llama_bundle / "cloud"
    refused = spawn_plcli("serve-cloud", cloud_dir, "--bind", "tcp://0.0.0.0:*", "--no-tune")
    _, err = refused.communicate(timeout=60)  # it exits by itself: nothing was bound
    assert refused.returncode == 2 and err.count("\n") == 1, err
    assert "tcp://0.0.0.0:* is reachable from other machines" in err and "--insecure" in err and "--curve-secret" in err
    # With --insecure it serves, after a warning. Tests listen on loopback only, so the address here is one no machine
    # holds (TEST-NET-1): the warning comes before the bind, which then fails.
    insecure = spawn_plcli("serve-cloud", cloud_dir, "--bind", "tcp://192.0.2.1:*", "--no-tune", "--insecure")
    _, err = insecure.communicate(timeout=60)
    assert insecure.returncode == 2 and "error: cannot bind tcp://192.0.2.1:*" in err, err
    warning = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "without encryption or authentication (--insecure)" in warning[0], err


def test_run_edge_against_serve_cloud_with_curve(llama_bundle, cloud, keys):
    edge = EdgeModel(llama_bundle / "edge", threads=1)
    prompt_ids = edge.tokenizer(PROMPT)["input_ids"]
    server = spawn_plcli("serve-cloud", llama_bundle / "cloud", "--bind", "tcp://127.0.0.1:*", "--no-tune", "--threads", 1,
                    "--curve-secret", keys / "server.key_secret", "--authorized-keys", keys / "authorized", "--json")
    try:
        event = listening(server)
        endpoint = event["endpoint"]
        assert event["authorized_keys"] == 2
        ran = _invoke("run-edge", llama_bundle / "edge", "--connect", endpoint, "--prompt", PROMPT, "--max-new-tokens", 8,
                      "--ignore-eos", "--json", "--curve-secret", keys / "edge.key_secret", "--server-key", keys / "server.key")
        stranger = _invoke("run-edge", llama_bundle / "edge", "--connect", endpoint, "--prompt", PROMPT, "--timeout", 1,
                           "--curve-secret", keys / "stranger.key_secret", "--server-key", keys / "server.key")
        plain = _invoke("run-edge", llama_bundle / "edge", "--connect", endpoint, "--prompt", PROMPT, "--timeout", 1)
    finally:
        stop(server)
    assert ran.exit_code == 0, ran.output
    want = list(generate(edge, cloud.new_session(), prompt_ids, Sampling(max_new_tokens=8, ignore_eos=True)))
    assert json.loads(ran.stdout)["token_ids"] == want
    assert (f"no answer from the cloud at {endpoint} within 1 s (is `plcli serve-cloud` running there, does it authorize "
            "this edge's key") in " ".join(_one_line_error(stranger).split())
    assert f"no answer from the cloud at {endpoint} within 1 s" in _one_line_error(plain)
