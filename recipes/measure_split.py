"""Time and peak memory of `plcli split` on a TinyLlama-shaped Llama with random weights.

    python -m plcli.recipes.measure_split [--out DIR] [--rank R] [--json]

Builds the checkpoint (hidden 2048, 22 layers, 32 heads / 4 kv heads,
intermediate 5632, vocab 32000, about 1.1 billion fp32 parameters), then runs
`plcli split` in a child process with an empty graph cache, so the numbers are
those of a first split: wall time, the child's peak resident memory and the
sizes of the bundles. Everything is written under a temporary directory that is
removed afterwards unless `--out` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINYLLAMA_SHAPE = dict(
    hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
    intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048,
)


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def run_split_child(model_dir: Path, out_dir: Path, cache: Path, rank: int, targets: str) -> dict:
    """Run `plcli split` in a child process; wall time, and that child's own CPU time and peak RSS (from wait4)."""
    cmd = [sys.executable, "-m", "plcli.cli", "split", str(model_dir), str(out_dir),
           "--rank", str(rank), "--targets", targets, "--json"]
    env = {**os.environ, "PLCLI_CACHE": str(cache)}
    started = time.perf_counter()
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        child = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, env=env)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        stderr.seek(0)
        out, err = stdout.read().decode(), stderr.read().decode()
    if child.returncode != 0:
        raise SystemExit(f"plcli split failed (exit {child.returncode}): {err.strip() or out.strip()}")
    # ru_maxrss is in KiB on Linux.
    return {"wall_seconds": wall, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "peak_rss_bytes": usage.ru_maxrss * 1024, "summary": json.loads(out)}


def measure(work: Path, rank: int, targets: str, progress, shape: dict = TINYLLAMA_SHAPE) -> dict:
    """Build a random Llama of `shape` under `work` and measure its first split there."""
    from plcli.recipes.checkpoints import make_random_checkpoint

    model_dir, out_dir, cache = work / "random-llama", work / "split", work / "cache"
    progress("building the random checkpoint")
    started = time.perf_counter()
    make_random_checkpoint(model_dir, "llama", **shape)
    build_seconds = time.perf_counter() - started
    checkpoint_bytes = _dir_bytes(model_dir)

    progress("running plcli split")
    child = run_split_child(model_dir, out_dir, cache, rank, targets)
    s = child["summary"]
    return {
        "shape": shape,
        "rank": rank,
        "targets": targets.split(","),
        "checkpoint_bytes": checkpoint_bytes,
        "checkpoint_build_seconds": round(build_seconds, 1),
        "split_wall_seconds": round(child["wall_seconds"], 1),
        "split_reported_seconds": s["seconds"],
        "split_cpu_seconds": round(child["cpu_seconds"], 1),
        "split_peak_rss_bytes": child["peak_rss_bytes"],
        "cloud": s["sides"]["cloud"],
        "edge": s["sides"]["edge"],
        "per_token": s["per_token"],
        "cpu_count": os.cpu_count(),
        "total_memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
    }


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def print_table(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    shape = r["shape"]
    table = Table(title=(
        f"plcli split · Llama hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
        f"GQA {shape['num_attention_heads']}/{shape['num_key_value_heads']}, vocab {shape['vocab_size']} · "
        f"rank {r['rank']} · {','.join(r['targets'])}"
    ))
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("checkpoint (fp32 safetensors)", _gib(r["checkpoint_bytes"]))
    table.add_row("split wall time (child process, cold graph cache)", f"{r['split_wall_seconds']:.1f} s")
    table.add_row("split time reported by plcli", f"{r['split_reported_seconds']:.1f} s")
    table.add_row("split CPU time (user + system)", f"{r['split_cpu_seconds']:.1f} s")
    table.add_row("split peak resident memory", _gib(r["split_peak_rss_bytes"]))
    for side in ("cloud", "edge"):
        table.add_row(f"{side} bundle ({r[side]['parameters']:,} parameters)", _gib(r[side]["bundle_bytes"]))
    t = r["per_token"]["float32"]
    table.add_row("per token, float32: bytes up / down / round trips", f"{t['bytes_up']:,} / {t['bytes_down']:,} / {t['round_trips']}")
    table.add_row("machine", f"{r['cpu_count']} cores, {_gib(r['total_memory_bytes'])}")
    Console().print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="Keep the checkpoint and bundles here (default: a temporary directory, removed).")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj")
    parser.add_argument("--json", action="store_true", help="Print the measurements as JSON.")
    args = parser.parse_args(argv)

    from rich.console import Console

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # before transformers is imported: no save bars
    err = Console(stderr=True)
    if args.out is not None:
        if args.out.exists():
            parser.error(f"{args.out} exists")
        work, cleanup = args.out, False
        work.mkdir(parents=True)
    else:
        work, cleanup = Path(tempfile.mkdtemp(prefix="plcli-measure-split-")), True
    try:
        with err.status("") as spinner:
            result = measure(work, args.rank, args.targets, lambda msg: spinner.update(msg))
    finally:
        if cleanup:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        print_table(result)


if __name__ == "__main__":
    main()
