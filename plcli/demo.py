"""`plcli demo`: the whole story on the embedded demo model, in one command.

Split, verify against transformers, generate in one process, then serve the
cloud on loopback and generate through the network the way two terminals would;
last, split again with all seven projections adapted and tune M on synthetic
private notes through a loopback cloud, as `plcli tune --connect` does.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table
from rich.text import Text

from .app import UserError, app, console, print_json, printable, reports_errors, shown
from .bundle_commands import split_with_progress
from .serve_commands import timed_turn

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
    from plcli.runtime.plan import ALL_TARGETS
    from plcli.runtime.summary import summarize

    say = (lambda *a: None) if as_json else console.print
    model_dir = demo_model_dir()
    out = Path(out) if out else cache_root() / "demo"
    bundles, tune_bundles = out / "bundles", out / "tune-bundles"
    for path in (bundles, tune_bundles):
        _only_a_demo_split(path)
    _only_a_demo_tune(out / "tune")

    say(f"[bold]1. split[/] the embedded demo model ({model_dir.name}) into {shown(bundles)}")
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
        # No end-of-text token, as `ignore_eos`: `min_new_tokens` would ban it, where the split may pick it and go on.
        # The mask is given: without an eos, generate masks every prompt token equal to the pad id (here the BOS).
        ids = torch.tensor([prompt_ids])
        ref = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                                 eos_token_id=None, pad_token_id=edge.tokenizer.pad_token_id)[0, len(prompt_ids):].tolist()
    identical = ref == split_ids
    text = edge.tokenizer.decode(split_ids)
    table = Table(show_header=True)
    table.add_column("source")
    table.add_column("completion")
    table.add_row("split (ONNX Runtime)", Text(printable(DEMO_PROMPT + text)))
    table.add_row("transformers generate", Text(printable(DEMO_PROMPT + edge.tokenizer.decode(ref))))
    if not as_json:
        console.print(table)
    say(f"   token ids identical: {'[green]yes[/]' if identical else '[red]no[/]'} · "
        f"{len(split_ids) / split_s:.1f} tokens/s through the in-process split")

    say("[bold]4. serve[/] the cloud on loopback over ZeroMQ and generate through it, as `plcli run-edge` does")
    network = serve_and_generate(cloud, edge, prompt_ids, Sampling(max_new_tokens=32, ignore_eos=True))
    network["identical"] = network["token_ids"] == split_ids
    payload = summary["per_token"]["float32"]
    if not as_json:
        console.print(_network_table(network, payload))
    say(f"   token ids identical to the in-process split: {'[green]yes[/]' if network['identical'] else '[red]no[/]'}")

    # Recalling a fact verbatim takes the MLP too: with q, k, v alone this 2M-parameter model learns the notes' style
    # but none of their facts (recipes/tune_quality.py measures both), so the tuning act adapts all seven projections.
    say(f"[bold]5. tune[/] M on synthetic private notes through a loopback cloud, as `plcli tune --connect` does; "
        f"split again with all seven projections adapted into {shown(tune_bundles)}")
    split_with_progress(model_dir, tune_bundles, targets=ALL_TARGETS, force=True)
    tuned = serve_and_tune(CloudModel(tune_bundles / "cloud"), EdgeModel(tune_bundles / "edge"), tune_bundles,
                           out / "tune", say=say)

    report = {
        "bundles": str(bundles), "split_seconds": round(result.seconds, 3), "verify_ok": parity,
        "verify_worst_rel_error": worst, "prompt": DEMO_PROMPT, "completion": text,
        "token_ids": split_ids, "reference_token_ids": ref, "greedy_identical": identical,
        "per_token": summary["per_token"], "network": network, "tune": tuned,
    }
    if as_json:
        print_json(report)
    if not (parity and identical and network["identical"]):
        raise typer.Exit(1)
    return report


def _only_a_demo_split(path: Path) -> None:
    """Refuse `path` unless it is missing, empty or an earlier demo's split: the demo replaces it without --force, so
    under a user's --out it must never take a directory of theirs that happens to bear the name."""
    from plcli.runtime.bundle import MANIFEST

    if path.is_dir() and any(path.iterdir()) and not all((path / side / MANIFEST).is_file() for side in ("cloud", "edge")):
        raise UserError(f"{path} exists and is not a split of an earlier demo, which the demo would replace: "
                        "choose another --out")


