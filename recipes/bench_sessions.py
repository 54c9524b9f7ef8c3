"""Aggregate decode speed of many edges on one cloud, next to one edge alone.

    python -m plcli.recipes.bench_sessions [--edges 8] [--new-tokens 40] [--prompt-len 16] [--rounds 3] [--out DIR]
                                           [--json] [--max-group N] [--batch-wait-us N] [--low-latency] [--pin]
                                           [--group-cost]

Builds a random-weight Llama (hidden 512, 8 layers, 8 heads, intermediate
1376, vocab 8000; rank 64, q/k/v adapted) unless `--out` already holds one,
starts `plcli serve-cloud --threads 1` as a child process and runs the edges
in this one, each with its own prompt of random token ids and a random M,
greedy. First each edge runs alone, one after the other: its ids are the
reference and its decode rate the single-edge speed. Then all of them run at
once, starting together; their aggregate rate is every edge's decoded tokens
(all but the first, which the prefill gives) over the time from the first
edge's first token to the last edge's last token. Each round does both, on
the same cloud, so that a machine whose speed drifts moves both alike; the
ratio is that of the medians over the rounds (a round's single-edge speed
being the median of its solo runs), and each round's own ratio is reported
too.

The edges are driven by one thread of this process, as a load generator
drives its clients: each has its own session, connection, M and conversation,
and the cloud cannot tell them from edges on eight devices. The thread sends
each edge's message and answers whichever replies came in
(`RemoteCloudSession.post_start`, `post_resume`, `receive`): every `A x` at
once, then the LM heads of the edges whose step is done as one product, since
eight devices would run theirs at the same time (one after another, they let
the cloud's next steps in one by one, and it ran 11% of the steps alone, at
their first segment; together, the eight decoded 312-328 tok/s where they had
285-291 in alternating runs). Edges run on
devices of their own in deployment; here they take the cloud's cores, and
what they take is what the run measures besides the cloud: eight processes,
each with an interpreter and an I/O thread to wake on every message, made it
measure the machine more than the cloud, and eight threads, each asleep in
its receive, got a tenth fewer tokens per second out of the same cloud than
this one thread (140 against 154 tok/s, medians of 12 alternating runs). The
CPU the edges still use is reported (per token), next to the cloud's own,
alone and together (where /proc tells): what grouping saves the cloud
wherever the edges run.
`--max-group` and `--batch-wait-us` go to serve-cloud, to compare without
grouping or with a wait; `--low-latency` keeps idle cores polling for the
whole run (runtime/cpu_latency.py); `--pin` runs the cloud's compute on a
core of its own and the edges on the others (runtime/cpus.py).

`--group-cost` measures instead what grouping saves the cloud where nothing
else gets in the way: its CPU per session step with every group of 1, 2, 4
and 8 sessions, edges answering at once in its own process (`group_cost`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from plcli.runtime.cpu_latency import CpuLatencyError, hold_low_latency
from plcli.runtime.cpus import Apart, apart, pinned

from .bench_decode import cloud_process

SHAPE = "bench-512"  # of recipes.checkpoints.BENCH_SHAPES, the shapes `plcli bench decode` is held to
RANK = 64
TIMEOUT_S = 60.0


def build_bundles(work: Path) -> tuple[Path, Path]:
    """(cloud dir, edge dir) of the bench model under `work`, built on first use."""
    out = work / "split"
    if not (out / "cloud").is_dir():
        from plcli.exporters.split import split_checkpoint
        from plcli.recipes.checkpoints import BENCH_SHAPES, make_random_checkpoint

        checkpoint = make_random_checkpoint(work / "checkpoint", "llama", **BENCH_SHAPES[SHAPE])
        split_checkpoint(checkpoint, out, rank=RANK)
    return out / "cloud", out / "edge"


def _edge_model(edge_dir: Path, seed: int):
    """An edge with a random M from `seed`, its tokenizer loaded: nothing left to load once edges decode."""
    from plcli.exporters.verify import random_adapter
    from plcli.runtime.edge import EdgeModel

    edge = EdgeModel(edge_dir, threads=1)
    edge.set_adapter(random_adapter(edge, seed=seed))
    edge.tokenizer  # noqa: B018 (loaded on first use)
    return edge


def _solo(edge, endpoint: str, prompt_ids: list[int], new_tokens: int) -> dict:
    """One edge alone, as `plcli run-edge` generates: its ids and the times of its first and last token."""
    from plcli.runtime.client import RemoteCloudSession
    from plcli.runtime.generate import Conversation, Sampling

    with RemoteCloudSession(endpoint, edge.manifest, timeout=TIMEOUT_S) as session:
        ids, times = [], []
        for token in Conversation(edge, session, Sampling(max_new_tokens=new_tokens, ignore_eos=True)).turn(prompt_ids):
            ids.append(token)
            times.append(time.monotonic())
    return {"ids": ids, "first": times[0], "last": times[-1]}


def _together(models: dict, endpoint: str, prompts: dict[int, list[int]], new_tokens: int) -> tuple[list[dict], float]:
    """Every edge at once, each on `models[seed]` with its prompt, all driven by this thread; (results in seed order, the
    CPU seconds this process used meanwhile).

    Each edge does what an edge alone does (`Conversation`, greedy): embed,
    answer each `A x` with its `M A x`, run the LM head on the last hidden
    state and pick the next token. The thread sends each edge's message
    (`post_start`, `post_resume`) and answers whichever replies came in: each
    `A x` at once, then the LM heads of the edges whose step is done, as one
    product (the edges share one bundle).
    """
    import numpy as np
    import zmq

    from plcli.runtime.client import RemoteCloudSession
    from plcli.runtime.generate import Sampler, Sampling

    sessions = {}
    try:
        for seed in prompts:
            sessions[seed] = RemoteCloudSession(endpoint, models[seed].manifest, timeout=TIMEOUT_S)
        poller, seed_of = zmq.Poller(), {}
        for seed, session in sessions.items():
            poller.register(session.socket, zmq.POLLIN)
            seed_of[session.socket] = seed
        samplers = {seed: Sampler(Sampling(max_new_tokens=new_tokens, ignore_eos=True), vocab_limit=models[seed].vocab_limit)
                    for seed in prompts}
        ids, times = {seed: [] for seed in prompts}, {seed: [] for seed in prompts}
        cpu = time.process_time()
        for seed, prompt in prompts.items():
            sessions[seed].post_start(models[seed].embed(np.asarray([prompt], np.int64)))
        generating = len(prompts)
        while generating:
            ready = poller.poll(int(TIMEOUT_S * 1000))
            if not ready:
                raise RuntimeError(f"the cloud sent nothing within {TIMEOUT_S:g} s")
            finished = []  # (seed, last hidden state [1, 1, hidden]) of the edges whose step is done
            for socket, _ in ready:
                seed = seed_of[socket]
                out = sessions[seed].receive()
                if out.done:
                    finished.append((seed, out.hidden[:, -1:]))
                else:
                    sessions[seed].post_resume(models[seed].apply_adapter(out.layer, out.stage, out.ax))
            if not finished:
                continue
            # Every edge has the same bundle, so the heads of those done together are one product: eight devices
            # would run theirs at the same time, where one after another they let their next steps in one by one.
            logits = models[finished[0][0]].logits(np.concatenate([hidden for _, hidden in finished]))
            for (seed, _), row in zip(finished, logits):
                token = samplers[seed](row[-1])
                ids[seed].append(token)
                times[seed].append(time.monotonic())
                if len(ids[seed]) < new_tokens:
                    sessions[seed].post_start(models[seed].embed(np.asarray([[token]], np.int64)))
                else:
                    generating -= 1
        cpu = time.process_time() - cpu
    finally:
        for session in sessions.values():
            session.close()
    return [{"ids": ids[seed], "first": times[seed][0], "last": times[seed][-1]} for seed in sorted(prompts)], cpu


def _cpu_s(pid: int) -> float | None:
    """CPU seconds (user and system) process `pid` has used, where /proc tells (Linux); else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rate(result: dict) -> float:
    return (len(result["ids"]) - 1) / (result["last"] - result["first"])


