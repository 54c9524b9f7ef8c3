"""Decode speed, side by side in one run: transformers, the same ONNX graphs in one process, and the split.

What `plcli bench decode` measures, interleaved round by round so that a busy
machine slows every method alike:

- `transformers`: `generate` (greedy, eager, fp32) on the checkpoint, one process;
- `onnx`: the bundle's graphs with cloud and edge in this process, no network;
- `split`: cloud in a `plcli serve-cloud` process, edge in this one, loopback ZeroMQ;
- `split-link`: the same over an emulated link: each exchange also waits the
  round-trip time and its bytes' transfer time at the link's rates;
- `split-fp16` (optional): the split with float16 on the wire.

Each reports decode tokens/s (after the first token), time to the first token
(prefill included), and for the split, bytes per decoded token each way (counted
on the socket) and round trips per token. Greedy ids of every method are checked
against transformers'. Cloud and edge each get their own threads (`threads`
for the cloud, one for the edge's head) so that they do not fight over cores.

Each round also times `status` exchanges with the cloud process: an empty round
trip through the same sockets and server loop, which runs no model. Were every
round trip of the split that cheap, it would decode at one-process speed plus
that much per round trip: `split_vs_onnx_ceiling` is the ratio to onnx that this
machine's loopback allows at best.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from plcli.runtime.cpus import Apart, pinned
from plcli.runtime.estimate import Link

LINK_PRESETS = {"5g": Link(up_mbps=60, down_mbps=100, rtt_ms=20)}
METHODS = ("transformers", "onnx", "split", "split-link")


MAX_RTT_MS = 60_000.0  # a minute per exchange: past any real link


def parse_link(text: str) -> Link:
    """`5g`, or `up=60,down=100,rtt=20` (Mbit/s, Mbit/s, ms)."""
    if text in LINK_PRESETS:
        return LINK_PRESETS[text]
    try:
        fields = dict(part.split("=", 1) for part in text.split(","))
        link = Link(up_mbps=float(fields.pop("up")), down_mbps=float(fields.pop("down")), rtt_ms=float(fields.pop("rtt", 0)))
    except (ValueError, KeyError):
        raise ValueError(f"--link {text!r}: give a preset ({', '.join(LINK_PRESETS)}) or up=MBIT,down=MBIT,rtt=MS") from None
    # NaN passes every comparison, and an infinite or huge wait overflows time.sleep: each was an internal error.
    if (fields or not 0 < link.up_mbps < math.inf or not 0 < link.down_mbps < math.inf
            or not 0 <= link.rtt_ms <= MAX_RTT_MS):
        raise ValueError(f"--link {text!r}: up and down must be positive finite Mbit/s, rtt 0 to {MAX_RTT_MS:g} ms, "
                         "nothing else")
    return link


class EmulatedLink:
    """A remote session behind a slower link: each exchange also waits the RTT and the transfer time of its bytes."""

    def __init__(self, session, link: Link):
        self.session, self.link = session, link

    def __getattr__(self, name):  # position, max_context, byte counters: the session's own
        return getattr(self.session, name)

    def start(self, embeds):
        return self._exchange(self.session.start, embeds)

    def resume(self, madx):
        return self._exchange(self.session.resume, madx)

    def _exchange(self, call, tensor):
        up, down = self.session.bytes_up, self.session.bytes_down
        out = call(tensor)
        bits_up, bits_down = 8 * (self.session.bytes_up - up), 8 * (self.session.bytes_down - down)
        time.sleep(self.link.rtt_ms / 1e3 + bits_up / (self.link.up_mbps * 1e6) + bits_down / (self.link.down_mbps * 1e6))
        return out


@dataclass
class Run:
    ids: list[int]
    ttft_s: float
    decode_tokens_per_s: float
    traffic: tuple[int, int, int] | None = None  # bytes up, bytes down, round trips of the decode phase


def timed(tokens: Iterator[int], traffic: Callable[[], tuple[int, int, int]] | None = None) -> Run:
    started = time.perf_counter()
    ids, times, first = [], [], None
    for token in tokens:
        times.append(time.perf_counter())
        ids.append(token)
        if first is None and traffic is not None:
            first = traffic()
    decode = (len(ids) - 1) / (times[-1] - times[0])
    spent = None if traffic is None else tuple(b - a for a, b in zip(first, traffic()))
    return Run(ids, times[0] - started, decode, spent)


class _Clock:
    """A transformers streamer that notes when each generated token arrives (the first `put` is the prompt)."""

    def __init__(self):
        self.times: list[float] = []
        self.ids: list[int] = []
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter())
        self.ids.extend(int(v) for v in value.reshape(-1))

    def end(self) -> None:
        pass


class _VocabLimit:
    """Never pick embedding rows past the tokenizer's vocabulary, as plcli's sampler does (their logits are noise)."""

    def __init__(self, limit: int):
        self.limit = limit

    def __call__(self, input_ids, scores):
        scores[:, self.limit:] = float("-inf")
        return scores


def transformers_run(model, prompt_ids: list[int], new_tokens: int, vocab_limit: int) -> Run:
    import torch
    from transformers import LogitsProcessorList

    clock = _Clock()
    started = time.perf_counter()
    with torch.inference_mode():
        # No end-of-text token, as plcli's `ignore_eos` runs: greedy may still pick one and go on past it, where
        # `min_new_tokens` would ban it and so pick another token than the split. The mask is given: without an eos,
        # generate masks every prompt token equal to the pad id.
        ids = torch.tensor([prompt_ids])
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, eos_token_id=None,
                       do_sample=False, streamer=clock, pad_token_id=0,
                       logits_processor=LogitsProcessorList([_VocabLimit(vocab_limit)]))
    return Run(clock.ids, clock.times[0] - started, (len(clock.ids) - 1) / (clock.times[-1] - clock.times[0]))


def empty_round_trip_s(endpoint: str, count: int = 100) -> float:
    """Median time of `count` back-to-back `status` exchanges with the cloud on one connection."""
    from plcli.runtime.client import ask_status, status_connection

    socket = status_connection(endpoint)
    times = []
    try:
        for _ in range(count + 1):
            started = time.perf_counter()
            ask_status(socket, endpoint, timeout=10.0)
            times.append(time.perf_counter() - started)
    finally:
        socket.close()
    return statistics.median(times[1:])  # the first one also connects


def _drain(stream) -> None:
    for _ in stream:
        pass


@dataclass(frozen=True)
class CloudProcess:
    endpoint: str
    pid: int


@contextmanager
def cloud_process(cloud_dir: Path, *, threads: int, wire_dtype: str = "float32", tune: bool = False,
                  huge_pages: bool = True, placement: Apart | None = None,
                  options: Sequence[str] = ()) -> Iterator[CloudProcess]:
    """`plcli serve-cloud` on a free loopback port, in its own process; yields its endpoint and pid; always stopped.

    With `placement`, its compute runs on the cores set apart for it, and polls for its next message. `options` are
    more `serve-cloud` options (say ["--max-group", "1"]).
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "plcli.cli", "serve-cloud", str(cloud_dir), "--bind", "tcp://127.0.0.1:*",
                             "--threads", str(threads), "--wire-dtype", wire_dtype, "--tune" if tune else "--no-tune",
                             "--huge-pages" if huge_pages else "--no-huge-pages", "--json",
                             *(placement.serve_options() if placement else []), *options],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        if '"listening"' not in line:
            raise RuntimeError(f"serve-cloud did not start: {line}{proc.stderr.read() if proc.poll() is not None else ''}")
        # It logs every session it opens and closes: a pipe nobody read would fill, and stop it mid-run.
        for stream in (proc.stdout, proc.stderr):
            threading.Thread(target=_drain, args=(stream,), daemon=True).start()
        yield CloudProcess(json.loads(line)["endpoint"], proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def bench_decode(model_dir: Path, *, bundles: Path | None = None, rank: int = 64, prompt_len: int = 32,
                 new_tokens: int = 64, rounds: int = 3, link: Link = LINK_PRESETS["5g"], threads: int = 1,
                 float16: bool = False, seed: int = 0, huge_pages: bool = True, placement: Apart | None = None,
                 progress: Callable[[str], None] = lambda _: None) -> dict:
    """Every method, `rounds` times interleaved; medians, the ratios, and whether greedy ids agree.

    With `float16`, also the split with `--wire-dtype float16` on both sides (a second cloud process).
    With `huge_pages`, every method's memory goes onto huge pages alike: this process's once its models are
    loaded (transformers', the one-process graphs', the edge's), and the cloud process's.
    With `placement` (runtime/cpus.py), the cloud's compute runs on cores of its own, and this process, the edge's,
    transformers' and the one-process run's threads included, on the others; the JSON's `placement` says which.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from plcli.exporters.split import split_checkpoint
    from plcli.runtime.client import RemoteCloudSession
    from plcli.runtime.cloud import CloudModel
    from plcli.runtime.edge import EdgeModel
    from plcli.runtime.generate import Sampling, generate
    from plcli.runtime.huge_pages import back_with_huge_pages

    with tempfile.TemporaryDirectory(prefix="plcli-bench-") as work:
        if bundles is None:
            progress(f"splitting {model_dir} at rank {rank}")
            bundles = Path(work) / "split"
            split_checkpoint(model_dir, bundles, rank=rank, seed=seed)
        torch.set_num_threads(threads)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
        edge = EdgeModel(bundles / "edge", threads=1)
        cloud = CloudModel(bundles / "cloud", threads=threads, prepack=True)  # as `serve-cloud` runs it
        if huge_pages:
            back_with_huge_pages()
        rng = np.random.default_rng(seed)
        vocab_limit = edge.vocab_limit
        prompt = [int(i) for i in rng.integers(1, vocab_limit, prompt_len)]
        sampling = Sampling(max_new_tokens=new_tokens, ignore_eos=True)
        methods = METHODS + (("split-fp16",) if float16 else ())
        runs: dict[str, list[Run]] = {m: [] for m in methods}
        empty_trips: list[float] = []
        with ExitStack() as stack:
            endpoints = {dtype: stack.enter_context(cloud_process(bundles / "cloud", threads=threads, wire_dtype=dtype,
                                                                  huge_pages=huge_pages, placement=placement)).endpoint
                         for dtype in ("float32", "float16")[: 1 + float16]}
            # Only once the clouds have started: a child starts on its parent's cores, and must be free to leave them.
            stack.enter_context(pinned(placement and placement.rest))

            def remote(wrap=lambda s: s, wire_dtype="float32") -> Run:
                with RemoteCloudSession(endpoints[wire_dtype], edge.manifest, wire_dtype=wire_dtype, timeout=60) as session:
                    traffic = lambda: (session.bytes_up, session.bytes_down, session.round_trips)  # noqa: E731
                    return timed(generate(edge, wrap(session), prompt, sampling), traffic)

            measure = {
                "transformers": lambda: transformers_run(model, prompt, new_tokens, vocab_limit),
                "onnx": lambda: timed(generate(edge, cloud.new_session(), prompt, sampling)),
                "split": remote,
                "split-link": lambda: remote(lambda s: EmulatedLink(s, link)),
                "split-fp16": lambda: remote(wire_dtype="float16"),
            }
            for name in methods:  # warm-up: first calls allocate and JIT what later ones reuse
                measure[name]()
            for r in range(rounds):
                progress(f"round {r + 1} of {rounds}")
                for name in methods:
                    runs[name].append(measure[name]())
                empty_trips.append(empty_round_trip_s(endpoints["float32"]))
    result = summarize(runs, edge, prompt_len, new_tokens, rank=edge.manifest.rank, link=link, rounds=rounds,
                       empty_round_trip_s=statistics.median(empty_trips))
    result["placement"] = placement and placement.as_json()
    return result


def summarize(runs: dict[str, list[Run]], edge, prompt_len: int, new_tokens: int, *, rank: int, link: Link,
              rounds: int, empty_round_trip_s: float) -> dict:
    reference = runs["transformers"][0].ids
    rows = []
    for name, rs in runs.items():
        row = {"method": name, "decode_tokens_per_s": statistics.median(r.decode_tokens_per_s for r in rs),
               "ttft_s": statistics.median(r.ttft_s for r in rs),
               "greedy_ids_identical": all(r.ids == reference for r in rs)}
        if rs[0].traffic is not None:
            decoded = len(rs[0].ids) - 1
            up, down, trips = rs[0].traffic
            row.update(bytes_up_per_token=up / decoded, bytes_down_per_token=down / decoded,
                       round_trips_per_token=trips / decoded)
        rows.append(row)
    rate = {row["method"]: row["decode_tokens_per_s"] for row in rows}
    trips = next(row for row in rows if row["method"] == "split")["round_trips_per_token"]
    arch = edge.arch
    return {
        "model": {"hidden": arch.hidden_size, "layers": arch.num_layers, "vocab": arch.vocab_size, "rank": rank,
                  "targets": list(edge.manifest.targets)},
        "prompt_tokens": prompt_len, "new_tokens": new_tokens, "rounds": rounds,
        "link": {"up_mbps": link.up_mbps, "down_mbps": link.down_mbps, "rtt_ms": link.rtt_ms},
        "rows": rows,
        "empty_round_trip_ms": empty_round_trip_s * 1e3,
        "ratios": {
            "split_vs_transformers": rate["split"] / rate["transformers"],
            "split_vs_onnx": rate["split"] / rate["onnx"],
            "split_link_vs_transformers": rate["split-link"] / rate["transformers"],
            "split_vs_onnx_ceiling": 1 / (1 + rate["onnx"] * trips * empty_round_trip_s),
        },
    }