def _only_a_demo_tune(path: Path) -> None:
    """Refuse `path` unless it is missing, empty or holds only what an earlier demo's tuning wrote there (its notes,
    and an adapter of the demo's seven targets), all of which the demo replaces."""
    import json

    from plcli.runtime.bundle import foreign_entry, restore_interrupted
    from plcli.runtime.edge import ADAPTER_CONFIG
    from plcli.runtime.plan import ALL_TARGETS

    def ours() -> bool:
        if not path.is_dir():
            return False
        restore_interrupted(path / "adapter")  # what an adapter write cut short left beside it
        if foreign_entry(path, {"notes": {"train.jsonl": None, "heldout.jsonl": None}, "adapter": None}):
            return False
        try:
            return json.loads((path / "adapter" / ADAPTER_CONFIG).read_text()).get("targets") == list(ALL_TARGETS)
        except FileNotFoundError:
            return not (path / "adapter").exists()
        except (OSError, ValueError, AttributeError):
            return False

    if path.exists() and not ours():
        raise UserError(f"{path} exists and is not what an earlier demo tuned there, which the demo would replace: "
                        "choose another --out")


def serve_and_generate(cloud, edge, prompt_ids: list[int], sampling) -> dict:
    """Start a cloud server on a free loopback port in a thread, generate through it, stop it: what crossed and how fast."""
    from plcli.runtime.client import RemoteCloudSession, cloud_status
    from plcli.runtime.generate import Conversation
    from plcli.runtime.server import CloudServer, running

    server = CloudServer(cloud, bind="tcp://127.0.0.1:*", max_sessions=1)
    with running(server) as endpoint:
        with RemoteCloudSession(endpoint, edge.manifest, timeout=10.0) as session:
            result = timed_turn(Conversation(edge, session, sampling), prompt_ids)
        served = cloud_status(endpoint)["tokens"]
    up, down = result.decode_bytes_per_token or (None, None)
    return {"endpoint": endpoint, "token_ids": result.token_ids, "stats": result.stats, "cloud_tokens_served": served,
            "decode_bytes_up_per_token": up, "decode_bytes_down_per_token": down}


def serve_and_tune(cloud, edge, bundles: Path, work: Path, *, config=None, say=console.print) -> dict:
    """Start a cloud server on a free loopback port in a thread and tune M through it; what the tuning showed."""
    from plcli.runtime.client import RemoteTrainLink
    from plcli.runtime.server import CloudServer, running

    from .tune_commands import tune_demo

    server = CloudServer(cloud, bind="tcp://127.0.0.1:*", max_sessions=1)
    with running(server) as endpoint, RemoteTrainLink(endpoint, edge.manifest, timeout=30.0) as link:
        return {"endpoint": endpoint, **tune_demo(bundles, work, link, config=config, say=say)}


def _network_table(network: dict, payload: dict) -> Table:
    stats = network["stats"]
    table = Table(title=f"over loopback ({network['endpoint']}, float32 on the wire)", show_header=True)
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("tensor payload alone", justify="right")
    table.add_row("first token after", f"{stats['ttft_s'] * 1000:.1f} ms", "")
    table.add_row("decode speed", f"{stats['decode_tokens_per_s']:.1f} tokens/s", "")
    table.add_row("bytes up per decoded token (socket)", f"{network['decode_bytes_up_per_token']:,.0f}", f"{payload['bytes_up']:,}")
    table.add_row("bytes down per decoded token (socket)", f"{network['decode_bytes_down_per_token']:,.0f}", f"{payload['bytes_down']:,}")
    table.add_row("round trips per token", f"{stats['round_trips'] / stats['new_tokens']:.2f}", str(payload["round_trips"]))
    table.add_row("tokens the cloud computed", f"{network['cloud_tokens_served']:,}", "")
    return table


@app.command()
@reports_errors
def demo(
    out: Optional[Path] = typer.Option(None, "--out", help="Where to put the demo bundles (default: a cache directory)."),
    as_json: bool = typer.Option(False, "--json", help="Print what the demo measured as JSON."),
):
    """Split the embedded demo model, verify it, generate through the split in one process and over loopback, then tune M."""
    run_demo(out, as_json=as_json)
