"""The split over the network: `CloudServer` on loopback, `RemoteCloudSession` and the two commands.

Every server binds 127.0.0.1 on a port the OS picks and is stopped by the test
that started it (threads through `running`, subprocesses in a finally).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from plcli.exporters.verify import merged_reference, random_adapter
from plcli.runtime import wire
from plcli.runtime.client import CloudError, RemoteCloudSession, cloud_status
from plcli.runtime.cloud import CloudModel, CloudSession
from plcli.runtime.edge import EdgeModel, forward
from plcli.runtime.generate import Conversation, Sampling, TextStream, generate
from plcli.runtime.server import CloudServer, running
from plcli.runtime.summary import per_token_traffic
from plcli.serve_commands import _write
from processes import SLOW_MACHINE_S
from tcp_relay import TcpRelay

PROMPT = "The cloud runs the decoder layers"
TIMEOUT = 5.0

# name -> (checkpoint name, family, config overrides, split options); names shared with other test files share builds.
MODELS = {
    "llama": ("llama", "llama", {}, {"rank": 8}),
    "mistral-window": ("mistral-window", "mistral", {"sliding_window": 8}, {"rank": 8}),
    # Wide enough for realistic message sizes; more embedding rows than tokens, like many real checkpoints.
    "qwen2-wide": ("qwen2-wide", "qwen2", {"hidden_size": 256, "intermediate_size": 512, "vocab_size": 384,
                                          "tokenizer_vocab": 300}, {"rank": 128}),
}


@pytest.fixture(scope="module")
def model(checkpoint_factory, bundle_factory):
    """name -> (checkpoint dir, bundle dir, CloudModel), built once per module; prepacked, as serve-cloud loads it."""
    loaded = {}

    def get(name: str):
        if name not in loaded:
            ckpt_name, family, overrides, options = MODELS[name]
            ckpt = checkpoint_factory(ckpt_name, family, **overrides)
            bundle = bundle_factory(ckpt, **options)
            loaded[name] = (ckpt, bundle, CloudModel(bundle / "cloud", threads=1, prepack=True))
        return loaded[name]

    return get


@contextmanager
def serve(cloud: CloudModel, **options):
    events: list[dict] = []
    server = CloudServer(cloud, bind="tcp://127.0.0.1:*", on_event=events.append, **options)
    with running(server) as endpoint:
        yield server, endpoint, events


def edge_of(bundle: Path, m: str | None = None) -> EdgeModel:
    edge = EdgeModel(bundle / "edge", threads=1)
    if m == "zero":
        edge.set_adapter({k: np.zeros_like(v) for k, v in edge.adapter_matrices().items()})
    elif m == "random":
        edge.set_adapter(random_adapter(edge, seed=1))
    return edge


def local_ids(edge: EdgeModel, cloud: CloudModel, prompt_ids: list[int], sampling: Sampling) -> list[int]:
    return list(generate(edge, cloud.new_session(), prompt_ids, sampling))


# -- correctness over loopback ---------------------------------------------------------------
@pytest.mark.parametrize("m", ["zero", "random"])
@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_ids_over_loopback_match_transformers_with_bma_merged(model, name, m):
    ckpt, bundle, cloud = model(name)
    edge = edge_of(bundle, m)
    prompt_ids = edge.tokenizer(PROMPT)["input_ids"]
    want = transformers_ids(ckpt, cloud, edge, prompt_ids, 64)
    with serve(cloud) as (_, endpoint, _), RemoteCloudSession(endpoint, edge.manifest, timeout=TIMEOUT) as session:
        got = list(generate(edge, session, prompt_ids, Sampling(max_new_tokens=64, ignore_eos=True)))
    assert len(want) == 64 and got == want


def transformers_ids(ckpt: Path, cloud: CloudModel, edge: EdgeModel, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """transformers' greedy ids with the edge's B M A merged into the checkpoint's weights."""
    reference = merged_reference(ckpt, cloud, edge.adapter_matrices())
    unused_rows = list(range(len(edge.tokenizer), reference.config.vocab_size))  # ids no tokenizer can emit: neither side may pick them
    with torch.no_grad():
        ids = torch.tensor([prompt_ids])  # the mask given: else generate masks prompt tokens equal to the pad id
        return reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                                  eos_token_id=None, pad_token_id=0,
                                  suppress_tokens=unused_rows or None)[0, len(prompt_ids):].tolist()


@pytest.mark.parametrize("stream", [True, False], ids=["one-row-streamed", "all-packed"])
def test_a_prepacked_cloud_decodes_transformers_ids_with_one_row_calls_on_either_kernel(model, stream):
    """One-row calls run on the sessions fed their weights when the cloud streams them, on the packed ones otherwise;
    prompts and groups always on the packed ones; the greedy ids are transformers' either way."""
    from plcli.runtime.cloud import _activations

    ckpt, bundle, _ = model("llama")
    cloud = CloudModel(bundle / "cloud", threads=1, prepack=True, stream_one_row=stream)
    assert cloud.streams_one_row is stream and (cloud._fed is not None) is stream
    rows = {"fed": [], "packed": []}
    for kind, pairs in (("fed", cloud._fed or []), ("packed", cloud._packed)):
        for session in {id(s): s for pair in pairs for s in pair if s}.values():  # fed ones are shared by kind
            run = session.run
            session.run = lambda outputs, feed, run=run, kind=kind: rows[kind].append(
                _activations(feed).shape[:2]) or run(outputs, feed)
    edge = edge_of(bundle, "random")
    prompt_ids = edge.tokenizer(PROMPT)["input_ids"]
    got = local_ids(edge, cloud, prompt_ids, Sampling(max_new_tokens=16, ignore_eos=True))
    assert got == transformers_ids(ckpt, cloud, edge, prompt_ids, 16)
    one_row = (1, 1)
    if stream:
        assert rows["fed"] and set(rows["fed"]) == {one_row} and rows["packed"] and one_row not in rows["packed"]
    else:
        assert not rows["fed"] and one_row in rows["packed"] and (1, len(prompt_ids)) in rows["packed"]


def test_nan_logits_stop_generation_with_an_error_instead_of_picking_token_0(model):
    from plcli.runtime.errors import PlcliError

    _, bundle, cloud = model("llama")
    edge = edge_of(bundle)

    class Overflowing:
        """An in-process cloud whose weights overflow: its last hidden state is NaN (a remote one's is refused)."""

        def __init__(self):
            self.inner = cloud.new_session()

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def start(self, embeds):
            return self._last_nan(self.inner.start(embeds))

        def resume(self, madx):
            return self._last_nan(self.inner.resume(madx))

        def _last_nan(self, out):
            if out.done:
                out.hidden = np.full_like(out.hidden, np.nan)
            return out

    with pytest.raises(PlcliError, match="NaN or infinite logits"):
        list(generate(edge, Overflowing(), [5, 6, 7], Sampling(max_new_tokens=3, ignore_eos=True)))


def test_a_chat_turn_continues_the_cache_exactly_like_a_fresh_prefill(model):
    _, bundle, cloud = model("llama")
    edge = edge_of(bundle)
    sampling = Sampling(max_new_tokens=12, ignore_eos=True)
    first, second = edge.tokenizer("Private text")["input_ids"], edge.tokenizer(" never leaves", add_special_tokens=False)["input_ids"]
    with serve(cloud) as (_, endpoint, _), RemoteCloudSession(endpoint, edge.manifest, timeout=TIMEOUT) as session:
        chat = Conversation(edge, session, sampling)
        turn1, turn2 = list(chat.turn(first)), list(chat.turn(second))
    # The last sampled token of turn 1 was never fed; turn 2 must feed it before its own prompt.
    assert turn2 == local_ids(edge, cloud, first + turn1 + second, sampling)


class CharTokenizer:
    """Token i is chr(i); token 0 stands for an incomplete character."""

    def decode(self, ids):
        return "".join("\ufffd" if i == 0 else chr(i) for i in ids)


