"""`plcli tune` (train M on the edge across the split) and `plcli export-peft` (hand the result to peft)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from .app import (KeepsWords, UserError, app, check_utf8, console, err_console, fail, positionals, print_json,
                  print_table, printable, reports_errors, seconds, shown, thread_count)
from .cloud_options import (CURVE_SECRET_HELP, RECONNECT_HELP, SERVER_KEY_HELP, WIRE_DTYPE_HELP, check_wire_dtype,
                            client_keys, cloud_urls, make_failover)


def tune_progress() -> Progress:
    return Progress(
        TextColumn("tuning"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TextColumn("grad norm {task.fields[grad_norm]}"),
        TextColumn("{task.fields[speed]} tok/s"), TextColumn("lr {task.fields[lr]}"),
        TimeElapsedColumn(), TimeRemainingColumn(),
        console=err_console, disable=not err_console.is_terminal,
    )


def run_tuner(tuner, *, quiet: bool = False):
    """Run with a progress bar (steps, loss, gradient norm before clipping, tokens/s, learning rate) and eval lines;
    returns the summary."""
    from plcli.runtime.tune import TuneInterrupted

    with tune_progress() as progress:
        task = progress.add_task("tuning", total=tuner.total_steps, completed=tuner.step_count, loss="-", grad_norm="-",
                                 speed="-", lr="-")

        def on_step(r):
            progress.update(task, completed=r.step, loss=f"{r.loss:.3f}", grad_norm=f"{r.grad_norm:.2g}",
                            speed=f"{r.tokens_per_s:,.0f}", lr=f"{r.lr:.1e}")

        def on_eval(step: int, loss: float):
            if not quiet:
                progress.console.print(f"step {step}: eval loss {loss:.4f}")

        try:
            return tuner.run(on_step=on_step, on_eval=on_eval)
        except TuneInterrupted as e:
            fail(str(e), e.exit_code)


@app.command(cls=KeepsWords)
@reports_errors
def tune(
    ctx: typer.Context,
    edge_dir: Path = typer.Argument(..., help="The edge bundle (its tokenizer, embedding, head and M)."),
    more_data: Optional[list[Path]] = typer.Argument(None, metavar="[PATH ...]", show_default=False,
                                                     help="More training files: `--data a.txt b.jsonl` reads both."),
    data: list[Path] = typer.Option(..., "--data", help="Training text: .txt files, or .jsonl with {\"text\"} or {\"prompt\", \"response\"} lines."),
    connect: Optional[list[str]] = typer.Option(None, "--connect", help="The cloud's endpoint (`plcli serve-cloud`), e.g. "
                                                "tcp://127.0.0.1:5555; repeat it (or separate with commas) to name clouds to fail over to."),
    reconnect_timeout: float = typer.Option(30.0, "--reconnect-timeout", help=RECONNECT_HELP),
    cloud_dir: Optional[Path] = typer.Option(None, "--cloud", help="Instead of --connect: run this cloud bundle in this process (single machine, tests)."),
    timeout: float = typer.Option(30.0, "--timeout", help="Seconds to wait for the cloud to connect and for each reply."),
    wire_dtype: str = typer.Option("float32", "--wire-dtype", help=WIRE_DTYPE_HELP),
    curve_secret: Optional[Path] = typer.Option(None, "--curve-secret", help=CURVE_SECRET_HELP),
    server_key: Optional[Path] = typer.Option(None, "--server-key", help=SERVER_KEY_HELP),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps (instead of --epochs)."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Passes over the data (default 3)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (default 1e-2)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Sequences per micro-batch (default 8)."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Tokens per sequence (default 128)."),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help="Micro-batches per optimizer step (default 1)."),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="Linear warmup steps before the cosine decay (default 10)."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW decoupled weight decay (default 0)."),
    max_grad_norm: Optional[float] = typer.Option(None, "--max-grad-norm", help="Clip the gradient's global norm; 0 is off (default 1)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the data order (default 0)."),
    eval_data: Optional[list[Path]] = typer.Option(None, "--eval-data", help="Held-out text, same formats: loss and perplexity before and after."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Also evaluate every N steps (default: before and after only)."),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Checkpoint every N steps (default 50; 0: at the end only)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Adapter directory (default EDGE_DIR/adapter)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads of the in-process cloud with --cloud (default: torch's)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run checkpointed in --out, exactly where it stopped."),
    force: bool = typer.Option(False, "--force", help="Replace the adapter in --out, finished or not, instead of refusing."),
    as_json: bool = typer.Option(False, "--json", help="Print a summary as JSON."),
):
    """Tune the adapter M on your own text: the text, its labels and M are never sent."""
    from plcli.runtime.bundle import refuse_overlap
    from plcli.runtime.edge import EdgeModel
    from plcli.runtime.tune import Tuner, TuneConfig, check_out, default_adapter_dir, resume_config

    if (connect is None) == (cloud_dir is None):
        raise UserError("give the cloud's endpoint with --connect URL, or --cloud CLOUD_DIR to run it in this process")
    thread_count(threads)
    if threads is not None and connect is not None:
        raise UserError("--threads sets the threads of an in-process --cloud; a cloud at --connect has its own "
                        "(serve-cloud --threads)")
    check_wire_dtype(wire_dtype)  # as run-edge: refused before anything loads, with --cloud too
    if connect is None and wire_dtype != "float32":
        raise UserError("--wire-dtype sets what crosses to a --connect cloud; an in-process --cloud sends nothing")
    seconds("--timeout", timeout)
    seconds("--reconnect-timeout", reconnect_timeout, zero_turns_off=True)
    if connect is None and (curve_secret or server_key):
        raise UserError("--curve-secret and --server-key secure a --connect; an in-process --cloud needs neither")
    curve = client_keys(curve_secret, server_key)
    urls = None if connect is None else cloud_urls(connect)
    # `--data a.txt b.txt` reads both; after --eval-data's file, a second one would be trained on without a word.
    held_out_too = [word for word, after in positionals(ctx)[1:] if after == "--eval-data"]
    if held_out_too:
        raise UserError(f"{held_out_too[0]} follows --eval-data's file, where it would be read as training data: give "
                        "each held-out file its own --eval-data (--eval-data A --eval-data B)")
    data = [*data, *(more_data or [])]
    out = out or default_adapter_dir(edge_dir)
    # A checkpoint replaces --out whole: what it holds of the inputs would be deleted (the bundles, a data file).
    refuse_overlap(out, [("the edge bundle", edge_dir), ("the cloud bundle", cloud_dir),
                         *(("the data file", p) for p in [*data, *(eval_data or [])])])
    given = {k: v for k, v in dict(
        steps=steps, epochs=epochs, lr=lr, batch_size=batch_size, seq_len=seq_len, grad_accum=grad_accum, warmup=warmup,
        weight_decay=weight_decay, max_grad_norm=max_grad_norm, seed=seed, eval_every=eval_every, save_every=save_every,
    ).items() if v is not None}
    edge = EdgeModel(edge_dir)
    # Before the checkpoint is read and the cloud connected: a refused --out should cost neither.
    check_out(out, edge.manifest, resume=resume, force=force)
    config = resume_config(out, given) if resume else TuneConfig(**given)
    failover = None
    if urls is not None:
        tokens = config.batch_size * config.seq_len  # what a pass carries: the replies the edge takes are no larger
        failover = make_failover(urls, lambda url, t: _remote_link(url, edge, wire_dtype, t, curve, tokens),
                                 timeout=timeout, reconnect_timeout=reconnect_timeout,
                                 carrying_on="doing the interrupted step again")
        link = failover.open()
    else:
        link = _local_link(cloud_dir, edge, threads)
    tuner = None
    try:
        tuner = Tuner(edge, link, data, config, out, eval_data=eval_data or None, resume=resume, force=force,
                      failover=failover)
        for what, dataset in (("training", tuner.train), ("evaluation", tuner.eval)):
            note = dataset and dataset.cut_note(what, tuner.config.seq_len)
            if note:
                err_console.print(f"[yellow]note:[/] {shown(note)}", highlight=False, soft_wrap=True)
        summary = run_tuner(tuner, quiet=as_json)
    finally:
        if connect is not None:
            (tuner.link if tuner else link).close()
    if as_json:
        print_json(summary.to_json())
        return
    table = Table(title=f"tuned M · {summary.steps} step{'s' if summary.steps != 1 else ''}" + (f" (resumed at {summary.resumed_from})" if summary.resumed_from else ""))
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row("train loss (first / last step)", _num(summary.train_loss_first), _num(summary.train_loss_last))
    if summary.eval_loss_before is not None:
        table.add_row("eval loss", _num(summary.eval_loss_before), _num(summary.eval_loss_after))
        table.add_row("eval perplexity", _num(summary.eval_perplexity_before, 2), _num(summary.eval_perplexity_after, 2))
    print_table(table)
    console.print(f"{summary.tokens_per_s:,.0f} tokens/s · adapter in [bold]{shown(summary.out)}[/]"
                  + ("" if eval_data else " · no --eval-data: nothing held out was measured"))


def _local_link(cloud_dir: Path, edge, threads: int | None):
    from plcli.runtime.bundle import read_pair
    from plcli.runtime.cloud_tune import local_train_link

    read_pair(cloud_dir, edge.dir)
    return local_train_link(cloud_dir, threads=threads)


def _remote_link(url: str, edge, wire_dtype: str, timeout: float, curve, max_tokens: int):
    from plcli.runtime.client import RemoteTrainLink

    try:
        return RemoteTrainLink(url, edge.manifest, wire_dtype=wire_dtype, timeout=timeout, max_tokens=max_tokens, curve=curve)
    except ValueError as e:
        raise UserError(str(e)) from None


def _num(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


@app.command("export-peft")
@reports_errors
def export_peft(
    cloud_dir: Path = typer.Option(..., "--cloud", help="The cloud bundle (A and B)."),
    edge_dir: Path = typer.Option(..., "--edge", help="The edge bundle."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="Adapter directory from `plcli tune` (default EDGE_DIR/adapter)."),
    out: Path = typer.Option(..., "--out", help="Where to write the peft adapter."),
    base_model: Optional[str] = typer.Option(None, "--base-model", help="Recorded as base_model_name_or_path (e.g. the checkpoint you split)."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print what was written as JSON."),
):
    """Write a standard peft LoRA adapter (lora_A = M A, lora_B = B, scaling 1) equal to the tuned split."""
    from plcli.exporters.peft_adapter import CONFIG, WEIGHTS_FILE, export_peft as write
    from plcli.runtime.tune import default_adapter_dir

    adapter = adapter or default_adapter_dir(edge_dir)
    if not adapter.is_dir():
        raise UserError(f"{adapter}: no adapter there (tune first, or give --adapter)")
    if base_model is not None:
        check_utf8(base_model, "--base-model")
    written = write(cloud_dir, edge_dir, adapter, out, base_model=base_model, force=force)
    files = [str(written / CONFIG), str(written / WEIGHTS_FILE)]
    if as_json:
        print_json({"out": str(written), "files": files})
    else:
        console.print(f"wrote a peft LoRA adapter to [bold]{shown(written)}[/]: load it with "
                      f"PeftModel.from_pretrained(base_model, {shown(repr(str(written)))})")


def tune_demo(bundles: Path, work: Path, link, *, config=None, say=console.print) -> dict:
    """`plcli demo`'s tuning act: tune on the synthetic private notes through `link`, then complete one of their facts again.

    `bundles` is a split of the demo model (cloud/ and edge/); notes and adapter go under `work`; `config` defaults
    to `plcli tune`'s defaults.
    """
    from plcli.recipes.private_notes import demo_fact, write_corpus
    from plcli.recipes.tune_quality import complete
    from plcli.runtime.cloud import CloudModel
    from plcli.runtime.edge import EdgeModel
    from plcli.runtime.tune import Tuner, TuneConfig

    train, held_out = write_corpus(work / "notes")
    edge, cloud = EdgeModel(bundles / "edge"), CloudModel(bundles / "cloud")
    prompt, answer = demo_fact()
    before = complete(edge, cloud, prompt, 6)
    # The demo splits anew each run, with the same seed: the last run's adapter is of this bundle, and replaced.
    tuner = Tuner(edge, link, [train], config or TuneConfig(), work / "adapter", eval_data=[held_out], force=True)
    say(f"   {len(tuner.train.rows)} rows of {tuner.config.seq_len} tokens of one fictional person's notes, "
        f"{tuner.total_steps} steps; text, ids and loss are never sent")
    summary = run_tuner(tuner, quiet=True)
    edge.set_adapter(tuner.adapter_matrices())
    after = complete(edge, cloud, prompt, 6)
    table = Table(show_header=True)
    table.add_column("M")
    table.add_column("held-out perplexity", justify="right")
    table.add_column(f"{prompt} …")
    table.add_row("before tuning (zeros)", f"{summary.eval_perplexity_before:.2f}", Text(printable(before)))
    table.add_row(f"after {summary.steps} steps", f"{summary.eval_perplexity_after:.2f}", Text(printable(after)))
    say(table)
    learned = after.startswith(answer) and not before.startswith(answer)
    say(f"   the notes say{answer}: " + ("[green]learned[/]" if learned else "[red]not learned[/]")
        + f" · {summary.tokens_per_s:,.0f} tokens/s")
    return {**summary.to_json(), "prompt": prompt, "expected": answer, "before": before, "after": after, "learned": learned}