def aggregate_decode(cloud_dir, edge_dir, edges: int, new_tokens: int, prompt_len: int, *, rounds: int = 1,
                     serve_options: list[str] | None = None, huge_pages: bool = True, placement: Apart | None = None) -> dict:
    """Decode tokens/s of `edges` edges at once on one cloud, next to one edge alone, and whether every edge got its solo ids.

    `rounds` alternate the solo runs and the run together that many times (medians reported, and each round's ratio).
    `serve_options` are extra `plcli serve-cloud` options (say ["--max-group", "1"]). `huge_pages` puts the cloud's
    memory and the edges' on huge pages, as `serve-cloud` and `run-edge` do by default. With `placement`
    (runtime/cpus.py), the cloud computes on cores of its own and the edges run on the others.
    """
    import numpy as np

    if edges < 1 or new_tokens < 2 or prompt_len < 1 or rounds < 1:
        raise ValueError("need at least 1 edge, 2 new tokens, 1 prompt token and 1 round")
    from plcli.runtime.bundle import read_manifest
    from plcli.runtime.client import cloud_status
    from plcli.runtime.huge_pages import back_with_huge_pages

    vocab = read_manifest(Path(edge_dir), side="edge").architecture.vocab_size
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, vocab, size=prompt_len).tolist() for _ in range(edges)]
    models = {seed: _edge_model(Path(edge_dir), seed) for seed in range(edges)}
    if huge_pages:
        back_with_huge_pages()
    alone, together, grouped_calls, edge_cpu_s = [], [], 0, 0.0
    with cloud_process(Path(cloud_dir), threads=1, huge_pages=huge_pages, placement=placement,
                       options=["--max-sessions", str(max(edges, 16)), *(serve_options or [])]) as cloud, \
            pinned(placement and placement.rest):  # the edges, on the cores the cloud's compute leaves
        endpoint = cloud.endpoint
        cloud_cpu_s = {"alone": 0.0, "together": 0.0} if _cpu_s(cloud.pid) is not None else None
        for _ in range(rounds):
            cpu_start = _cpu_s(cloud.pid)
            alone.append([_solo(models[i], endpoint, p, new_tokens) for i, p in enumerate(prompts)])
            before, cpu_before = cloud_status(endpoint), _cpu_s(cloud.pid)
            results, cpu_s = _together(models, endpoint, dict(enumerate(prompts)), new_tokens)
            together.append(results)
            edge_cpu_s += cpu_s
            after, cpu_after = cloud_status(endpoint), _cpu_s(cloud.pid)
            grouped_calls += after["grouped_calls"] - before["grouped_calls"]
            if cloud_cpu_s is not None:
                cloud_cpu_s["alone"] += cpu_before - cpu_start
                cloud_cpu_s["together"] += cpu_after - cpu_before

    def tokens(runs):
        return sum(len(r["ids"]) for results in runs for r in results)

    def cloud_ms(phase, runs):
        """The cloud process's CPU per token over `runs`, or None where /proc does not tell."""
        return None if cloud_cpu_s is None else round(1000 * cloud_cpu_s[phase] / tokens(runs), 2)

    singles = [statistics.median(_rate(r) for r in results) for results in alone]
    aggregates = [sum(len(r["ids"]) - 1 for r in results) / (max(r["last"] for r in results) - min(r["first"] for r in results))
                  for results in together]
    single, aggregate = statistics.median(singles), statistics.median(aggregates)  # as `bench decode`: ratio of medians
    return {"edges": edges, "rounds": rounds, "single_tokens_per_s": round(single, 2),
            "aggregate_tokens_per_s": round(aggregate, 2), "ratio": round(aggregate / single, 2),
            "ratio_per_round": [round(a / s, 2) for a, s in zip(aggregates, singles)],
            # Every run of an edge, alone or together, in any round, gave the ids of its first solo run.
            "identical": all(r["ids"] == alone[0][i]["ids"] for results in alone + together for i, r in enumerate(results)),
            "grouped_calls": grouped_calls, "largest_group": after["largest_group"],
            "edge_cpu_ms_per_token": round(1000 * edge_cpu_s / tokens(together), 2),
            # The cloud's CPU per token, edges alone and together: what grouping saves the cloud, wherever the edges run.
            "cloud_cpu_ms_per_token_alone": cloud_ms("alone", alone),
            "cloud_cpu_ms_per_token": cloud_ms("together", together),
            "placement": placement and placement.as_json()}


