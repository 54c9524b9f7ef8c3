"""Training speed across the split against one process, side by side in one run.

What `plcli bench tune` measures, interleaved round by round: `plcli tune`'s
own loop on the synthetic private notes (recipes/private_notes.py), with the
cloud in this process (`one-process`: torch segments, no network) and in a
`plcli serve-cloud` process over loopback ZeroMQ (`split`). Both run the same
steps on the same rows, so their losses must agree; the ratio of their training
tokens/s is what the network costs a tuning run.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Callable

from .bench_decode import cloud_process

METHODS = ("one-process", "split")


def bench_tune(model_dir: Path, *, bundles: Path | None = None, rank: int = 64, steps: int = 4, batch_size: int = 8,
               seq_len: int = 128, rounds: int = 3, threads: int = 1, seed: int = 0,
               progress: Callable[[str], None] = lambda _: None) -> dict:
    from plcli.exporters.split import split_checkpoint
    from plcli.runtime.client import RemoteTrainLink
    from plcli.runtime.cloud_tune import local_train_link, set_threads
    from plcli.runtime.edge import EdgeModel
    from plcli.runtime.tune import Tuner, TuneConfig

    from .private_notes import write_corpus

    with tempfile.TemporaryDirectory(prefix="plcli-bench-tune-") as work:
        work = Path(work)
        if bundles is None:
            progress(f"splitting {model_dir} at rank {rank}")
            bundles = work / "split"
            split_checkpoint(model_dir, bundles, rank=rank, seed=seed)
        set_threads(threads)
        train, _ = write_corpus(work / "notes", seed)
        edge = EdgeModel(bundles / "edge", threads=1)
        config = TuneConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, seed=seed, save_every=0)
        runs: dict[str, list] = {m: [] for m in METHODS}
        # Small pages on both sides: the one-process cloud is loaded afresh for every run, so nothing here could put
        # it on huge pages as serve-cloud puts its own.
        with cloud_process(bundles / "cloud", threads=threads, tune=True, huge_pages=False) as cloud:
            links = {"one-process": lambda: local_train_link(bundles / "cloud", threads=threads),
                     "split": lambda: RemoteTrainLink(cloud.endpoint, edge.manifest, timeout=120)}

            def measure(name: str, r: int):
                link = links[name]()
                try:
                    return Tuner(edge, link, [train], config, work / f"{name}-{r}").run()
                finally:
                    if name == "split":
                        link.close()

            for name in METHODS:  # warm-up
                measure(name, -1)
            for r in range(rounds):
                progress(f"round {r + 1} of {rounds}")
                for name in METHODS:
                    runs[name].append(measure(name, r))
    rows = [{"method": name, "tokens_per_s": statistics.median(s.tokens_per_s for s in rs), "steps": rs[0].steps,
             "train_tokens": rs[0].train_tokens, "train_loss_last": rs[0].train_loss_last} for name, rs in runs.items()]
    rate = {row["method"]: row["tokens_per_s"] for row in rows}
    one, split = runs["one-process"][0].losses, runs["split"][0].losses
    return {
        "model": {"hidden": edge.arch.hidden_size, "layers": edge.arch.num_layers, "vocab": edge.arch.vocab_size,
                  "rank": edge.manifest.rank, "targets": list(edge.manifest.targets)},
        "steps": steps, "batch_size": batch_size, "seq_len": seq_len, "rounds": rounds, "rows": rows,
        "ratios": {"split_vs_one_process": rate["split"] / rate["one-process"]},
        "losses_agree": all(abs(a - b) <= 1e-4 * abs(a) for a, b in zip(one, split)),
    }
