"""`plcli serve-cloud` and `plcli run-edge`: the split model over the network, in two terminals."""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.live import Live
from rich.text import Text

from plcli.runtime.cpu_latency import hold_low_latency
from plcli.runtime.cpus import MAX_SPIN_US, format_cpus, pinned, usable_cpus

from .app import (HUGE_PAGES_HELP, LOW_LATENCY_HELP, UserError, app, check_utf8, console, cpu_list,
                  err_console, print_json, printable, reports_errors, seconds, shown, status, stdout, thread_count)
from .cloud_options import (CONNECT_HELP, CURVE_SECRET_HELP, DEFAULT_ENDPOINT, RECONNECT_HELP, SERVER_KEY_HELP,
                            WIRE_DTYPE_HELP, check_wire_dtype, client_keys, cloud_urls, make_failover)

CHECKPOINT_DEFAULT = "Default: the checkpoint's when its generation config samples (do_sample), else greedy."


# -- serve-cloud ---------------------------------------------------------------------
@app.command("serve-cloud")
@reports_errors
def serve_cloud(
    cloud_dir: Path = typer.Argument(..., help="The cloud bundle (OUT_DIR/cloud from `plcli split`)."),
    bind: str = typer.Option(DEFAULT_ENDPOINT, "--bind", help="ZeroMQ endpoint to listen on; tcp://127.0.0.1:* picks a free port."),
    max_sessions: int = typer.Option(16, "--max-sessions", help="Edges served at once."),
    max_context: Optional[int] = typer.Option(None, "--max-context", help="Tokens per session (default: the model's maximum)."),
    session_timeout: float = typer.Option(600.0, "--session-timeout", help="Seconds a session may stay idle before it is freed."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Compute threads: one ONNX Runtime pool that every segment shares, and torch's for tuning (default: one per core)."),
    wire_dtype: str = typer.Option("float32", "--wire-dtype", help=WIRE_DTYPE_HELP),
    max_batch: int = typer.Option(1, "--max-batch", help="Sequences one session may run side by side."),
    tune: bool = typer.Option(True, "--tune/--no-tune", help="Also serve `plcli tune` (loads torch for the backward)."),
    max_train_tokens: int = typer.Option(16384, "--max-train-tokens", help="Tokens (batch x sequence) one tuning pass may carry."),
    curve_secret: Optional[Path] = typer.Option(None, "--curve-secret", help="The cloud's NAME.key_secret (`plcli keys generate`): encrypt all traffic; needs --authorized-keys."),
    authorized_keys: Optional[Path] = typer.Option(None, "--authorized-keys", help="Directory of the public NAME.key of every edge to serve (read at start); needs --curve-secret."),
    insecure: bool = typer.Option(False, "--insecure", help="Allow a non-loopback --bind without CURVE: anyone who reaches it can use this cloud and read its traffic."),
    max_memory: Optional[int] = typer.Option(None, "--max-memory", help="MiB all sessions may hold (KV caches, tuning "
                                              "activations); a session or step over it is refused (default: no limit)."),
    max_group: Optional[int] = typer.Option(None, "--max-group", help="Sessions whose steps at the same layer run as one "
                                             "call (default: --max-sessions). Above 1 the weights are also held packed "
                                             "for it (about as much memory again); 1 runs every step alone."),
    batch_wait_us: int = typer.Option(0, "--batch-wait-us", help="Microseconds a group may wait for sessions whose edge "
                                       "still owes an answer at that layer, while other groups run (default 0: never)."),
    cpus: Optional[str] = typer.Option(None, "--cpus", help="Cores the compute threads run on (the server's loop and "
                                       "ONNX Runtime's pool), as taskset -c takes them: 0, 0-3, 0,2 (default: any)."),
    io_cpus: Optional[str] = typer.Option(None, "--io-cpus", help="Cores ZeroMQ's I/O thread runs on (default with "
                                          "--cpus: the others this process may use, so that no message waits for the "
                                          "compute; else any)."),
    spin_us: int = typer.Option(0, "--spin-us", help="Microseconds to poll for the next message before sleeping: the "
                                "core stays awake between an edge's answers. Worth it where --cpus gives the server "
                                "cores of its own (default 0: sleep at once)."),
    low_latency: bool = typer.Option(False, "--low-latency", help=LOW_LATENCY_HELP),
    huge_pages: bool = typer.Option(True, "--huge-pages/--no-huge-pages", help=HUGE_PAGES_HELP),
    as_json: bool = typer.Option(False, "--json", help="Log one JSON object per event on stdout."),
):
    """Serve a cloud bundle to edges over ZeroMQ: generation (one KV cache per session) and tuning (`plcli tune`)."""
    from plcli.runtime.cloud import CloudModel
    from plcli.runtime.huge_pages import back_with_huge_pages, huge_page_bytes
    from plcli.runtime.secure import ServerKeys
    from plcli.runtime.server import CloudServer, memory_per_session
    from plcli.runtime.wire import MAX_TIMEOUT_S, check_endpoint

    thread_count(threads)
    check_wire_dtype(wire_dtype)
    seconds("--session-timeout", session_timeout)
    if (curve_secret is None) != (authorized_keys is None):
        raise UserError("--curve-secret and --authorized-keys go together: the cloud's secret key and the directory of the "
                        "edges' public keys")
    if curve_secret is not None and insecure:
        raise UserError("--insecure contradicts --curve-secret: a CURVE server is encrypted and authenticated")
    try:
        check_endpoint(bind, bind=True)
    except ValueError as e:
        raise UserError(f"--bind {e}") from None
    # Checked on the endpoint as given, before anything binds it.
    if curve_secret is None and not insecure and not _is_local(bind):
        raise UserError(f"{bind} is reachable from other machines: give --curve-secret and --authorized-keys "
                        "(`plcli keys generate`), or --insecure to serve it unencrypted and open to anyone")
    if curve_secret is None and not _is_local(bind):  # said at once, before the wait for the model to load
        err_console.print(f"[yellow]warning:[/] {shown(bind)} is reachable from other machines without encryption or "
                          "authentication (--insecure): anyone who reaches it can use this cloud and read its traffic",
                          highlight=False, soft_wrap=True)
    compute_cpus, io = cpu_list(cpus, "--cpus"), cpu_list(io_cpus, "--io-cpus")
    if io is None and compute_cpus is not None:
        io = (usable_cpus() - compute_cpus) or None
    if not 0 <= spin_us <= MAX_SPIN_US:
        raise UserError(f"--spin-us {spin_us} is out of range: 0 to {MAX_SPIN_US}")
    if not 0 <= batch_wait_us <= MAX_TIMEOUT_S * 10**6:  # as every other wait: at most a day
        raise UserError(f"--batch-wait-us {batch_wait_us} is out of range: 0 to {MAX_TIMEOUT_S * 10**6} (24 hours)")
    curve = ServerKeys.load(curve_secret, authorized_keys) if curve_secret is not None else None
    # Pinned before the model loads: ONNX Runtime's pool threads start on the cores of the thread that makes them.
    with hold_low_latency(low_latency), pinned(compute_cpus):
        reporter = _Reporter(as_json)
        try:
            with status("loading the cloud bundle"):
                model = CloudModel(cloud_dir, threads=threads, prepack=(max_group or max_sessions) > 1)
                server = CloudServer(model, bind=bind, max_sessions=max_sessions, max_context=max_context,
                                     session_timeout=session_timeout, wire_dtype=wire_dtype, max_batch=max_batch, tune=tune,
                                     max_train_tokens=max_train_tokens, threads=threads, on_event=reporter.event, curve=curve,
                                     max_memory_bytes=None if max_memory is None else max_memory * 2**20,
                                     max_group=max_group, batch_wait_s=batch_wait_us / 1e6, spin_s=spin_us / 1e6,
                                     io_cpus=io)
                reporter.huge_page_bytes = back_with_huge_pages().bytes if huge_pages else huge_page_bytes()
        except ValueError as e:
            raise UserError(str(e)) from None
        reporter.server = server
        if not as_json:
            kv = memory_per_session(model, server.max_context, max_batch)
            grouping = f"steps of up to {server.max_group} sessions per call" if server.max_group > 1 else "every step alone"
            reporter.line(f"{model.arch.family} · {model.arch.num_layers} layers · rank {model.manifest.rank} · "
                          f"KV cache up to {kv / 2**20:.1f} MiB per session · {grouping} · "
                          f"{reporter.huge_page_bytes / 2**20:.0f} MiB on huge pages"
                          + (" · idle cores poll (--low-latency)" if low_latency else "")
                          + (f" · compute on cores {format_cpus(compute_cpus)}" if compute_cpus is not None else "")
                          + (f" · ZeroMQ I/O on {format_cpus(io)}" if io is not None else "")
                          + (f" · polls {spin_us} us before sleeping" if spin_us else ""))
        stop = threading.Event()
        # SIGHUP too (its terminal closed): every command takes it as Ctrl-C, and for a server that is a clean stop.
        previous = {s: signal.signal(s, lambda *_: stop.set())
                    for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM))}
        try:
            with reporter.live():
                server.serve(stop)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def _is_local(endpoint: str) -> bool:
    transport, _, address = endpoint.partition("://")
    if transport != "tcp":
        return transport in ("ipc", "inproc")
    host = address.rsplit(":", 1)[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class _Reporter:
    """Server events as JSON lines, as plain log lines, or above a live status line on a terminal."""

    def __init__(self, as_json: bool):
        self.as_json = as_json
        self.server = None
        self.huge_page_bytes = 0  # the process's memory on huge pages once loaded: in the `listening` event
        self._live: Live | None = None

    def live(self):
        if self.as_json or not console.is_terminal:
            return contextlib.nullcontext()
        self._live = Live(self, console=console, refresh_per_second=2, transient=True)
        return self._live

    def __rich__(self) -> Text:
        s = self.server.stats()
        return Text(f"{self.server.endpoint} · {s['sessions']}/{s['max_sessions']} sessions · {s['tokens_per_s']:.1f} tokens/s · "
                    f"{s['tokens']:,} tokens · {s['rejected']} refused · {s['memory_bytes'] / 2**20:.1f} MiB held · "
                    f"largest group {s['largest_group']}", style="dim", no_wrap=True, overflow="ellipsis")

    def line(self, text: str) -> None:
        stamp = datetime.now().strftime("%H:%M:%S")
        (self._live.console if self._live else console).print(f"{stamp} {printable(text)}", highlight=False, markup=False,
                                                              soft_wrap=True)
        sys.stdout.flush()

    def event(self, e: dict) -> None:
        if e["event"] == "listening":
            e = {**e, "huge_pages_bytes": self.huge_page_bytes}
        if self.as_json:
            stdout().write(json.dumps({"time": round(time.time(), 3), **e}) + "\n")
            stdout().flush()
            return
        kind = e["event"]
        if kind == "listening":
            text = (f"serving {e['endpoint']} · up to {e['max_sessions']} sessions of {e['max_context']} tokens · "
                    f"idle sessions freed after {e['session_timeout']:g} s · {e['wire_dtype']} on the wire · "
                    + (f"CURVE, {e['authorized_keys']} authorized keys" if e["authorized_keys"] else "unencrypted"))
        elif kind == "opened":
            text = f"{e['mode']} session {e['session']} opened ({e['sessions']} open)"
        elif kind == "closed":
            text = f"session {e['session']} closed after {e['tokens']} tokens ({e['sessions']} open)"
        elif kind == "expired":
            text = f"session {e['session']} freed after {e['idle_s']:g} s idle, {e['tokens']} tokens ({e['sessions']} open)"
        elif kind == "rejected":
            text = f"refused a message ({e['code']}): {e['message']}"
        elif kind == "stopped":
            text = f"stopped; freed {e['sessions_freed']} sessions; {e['tokens']} tokens served"
        else:
            text = json.dumps(e)
        self.line(text)


# -- run-edge ------------------------------------------------------------------------
@dataclass
class TurnResult:
    token_ids: list[int]
    text: str
    stats: dict  # exactly the fields `run-edge --json` reports
    decode_bytes_per_token: tuple[float, float] | None  # (up, down) per decoded token, prefill excluded


def timed_turn(conversation, prompt_ids: list[int], on_text: Callable[[str], None] | None = None,
               stop: list[str] | None = None) -> TurnResult:
    """One turn of `conversation` over a remote session, with its timings and the traffic its socket counted."""
    from plcli.runtime.generate import TextStream

    stream = TextStream(conversation.edge.tokenizer, stop)
    start_counts = conversation.traffic
    first_counts = None
    started = time.perf_counter()
    times: list[float] = []
    for token in conversation.turn(prompt_ids):
        times.append(time.perf_counter())
        if first_counts is None:
            first_counts = conversation.traffic
        new = stream.push(token)
        if on_text and new:
            on_text(new)
    rest = stream.finish()
    if on_text and rest:
        on_text(rest)
    n = len(times)
    counts = conversation.traffic
    stats = {
        "ttft_s": round(times[0] - started, 6) if n else None,
        "decode_tokens_per_s": round((n - 1) / (times[-1] - times[0]), 3) if n > 1 and times[-1] > times[0] else None,
        "bytes_up": counts[0] - start_counts[0],
        "bytes_down": counts[1] - start_counts[1],
        "round_trips": counts[2] - start_counts[2],
        "new_tokens": n,
    }
    per_token = None
    if n > 1:
        per_token = ((counts[0] - first_counts[0]) / (n - 1), (counts[1] - first_counts[1]) / (n - 1))
    return TurnResult(stream.ids, stream.text, stats, per_token)


@app.command("run-edge")
@reports_errors
def run_edge(
    edge_dir: Path = typer.Argument(..., help="The edge bundle (OUT_DIR/edge from `plcli split`)."),
    connect: Optional[list[str]] = typer.Option(None, "--connect", help=CONNECT_HELP),
    reconnect_timeout: float = typer.Option(30.0, "--reconnect-timeout", help=RECONNECT_HELP),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Generate once from this text; without it, chat on stdin."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Tokens to generate (per chat turn)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="0 is greedy. " + CHECKPOINT_DEFAULT),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Sample among the k likeliest tokens (0: all). " + CHECKPOINT_DEFAULT),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Sample within this probability mass. " + CHECKPOINT_DEFAULT),
    repetition_penalty: Optional[float] = typer.Option(
        None, "--repetition-penalty", help="Divide the logits of tokens already in the text by this, as transformers "
                                           "does (1: off). Default: the checkpoint's, else 1."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for sampling."),
    stop: Optional[list[str]] = typer.Option(None, "--stop", help="Stop when the text contains this (repeatable)."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Keep generating past end-of-sequence tokens."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="Load M from this adapter directory instead of the bundle's."),
    timeout: float = typer.Option(10.0, "--timeout", help="Seconds to wait for the cloud to connect and for each reply."),
    wire_dtype: str = typer.Option("float32", "--wire-dtype", help=WIRE_DTYPE_HELP),
    curve_secret: Optional[Path] = typer.Option(None, "--curve-secret", help=CURVE_SECRET_HELP),
    server_key: Optional[Path] = typer.Option(None, "--server-key", help=SERVER_KEY_HELP),
    threads: Optional[int] = typer.Option(None, "--threads", help="ONNX Runtime threads for the LM head."),
    cpus: Optional[str] = typer.Option(None, "--cpus", help="Cores every thread of the edge runs on, as taskset -c takes "
                                       "them: 0, 0-3, 0,2 (default: any). On a cloud's machine, the cores its --cpus "
                                       "leaves free."),
    low_latency: bool = typer.Option(False, "--low-latency", help=LOW_LATENCY_HELP),
    huge_pages: bool = typer.Option(True, "--huge-pages/--no-huge-pages", help=HUGE_PAGES_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (needs --prompt) instead of streaming text."),
):
    """Generate with an edge bundle against a running `plcli serve-cloud`: text and token ids stay here."""
    from plcli.runtime.client import RemoteCloudSession
    from plcli.runtime.edge import EdgeModel
    from plcli.runtime.generate import Conversation, Sampling, unapplied_note
    from plcli.runtime.huge_pages import back_with_huge_pages

    if as_json and prompt is None:
        raise UserError("--json needs --prompt (chat mode streams text)")
    if prompt is None and sys.stdin is None:  # started with it closed (`<&-`): Python has None there
        raise UserError("standard input is closed: give --prompt TEXT, or chat on standard input")
    if prompt is not None:
        check_utf8(prompt, "--prompt")
    urls = cloud_urls(connect)
    check_wire_dtype(wire_dtype)
    seconds("--timeout", timeout)
    seconds("--reconnect-timeout", reconnect_timeout, zero_turns_off=True)
    thread_count(threads)
    given = {k: v for k, v in dict(temperature=temperature, top_k=top_k, top_p=top_p,
                                   repetition_penalty=repetition_penalty).items() if v is not None}
    # Bad flags fail here, before the bundle loads; the bundle's own settings join them below.
    _sampling(given, max_new_tokens=max_new_tokens, seed=seed, stop=list(stop or []), ignore_eos=ignore_eos)
    curve = client_keys(curve_secret, server_key)
    with hold_low_latency(low_latency), pinned(cpu_list(cpus, "--cpus")):
        edge = EdgeModel(edge_dir, adapter=adapter, threads=threads)
        if huge_pages:
            back_with_huge_pages()
        # What the flags leave open, the checkpoint's generation config settles, as in transformers' generate.
        sampling = _sampling({**Sampling.checkpoint_defaults(edge.manifest.generation,
                                                                sampled=given.get("temperature", 0) > 0), **given},
                             max_new_tokens=max_new_tokens, seed=seed, stop=list(stop or []), ignore_eos=ignore_eos)
        note = unapplied_note(edge.manifest.generation)
        if note:
            err_console.print(f"[yellow]note:[/] {shown(note)}", highlight=False, soft_wrap=True)
        failover = make_failover(
            urls, lambda url, t: RemoteCloudSession(url, edge.manifest, wire_dtype=wire_dtype, timeout=t, curve=curve),
            timeout=timeout, reconnect_timeout=reconnect_timeout)
        session, conversation = failover.open(), None
        try:  # whatever fails from here on, the cloud gets its session back (the one in use, after a failover)
            conversation = Conversation(edge, session, sampling, failover=failover)
            if prompt is not None:
                _generate_once(conversation, prompt, sampling, as_json)
            else:
                _chat(conversation, sampling)
        except ValueError as e:  # a prompt the model cannot take: token ids out of range, context full
            raise UserError(str(e)) from None
        finally:
            (conversation.session if conversation is not None else session).close()


def _sampling(settings: dict, **fixed):
    from plcli.runtime.generate import Sampling

    try:
        sampling = Sampling(**fixed, **settings)
        sampling.validate()
    except (TypeError, ValueError) as e:  # a bundle's own settings can be of the wrong type, too
        raise UserError(f"generation settings: {e}") from None
    return sampling


def _write(text: str) -> None:
    # The cloud can steer what the model writes (the threat model says so): on a terminal, an escape sequence in it
    # is shown, never acted on. Piped, the text goes out exactly as generated.
    out = stdout()
    out.write(printable(text, keep="\n\t") if out.isatty() else text)
    out.flush()


def _generate_once(conversation, prompt: str, sampling, as_json: bool) -> None:
    ids = conversation.edge.tokenizer(prompt)["input_ids"]
    session = conversation.session
    needed = len(ids) + sampling.max_new_tokens - 1
    if needed > session.max_context:
        raise UserError(f"the prompt ({len(ids)} tokens) and --max-new-tokens {sampling.max_new_tokens} need a context of "
                        f"{needed} tokens; the cloud allows {session.max_context}")
    result = timed_turn(conversation, ids, None if as_json else _write, sampling.stop)
    if as_json:
        settings = {k: getattr(sampling, k) for k in ("temperature", "top_k", "top_p", "repetition_penalty", "seed")}
        print_json({"prompt_token_ids": ids, "token_ids": result.token_ids, "text": result.text, "sampling": settings,
                    "stats": result.stats})
        return
    _write("\n")
    _print_stats(result.stats)


def _chat(conversation, sampling) -> None:
    tokenizer = conversation.edge.tokenizer
    interactive = sys.stdin.isatty()
    if interactive:
        err_console.print("[dim]chat: each line you type is added to the text (with a newline) and the model continues it; "
                          "/exit or Ctrl-D ends[/]", highlight=False)
    first = True
    for number in itertools.count(1):
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        if line.strip() == "/exit":
            break
        check_utf8(line, f"line {number} of the chat")
        ids = tokenizer(line + "\n", add_special_tokens=first)["input_ids"]
        first = False
        session = conversation.session
        if len(conversation.unfed) + len(ids) > session.max_context - session.position:
            # The same end as a context that fills mid-turn: the chat is over, nothing went wrong.
            err_console.print(f"context full ({session.max_context} tokens): this line does not fit; start a new chat")
            break
        result = timed_turn(conversation, ids, _write, sampling.stop)
        _write("\n")
        _print_stats(result.stats)
        if conversation.stop_reason == "context":
            err_console.print(f"context full ({conversation.session.max_context} tokens): start a new chat")
            break


def _print_stats(stats: dict) -> None:
    if not err_console.is_terminal:
        return
    rate = stats["decode_tokens_per_s"]
    err_console.print(f"[dim]{stats['new_tokens']} tokens · first after {stats['ttft_s'] or 0:.3f} s · "
                      f"{f'{rate:.1f} tokens/s · ' if rate else ''}{stats['bytes_up']:,} B up · {stats['bytes_down']:,} B down · "
                      f"{stats['round_trips']} round trips[/]", highlight=False)
