"""Failover by replay: the policy, generation and tuning surviving a lost cloud, and real clouds killed with -9.

Every server binds 127.0.0.1 on a port the OS picks and is killed by the test
that started it, in a finally.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time

import numpy as np
import pytest
import torch

from plcli.exporters.verify import random_adapter
from plcli.runtime.client import CloudError, cloud_status
from plcli.runtime.cloud import CloudModel
from plcli.runtime.cloud_tune import local_train_link
from plcli.runtime.edge import EdgeModel
from plcli.runtime.failover import MAX_DELAY_S, Failover, is_loss
from plcli.runtime.generate import Conversation, Sampling, generate
from plcli.runtime.train_link import LinkError
from plcli.runtime.tune import Tuner, TuneConfig
from processes import listening, spawn_plcli

LOSS = ("timeout", "closed", "unknown_session")


# -- the policy --------------------------------------------------------------------------------
class FakeClouds:
    """`open_session` for a Failover: URLs that refuse until a given time on a fake clock."""

    def __init__(self, up_at: dict[str, float]):
        self.up_at, self.now, self.tries = up_at, 0.0, []

    def open(self, url: str, timeout: float) -> str:
        self.tries.append((round(self.now, 3), url, timeout))
        if self.now < self.up_at[url]:
            self.now += timeout  # a silence costs the whole timeout
            raise CloudError(f"no answer from {url}", "timeout")
        return f"session@{url}"

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def failover(clouds: FakeClouds, urls: list[str], *, timeout: float = 1.0, reconnect_timeout: float = 30.0,
             events: list | None = None) -> Failover:
    return Failover(urls, clouds.open, timeout=timeout, reconnect_timeout=reconnect_timeout,
                    on_event=(events if events is not None else []).append, sleep=clouds.sleep, clock=lambda: clouds.now)


def test_a_lost_session_moves_to_the_next_cloud_in_turn():
    clouds = FakeClouds({"a": 0.0, "b": 0.0, "c": 0.0})
    events: list[dict] = []
    f = failover(clouds, ["a", "b", "c"], events=events)
    assert f.open() == "session@a"
    assert f.recover(CloudError("silence", "timeout")) == "session@b"
    assert f.recover(CloudError("gone", "unknown_session")) == "session@c"
    assert f.recover(CloudError("closed", "closed")) == "session@a"  # round the list
    assert [e["event"] for e in events] == ["lost", "reconnected"] * 3 and f.reconnects == 3


def test_one_cloud_is_retried_with_capped_exponential_backoff_until_it_is_back():
    clouds = FakeClouds({"a": 0.0})
    f = failover(clouds, ["a"], timeout=0.5)
    f.open()
    clouds.up_at["a"] = 20.0
    assert f.recover(CloudError("silence", "timeout")) == "session@a"
    starts = [t for t, _, _ in clouds.tries[1:]]
    waits = [round(b - a - 0.5, 3) for a, b in zip(starts, starts[1:])]  # each failed try costs its 0.5 s timeout
    assert waits[:5] == [0.25, 0.5, 1.0, 2.0, 4.0] and set(waits[5:]) == {MAX_DELAY_S}
    assert starts[-1] >= 20.0


def test_the_first_open_tries_each_cloud_once_and_reports_the_last_error():
    clouds = FakeClouds({"a": 99.0, "b": 0.0})
    events: list[dict] = []
    f = failover(clouds, ["a", "b"], events=events)
    assert f.open() == "session@b" and f.url == "b" and events[0]["event"] == "unreachable"
    clouds = FakeClouds({"a": 99.0})
    with pytest.raises(CloudError, match="no answer from a"):
        failover(clouds, ["a"]).open()
    assert len(clouds.tries) == 1  # no backoff before the first session: --timeout is the limit


def test_the_deadline_ends_the_retries_with_both_errors_and_the_option_to_change():
    clouds = FakeClouds({"a": 0.0, "b": 0.0})
    f = failover(clouds, ["a", "b"], timeout=2.0, reconnect_timeout=7.0)
    f.open()
    clouds.up_at.update(a=99.0, b=99.0)
    with pytest.raises(LinkError) as gone:
        f.recover(CloudError("the cloud at a stopped answering", "timeout"))
    message = str(gone.value)
    assert "stopped answering" in message and "a, b" in message and "--reconnect-timeout 7 s" in message
    assert not is_loss(gone.value)  # a caller that gives up does not try again
    assert clouds.now <= 7.0 + 1e-9 and all(t <= 2.0 for _, _, t in clouds.tries)


@pytest.mark.parametrize("code", ["fingerprint_mismatch", "limit", "bad_reply", "out_of_order"])
def test_a_refusal_is_not_a_loss_and_is_raised_as_it_is(code):
    clouds = FakeClouds({"a": 0.0, "b": 0.0})
    f = failover(clouds, ["a", "b"])
    f.open()
    refusal = CloudError("refused", code)
    with pytest.raises(CloudError) as raised:
        f.recover(refusal)
    assert raised.value is refusal and len(clouds.tries) == 1


def test_a_reconnect_timeout_of_zero_turns_failover_off():
    clouds = FakeClouds({"a": 0.0})
    f = failover(clouds, ["a"], reconnect_timeout=0)
    f.open()
    with pytest.raises(CloudError, match="silence"):
        f.recover(CloudError("silence", "timeout"))
    assert len(clouds.tries) == 1


def test_a_session_lost_before_it_settles_gets_the_rest_of_the_same_deadline_and_backoff():
    """A cloud that opens sessions and loses each at once made recover start a whole new --reconnect-timeout after
    every open: run-edge and tune retried it forever, tens of thousands of opens a minute."""
    clouds = FakeClouds({"a": 0.0})
    events: list[dict] = []
    f = failover(clouds, ["a"], reconnect_timeout=10.0, events=events)
    f.open()
    with pytest.raises(LinkError, match="--reconnect-timeout 10 s") as gone:
        for _ in range(100):
            f.recover(CloudError("gone", "unknown_session"))  # every reopened session is lost before its work is done
    assert not is_loss(gone.value) and clouds.now <= 10.0
    starts = [t for t, _, _ in clouds.tries[1:]]
    assert [round(b - a, 3) for a, b in zip(starts, starts[1:])] == [0.25, 0.5, 1.0, 2.0, 4.0]
    assert [e["left_s"] for e in events if e["event"] == "lost"] == [10.0, 10.0, 9.8, 9.2, 8.2, 6.2, 2.2]
    # A session that did its work settles the loss: the next one has the whole timeout and the first delay again.
    f.recover(CloudError("gone", "unknown_session"))
    f.settled()
    clouds.now += 60.0
    assert f.recover(CloudError("gone", "unknown_session")) == "session@a" and clouds.tries[-1][0] == clouds.now


# -- replay, in one process ------------------------------------------------------------------------
class FlakySession:
    """A local CloudSession that loses itself (a CloudError of `code`) at its `fail_at`-th call."""

    bytes_up = bytes_down = round_trips = 0

    def __init__(self, session, fail_at: int | None, code: str = "timeout"):
        self.session, self.fail_at, self.code, self.calls, self.closed = session, fail_at, code, 0, False
        self.max_context = session.max_context

    @property
    def position(self) -> int:
        return self.session.position

    def start(self, embeds):
        return self._call(self.session.start, embeds)

    def resume(self, madx):
        return self._call(self.session.resume, madx)

    def _call(self, method, tensor):
        self.calls += 1
        if self.calls == self.fail_at:
            raise CloudError("the cloud stopped answering", self.code)
        return method(tensor)

    def close(self) -> None:
        self.closed = True


@pytest.fixture(scope="module")
def split(llama_bundle):
    edge = EdgeModel(llama_bundle / "edge", threads=1)
    edge.set_adapter(random_adapter(edge, seed=3))  # a non-zero M: the replay must go through it too
    return edge, CloudModel(llama_bundle / "cloud", threads=1), llama_bundle


# One step is a start and one resume per cut: with 2 layers and q,k,v, 3 calls. Call 2 is inside the prefill,
# 3 its last, 4 the first decode step's start, 11 inside a later decode step.
@pytest.mark.parametrize("fail_at", [1, 2, 3, 4, 11, 40])
@pytest.mark.parametrize("code", LOSS)
@pytest.mark.parametrize("draws", ["greedy", "seeded"])
def test_a_conversation_replays_its_tokens_and_continues_exactly(split, fail_at, code, draws):
    """Greedy, or sampled with a seed: the replacement session goes on with the draws the lost one would have made."""
    edge, cloud, _ = split
    sampling = Sampling(max_new_tokens=24, ignore_eos=True)
    if draws == "seeded":
        sampling = Sampling(max_new_tokens=24, ignore_eos=True, temperature=1.5, top_k=50, seed=7)
    turns = [[5, 9, 14, 2, 7], [3, 8]]
    whole = Conversation(edge, cloud.new_session(), sampling)
    want = [list(whole.turn(ids)) for ids in turns]

    sessions: list[FlakySession] = []

    def open_session(url, timeout):
        sessions.append(FlakySession(cloud.new_session(), None))
        return sessions[-1]

    f = Failover(["tcp://a"], open_session, timeout=1.0, reconnect_timeout=5.0)
    first = FlakySession(cloud.new_session(), fail_at, code)
    chat = Conversation(edge, first, sampling, failover=f)
    assert [list(chat.turn(ids)) for ids in turns] == want
    assert first.closed and f.reconnects == 1 and chat.session is sessions[0]
    assert chat.session.position == whole.session.position  # the new KV cache stands where the old one would
    assert chat.fed == whole.fed


def test_a_replay_that_is_lost_too_is_replayed_again_and_a_refusal_is_not(split):
    edge, cloud, _ = split
    sampling = Sampling(max_new_tokens=12, ignore_eos=True)
    want = list(generate(edge, cloud.new_session(), [4, 5, 6], sampling))
    plan = iter([2, None])  # the first replacement is lost during its replay
    f = Failover(["a", "b"], lambda url, t: FlakySession(cloud.new_session(), next(plan)), timeout=1.0, reconnect_timeout=5.0)
    chat = Conversation(edge, FlakySession(cloud.new_session(), 8), sampling, failover=f)
    assert list(chat.turn([4, 5, 6])) == want and f.reconnects == 2

    refusing = Conversation(edge, FlakySession(cloud.new_session(), 5, "limit"), sampling, failover=f)
    with pytest.raises(CloudError, match="stopped answering"):
        list(refusing.turn([4, 5, 6]))
    assert f.reconnects == 2


@pytest.mark.parametrize("code", LOSS)
def test_a_conversation_whose_every_new_session_is_lost_gives_up_at_the_deadline(split, code):
    edge, cloud, _ = split
    clouds = FakeClouds({"a": 0.0})
    opened: list[FlakySession] = []

    def open_session(url, timeout):
        assert len(opened) < 100, "reopened sessions forever"
        clouds.open(url, timeout)
        opened.append(FlakySession(cloud.new_session(), 1, code))  # lost at its first call, the replay
        return opened[-1]

    f = Failover(["a"], open_session, timeout=1.0, reconnect_timeout=5.0, sleep=clouds.sleep, clock=lambda: clouds.now)
    chat = Conversation(edge, FlakySession(cloud.new_session(), 2, code), Sampling(max_new_tokens=4), failover=f)
    with pytest.raises(LinkError, match="--reconnect-timeout 5 s"):
        list(chat.turn([4, 5, 6]))
    assert clouds.now <= 5.0 and len(opened) == 5 and all(s.closed for s in opened[:-1])


class FlakyLink:
    """A local train link that loses itself at its `fail_at`-th call (forward or backward)."""

    def __init__(self, link, fail_at: int | None):
        self.link, self.fail_at, self.calls, self.closed = link, fail_at, 0, False

    def __getattr__(self, name):
        method = getattr(self.link, name)
        if name == "abort":
            return method

        def call(*args, **kwargs):
            self.calls += 1
            if self.calls == self.fail_at:
                raise CloudError("the cloud stopped answering", "timeout")
            return method(*args, **kwargs)

        return call

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# With 2 cuts, one training pass is 2 + 1 forward calls and 2 backward calls; the evaluation before comes first.
@pytest.mark.parametrize("fail_at", [2, 8, 9, 11, 30])
def test_a_lost_step_is_done_again_once_and_the_run_matches_an_uninterrupted_one(split, tmp_path, fail_at, one_thread):
    edge, _, bundle = split
    text = tmp_path / "notes.txt"
    text.write_text("The edge keeps the notes; the cloud sees activations of its frozen layers. " * 40)
    config = TuneConfig(steps=6, seq_len=16, batch_size=2, lr=0.03, warmup=1, save_every=0)
    whole = Tuner(edge, local_train_link(bundle / "cloud", threads=1), [text], config, tmp_path / "whole", eval_data=[text])
    want = whole.run()

    opened: list[FlakyLink] = []

    def open_link(url, timeout):
        opened.append(FlakyLink(local_train_link(bundle / "cloud", threads=1), None))
        return opened[-1]

    f = Failover(["a"], open_link, timeout=1.0, reconnect_timeout=5.0)
    first = FlakyLink(local_train_link(bundle / "cloud", threads=1), fail_at)
    tuner = Tuner(edge, first, [text], config, tmp_path / "flaky", eval_data=[text], failover=f)
    got = tuner.run()
    assert first.closed and f.reconnects == 1 and tuner.link is opened[0]
    assert got.losses == want.losses and got.steps == 6  # each step applied exactly once, none twice
    assert (got.eval_loss_before, got.eval_loss_after) == (want.eval_loss_before, want.eval_loss_after)
    for key, m in whole.adapter_matrices().items():
        np.testing.assert_array_equal(tuner.adapter_matrices()[key], m)


# -- real processes, killed -------------------------------------------------------------------------
def serve_cloud(bundle, bind: str = "tcp://127.0.0.1:*") -> tuple[subprocess.Popen, str]:
    server = spawn_plcli("serve-cloud", bundle / "cloud", "--bind", bind, "--threads", 1, "--json")
    return server, listening(server)["endpoint"]


def freeze_after(server: subprocess.Popen, endpoint: str, tokens: int, edge: subprocess.Popen) -> None:
    """SIGSTOP `server` once it has served `tokens` tokens: from then on the edge waits on it, wherever it stands."""
    deadline = time.monotonic() + 120
    while cloud_status(endpoint, timeout=5.0)["tokens"] < tokens:
        assert edge.poll() is None and time.monotonic() < deadline, edge.stderr.read() if edge.poll() is not None else ""
        time.sleep(0.005)
    server.send_signal(signal.SIGSTOP)


def stop_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_run_edge_fails_over_to_the_next_cloud_mid_generation_and_its_tokens_are_unchanged(split):
    edge, cloud, bundle = split
    prompt = "The cloud runs the decoder layers"
    base = EdgeModel(bundle / "edge", threads=1)  # the bundle's own M, as run-edge loads it
    prompt_ids = base.tokenizer(prompt)["input_ids"]
    want = list(generate(base, cloud.new_session(), prompt_ids, Sampling(max_new_tokens=160, ignore_eos=True)))
    procs: list[subprocess.Popen] = []
    try:
        first, first_url = serve_cloud(bundle)
        procs.append(first)
        second, second_url = serve_cloud(bundle)
        procs.append(second)
        run = spawn_plcli("run-edge", bundle / "edge", "--connect", first_url, "--connect", second_url, "--prompt",
                          prompt, "--max-new-tokens", 160, "--ignore-eos", "--timeout", 2, "--json")
        procs.append(run)
        freeze_after(first, first_url, len(prompt_ids) + 20, run)
        first.kill()  # kill -9 while the edge waits for its reply
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0, err
        result = json.loads(out)
        assert result["token_ids"] == want  # as if nothing had happened
        assert f"lost the cloud at {first_url}" in err and f"reconnected to {second_url}" in err
        assert cloud_status(second_url)["tokens"] >= len(prompt_ids) + 20  # the replay, then the rest
        # Nothing left to fail over to: the error names both losses and the limit, one line, exit 2.
        third, third_url = serve_cloud(bundle)
        procs.append(third)
        run = spawn_plcli("run-edge", bundle / "edge", "--connect", third_url, "--prompt", prompt, "--max-new-tokens", 160,
                          "--ignore-eos", "--timeout", 1, "--reconnect-timeout", 2, "--json")
        procs.append(run)
        freeze_after(third, third_url, len(prompt_ids) + 5, run)
        third.kill()
        started = time.monotonic()
        _, err = run.communicate(timeout=60)
        assert run.returncode == 2 and time.monotonic() - started < 1 + 2 + 5
        error = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(error) == 1 and "--reconnect-timeout 2 s" in error[0] and "Traceback" not in err, err
    finally:
        stop_all(procs)


def test_tune_survives_a_cloud_killed_mid_step_and_restarted_and_applies_every_step_once(split, tmp_path):
    _, _, bundle = split
    text = tmp_path / "notes.txt"
    text.write_text("The edge keeps the notes; the cloud sees activations of its frozen layers. " * 60)
    common = ["--data", text, "--eval-data", text, "--steps", 16, "--seq-len", 16, "--batch-size", 3, "--lr", 0.03,
              "--warmup", 2, "--save-every", 4, "--json"]
    procs: list[subprocess.Popen] = []
    try:
        whole = spawn_plcli("tune", bundle / "edge", "--cloud", bundle / "cloud", "--threads", 1, "--out", tmp_path / "whole",
                            *common)
        procs.append(whole)
        out, err = whole.communicate(timeout=300)
        assert whole.returncode == 0, err
        want = json.loads(out)
        want_losses = json.loads((tmp_path / "whole" / "training" / "state.json").read_text())["losses"]

        server, url = serve_cloud(bundle)
        procs.append(server)
        adapter = tmp_path / "run"
        tune = spawn_plcli("tune", bundle / "edge", "--connect", url, "--timeout", 2, "--out", adapter, *common)
        procs.append(tune)
        deadline = time.monotonic() + 120
        while not (adapter / "training" / "state.json").is_file():  # the first checkpoint (step 4) is written
            assert tune.poll() is None and time.monotonic() < deadline, tune.stderr.read() if tune.poll() is not None else ""
            time.sleep(0.01)
        server.send_signal(signal.SIGSTOP)  # the edge now waits in the middle of a step
        saved = (adapter / "training" / "state.json").read_bytes()
        server.kill()
        server.wait()  # its port is free once it is gone
        restarted, _ = serve_cloud(bundle, bind=url)  # the same address: one URL, retried with backoff
        procs.append(restarted)
        out, err = tune.communicate(timeout=300)
        assert tune.returncode == 0, err
        got = json.loads(out)
        assert f"lost the cloud at {url}" in err and f"reconnected to {url}" in err
        losses = json.loads((adapter / "training" / "state.json").read_text())["losses"]
        assert got["steps"] == 16 and losses == pytest.approx(want_losses, rel=1e-6)
        assert got["eval_loss_after"] == pytest.approx(want["eval_loss_after"], rel=1e-6)
        assert json.loads(saved)["step"] >= 4  # what the kill found on disk was a whole checkpoint
    finally:
        stop_all(procs)
