"""`plcli bench decode` and `plcli bench tune`: speed measured side by side in one run, as ratios."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from plcli.runtime.cpu_latency import hold_low_latency
from plcli.runtime.cpus import apart, format_cpus

from .app import (HUGE_PAGES_HELP, LOW_LATENCY_HELP, UserError, app, console, print_json, print_table, progress_bar,
                  reports_errors, shown, status, thread_count)

bench_app = typer.Typer(no_args_is_help=True, help="Measure speed: every method side by side in one run, as ratios.")
app.add_typer(bench_app, name="bench")


DEFAULT_RANK = 64


def _ranks(text: str | None, bundles: Path | None) -> list[int]:
    """The ranks to split at: --rank, or the default; none to give with --bundles, whose split has its own."""
    if bundles is not None and text is not None:
        raise UserError("--bundles fixes the rank (the split's own): drop --rank")
    if text is None:
        return [DEFAULT_RANK]
    try:
        ranks = [int(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise UserError(f"--rank {text!r}: give one rank or a comma-separated list, e.g. 16,32,64") from None
    if not ranks:
        raise UserError("--rank names no rank")
    return ranks


def _edge_counts(text: str) -> list[int]:
    """`--edges`: 0 (off), a count, or a comma-separated list of counts (aggregate tok/s against concurrent edges)."""
    try:
        counts = sorted({int(n) for n in text.split(",") if n.strip()})
    except ValueError:
        raise UserError(f"--edges {text!r}: give a count of edges or a comma-separated list, e.g. 2,4,8") from None
    if counts == [0]:
        return []
    if not counts or counts[0] < 2:
        raise UserError(f"--edges {text} is out of range: 0 (off), or counts of at least 2 (one edge alone is measured "
                        "beside each)")
    return counts


def _positive(name: str, value: int) -> int:
    if value < 1:
        raise UserError(f"{name} {value} is out of range: must be at least 1")
    return value


def _max_positions(model_dir: Path, bundles: Path | None) -> int:
    """Tokens a sequence may hold in every method here: the split's (its cloud's context), else the checkpoint's.

    Read before any method runs: a run that needs more would split, load and generate for minutes first.
    """
    if bundles is not None:
        from plcli.exporters.checkpoint import CheckpointTensors
        from plcli.runtime.bundle import read_pair

        _, edge = read_pair(bundles / "cloud", bundles / "edge")
        # Every method is checked against transformers on MODEL_DIR: a split of another checkpoint differs from it all.
        if CheckpointTensors(model_dir).source_hash() != edge.source_hash:
            raise UserError(f"--bundles {bundles} was not split from {model_dir} (its source hash differs): give its "
                            "own checkpoint, or leave --bundles out to split this one")
        return edge.architecture.max_position_embeddings
    from plcli.exporters.checkpoint import load_config
    from plcli.recipes.base import family_for

    config = load_config(model_dir)
    return family_for(config).architecture(config).max_position_embeddings


@bench_app.command("decode")
@reports_errors
def bench_decode(
    model_dir: Path = typer.Argument(..., help="A Hugging Face checkpoint (the transformers baseline, and what is split)."),
    bundles: Optional[Path] = typer.Option(None, "--bundles", help="Its split (OUT_DIR of `plcli split`), instead of splitting it here."),
    rank: Optional[str] = typer.Option(None, "--rank", help=f"Rank to split at (default {DEFAULT_RANK}; not with "
                                       "--bundles); a comma-separated list measures each (tok/s against rank)."),
    prompt_len: int = typer.Option(32, "--prompt-len", help="Prompt tokens."),
    new_tokens: int = typer.Option(64, "--new-tokens", help="Tokens to generate, greedily."),
    rounds: int = typer.Option(3, "--rounds", help="Interleaved rounds; the median is reported."),
    link: str = typer.Option("5g", "--link", help="Emulated link: 5g (60 Mbit/s up, 100 down, 20 ms RTT) or up=MBIT,down=MBIT,rtt=MS."),
    threads: int = typer.Option(1, "--threads", help="Compute threads of the cloud and of transformers (the edge uses one)."),
    float16: bool = typer.Option(False, "--float16", help="Also the split with --wire-dtype float16: bytes, speed, same tokens?"),
    edges: str = typer.Option("0", "--edges", help="Also N edges at once on one cloud (all driven by one thread of this process): aggregate tok/s against one alone; a comma-separated list measures each (tok/s against concurrent edges)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write decode tok/s against rank, per method (and against concurrent edges, with --edges), to this PNG."),
    low_latency: bool = typer.Option(False, "--low-latency", help=LOW_LATENCY_HELP + " Held for every method alike."),
    huge_pages: bool = typer.Option(True, "--huge-pages/--no-huge-pages", help=HUGE_PAGES_HELP + " For every method alike."),
    pin: bool = typer.Option(False, "--pin/--no-pin", help="Where the machine has a core more than --threads: the "
                             "cloud's compute on the first --threads cores, polling for its next message, and all else "
                             "(its ZeroMQ I/O thread, the edges, transformers, the one-process run) on the others, as "
                             "`serve-cloud --cpus --spin-us` and `run-edge --cpus` place them."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
):
    """Decode speed: transformers, the ONNX graphs in one process, the split over loopback and over an emulated link."""
    from plcli.recipes.bench_decode import bench_decode as run, parse_link

    try:
        emulated = parse_link(link)
    except ValueError as e:
        raise UserError(str(e)) from None
    for name, value in (("--prompt-len", prompt_len), ("--new-tokens", new_tokens), ("--rounds", rounds)):
        _positive(name, value)
    thread_count(threads)
    if new_tokens < 2:
        raise UserError("--new-tokens must be at least 2: decode speed is measured after the first token")
    if not model_dir.is_dir():
        raise UserError(f"{model_dir}: no such checkpoint directory")
    ranks = _ranks(rank, bundles)
    edge_counts = _edge_counts(edges)
    if plot is not None:
        _check_plot(plot)
    positions = _max_positions(model_dir, bundles)
    if prompt_len + new_tokens - 1 > positions:  # the last new token is never fed back
        raise UserError(f"--prompt-len {prompt_len} and --new-tokens {new_tokens} need a context of "
                        f"{prompt_len + new_tokens - 1} tokens; the model holds {positions}")
    placement = apart(threads) if pin else None
    results = []
    with hold_low_latency(low_latency):
        with progress_bar() as progress:
            task = progress.add_task("benchmarking", total=len(ranks) * rounds)
            for r in ranks:
                results.append(run(model_dir, bundles=bundles, rank=r, prompt_len=prompt_len, new_tokens=new_tokens,
                                   rounds=rounds, link=emulated, threads=threads, float16=float16, huge_pages=huge_pages,
                                   placement=placement, progress=lambda msg: progress.advance(task) if msg.startswith("round") else None))
        if edge_counts:
            results[-1]["edges"] = _edges(model_dir, bundles, ranks[-1], edge_counts, prompt_len, new_tokens, rounds,
                                          huge_pages, placement)
    for result in results:
        result["low_latency"] = low_latency
        result["huge_pages"] = huge_pages
    if plot is not None:
        _plot(results, plot)
    if as_json:
        print_json(results[0] if len(results) == 1 else {"runs": results})
        return
    for result in results:
        print_table(_decode_table(result))
        if "edges" in result:
            print_table(_edges_table(result["edges"], result["rounds"]))
    if plot is not None:
        console.print(f"plot: [bold]{shown(plot)}[/]")


def _edges(model_dir: Path, bundles: Path | None, rank: int, counts: list[int], prompt_len: int, new_tokens: int,
           rounds: int, huge_pages: bool, placement) -> list[dict]:
    """Aggregate decode of each count of edges on one cloud (cross-session batching), against one edge alone."""
    import tempfile

    from plcli.exporters.split import split_checkpoint
    from plcli.recipes.bench_sessions import aggregate_decode

    with tempfile.TemporaryDirectory(prefix="plcli-bench-edges-") as work:
        if bundles is None:
            with status(f"splitting {model_dir} at rank {rank} for the edges"):
                bundles = Path(work) / "split"
                split_checkpoint(model_dir, bundles, rank=rank)
        results = []
        for count in counts:
            with status(f"{count} edges at once on one cloud"):
                results.append(aggregate_decode(bundles / "cloud", bundles / "edge", count, new_tokens, prompt_len,
                                                rounds=rounds, huge_pages=huge_pages, placement=placement))
        return results


def _edges_table(results: list[dict], rounds: int) -> Table:
    table = Table(title=f"concurrent edges on one cloud · each against one edge alone · median of {rounds}")
    for col in ("edges", "tok/s together", "tok/s alone", "x alone", "per round", "ids as alone", "largest group",
                "edge CPU ms/tok", "cloud CPU ms/tok"):
        table.add_column(col, justify="right", no_wrap=True)
    for e in results:
        cloud = ("-" if e["cloud_cpu_ms_per_token"] is None
                 else f"{e['cloud_cpu_ms_per_token']:.1f} (alone {e['cloud_cpu_ms_per_token_alone']:.1f})")
        table.add_row(str(e["edges"]), f"{e['aggregate_tokens_per_s']:.1f}", f"{e['single_tokens_per_s']:.1f}",
                      f"{e['ratio']:.2f}", ", ".join(f"{r:.2f}" for r in e["ratio_per_round"]),
                      "yes" if e["identical"] else "no", str(e["largest_group"]), f"{e['edge_cpu_ms_per_token']:.1f}", cloud)
    table.caption = ("all edges are driven by one thread of this process; the cloud groups the steps of sessions at the "
                     "same layer into one call (cross-session batching)")
    return table


def _decode_table(r: dict) -> Table:
    m, link = r["model"], r["link"]
    table = Table(title=f"decode · hidden {m['hidden']} · {m['layers']} layers · vocab {m['vocab']} · rank {m['rank']} · "
                        f"{r['prompt_tokens']}-token prompt · {r['new_tokens']} new tokens · median of {r['rounds']}")
    for col in ("method", "tok/s", "x HF", "TTFT ms", "B up/tok", "B down/tok", "RT/tok", "ids = HF"):
        table.add_column(col, justify="left" if col == "method" else "right", no_wrap=True)
    base = next(row for row in r["rows"] if row["method"] == "transformers")["decode_tokens_per_s"]
    split = next(row for row in r["rows"] if row["method"] == "split")
    for row in r["rows"]:
        def opt(key, fmt="{:,.0f}"):
            return fmt.format(row[key]) if key in row else "-"

        table.add_row(row["method"], f"{row['decode_tokens_per_s']:.1f}",
                      f"{row['decode_tokens_per_s'] / base:.2f}", f"{row['ttft_s'] * 1e3:.1f}", opt("bytes_up_per_token"),
                      opt("bytes_down_per_token"), opt("round_trips_per_token", "{:g}"),
                      "yes" if row["greedy_ids_identical"] else "no")
    ratios = r["ratios"]
    table.caption = (f"HF = transformers generate, one process · onnx = the same graphs, one process · split = cloud process "
                     f"over loopback · split-link = the split over {link['up_mbps']:g} Mbit/s up, {link['down_mbps']:g} down, "
                     f"{link['rtt_ms']:g} ms RTT (emulated)\nsplit / transformers {ratios['split_vs_transformers']:.2f} · "
                     f"split / onnx {ratios['split_vs_onnx']:.2f} · split-link / transformers {ratios['split_link_vs_transformers']:.2f}\n"
                     f"an empty round trip to the cloud takes {r['empty_round_trip_ms']:.2f} ms: were each of the "
                     f"{split['round_trips_per_token']:g} per token that cheap, split / onnx would be about "
                     f"{ratios['split_vs_onnx_ceiling']:.2f} here"
                     + (" · idle cores polling (--low-latency)" if r["low_latency"] else "")
                     + ("" if r["huge_pages"] else " · small pages (--no-huge-pages)")
                     + ("" if r["placement"] is None else
                        f"\ncloud compute on cores {format_cpus(r['placement']['cloud_cpus'])}, polling "
                        f"{r['placement']['spin_us']:,} us for its next message; all else on "
                        f"{format_cpus(r['placement']['other_cpus'])}"))
    return table


def _check_plot(path: Path) -> None:
    """Refuse a --plot the run could not write at its end, before minutes of measuring."""
    import importlib.util

    from plcli.runtime.bundle import check_writable

    if importlib.util.find_spec("matplotlib") is None:
        raise UserError('--plot needs matplotlib: pip install matplotlib (or pip install -e ".[plot]")')
    if path.is_dir() or path.name in ("", ".", ".."):
        raise UserError(f"--plot {path} is a directory: give the file to write, e.g. {Path(path) / 'rank.png'}")
    check_writable(path, "the plot")


def _plot(results: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError('--plot needs matplotlib: pip install matplotlib (or pip install -e ".[plot]")') from None
    ranks = [r["model"]["rank"] for r in results]
    edges = results[-1].get("edges", [])
    fig, axes = plt.subplots(1, 1 + bool(edges), figsize=(6 + 5 * bool(edges), 4), squeeze=False)
    ax = axes[0][0]
    for method in [row["method"] for row in results[0]["rows"]]:
        rates = [next(row for row in r["rows"] if row["method"] == method)["decode_tokens_per_s"] for r in results]
        ax.plot(ranks, rates, marker="o", label=method)
    m = results[0]["model"]
    ax.set(xlabel="rank", ylabel="decode tokens/s", xticks=ranks,
           title=f"hidden {m['hidden']}, {m['layers']} layers, {results[0]['new_tokens']} new tokens")
    ax.legend()
    if edges:
        # One edge alone is measured beside every count; its median over them all is the curve's first point.
        alone = statistics.median(e["single_tokens_per_s"] for e in edges)
        counts = [1] + [e["edges"] for e in edges]
        ax = axes[0][1]
        ax.plot(counts, [alone] + [e["aggregate_tokens_per_s"] for e in edges], marker="o", label="all edges together")
        ax.plot(counts, [alone] + [e["aggregate_tokens_per_s"] / e["edges"] for e in edges], marker="o", label="per edge")
        ax.set(xlabel="concurrent edges (sessions batched by the cloud)", ylabel="decode tokens/s", xticks=counts,
               title=f"split over loopback, rank {results[-1]['model']['rank']}")
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".part.png")
    path.parent.mkdir(parents=True, exist_ok=True)  # as every other output of plcli's; _check_plot made sure it can be
    try:
        fig.savefig(tmp)
        tmp.replace(path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


@bench_app.command("tune")
@reports_errors
def bench_tune(
    model_dir: Path = typer.Argument(..., help="A Hugging Face checkpoint, split here unless --bundles is given."),
    bundles: Optional[Path] = typer.Option(None, "--bundles", help="Its split (OUT_DIR of `plcli split`)."),
    rank: Optional[int] = typer.Option(None, "--rank",
                                       help=f"Rank to split at (default {DEFAULT_RANK}; not with --bundles)."),
    steps: int = typer.Option(4, "--steps", help="Optimizer steps per run."),
    batch_size: int = typer.Option(8, "--batch-size", help="Rows per step."),
    seq_len: int = typer.Option(128, "--seq-len", help="Tokens per row."),
    rounds: int = typer.Option(3, "--rounds", help="Interleaved rounds; the median is reported."),
    threads: int = typer.Option(1, "--threads", help="Compute threads of the cloud, in either place."),
    low_latency: bool = typer.Option(False, "--low-latency", help=LOW_LATENCY_HELP + " Held for both methods alike."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
):
    """Training tokens/s of `plcli tune`: the split over loopback against the cloud in the same process."""
    from plcli.recipes.bench_tune import bench_tune as run

    for name, value in (("--steps", steps), ("--batch-size", batch_size), ("--seq-len", seq_len), ("--rounds", rounds)):
        _positive(name, value)
    thread_count(threads)
    if not model_dir.is_dir():
        raise UserError(f"{model_dir}: no such checkpoint directory")
    [rank] = _ranks(None if rank is None else str(rank), bundles)
    positions = _max_positions(model_dir, bundles)
    if seq_len > positions:
        raise UserError(f"--seq-len {seq_len} is out of range: the model holds {positions} tokens")
    with hold_low_latency(low_latency), progress_bar() as progress:
        task = progress.add_task("benchmarking", total=rounds)
        r = run(model_dir, bundles=bundles, rank=rank, steps=steps, batch_size=batch_size, seq_len=seq_len, rounds=rounds,
                threads=threads, progress=lambda msg: progress.advance(task) if msg.startswith("round") else None)
    r["low_latency"] = low_latency
    if as_json:
        print_json(r)
        return
    m = r["model"]
    table = Table(title=f"tune · hidden {m['hidden']} · {m['layers']} layers · rank {m['rank']} · {r['steps']} steps of "
                        f"{r['batch_size']} x {r['seq_len']} tokens · median of {r['rounds']}")
    for col in ("method", "training tok/s", "x one process", "last loss"):
        table.add_column(col, justify="left" if col == "method" else "right")
    base = r["rows"][0]["tokens_per_s"]
    for row in r["rows"]:
        table.add_row(row["method"], f"{row['tokens_per_s']:,.0f}", f"{row['tokens_per_s'] / base:.2f}",
                      f"{row['train_loss_last']:.4f}")
    table.caption = ("losses agree" if r["losses_agree"] else "[red]losses differ[/]") + (
        " · idle cores polling (--low-latency)" if r["low_latency"] else "")
    print_table(table)