def test_generated_text_cannot_steer_the_terminal_it_is_shown_on(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for out, want in ((Terminal(), "red \\x1b[31mtext\\x07\n\tnext"), (io.StringIO(), "red \x1b[31mtext\x07\n\tnext")):
        monkeypatch.setattr(sys, "stdout", out)
        _write("red \x1b[31mtext\x07\n\tnext")
        assert out.getvalue() == want  # on a terminal escaped; piped, exactly as generated


def test_streamed_text_holds_back_half_characters_and_never_shows_a_stop_string():
    stream = TextStream(CharTokenizer(), stop=["END"])
    shown = [stream.push(ord(c) if c != "?" else 0) for c in "ab?cEN"]
    assert shown == ["a", "b", "", "\ufffdc", "", ""]
    assert stream.push(ord("D")) == "" and stream.finish() == "" and stream.text == "ab\ufffdc"
    stream = TextStream(CharTokenizer(), stop=["END"])
    assert [stream.push(ord(c)) for c in "xEN"] == ["x", "", ""] and stream.finish() == "EN"


def test_streamed_text_goes_on_after_a_byte_fallback_decoder_rewrites_what_it_showed():
    """Llama 2's and Mistral's tokenizers decode a run of byte tokens that ends in a broken character as one U+FFFD
    per byte, the complete characters before it too: the stream stalled for the rest of the generation."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}, "▁a": 257, "▁b": 258, "c": 259}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])  # as in Llama 2's tokenizer.json
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    euro, broken = [1 + 0xE2, 1 + 0x82, 1 + 0xAC], [1 + 0xE2]
    ids = [257, *euro, *broken, 258, 259]
    assert tokenizer.decode(ids[:4]) == "a€" and tokenizer.decode(ids[:5]) == "a" + "\ufffd" * 4
    stream = TextStream(tokenizer)
    shown = [stream.push(i) for i in ids]
    assert shown == ["a", "", "", "€", "", "\ufffd" * 3 + " b", "c"] and stream.finish() == ""
    assert stream.text == tokenizer.decode(ids)  # --json reports the decoder's own text


def test_generation_stops_at_a_stop_string(model):
    _, bundle, cloud = model("llama")
    edge = edge_of(bundle)
    prompt_ids = edge.tokenizer(PROMPT)["input_ids"]
    free = local_ids(edge, cloud, prompt_ids, Sampling(max_new_tokens=16, ignore_eos=True))
    piece = lambda i: edge.tokenizer.decode(free[i:i + 1])  # noqa: E731
    at = next(i for i in range(4, 16) if piece(i).strip() and "\ufffd" not in piece(i)
              and piece(i) not in edge.tokenizer.decode(free[:i]))
    stop = edge.tokenizer.decode(free[at:at + 1])
    with serve(cloud) as (_, endpoint, _), RemoteCloudSession(endpoint, edge.manifest, timeout=TIMEOUT) as session:
        chat = Conversation(edge, session, Sampling(max_new_tokens=16, ignore_eos=True, stop=[stop]))
        assert list(chat.turn(prompt_ids)) == free[:at + 1] and chat.stop_reason == "stop"


def test_generation_stops_at_eos_where_transformers_generate_does(model):
    ckpt, bundle, cloud = model("llama")
    edge = edge_of(bundle, "random")
    prompt_ids = edge.tokenizer(PROMPT)["input_ids"]
    free = local_ids(edge, cloud, prompt_ids, Sampling(max_new_tokens=16, ignore_eos=True))
    at = next(i for i in range(3, 16) if free[i] not in free[:i])  # the first time this token comes up
    edge.manifest.generation["eos_token_id"] = [free[at]]  # as a bundle split from a checkpoint with that EOS holds it
    reference = merged_reference(ckpt, cloud, edge.adapter_matrices())
    with torch.no_grad():
        ids = torch.tensor([prompt_ids])
        want = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                                  eos_token_id=free[at], pad_token_id=0)[0, len(prompt_ids):].tolist()
    assert want == free[:at + 1]  # transformers keeps the EOS it stopped at; plcli does not show it
    with serve(cloud) as (_, endpoint, _), RemoteCloudSession(endpoint, edge.manifest, timeout=TIMEOUT) as session:
        chat = Conversation(edge, session, Sampling(max_new_tokens=16))
        assert list(chat.turn(prompt_ids)) == free[:at] and chat.stop_reason == "eos"
        assert chat.unfed == [free[at]]  # sampled, not yet through the model: the next turn feeds it first


def test_generation_stops_when_the_context_is_full_and_then_refuses_more(model):
    _, bundle, cloud = model("llama")
    edge = edge_of(bundle)
    prompt_ids = edge.tokenizer(PROMPT)["input_ids"][:5]
    sampling = Sampling(max_new_tokens=10, ignore_eos=True)
    free = local_ids(edge, cloud, prompt_ids, sampling)
    chat = Conversation(edge, cloud.new_session(max_context=8), sampling)
    with pytest.raises(ValueError, match="the prompt is empty"):
        next(chat.turn([]))
    # Every token but the last is fed back: 5 prompt tokens and 3 generated fill 8 positions, and a 4th is sampled.
    assert list(chat.turn(prompt_ids)) == free[:4] and chat.stop_reason == "context"
    with pytest.raises(ValueError, match="the context is full: 2 new tokens, room for 0"):
        next(chat.turn(prompt_ids[:1]))


def test_eight_edges_at_once_each_get_what_they_get_alone(model):
    _, bundle, cloud = model("llama")
    edge = edge_of(bundle, "random")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, len(edge.tokenizer), size=int(n)).tolist() for n in rng.integers(2, 20, size=8)]
    sampling = Sampling(max_new_tokens=24, ignore_eos=True)
    alone = [local_ids(edge, cloud, p, sampling) for p in prompts]
    results: dict[int, list[int] | BaseException] = {}
    barrier = threading.Barrier(len(prompts))

    def run(i: int, endpoint: str):
        try:
            with RemoteCloudSession(endpoint, edge.manifest, timeout=TIMEOUT) as session:
                barrier.wait(timeout=TIMEOUT)
                results[i] = list(generate(edge, session, prompts[i], sampling))
        except BaseException as e:  # reported by the assertion below
            results[i] = e

    with serve(cloud) as (server, endpoint, events):
        threads = [threading.Thread(target=run, args=(i, endpoint)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert max(e["sessions"] for e in events if e["event"] == "opened") == len(prompts)  # truly at once
        assert server.stats()["sessions"] == 0
        assert server.counters.tokens == sum(len(p) + 23 for p in prompts)
    assert [results[i] for i in range(len(prompts))] == alone


def run_edges_at_once(endpoint: str, edge: EdgeModel, prompts: list[list[int]], sampling: Sampling) -> list[list[int]]:
    """Each prompt on its own connection, all generating at once; every edge's ids, in prompt order."""
    results: dict[int, list[int] | BaseException] = {}
    barrier = threading.Barrier(len(prompts))

    def run(i: int):
        try:
            with RemoteCloudSession(endpoint, edge.manifest, timeout=TIMEOUT) as session:
                barrier.wait(timeout=TIMEOUT)
                results[i] = list(generate(edge, session, prompts[i], sampling))
        except BaseException as e:  # reported by the caller's assertion
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [results[i] for i in range(len(prompts))]


@pytest.mark.parametrize("m", ["zero", "random"])
@pytest.mark.parametrize("name", ["llama", "mistral-window"])
def test_steps_of_concurrent_edges_run_grouped_and_each_edge_gets_its_solo_ids(model, name, m):
    _, bundle, cloud = model(name)
    edge = edge_of(bundle, m)
    rng = np.random.default_rng(1)
    lengths = rng.permutation(np.arange(3, 19, 2))  # 8 distinct prompt lengths: pasts differ in every group
    prompts = [rng.integers(1, len(edge.tokenizer), size=int(n)).tolist() for n in lengths]
    sampling = Sampling(max_new_tokens=40, ignore_eos=True)
    alone = [local_ids(edge, cloud, p, sampling) for p in prompts]
    with serve(cloud) as (server, endpoint, _):
        got = run_edges_at_once(endpoint, edge, prompts, sampling)
        status = cloud_status(endpoint, timeout=TIMEOUT)
    assert got == alone
    assert status["grouped_calls"] > 0 and 2 <= status["largest_group"] <= len(prompts)  # grouping did happen
    assert status["tokens"] == sum(lengths) + len(prompts) * 39


def test_one_thread_drives_many_sessions_by_posting_and_receiving(model):
    """`post_start`/`post_resume` then `receive`, in any order across sessions, give each what `forward` gives it."""
    _, bundle, cloud = model("llama")
    edge = edge_of(bundle, "random")
    rng = np.random.default_rng(2)
    prompts = [rng.integers(1, len(edge.tokenizer), size=n).tolist() for n in (3, 7, 5)]
    alone = [forward(edge, cloud.new_session(), np.asarray([p]), last=True) for p in prompts]
    with serve(cloud) as (_, endpoint, _):
        sessions = [RemoteCloudSession(endpoint, edge.manifest, timeout=TIMEOUT) for _ in prompts]
        try:
            with pytest.raises(RuntimeError, match="awaits a reply"):
                sessions[0].receive()
            with pytest.raises(RuntimeError, match="no step is open"):
                sessions[0].post_resume(np.zeros((1, 3, 3, 8), np.float32))
            for session, prompt in zip(sessions, prompts):
                session.post_start(edge.embed(np.asarray([prompt])))
            for send in (lambda: sessions[0].post_start(edge.embed(np.asarray([prompts[0]]))),
                         lambda: sessions[0].post_resume(np.zeros((1, 3, 3, 8), np.float32))):
                with pytest.raises(RuntimeError, match="awaits a reply"):
                    send()
            hidden = [None] * len(sessions)
            while any(h is None for h in hidden):
                for i in reversed(range(len(sessions))):  # not the order they were sent in
                    if hidden[i] is None:
                        out = sessions[i].receive()
                        if out.done:
                            hidden[i] = out.hidden
                        else:
                            sessions[i].post_resume(edge.apply_adapter(out.layer, out.stage, out.ax))
        finally:
            for session in sessions:
                session.close()
    for h, want, session, prompt in zip(hidden, alone, sessions, prompts):
        assert session.position == len(prompt) and session.round_trips == len(cloud.plan.segments) + 1  # with the open
        np.testing.assert_allclose(edge.logits(np.ascontiguousarray(h[:, -1:])), want, rtol=1e-5, atol=1e-5)


def test_the_cloud_projects_before_the_edge_answers(model, monkeypatch):
    """After each `A x` reply the server runs the next projections at once: no `M A x` has to wait for them."""
    _, bundle, cloud = model("llama")
    edge = edge_of(bundle, "random")
    pending_at_resume = []
    resume_call = CloudSession.resume_call

    def noting(self, madx):
        pending_at_resume.append(self.projection_call() is not None)
        return resume_call(self, madx)

    monkeypatch.setattr(CloudSession, "resume_call", noting)
    sampling = Sampling(max_new_tokens=5, ignore_eos=True)
    with serve(cloud) as (_, endpoint, _):
        with RemoteCloudSession(endpoint, edge.manifest, timeout=TIMEOUT) as session:
            got = list(generate(edge, session, [1, 2, 3], sampling))
    remote = len(pending_at_resume)
    assert remote and remote % (len(cloud.plan.segments) - 1) == 0 and not any(pending_at_resume)
    # In one process nobody projects ahead: `resume_call` does, with the same result.
    assert got == local_ids(edge, cloud, [1, 2, 3], sampling)
    assert len(pending_at_resume) == 2 * remote and all(pending_at_resume[remote:])


def test_a_step_that_fails_in_a_group_fails_only_its_own_session(model, monkeypatch):
    _, bundle, cloud = model("llama")
    edge = edge_of(bundle, "random")
    poison = 12345.0  # an embedding value the model below refuses, standing in for any failure of one row
    run_segment, rows_run = cloud.run_segment, []

    def failing(index, feed, **kwargs):
        if "inputs_embeds" in feed:
            rows_run.append(feed["inputs_embeds"].shape[0])
            if np.any(feed["inputs_embeds"] == poison):
                raise FloatingPointError("poisoned row")
        return run_segment(index, feed, **kwargs)

    monkeypatch.setattr(cloud, "run_segment", failing)
    ids = np.asarray([[1, 2, 3]])
    good, bad = edge.embed(ids), edge.embed(ids).copy()
    bad[0, 0, 0] = poison
    with serve(cloud) as (server, endpoint, events):
        # The loop runs nothing until both steps are queued, so that they meet in one group.
        both_queued = threading.Event()
        take, run_next = server._take, server._run_next

        def take_and_count(requests):
            take(requests)
            if len(server._queue) == 2:
                both_queued.set()

        monkeypatch.setattr(server, "_take", take_and_count)
        monkeypatch.setattr(server, "_run_next", lambda: run_next() if both_queued.is_set() else 0.001)
        with RemoteCloudSession(endpoint, edge.manifest, timeout=TIMEOUT) as first, \
                RemoteCloudSession(endpoint, edge.manifest, timeout=TIMEOUT) as second:
            outcome: dict[str, object] = {}

            def step(name, session, embeds):
                try:
                    outcome[name] = session.start(embeds)
                except CloudError as e:
                    outcome[name] = e

            threads = [threading.Thread(target=step, args=("good", first, good)),
                       threading.Thread(target=step, args=("bad", second, bad))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert rows_run[:3] == [2, 1, 1]  # one call for both, then each alone
            assert isinstance(outcome["bad"], CloudError) and outcome["bad"].code == "internal"
            assert "poisoned row" in str(outcome["bad"])
            out = outcome["good"]
            while not out.done:  # the good session carries on as if alone
                out = first.resume(edge.apply_adapter(out.layer, out.stage, out.ax))
            np.testing.assert_array_equal(edge.logits(out.hidden), forward(edge, cloud.new_session(), ids))
            # The failed session lost only that step: it can take it again.
            assert forward(edge, second, ids).shape == (1, 3, edge.arch.vocab_size)
    assert any(e["event"] == "rejected" and "poisoned row" in e["message"] for e in events)


def test_a_projection_that_fails_fails_only_that_step(model, monkeypatch):
    """Projections run ahead of the edge's answer; when they fail, the step they belong to is refused, nothing more."""
    _, bundle, cloud = model("llama")
    edge = edge_of(bundle, "random")
    run_segment, broken = cloud.run_segment, [True]

    def failing(index, feed, *, projection=False):
        if projection and broken[0]:
            raise FloatingPointError("projection failed")
        return run_segment(index, feed, projection=projection)

    monkeypatch.setattr(cloud, "run_segment", failing)
    ids = np.asarray([[1, 2, 3]])
    with serve(cloud) as (server, endpoint, events):
        with RemoteCloudSession(endpoint, edge.manifest, timeout=TIMEOUT) as session:
            with pytest.raises(CloudError, match="projection failed") as refused:
                forward(edge, session, ids)
            assert refused.value.code == "internal"
            # The failed step grew the cache buffers, which the session keeps: they count against --max-memory.
            (held,) = [sum(a.nbytes for kv in s.cloud.kv if kv is not None for a in kv) for s in server.sessions.values()]
            assert held and cloud_status(endpoint, timeout=TIMEOUT)["memory_bytes"] == held
            broken[0] = False  # the session lost only that step: it takes it again
            np.testing.assert_array_equal(forward(edge, session, ids), forward(edge, cloud.new_session(), ids))
    assert sum(e["event"] == "rejected" for e in events) == 1


# -- bytes on the socket ---------------------------------------------------------------
@pytest.mark.parametrize("wire_dtype", ["float32", "float16"])
def test_bytes_on_the_socket_per_decoded_token_are_within_ten_percent_of_the_payload(model, wire_dtype):
    _, bundle, cloud = model("qwen2-wide")
    edge = edge_of(bundle, "random")
    payload = per_token_traffic(edge.manifest, wire_dtype)
    steps = 16
    with serve(cloud, wire_dtype=wire_dtype) as (_, endpoint, _):
        proxy = TcpRelay(endpoint)
        try:
            with RemoteCloudSession(proxy.endpoint, edge.manifest, wire_dtype=wire_dtype, timeout=TIMEOUT) as session:
                logits = forward(edge, session, np.asarray([edge.tokenizer(PROMPT)["input_ids"]]))
                socket_before, counted_before = (len(proxy.up), len(proxy.down)), (session.bytes_up, session.bytes_down)
                for _ in range(steps):
                    logits = forward(edge, session, logits[:, -1:].argmax(-1))
                on_socket = (len(proxy.up) - socket_before[0], len(proxy.down) - socket_before[1])
                counted = (session.bytes_up - counted_before[0], session.bytes_down - counted_before[1])
                assert session.round_trips == 1 + (steps + 1) * payload["round_trips"]  # handshake, prefill, decode steps
        finally:
            proxy.close()
    assert counted == on_socket  # the session's counters are exactly what its TCP connection carried
    up, down = on_socket[0] / steps, on_socket[1] / steps
    if wire_dtype == "float32":
        assert payload["bytes_up"] < up <= 1.10 * payload["bytes_up"]
        assert payload["bytes_down"] < down <= 1.10 * payload["bytes_down"]
    else:  # half the payload; the fixed-size headers weigh twice as much
        assert payload["bytes_up"] < up <= 1.20 * payload["bytes_up"]
        assert payload["bytes_down"] < down <= 1.20 * payload["bytes_down"]


def test_float16_on_the_wire_stays_close_to_float32(model):
    _, bundle, cloud = model("qwen2-wide")
    edge = edge_of(bundle, "random")
    ids = np.asarray([edge.tokenizer(PROMPT)["input_ids"]])
    exact = forward(edge, cloud.new_session(), ids)
    with serve(cloud, wire_dtype="float16") as (_, endpoint, _):
        with RemoteCloudSession(endpoint, edge.manifest, wire_dtype="float16", timeout=TIMEOUT) as session:
            half = forward(edge, session, ids)
        with pytest.raises(CloudError) as refused:
            RemoteCloudSession(endpoint, edge.manifest, wire_dtype="float32", timeout=TIMEOUT)
    assert np.abs(half - exact).max() < 1e-2 * np.abs(exact).max()
    assert refused.value.code == "wire_dtype_mismatch" and "--wire-dtype" in str(refused.value)


def test_embedding_rows_beyond_the_tokenizer_are_never_sampled(model):
    _, bundle, cloud = model("qwen2-wide")
    edge = edge_of(bundle, "random")
    assert len(edge.tokenizer) < edge.arch.vocab_size
    sampling = Sampling(max_new_tokens=48, temperature=1.5, seed=0, ignore_eos=True)
    with serve(cloud) as (_, endpoint, _), RemoteCloudSession(endpoint, edge.manifest, timeout=TIMEOUT) as session:
        ids = list(generate(edge, session, edge.tokenizer(PROMPT)["input_ids"], sampling))
    assert len(ids) == 48 and max(ids) < len(edge.tokenizer)
    assert isinstance(edge.tokenizer.decode(ids), str)


# -- refusals and bad input ---------------------------------------------------------------
def test_full_server_and_mismatched_bundle_are_refused_with_a_reason(model, bundle_factory, checkpoint_factory):
    _, bundle, cloud = model("llama")
    edge = edge_of(bundle)
    other = edge_of(bundle_factory(checkpoint_factory("llama"), rank=8, seed=1))
    with serve(cloud, max_sessions=1) as (server, endpoint, events):
        with pytest.raises(CloudError) as mismatch:
            RemoteCloudSession(endpoint, other.manifest, timeout=TIMEOUT)
        first = RemoteCloudSession(endpoint, edge.manifest, timeout=TIMEOUT)
        with pytest.raises(CloudError) as busy:
            RemoteCloudSession(endpoint, edge.manifest, timeout=TIMEOUT)
        first.close()
        with RemoteCloudSession(endpoint, edge.manifest, timeout=TIMEOUT) as second:
            assert forward(edge, second, np.asarray([[1, 2, 3]])).shape == (1, 3, edge.arch.vocab_size)
    assert mismatch.value.code == "fingerprint_mismatch" and "not split together" in str(mismatch.value)
    assert any(e["event"] == "rejected" and "not split together" in e["message"] for e in events)  # the cloud says so too
    assert busy.value.code == "busy"


class RawEdge:
    """A DEALER that sends whatever frames it is given: the hostile edge."""

    def __init__(self, endpoint: str):
        import zmq

        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)

    def ask(self, frames: list) -> tuple[dict, np.ndarray | None]:
        self.socket.send_multipart(frames)
        assert self.socket.poll(int(TIMEOUT * 1000)), "no reply"
        header, payload = wire.decode(self.socket.recv_multipart(), wire.REPLIES, max_message_bytes=1 << 24)
        return header, None if payload is None else wire.tensor(payload, header["shape"], "float32")

    def error(self, frames: list) -> str:
        header, _ = self.ask(frames)
        assert header["op"] == "error", header
        return header["code"]


def _raw(**header) -> bytes:
    return json.dumps({"v": wire.PROTOCOL_VERSION, **header}).encode()


def test_malformed_and_out_of_order_messages_get_errors_and_change_nothing(model):
    _, bundle, cloud = model("llama")
    edge = edge_of(bundle, "random")
    hidden, context = edge.arch.hidden_size, 16
    x = edge.embed(np.asarray([[5, 6, 7]]))
    want = forward(edge, cloud.new_session(), np.asarray([[5, 6, 7]]))
    with serve(cloud, max_context=context) as (server, endpoint, _):
        limit = server.max_message_bytes
        raw, stranger = RawEdge(endpoint), RawEdge(endpoint)
        assert raw.error([b"\x00garbage"]) == "bad_message"
        assert raw.error([b'{"v": 1, "op": "st']) == "bad_message"  # truncated header
        assert raw.error([_raw(op="hello")]) == "unknown_op"
        assert raw.error([b'{"v": 9, "op": "open"}']) == "unsupported_version"
        assert raw.error([_raw(op="status", pad="x" * wire.MAX_HEADER_BYTES)]) == "too_large"
        # Over the message limit in total, each frame under it (a frame over it makes libzmq drop the connection).
        assert raw.error([_raw(op="status"), b"\0" * (limit - 100), b"\0" * 200]) == "too_large"
        assert raw.error([_raw(op="step", session="0" * 32, step=0, shape=[1, 3, hidden]), x.tobytes()]) == "unknown_session"

        open_ = wire.encode("open", {"ab_fingerprint": edge.manifest.ab_fingerprint, "wire_dtype": "float32", "batch": 1,
                                     "mode": "generate"})
        opened, _ = raw.ask(open_)
        sid = opened["session"]
        assert raw.error(open_) == "limit"
        step = lambda n, t, **f: wire.encode("step", {"session": sid, "step": n, **f}, t)  # noqa: E731
        madx = lambda n, cut, t: wire.encode("madx", {"session": sid, "step": n, "cut": cut}, t)  # noqa: E731
        truncated = step(0, x)
        truncated[1] = bytes(truncated[1])[:-4]
        assert raw.error(truncated) == "bad_tensor"
        assert raw.error(step(0, x[..., : hidden // 2])) == "bad_tensor"
        assert raw.error(step(0, np.zeros((1, context + 1, hidden), np.float32))) == "limit"
        assert raw.error(step(3, x)) == "out_of_order"
        assert raw.error(madx(0, 0, np.zeros((1, 3, 3, 8), np.float32))) == "out_of_order"
        assert raw.error(wire.encode("abort", {"session": sid})) == "wrong_mode"  # a tune op in a generate session
        assert stranger.error(step(0, x)) == "unknown_session"  # a session belongs to the connection that opened it

        out, cut = raw.ask(step(0, x)), 0
        while out[0]["op"] == "ax":
            ax, header = out[1], out[0]
            assert header["cut"] == cut
            assert raw.error(step(1, x)) == "out_of_order"
            assert raw.error(madx(0, cut + 1, ax)) == "out_of_order"
            assert raw.error(madx(0, cut, ax[:, :2])) == "bad_tensor"
            assert stranger.error(madx(0, cut, ax)) == "unknown_session"
            out, cut = raw.ask(madx(0, cut, edge.apply_adapter(header["layer"], header["stage"], ax))), cut + 1
        assert out[0]["op"] == "hidden" and cut == len(edge.plan.segments) - 1
        np.testing.assert_array_equal(edge.logits(out[1]), want)  # none of the refused messages changed anything

        assert raw.ask(wire.encode("close", {"session": sid}))[0]["op"] == "closed"
        assert raw.error(step(1, x[:, :1])) == "unknown_session"
        assert server.stats()["rejected"] == 24
        # A single frame over the limit never reaches plcli: libzmq drops that connection.
        raw.socket.send_multipart([_raw(op="status"), b"\0" * (limit + 1)])
        assert not raw.socket.poll(500)
        with RemoteCloudSession(endpoint, edge.manifest, timeout=TIMEOUT) as session:  # still serving
            np.testing.assert_array_equal(forward(edge, session, np.asarray([[5, 6, 7]])), want)


def test_an_edge_that_closes_or_gives_up_mid_step_frees_its_session_at_once(model):
    _, bundle, cloud = model("llama")
    edge = edge_of(bundle)
    x = edge.embed(np.asarray([[5, 6, 7]]))
    server = CloudServer(cloud, bind="tcp://127.0.0.1:*")  # turned by hand, so that messages meet as the test wants

    def while_serving(work) -> None:
        worker = threading.Thread(target=work)
        worker.start()
        while worker.is_alive():
            server.turn(0.01)

    def opened(timeout: float) -> RemoteCloudSession:
        box: list[RemoteCloudSession] = []
        while_serving(lambda: box.append(RemoteCloudSession(server.endpoint, edge.manifest, timeout=timeout)))
        return box[0]

    try:
        # Ctrl-C mid-step: `close` reaches the cloud while the step it interrupts still waits to run.
        session = opened(TIMEOUT)
        session.post_start(x)
        closing = threading.Thread(target=session.close)
        closing.start()
        time.sleep(0.3)  # both messages are at the cloud, so the next turn takes them in together
        while closing.is_alive():
            server.turn(0.01)
        assert server.sessions == {} and server.counters.rejected == 0

        # An edge that gives up on a slow cloud tells it as it goes, rather than holding a slot until it expires.
        session = opened(0.3)
        with pytest.raises(CloudError) as gave_up:
            session.start(x)
        assert gave_up.value.code == "timeout"
        deadline = time.monotonic() + TIMEOUT
        while server.sessions:
            assert time.monotonic() < deadline, "the session given up on was not freed"
            server.turn(0.01)
    finally:
        server.close()


def test_an_edge_whose_connection_dropped_and_came_back_can_still_close_its_session(model):
    """ZeroMQ reconnects a dropped connection by itself, under a routing id the cloud has not seen; the edge's `close`
    then comes from there, and must still free its session, or the session would hold its slot until it expired."""
    _, bundle, cloud = model("llama")
    edge = edge_of(bundle)
    with serve(cloud, tune=False) as (server, endpoint, events):
        relay = TcpRelay(endpoint)
        try:
            session = RemoteCloudSession(relay.endpoint, edge.manifest, timeout=TIMEOUT)
            session.start(edge.embed(np.asarray([[5, 6, 7]])))
            relay.cut()
            deadline = time.monotonic() + TIMEOUT
            while len(relay.links) < 4:  # as an edge that gives up after its timeout: ZeroMQ has connected again
                assert time.monotonic() < deadline, "ZeroMQ did not reconnect"
                time.sleep(0.01)
            session.close()
            while not any(e["event"] == "closed" for e in events):  # the cloud says so once the session is gone
                assert time.monotonic() < deadline, "the session outlived its edge's close"
                time.sleep(0.01)
            assert server.sessions == {}
        finally:
            relay.close()


def test_serve_cloud_stops_cleanly_when_its_terminal_closes(model):
    """SIGHUP, as SIGINT and SIGTERM: for a server, a clean stop (exit 0), not an interrupted command (130)."""
    from processes import listening, spawn_plcli, stop

    _, bundle, _ = model("llama")
    server = spawn_plcli("serve-cloud", bundle / "cloud", "--bind", "tcp://127.0.0.1:*", "--no-tune", "--threads", 1,
                         "--json")
    try:
        cloud_status(listening(server)["endpoint"], timeout=TIMEOUT)  # answered: it serves, its handlers are set
    finally:
        out, err = stop(server, signal.SIGHUP)
    assert server.returncode == 0 and '"stopped"' in out, err


def test_a_refused_message_does_not_keep_its_session_alive_and_a_taken_one_does(model, monkeypatch):
    """A refused message changes nothing, its session's idle clock included: else a peer could hold every session
    slot for ever with messages that are never valid."""
    import types

    import plcli.runtime.server as server_module

    _, bundle, cloud = model("llama")
    edge = edge_of(bundle)
    clock = types.SimpleNamespace(now=1000.0)
    monkeypatch.setattr(server_module, "time", types.SimpleNamespace(monotonic=lambda: clock.now))
    open_ = wire.encode("open", {"ab_fingerprint": edge.manifest.ab_fingerprint, "wire_dtype": "float32", "batch": 1,
                                 "mode": "generate"})
    x = edge.embed(np.asarray([[5, 6, 7]]))
    with serve(cloud, tune=False, session_timeout=5.0) as (server, endpoint, events):
        squatter, honest = RawEdge(endpoint), RawEdge(endpoint)
        squatted, kept = (raw.ask(open_)[0]["session"] for raw in (squatter, honest))
        clock.now += 4.0
        assert squatter.error(wire.encode("madx", {"session": squatted, "step": 0, "cut": 0}, x)) == "out_of_order"
        assert honest.ask(wire.encode("step", {"session": kept, "step": 0}, x))[0]["op"] == "ax"
        clock.now += 2.0  # 6 s after the squatter's last message taken, 2 s after the honest edge's
        deadline = time.monotonic() + TIMEOUT
        while squatted in server.sessions:
            assert time.monotonic() < deadline, "a refused message kept its session alive"
            time.sleep(0.01)
        assert kept in server.sessions
        assert [e["session"] for e in events if e["event"] == "expired"] == [squatted[:8]]
        for raw in (squatter, honest):
            raw.socket.close()


def test_a_session_is_idle_only_while_its_edge_owes_a_message_however_slow_the_cloud(model, monkeypatch):
    """Every model call takes longer than --session-timeout: no session waiting on the cloud may expire for it."""
    import types

    import plcli.runtime.server as server_module

    _, bundle, cloud = model("llama")
    edge = edge_of(bundle)
    clock = types.SimpleNamespace(now=1000.0)
    monkeypatch.setattr(server_module, "time", types.SimpleNamespace(monotonic=lambda: clock.now))
    server = CloudServer(cloud, bind="tcp://127.0.0.1:*", tune=False, session_timeout=5.0)
    run_group = cloud.run_group

    def slow(calls):
        clock.now += 6.0
        return run_group(calls)

    monkeypatch.setattr(cloud, "run_group", slow)
    # On the fake clock a message the next turn misses by a millisecond of real time comes 6 s late: each turn takes
    # in every message sent before it, as a cloud busy for 6 s would find them all waiting.
    traffic = {"sent": 0, "received": 0}
    receive = server._receive

    def receive_all():
        taken = receive()
        deadline = time.monotonic() + TIMEOUT
        while traffic["received"] + len(taken) < traffic["sent"] and time.monotonic() < deadline:
            server.socket.poll(10)
            taken += receive()
        traffic["received"] += len(taken)
        return taken

    monkeypatch.setattr(server, "_receive", receive_all)

    def send(raw: RawEdge, frames: list) -> None:
        traffic["sent"] += 1
        raw.socket.send_multipart(frames)

    def turn() -> None:
        if traffic["sent"] > traffic["received"]:
            server.socket.poll(int(TIMEOUT * 1000))
        server.turn(0.01)

    prompts = [np.asarray([[5, 6, 7]]), np.asarray([[8, 9]])]  # of different lengths: never in one call
    try:
        edges = [RawEdge(server.endpoint) for _ in prompts]
        open_ = wire.encode("open", {"ab_fingerprint": edge.manifest.ab_fingerprint, "wire_dtype": "float32",
                                     "batch": 1, "mode": "generate"})
        for raw in edges:
            send(raw, open_)

        def reply(raw: RawEdge) -> tuple[dict, np.ndarray | None]:
            header, payload = wire.decode(raw.socket.recv_multipart(), wire.REPLIES, max_message_bytes=1 << 24)
            return header, None if payload is None else wire.tensor(payload, header["shape"], "float32")

        while not all(raw.socket.poll(0) for raw in edges):
            turn()
        sids = [reply(raw)[0]["session"] for raw in edges]
        # Both steps arrive together, so one waits in the queue while the other's slow call runs; each edge answers
        # its `A x` at once.
        for raw, sid, ids in zip(edges, sids, prompts):
            send(raw, wire.encode("step", {"session": sid, "step": 0}, edge.embed(ids)))
        hidden: dict[int, np.ndarray] = {}
        for _ in range(200):
            if len(hidden) == len(edges):
                break
            turn()
            for i, (raw, sid) in enumerate(zip(edges, sids)):
                if raw.socket.poll(50):  # a reply the server sent in this turn may still be on its way
                    header, tensor = reply(raw)
                    assert header["op"] in ("ax", "hidden"), header
                    if header["op"] == "hidden":
                        hidden[i] = tensor
                    else:
                        send(raw, wire.encode("madx", {"session": sid, "step": 0, "cut": header["cut"]},
                                              edge.apply_adapter(header["layer"], header["stage"], tensor)))
        for i, ids in enumerate(prompts):
            np.testing.assert_array_equal(edge.logits(hidden[i]), forward(edge, cloud.new_session(), ids))
        assert server.counters.rejected == 0
        clock.now += 5.5  # now the edges owe the next step, and say nothing
        server.turn(0.01)
        assert server.sessions == {}
    finally:
        for raw in edges:
            raw.socket.close()
        server.close()


def test_a_group_waits_for_a_session_its_edge_owes_but_the_loop_never_sleeps_through_a_stop(model):
    """--batch-wait-us holds a group back for an edge still computing its `M A x`, however long it is set; the loop's
    own waits stay short, or a stop request (SIGINT) and expiry would wait for the next message to arrive."""
    from plcli.runtime.server import POLL_S

    _, bundle, cloud = model("llama")
    edge = edge_of(bundle)
    server = CloudServer(cloud, bind="tcp://127.0.0.1:*", tune=False, batch_wait_s=1000.0)
    ids = np.asarray([[5, 6, 7]])
    try:
        a, b = RawEdge(server.endpoint), RawEdge(server.endpoint)

        def reply(raw: RawEdge, turns: int = 100) -> tuple[dict, np.ndarray | None]:
            for _ in range(turns):
                if raw.socket.poll(0):
                    header, payload = wire.decode(raw.socket.recv_multipart(), wire.REPLIES, max_message_bytes=1 << 24)
                    return header, None if payload is None else wire.tensor(payload, header["shape"], "float32")
                server.turn(0.01)
            raise AssertionError("no reply")

        def answer(raw: RawEdge, sid: str, header: dict, ax: np.ndarray) -> None:
            raw.socket.send_multipart(wire.encode("madx", {"session": sid, "step": 0, "cut": header["cut"]},
                                                  edge.apply_adapter(header["layer"], header["stage"], ax)))

        open_ = wire.encode("open", {"ab_fingerprint": edge.manifest.ab_fingerprint, "wire_dtype": "float32",
                                     "batch": 1, "mode": "generate"})
        sids = []
        for raw in (a, b):
            raw.socket.send_multipart(open_)
            sids.append(reply(raw)[0]["session"])
        for raw, sid in zip((a, b), sids):
            raw.socket.send_multipart(wire.encode("step", {"session": sid, "step": 0}, edge.embed(ids)))
        (ha, axa), (hb, axb) = reply(a), reply(b)
        answer(a, sids[0], ha, axa)
        waits, deadline = [], time.monotonic() + TIMEOUT
        while not server._queue:  # until A's answer is at the cloud; B's edge is still computing its own
            assert time.monotonic() < deadline, "A's answer never reached the cloud"
            waits.append(server.turn(0.01))
        waits += [server.turn(0.01) for _ in range(3)]
        assert not a.socket.poll(0) and len(server._queue) == 1  # A's next segment waits for B's
        assert max(waits) <= POLL_S
        grouped = server.counters.grouped_calls
        answer(b, sids[1], hb, axb)
        (ha, axa), (hb, axb) = reply(a), reply(b)
        assert server.counters.grouped_calls == grouped + 1 and ha["cut"] == hb["cut"] == 1
        b.socket.send_multipart(wire.encode("close", {"session": sids[1]}))  # B's edge stops: nobody to wait for
        assert reply(b)[0]["op"] == "closed"
        answer(a, sids[0], ha, axa)
        assert reply(a)[0]["op"] in ("ax", "hidden")
    finally:
        for raw in (a, b):
            raw.socket.close()
        server.close()


def test_a_session_of_several_rows_gets_each_rows_solo_logits_and_more_rows_than_max_batch_are_refused(model):
    """`RemoteCloudSession(batch=...)`, as a program that runs several sequences at once opens it (`--max-batch`)."""
    _, bundle, cloud = model("llama")
    edge = edge_of(bundle, "random")
    rows = np.asarray([[5, 6, 7, 8], [9, 3, 2, 11]])
    with serve(cloud, tune=False, max_batch=2) as (_, endpoint, _):
        solos = [cloud.new_session() for _ in rows]
        with RemoteCloudSession(endpoint, edge.manifest, timeout=TIMEOUT, batch=2) as session:
            for ids in (rows, rows[:, -1:] + 1, rows[:, -1:] + 2):  # a prefill, then two decode steps
                want = np.concatenate([forward(edge, solo, ids[i:i + 1]) for i, solo in enumerate(solos)])
                np.testing.assert_allclose(forward(edge, session, ids), want, rtol=1e-5, atol=1e-6)
        with pytest.raises(CloudError) as refused:
            RemoteCloudSession(endpoint, edge.manifest, timeout=TIMEOUT, batch=3)
        assert refused.value.code == "limit" and "batch 3 exceeds this cloud's limit of 2" in str(refused.value)


def _decode_in_lockstep(edge: EdgeModel, endpoint: str, prompts: list[list[int]], new_tokens: int,
                        after_each_token) -> list[list[int]]:
    """Greedy tokens of one session per prompt, every session's step sent before any reply is read, so that the
    cloud can group them; each reply answered as soon as it is in, whichever session's it is."""
    sessions = [RemoteCloudSession(endpoint, edge.manifest, timeout=TIMEOUT) for _ in prompts]
    try:
        tokens: list[list[int]] = [[] for _ in prompts]
        feed = [list(p) for p in prompts]
        for _ in range(new_tokens):
            for session, ids in zip(sessions, feed):
                session.post_start(edge.embed(np.asarray([ids])))
            waiting = set(range(len(sessions)))
            while waiting:
                for i in [i for i in waiting if sessions[i].socket.poll(10)]:
                    out = sessions[i].receive()
                    if not out.done:
                        sessions[i].post_resume(edge.apply_adapter(out.layer, out.stage, out.ax))
                        continue
                    logits = edge.logits(np.ascontiguousarray(out.hidden[:, -1:]))[0, -1]
                    tokens[i].append(int(logits[:edge.vocab_limit].argmax()))
                    feed[i] = tokens[i][-1:]
                    waiting.discard(i)
            after_each_token()
        return tokens
    finally:
        for session in sessions:
            session.close()


def test_sessions_of_different_lengths_group_within_the_memory_budget(model):
    """A group's shared cache rows are as wide as its longest member needs: a short session grouped with a long one
    holds as much as the long one. The cloud counts that against --max-memory, and runs a group one by one where it
    would not fit, so that the caches stay within the budget (and what groups leave behind within twice it)."""
    from plcli.runtime.server import memory_per_session

    _, bundle, cloud = model("llama")
    edge = edge_of(bundle, "random")
    new_tokens = 4
    prompts = [list(range(1, 101))] + [[5 + i, 6, 7] for i in range(5)]
    solo = [list(generate(edge, cloud.new_session(), p, Sampling(max_new_tokens=new_tokens, ignore_eos=True)))
            for p in prompts]
    # Room for what each session needs on its own, and for no group that widens two rows of the 2 layers.
    budget = sum(memory_per_session(cloud, len(p) + new_tokens) for p in prompts) + memory_per_session(cloud, 1)

    def held(server: CloudServer) -> tuple[int, int]:
        """Bytes of the cache rows the sessions hold, and of the buffers behind them (rows left behind included)."""
        views, buffers = 0, {}
        for session in list(server.sessions.values()):
            for kv in session.cloud.kv:
                for array in kv or ():
                    views += array.nbytes
                    base = array if array.base is None else array.base
                    buffers[id(base)] = base.nbytes
        return views, sum(buffers.values())

    for limit in (None, budget):
        seen = []
        with serve(cloud, tune=False, max_memory_bytes=limit, batch_wait_s=1000.0) as (server, endpoint, _):
            def check() -> None:
                views, buffers = held(server)
                seen.append((views, buffers, server.memory_bytes()))
                assert views <= server.memory_bytes(), "the sessions hold more than the cloud counts"
                if limit is not None:
                    assert server.memory_bytes() <= limit and buffers <= 2 * limit

            assert _decode_in_lockstep(edge, endpoint, prompts, new_tokens, check) == solo
            grouped = server.counters.grouped_calls
        if limit is None:
            # Without a limit, grouping widens the short sessions' rows past the budget: the budget has work to do.
            assert grouped > 0 and max(views for views, _, _ in seen) > budget


# -- the commands -------------------------------------------------------------------------
def _invoke(*args: str, input: str | None = None):
    from typer.testing import CliRunner

    from plcli.cli import app

    return CliRunner().invoke(app, list(args), input=input)


def test_run_edge_takes_the_checkpoints_generation_settings_unless_flags_say_otherwise(checkpoint_factory, bundle_factory,
                                                                                        tmp_path):
    ckpt = shutil.copytree(checkpoint_factory("llama"), tmp_path / "ckpt")
    (ckpt / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.8, "top_k": 5, "repetition_penalty": 1.2, "num_beams": 2}))
    bundle = bundle_factory(ckpt, rank=8)
    edge, cloud = edge_of(bundle), CloudModel(bundle / "cloud", threads=1)
    prompt_ids = edge.tokenizer(PROMPT)["input_ids"]
    common = ["--connect", "", "--prompt", PROMPT, "--max-new-tokens", "8", "--ignore-eos", "--json"]
    with serve(cloud) as (_, endpoint, _):
        common[1] = endpoint
        sampled = _invoke("run-edge", str(bundle / "edge"), *common, "--seed", "3")
        greedy = _invoke("run-edge", str(bundle / "edge"), *common, "--temperature", "0", "--repetition-penalty", "1")
    assert sampled.exit_code == 0, sampled.output
    report = json.loads(sampled.stdout)
    assert report["sampling"] == {"temperature": 0.8, "top_k": 5, "top_p": 1.0, "repetition_penalty": 1.2, "seed": 3}
    assert report["token_ids"] == local_ids(edge, cloud, prompt_ids, Sampling(max_new_tokens=8, ignore_eos=True, seed=3,
                                                                                temperature=0.8, top_k=5, repetition_penalty=1.2))
    assert "note: the checkpoint's generation config sets num_beams=2, which plcli does not apply" in " ".join(sampled.stderr.split())
    assert greedy.exit_code == 0, greedy.output
    assert json.loads(greedy.stdout)["token_ids"] == local_ids(edge, cloud, prompt_ids, Sampling(max_new_tokens=8, ignore_eos=True))


def test_serve_cloud_refuses_limits_out_of_range_in_one_line(model):
    _, bundle, cloud = model("llama")
    positions = cloud.arch.max_position_embeddings
    for options, message in [(["--max-group", "0"], "--max-group must be at least 1"),
                             (["--batch-wait-us", "-1"], "--batch-wait-us -1 is out of range: 0 to 86400000000"),
                             (["--batch-wait-us", str(10**11)], "--batch-wait-us 100000000000 is out of range"),
                             (["--threads", "0"], "--threads 0 is out of range"),
                             (["--threads", str(10**11)], "--threads 100000000000 is out of range: 1 to 1024"),
                             # Beyond these, the message limit overflowed ZeroMQ's option: an internal error.
                             (["--max-context", str(positions + 1)], f"1 to the model's {positions} positions"),
                             (["--max-context", str(10**20)], "--max-context 100000000000000000000 is out of range"),
                             (["--max-batch", str(10**17)], "--max-batch 100000000000000000 is out of range: 1 to 65536")]:
        result = _invoke("serve-cloud", str(bundle / "cloud"), "--bind", "tcp://127.0.0.1:*", "--no-tune", *options)
        assert result.exit_code == 2 and message in result.output, result.output
    for command in (("run-edge", str(bundle / "edge"), "--prompt", "hi"),
                    ("tune", str(bundle / "edge"), "--data", "never-read.txt", "--connect", "tcp://127.0.0.1:9")):
        result = _invoke(*command, "--threads", str(10**11))  # was an internal error from ONNX Runtime
        assert result.exit_code == 2 and "--threads 100000000000 is out of range" in result.output, result.output
    # A pass carries at most wire.MAX_BATCH rows of the context, so no --max-train-tokens is too many.
    servers = [CloudServer(cloud, bind="tcp://127.0.0.1:*", tune=False, max_train_tokens=n)
               for n in (10**30, wire.MAX_BATCH * positions)]
    for server in servers:
        server.close()
    assert servers[0].max_message_bytes == servers[1].max_message_bytes


# ZeroMQ takes these ports modulo 65536 (99999 is 34463, -1 is 65535) or reads what digits it can (1e3 is 1).
BAD_PORTS = ("99999", "-1", "1e3", "65536")


def test_endpoints_whose_port_zeromq_would_misread_are_refused_before_anything_loads(model, tmp_path):
    _, bundle, cloud = model("llama")
    for port in BAD_PORTS:
        # A process of its own: were the endpoint taken, it would serve until the timeout kills it.
        done = subprocess.run([sys.executable, "-m", "plcli.cli", "serve-cloud", str(bundle / "cloud"), "--bind",
                               f"tcp://127.0.0.1:{port}", "--no-tune"], capture_output=True, text=True, timeout=60)
        assert (done.returncode, done.stdout) == (2, ""), done
        assert done.stderr.strip().splitlines() == [f"error: --bind tcp://127.0.0.1:{port}: '{port}' is not a port: use 0 "
                                                    "to 65535, or * for a free one"], done.stderr
        # --timeout 1: taken, the endpoint would only be found silent
        for command in (("run-edge", str(bundle / "edge"), "--prompt", "hi"),
                        ("tune", str(bundle / "edge"), "--data", str(tmp_path / "never-read.txt"))):
            result = _invoke(*command, "--timeout", "1", "--connect", f"tcp://127.0.0.1:5555,tcp://localhost:{port}")
            assert result.exit_code == 2 and result.stdout == "", result.output
            assert result.stderr.strip().splitlines() == [f"error: --connect tcp://localhost:{port}: '{port}' is not a port: "
                                                          "use 1 to 65535"], result.stderr
        with pytest.raises(ValueError, match="is not a port"):
            CloudServer(cloud, bind=f"tcp://127.0.0.1:{port}", tune=False)
        with pytest.raises(CloudError, match="is not a port") as refused:
            RemoteCloudSession(f"tcp://127.0.0.1:{port}", cloud.manifest, timeout=1)
        assert refused.value.code == "connect"
    for bind in ("tcp://127.0.0.1:0", f"ipc://{tmp_path / 'cloud.ipc'}"):  # a free port; a socket file
        server = CloudServer(cloud, bind=bind, tune=False)
        server.close()
    with pytest.raises(CloudError, match="no port"):
        RemoteCloudSession("tcp://127.0.0.1", cloud.manifest, timeout=1)
    with pytest.raises(CloudError, match="no host"):  # was "no port"
        RemoteCloudSession("tcp://:5555", cloud.manifest, timeout=1)


def test_waits_that_are_not_finite_or_over_a_day_are_refused_in_one_line(model, tmp_path):
    """ZeroMQ takes a wait as an int of milliseconds: inf and 1e7 s overflowed it, as internal errors."""
    _, bundle, cloud = model("llama")
    done = subprocess.run([sys.executable, "-m", "plcli.cli", "serve-cloud", str(bundle / "cloud"), "--bind",
                           "tcp://127.0.0.1:*", "--no-tune", "--session-timeout", "inf"], capture_output=True, text=True,
                          timeout=60)  # a process of its own: accepted, it would serve until killed
    assert (done.returncode, done.stdout) == (2, ""), done
    assert done.stderr.strip().splitlines() == ["error: --session-timeout inf is out of range: more than 0 to 86400 "
                                                "seconds (24 hours)"]
    nowhere = "tcp://127.0.0.1:1"  # refused before any connection is tried
    for flag, value, says in (("--timeout", "inf", "inf is out of range: more than 0"),
                              ("--timeout", "1e7", "1e+07 is out of range: more than 0"),
                              ("--timeout", "nan", "nan is out of range: more than 0"),
                              ("--reconnect-timeout", "inf", "inf is out of range: 0"),
                              ("--reconnect-timeout", "-1", "-1 is out of range: 0")):
        for command in (("run-edge", str(bundle / "edge"), "--prompt", "hi"),
                        ("tune", str(bundle / "edge"), "--data", str(tmp_path / "never-read.txt"))):
            result = _invoke(*command, "--connect", nowhere, flag, value)
            assert result.exit_code == 2 and result.stdout == "", result.output
            assert result.stderr.strip().splitlines() == [f"error: {flag} {says} to 86400 seconds (24 hours)"], result.stderr
    for timeout in (float("inf"), 1e7, float("nan"), 0.0):
        with pytest.raises(ValueError, match="out of range"):
            RemoteCloudSession(nowhere, cloud.manifest, timeout=timeout)
        with pytest.raises(ValueError, match="out of range"):
            cloud_status(nowhere, timeout=timeout)
        with pytest.raises(ValueError, match="--session-timeout"):
            CloudServer(cloud, bind="tcp://127.0.0.1:*", session_timeout=timeout, tune=False)


def test_run_edge_json_chat_and_adapter_through_a_cloud(model, bundle_factory, checkpoint_factory, tmp_path):
    from safetensors.numpy import save_file

    _, bundle, cloud = model("llama")
    edge = edge_of(bundle)
    prompt_ids = edge.tokenizer(PROMPT)["input_ids"]
    sampling = Sampling(max_new_tokens=10, ignore_eos=True)
    tuned = edge_of(bundle, "random")
    save_file(tuned.adapter_matrices(), str(tmp_path / "adapter.safetensors"))
    (tmp_path / "adapter.json").write_text(json.dumps({"rank": tuned.manifest.rank, "targets": list(tuned.manifest.targets),
                                                       "ab_fingerprint": tuned.manifest.ab_fingerprint}))
    with serve(cloud) as (_, endpoint, _):
        once = _invoke("run-edge", str(bundle / "edge"), "--connect", endpoint, "--prompt", PROMPT, "--max-new-tokens", "10",
                       "--ignore-eos", "--json", "--timeout", str(TIMEOUT))
        adapted = _invoke("run-edge", str(bundle / "edge"), "--connect", endpoint, "--prompt", PROMPT, "--max-new-tokens", "10",
                          "--ignore-eos", "--json", "--adapter", str(tmp_path))
        chat = _invoke("run-edge", str(bundle / "edge"), "--connect", endpoint, "--max-new-tokens", "6", "--ignore-eos",
                       input="Private text\n never leaves\n/exit\nnot read\n")
        mismatched = _invoke("run-edge", str(bundle_factory(checkpoint_factory("llama"), rank=8, seed=1) / "edge"),
                             "--connect", endpoint, "--prompt", PROMPT)
    first_line = len(edge.tokenizer("Private text\n")["input_ids"])
    with serve(cloud, max_context=first_line + 3) as (_, endpoint, _):  # one turn of 3 tokens fills it but for one
        full = _invoke("run-edge", str(bundle / "edge"), "--connect", endpoint, "--max-new-tokens", "3", "--ignore-eos",
                       input="Private text\n never leaves\n")
    assert once.exit_code == 0, once.output
    report = json.loads(once.stdout)
    assert set(report) == {"prompt_token_ids", "token_ids", "text", "sampling", "stats"}
    assert report["sampling"] == {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0, "seed": None}
    assert set(report["stats"]) == {"ttft_s", "decode_tokens_per_s", "bytes_up", "bytes_down", "round_trips", "new_tokens"}
    assert report["prompt_token_ids"] == prompt_ids
    assert report["token_ids"] == local_ids(edge, cloud, prompt_ids, sampling)
    assert report["text"] == edge.tokenizer.decode(report["token_ids"])
    segments = len(edge.plan.segments)
    assert report["stats"]["new_tokens"] == 10 and report["stats"]["round_trips"] == 10 * segments
    assert report["stats"]["bytes_up"] > 10 * per_token_traffic(edge.manifest)["bytes_up"]
    assert adapted.exit_code == 0, adapted.output
    adapted_ids = json.loads(adapted.stdout)["token_ids"]
    assert adapted_ids == local_ids(tuned, cloud, prompt_ids, sampling) and adapted_ids != report["token_ids"]

    assert chat.exit_code == 0, chat.output
    local = Conversation(edge, cloud.new_session(), Sampling(max_new_tokens=6, ignore_eos=True))
    turns = [edge.tokenizer.decode(list(local.turn(edge.tokenizer(line + "\n", add_special_tokens=first)["input_ids"])))
             for line, first in (("Private text", True), (" never leaves", False))]
    assert chat.stdout == "".join(t + "\n" for t in turns)
    # A line that no longer fits ends the chat as a context filled mid-turn does: a note, exit 0.
    assert full.exit_code == 0 and "context full" in full.stderr, full.output
    assert full.stdout.count("\n") == 1

    assert mismatched.exit_code == 2
    assert "not split together" in mismatched.stderr and "Traceback" not in mismatched.output


def test_a_prompt_or_chat_line_that_is_not_utf8_is_refused_in_one_line(model):
    """Python hands such bytes of argv and stdin over as lone surrogates, which the tokenizer failed on as an internal
    error. The chat runs in a process of its own: only a real stdin decodes with surrogateescape."""
    _, bundle, cloud = model("llama")
    once = _invoke("run-edge", str(bundle / "edge"), "--prompt", b"caf\xe9".decode("utf-8", "surrogateescape"))
    assert (once.exit_code, once.stdout) == (2, "")
    assert once.stderr.splitlines() == ["error: --prompt is not UTF-8 text (an invalid byte at character 3)"]
    with serve(cloud) as (_, endpoint, _):
        chat = subprocess.run([sys.executable, "-m", "plcli.cli", "run-edge", str(bundle / "edge"), "--connect", endpoint,
                               "--max-new-tokens", "3", "--ignore-eos"], input=b"Private text\ncaf\xe9\nnot read\n",
                              capture_output=True, timeout=60)
    assert chat.returncode == 2 and chat.stdout.count(b"\n") == 1  # the first turn's answer, then nothing
    assert chat.stderr.decode().splitlines() == ["error: line 2 of the chat is not UTF-8 text (an invalid byte at "
                                                 "character 3)"]


def test_the_demo_generates_over_loopback_what_it_generates_in_process(model):
    from plcli.demo import serve_and_generate

    _, bundle, cloud = model("llama")
    edge = edge_of(bundle)
    prompt_ids = edge.tokenizer(PROMPT)["input_ids"]
    sampling = Sampling(max_new_tokens=12, ignore_eos=True)
    network = serve_and_generate(cloud, edge, prompt_ids, sampling)
    assert network["token_ids"] == local_ids(edge, cloud, prompt_ids, sampling)
    assert network["cloud_tokens_served"] == len(prompt_ids) + 11
    assert network["stats"]["round_trips"] == 12 * len(edge.plan.segments)
    assert network["decode_bytes_up_per_token"] > per_token_traffic(edge.manifest)["bytes_up"]


def test_the_demo_tunes_through_a_loopback_cloud(model, tmp_path):
    from plcli.demo import serve_and_tune
    from plcli.runtime.tune import TuneConfig

    _, bundle, cloud = model("llama")
    edge = edge_of(bundle)
    said = []
    config = TuneConfig(steps=3, batch_size=4, seq_len=32, warmup=1, lr=0.05, save_every=0)
    report = serve_and_tune(cloud, edge, bundle, tmp_path, config=config, say=said.append)
    assert report["steps"] == 3 and report["endpoint"].startswith("tcp://127.0.0.1:")
    assert report["eval_loss_after"] < report["eval_loss_before"]
    assert report["prompt"] and report["expected"] and isinstance(report["learned"], bool)
    assert EdgeModel(bundle / "edge", adapter=tmp_path / "adapter").adapter_matrices()  # the adapter it saved loads


LIGHT_EDGE = """
import sys, time
import numpy as np
from plcli.runtime.client import RemoteCloudSession
from plcli.runtime.edge import EdgeModel
edge = EdgeModel(sys.argv[1], threads=1)
session = RemoteCloudSession(sys.argv[2], edge.manifest, timeout=5)
ids = np.asarray([[1, 2, 3]])
while True:
    out = session.start(edge.embed(ids))
    while not out.done:
        print("cut", out.layer, flush=True)
        time.sleep(0.05)
        out = session.resume(edge.apply_adapter(out.layer, out.stage, out.ax))
    ids = edge.logits(out.hidden)[:, -1:].argmax(-1)
"""


class Lines:
    """A subprocess's stdout lines, read in a thread so that the test never blocks on them."""

    def __init__(self, stream):
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(iter(stream.readline, "")), daemon=True).start()

    def wait_for(self, predicate, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if predicate(line):
                    return line
            time.sleep(0.02)
        raise AssertionError(f"not seen within {timeout} s; got {self.lines}")


def _spawn(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_killed_edge_is_freed_and_a_dead_cloud_is_reported(model):
    _, bundle, cloud = model("llama")
    edge = edge_of(bundle)
    session_timeout = 2.0
    procs: list[subprocess.Popen] = []
    try:
        server = _spawn("-m", "plcli.cli", "serve-cloud", str(bundle / "cloud"), "--bind", "tcp://127.0.0.1:*",
                        "--session-timeout", str(session_timeout), "--threads", "1", "--json")
        procs.append(server)
        log = Lines(server.stdout)
        endpoint = json.loads(log.wait_for(lambda l: '"listening"' in l, 60))["endpoint"]

        # An edge killed in the middle of a step: its session is freed within the timeout, the next edge is served.
        light = _spawn("-c", LIGHT_EDGE, str(bundle / "edge"), endpoint)
        procs.append(light)
        cuts = Lines(light.stdout)
        cuts.wait_for(lambda _: len(cuts.lines) >= 3, 60)  # three cuts answered: a step is open
        light.kill()
        killed = time.monotonic()
        while cloud_status(endpoint, timeout=TIMEOUT)["sessions"]:
            assert time.monotonic() - killed < session_timeout + SLOW_MACHINE_S, "the dead edge's session was not freed"
            time.sleep(0.05)
        log.wait_for(lambda l: '"expired"' in l, TIMEOUT)
        ids = np.asarray([[4, 5, 6]])
        session = RemoteCloudSession(endpoint, edge.manifest, timeout=1.0)
        np.testing.assert_array_equal(forward(edge, session, ids), forward(edge, cloud.new_session(), ids))

        # The cloud stops cleanly on SIGTERM; the open session then errors within its timeout, the command exits 2.
        server.send_signal(signal.SIGTERM)
        assert server.wait(TIMEOUT) == 0
        assert json.loads(log.wait_for(lambda l: '"stopped"' in l, TIMEOUT))["sessions_freed"] == 1
        started = time.monotonic()
        with pytest.raises(CloudError) as gone:
            forward(edge, session, np.asarray([[7]]))
        assert gone.value.code == "timeout" and time.monotonic() - started < 1.0 + SLOW_MACHINE_S
        session.close()
        run = _spawn("-m", "plcli.cli", "run-edge", str(bundle / "edge"), "--connect", endpoint, "--prompt", PROMPT,
                     "--timeout", "1")
        procs.append(run)
        _, err = run.communicate(timeout=60)
        assert run.returncode == 2
        assert err.count("\n") == 1 and f"no answer from the cloud at {endpoint} within 1 s" in err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