def group_cost(cloud_dir, *, sessions: int = 8, new_tokens: int = 24, prompt_len: int = 16,
               group_sizes: tuple[int, ...] = (1, 2, 4, 8)) -> list[dict]:
    """The cloud server's own CPU per decode step of a session, in groups of each size: what grouping saves it.

    No edges, network or other process share the machine: a CloudServer in
    this process, on an inproc socket, serves `sessions` sessions in lockstep,
    every `A x` answered at once (by itself scaled down, standing in for
    `M A x`), so that under `max_group=g` every group holds g sessions (the
    last of a step fewer, where g does not divide `sessions`). Only the
    server's turns are timed, in CPU seconds, after each session's prompt.
    """
    import numpy as np
    import zmq

    from plcli.runtime import wire
    from plcli.runtime.cloud import CloudModel
    from plcli.runtime.server import CloudServer

    if sessions < 1 or new_tokens < 1 or prompt_len < 1 or not group_sizes or min(group_sizes) < 1:
        raise ValueError("need at least 1 session, 1 new token, 1 prompt token and group sizes of 1 or more")
    model = CloudModel(Path(cloud_dir), threads=1, prepack=True)  # as serve-cloud loads it to group
    hidden, segments = model.arch.hidden_size, len(model.plan.segments)
    rng = np.random.default_rng(0)
    rows = []
    for size in group_sizes:
        context = zmq.Context()
        server = CloudServer(model, bind=f"inproc://plcli-group-cost-{size}", tune=False, max_sessions=sessions,
                             max_group=size, context=context)
        edges = [context.socket(zmq.DEALER) for _ in range(sessions)]
        try:
            ids, steps, cpu = [], 0, 0.0  # ids[i]: edge i's session

            def exchange(frames_of, timed: bool) -> int:
                """Send each session's message, answer every `A x` until all have their reply; replies received."""
                nonlocal cpu
                for i, edge in enumerate(edges):
                    edge.send_multipart(frames_of(i))
                waiting, replies, deadline = set(range(sessions)), 0, time.monotonic() + TIMEOUT_S
                while waiting:
                    if time.monotonic() > deadline:
                        raise RuntimeError("the cloud stopped answering")
                    start = time.process_time()
                    server.turn(0.0)
                    cpu += (time.process_time() - start) * timed
                    for i, edge in enumerate(edges):
                        while edge.poll(0):
                            header, payload = wire.decode(edge.recv_multipart(copy=False), wire.REPLIES,
                                                          max_message_bytes=server.max_message_bytes)
                            replies += 1
                            if header["op"] == "ax":
                                madx = wire.tensor(payload, header["shape"], "float32") * 0.01
                                edge.send_multipart(wire.encode("madx", {"session": ids[i], "step": header["step"],
                                                                         "cut": header["cut"]}, madx))
                            elif header["op"] == "hidden":
                                waiting.discard(i)
                            else:
                                raise RuntimeError(f"the cloud refused: {header.get('message', header['op'])}")
                return replies

            for edge in edges:
                edge.setsockopt(zmq.RCVTIMEO, int(TIMEOUT_S * 1000))
                edge.connect(server.endpoint)
                edge.send_multipart(wire.encode("open", {"ab_fingerprint": model.manifest.ab_fingerprint,
                                                         "wire_dtype": "float32", "batch": 1, "mode": "generate"}))
                server.turn(0.0)  # answers the open
                header, _ = wire.decode(edge.recv_multipart(), wire.REPLIES, max_message_bytes=wire.MAX_HEADER_BYTES)
                if header["op"] != "opened":
                    raise RuntimeError(f"the cloud refused a session: {header.get('message')}")
                ids.append(header["session"])

            def step_frames(token: int, seq: int):
                return lambda i: wire.encode("step", {"session": ids[i], "step": token},
                                             (0.02 * rng.standard_normal((1, seq, hidden))).astype(np.float32))

            exchange(step_frames(0, prompt_len), timed=False)
            for token in range(1, new_tokens + 1):
                steps += exchange(step_frames(token, 1), timed=True)
            largest = server.stats()["largest_group"]
        finally:
            for edge in edges:
                edge.close(linger=0)
            server.close()
            context.term()
        rows.append({"group": size, "largest_group": largest or 1, "session_steps": steps,
                     "cpu_us_per_session_step": round(1e6 * cpu / steps, 1),
                     "cpu_ms_per_token": round(1e3 * cpu / (sessions * new_tokens), 3)})
        if steps != sessions * new_tokens * segments:
            raise RuntimeError(f"{steps} replies for {sessions * new_tokens * segments} session steps")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edges", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=40)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="Alternate solo and together this many times (medians).")
    parser.add_argument("--out", type=Path, help="Keep the checkpoint and bundles here and reuse them (default: a temporary "
                                                 "directory, removed).")
    parser.add_argument("--json", action="store_true", help="Print the result as JSON.")
    parser.add_argument("--max-group", type=int, help="serve-cloud --max-group (default: its own).")
    parser.add_argument("--batch-wait-us", type=int, help="serve-cloud --batch-wait-us (default: its own).")
    parser.add_argument("--low-latency", action="store_true", help="Keep idle cores polling for the whole run "
                                                                   "(/dev/cpu_dma_latency, needs root).")
    parser.add_argument("--no-huge-pages", action="store_true", help="Leave the cloud's and the edges' memory on small "
                                                                      "pages (serve-cloud --no-huge-pages).")
    parser.add_argument("--pin", action="store_true", help="The cloud's compute on a core of its own, polling for its "
                                                           "next message, the edges on the others (runtime/cpus.py; "
                                                           "default: wherever the scheduler puts them).")
    parser.add_argument("--group-cost", action="store_true", help="Instead: the cloud server's own CPU per session step "
                                                                  "in groups of 1, 2, 4, 8 (up to --edges), in this process "
                                                                  "(group_cost).")
    args = parser.parse_args(argv)
    serve_options = [opt for flag, value in (("--max-group", args.max_group), ("--batch-wait-us", args.batch_wait_us))
                     if value is not None for opt in (flag, str(value))]

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        latency = hold_low_latency(args.low_latency)
    except CpuLatencyError as e:
        parser.exit(2, f"error: {e}\n")
    work = args.out or Path(tempfile.mkdtemp(prefix="plcli-bench-sessions-"))
    try:
        with latency:
            cloud_dir, edge_dir = build_bundles(work)
            if args.group_cost:
                sizes = tuple(sorted({g for g in (1, 2, 4, 8) if g <= args.edges} | {args.edges}))
                rows = group_cost(cloud_dir, sessions=args.edges, new_tokens=args.new_tokens, prompt_len=args.prompt_len,
                                  group_sizes=sizes)
                _print_group_cost(rows, args.json)
                return
            result = aggregate_decode(cloud_dir, edge_dir, args.edges, args.new_tokens, args.prompt_len,
                                      rounds=args.rounds, serve_options=serve_options, huge_pages=not args.no_huge_pages,
                                      placement=apart(1) if args.pin else None)
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)
    result["low_latency"] = args.low_latency
    result["huge_pages"] = not args.no_huge_pages
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['edges']} edges at once: {result['aggregate_tokens_per_s']:.1f} decode tokens/s in all; one edge alone: "
          f"{result['single_tokens_per_s']:.1f} tokens/s (medians of {result['rounds']} rounds); ratio {result['ratio']:.2f} "
          f"(per round: {', '.join(f'{r:.2f}' for r in result['ratio_per_round'])}); every edge got its solo ids: "
          f"{'yes' if result['identical'] else 'NO'}; {result['grouped_calls']} grouped calls, largest group "
          f"{result['largest_group']}; the edges used {result['edge_cpu_ms_per_token']:.1f} ms of CPU per token"
          + _cloud_cpu_line(result))


def _print_group_cost(rows: list[dict], as_json: bool) -> None:
    if as_json:
        print(json.dumps({"rows": rows}))
        return
    alone = rows[0]["cpu_us_per_session_step"]
    for row in rows:
        print(f"groups of {row['group']}: {row['cpu_us_per_session_step']:.0f} us of cloud CPU per session step, "
              f"{row['cpu_ms_per_token']:.2f} ms per token ({alone / row['cpu_us_per_session_step']:.2f}x groups of {rows[0]['group']})")


def _cloud_cpu_line(result: dict) -> str:
    if result["cloud_cpu_ms_per_token"] is None:
        return ""
    return (f"; the cloud used {result['cloud_cpu_ms_per_token_alone']:.1f} ms of CPU per token for edges alone, "
            f"{result['cloud_cpu_ms_per_token']:.1f} ms for edges together")


if __name__ == "__main__":
    main()
