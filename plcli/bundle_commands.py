"""`plcli split`, `plcli verify` and `plcli inspect`: making bundles and looking at them."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from .app import UserError, app, console, print_json, print_table, progress_bar, reports_errors, shown, status


def split_with_progress(model_dir: Path, out_dir: Path, **kwargs):
    from plcli.exporters.split import split_checkpoint

    with progress_bar() as progress:
        tasks = {}

        def on_progress(phase: str, done: int, total: int):
            label = {"layers": "splitting layers", "graphs": "exporting graphs"}[phase]
            if phase not in tasks:
                tasks[phase] = progress.add_task(label, total=total)
            progress.update(tasks[phase], completed=done)

        return split_checkpoint(model_dir, out_dir, progress=on_progress, **kwargs)


@app.command()
@reports_errors
def split(
    model_dir: Path = typer.Argument(..., help="Hugging Face checkpoint directory (config.json, weights, tokenizer)."),
    out_dir: Path = typer.Argument(..., help="Where to write cloud/ and edge/."),
    rank: int = typer.Option(64, "--rank", help="Adapter rank r (1 to hidden/2)."),
    targets: str = typer.Option("q_proj,k_proj,v_proj", "--targets", help="Adapted projections, comma-separated."),
    seed: int = typer.Option(0, "--seed", help="Seed for the frozen random A and B."),
    force: bool = typer.Option(False, "--force", help="Replace OUT_DIR if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
):
    """Split a checkpoint into a cloud bundle and an edge bundle."""
    result = split_with_progress(model_dir, out_dir, rank=rank, targets=targets, seed=seed, force=force)
    from plcli.runtime.summary import summarize

    summary = summarize(out_dir)
    summary["seconds"] = round(result.seconds, 3)
    if as_json:
        print_json(summary)
        return
    console.print(f"split [bold]{shown(model_dir)}[/] into [bold]{shown(out_dir)}[/] in {result.seconds:.1f} s")
    _print_summary(summary)


@app.command()
@reports_errors
def verify(
    out_dir: Path = typer.Argument(..., help="Split output directory (with cloud/ and edge/)."),
    reference: Path = typer.Option(..., "--reference", help="The checkpoint the bundles were split from."),
    decode_steps: int = typer.Option(4, "--decode-steps", help="Single-token steps after each prefill."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random non-zero M."),
    as_json: bool = typer.Option(False, "--json", help="Print the comparisons as JSON."),
):
    """Compare the split pipeline's logits with transformers (W + B M A merged)."""
    from plcli.exporters.verify import TOLERANCE, verify as run_verify

    for side in ("cloud", "edge"):
        if not (out_dir / side).is_dir():
            raise UserError(f"{out_dir}: no {side}/ bundle (give the directory `plcli split` wrote)")
    with status("comparing against transformers"):
        results = run_verify(out_dir, reference, decode_steps=decode_steps, seed=seed)
    ok = all(r.ok for r in results)
    if as_json:
        print_json({"ok": ok, "tolerance": TOLERANCE, "comparisons": [dict(vars(r), ok=r.ok) for r in results]})
    else:
        table = Table(title=f"split vs transformers (fp32, tolerance {TOLERANCE:g})")
        for col in ("prompt", "step", "tokens", "max |error|", "relative error", "argmax", "ok"):
            table.add_column(col, justify="right" if col not in ("step", "ok") else "left")
        for r in results:
            table.add_row(str(r.prompt), r.phase, str(r.tokens), f"{r.max_abs_error:.2e}", f"{r.rel_error:.2e}",
                          "same" if r.same_argmax else "[red]differs[/]", "[green]yes[/]" if r.ok else "[red]NO[/]")
        print_table(table)
        console.print("[green]parity holds[/]" if ok else "[red]parity FAILED[/]")
    if not ok:
        raise typer.Exit(1)


@app.command()
@reports_errors
def inspect(
    path: Path = typer.Argument(..., help="Split output directory, or one side's bundle."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
):
    """Parameters, bytes, fingerprints and per-token wire traffic of a bundle."""
    from plcli.runtime.summary import summarize

    summary = summarize(path)
    if as_json:
        print_json(summary)
    else:
        _print_summary(summary)


def _print_summary(s: dict) -> None:
    from plcli.runtime.generate import unapplied_note

    table = Table(title=f"{s['family']} · {s['layers']} layers · hidden {s['hidden_size']} · rank {s['rank']} · {','.join(s['targets'])}")
    table.add_column("side")
    table.add_column("parameters", justify="right")
    table.add_column("weights", justify="right")
    table.add_column("bundle", justify="right")
    table.add_column("A/B fingerprint")
    for side, d in s["sides"].items():
        table.add_row(side, f"{d['parameters']:,}", _bytes(d["weight_bytes"]), _bytes(d["bundle_bytes"]), d["ab_fingerprint"][:23] + "…")
    print_table(table)
    traffic = Table(title="per generated token")
    for col in ("wire dtype", "bytes up", "bytes down", "round trips"):
        traffic.add_column(col, justify="right")
    for dt, t in s["per_token"].items():
        traffic.add_row(dt, f"{t['bytes_up']:,}", f"{t['bytes_down']:,}", str(t["round_trips"]))
    print_table(traffic)
    if "paired" in s and not s["paired"]:
        console.print("[red]cloud and edge were not split together (A/B fingerprints differ)[/]")
    note = unapplied_note(s.get("generation", {}))
    if note:
        console.print(f"[yellow]note:[/] {shown(note)}", highlight=False, soft_wrap=True)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
