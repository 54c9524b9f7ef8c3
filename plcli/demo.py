"""`plcli demo`: the whole story on the embedded demo model, in one command."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .app import app, console, print_json, reports_errors
from .bundle_commands import split_with_progress

DEMO_PROMPT = "The list"


def run_demo(out: Path | None, *, as_json: bool = False) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from plcli.exporters.verify import verify
    from plcli.recipes.demo_model import demo_model_dir
    from plcli.runtime.cloud import CloudModel
    from plcli.runtime.edge import EdgeModel
    from plcli.runtime.generate import Sampling, generate
    from plcli.runtime.bundle import cache_root
    from plcli.runtime.summary import summarize

    say = (lambda *a: None) if as_json else console.print
    model_dir = demo_model_dir()
    out = Path(out) if out else cache_root() / "demo"
    bundles = out / "bundles"

    say(f"[bold]1. split[/] the embedded demo model ({model_dir.name}) into {bundles}")
    result = split_with_progress(model_dir, bundles, force=True)
    summary = summarize(bundles)
    say(f"   cloud {summary['sides']['cloud']['parameters']:,} parameters · edge {summary['sides']['edge']['parameters']:,} parameters · "
        f"{summary['per_token']['float32']['round_trips']} round trips per token · {result.seconds:.1f} s")

    say("[bold]2. verify[/] the split against transformers with B M A merged (random non-zero M)")
    comparisons = verify(bundles, model_dir)
    worst = max(c.rel_error for c in comparisons)
    parity = all(c.ok for c in comparisons)
    say(f"   {len(comparisons)} comparisons (prefill + cached decode steps), worst relative error {worst:.1e}: "
        + ("[green]parity holds[/]" if parity else "[red]parity FAILED[/]"))

    say(f"[bold]3. generate[/] greedily through the split, in one process, from {DEMO_PROMPT!r}")
    edge = EdgeModel(bundles / "edge")
    cloud = CloudModel(bundles / "cloud")
    prompt_ids = edge.tokenizer(DEMO_PROMPT)["input_ids"]
    started = time.perf_counter()
    split_ids = list(generate(edge, cloud.new_session(), prompt_ids, Sampling(max_new_tokens=32, ignore_eos=True)))
    split_s = time.perf_counter() - started
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    with torch.no_grad():
        ref = reference.generate(torch.tensor([prompt_ids]), max_new_tokens=32, do_sample=False, min_new_tokens=32,
                                 pad_token_id=edge.tokenizer.pad_token_id)[0, len(prompt_ids):].tolist()
    identical = ref == split_ids
    text = edge.tokenizer.decode(split_ids)
    table = Table(show_header=True)
    table.add_column("source")
    table.add_column("completion")
    table.add_row("split (ONNX Runtime)", DEMO_PROMPT + text)
    table.add_row("transformers generate", DEMO_PROMPT + edge.tokenizer.decode(ref))
    if not as_json:
        console.print(table)
    say(f"   token ids identical: {'[green]yes[/]' if identical else '[red]no[/]'} · "
        f"{len(split_ids) / split_s:.1f} tokens/s through the in-process split")

    report = {
        "bundles": str(bundles), "split_seconds": round(result.seconds, 3), "verify_ok": parity,
        "verify_worst_rel_error": worst, "prompt": DEMO_PROMPT, "completion": text,
        "token_ids": split_ids, "reference_token_ids": ref, "greedy_identical": identical,
        "per_token": summary["per_token"],
    }
    if as_json:
        print_json(report)
    if not (parity and identical):
        raise typer.Exit(1)
    return report


@app.command()
@reports_errors
def demo(
    out: Optional[Path] = typer.Option(None, "--out", help="Where to put the demo bundles (default: a cache directory)."),
    as_json: bool = typer.Option(False, "--json", help="Print what the demo measured as JSON."),
):
    """Split the embedded demo model, verify it against transformers, and generate through the split."""
    run_demo(out, as_json=as_json)
