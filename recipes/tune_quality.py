"""How good is PrivateLoRA tuning? Held-out perplexity on private notes: base, PrivateLoRA, peft LoRA.

A benchmark, not a test. On the demo model (which read only Python's
documentation) and the synthetic private-notes corpus (recipes/private_notes.py):

- base: the model as it is;
- PrivateLoRA: `plcli tune`'s own loop across the split (cloud segments in
  torch in this process, edge in numpy), with its default learning rate;
- LoRA: peft on the same targets with about the same number of trainable
  parameters (r_lora = PrivateLoRA's targets x r^2 / (d_in + d_out), alpha 2 r
  as the paper's baseline), trained in one process with the same rows in the
  same order, steps, schedule and clipping, at the best learning rate of a grid.

Reported: held-out perplexity, and PrivateLoRA's share of LoRA's perplexity
reduction (target: at least 80%). Also the demo fact, completed greedily
through the split before and after tuning.

    python -m plcli.recipes.tune_quality [--targets q_proj,...] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from plcli.runtime.plan import DEFAULT_TARGETS

LORA_LRS = (1e-3, 3e-3, 1e-2, 3e-2)
TARGET_SHARE = 0.8


def lora_rank(pl_params: int, arch, targets: tuple[str, ...]) -> int:
    per_rank = arch.num_layers * sum(sum(arch.target_dims(t)) for t in targets)
    return max(1, round(pl_params / per_rank))


def train_lora(model_dir: Path, tuner, rank: int, lr: float) -> tuple[float, int, float]:
    """peft LoRA through the tuner's own data order and schedule; returns (held-out loss, trainable parameters, seconds)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from plcli.runtime.tune import learning_rate
    from plcli.runtime.tune_data import IGNORE, RowOrder, make_batch

    c = replace(tuner.config, lr=lr)  # the tuner's schedule, peaking at this grid point's rate
    torch.manual_seed(c.seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                            target_modules=list(tuner.edge.manifest.targets), task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=c.weight_decay)
    order = RowOrder(len(tuner.train.rows), c.seed)
    started = time.perf_counter()
    model.train()
    for step in range(tuner.total_steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, tuner.total_steps, c)
        batches = [make_batch([tuner.train.rows[i] for i in order.take(c.batch_size)], tuner.pad) for _ in range(c.grad_accum)]
        targets = sum(b.target_count for b in batches)
        opt.zero_grad()
        for b in batches:
            logits = model(input_ids=torch.from_numpy(b.inputs), attention_mask=torch.from_numpy(b.attention_mask)).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.from_numpy(b.targets).flatten(),
                                                     ignore_index=IGNORE, reduction="sum") / targets
            loss.backward()
        if c.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm)
        opt.step()
    seconds = time.perf_counter() - started
    return torch_eval_loss(model, tuner), sum(p.numel() for p in params), seconds


def torch_eval_loss(model, tuner) -> float:
    import torch

    from plcli.runtime.tune_data import IGNORE

    model.eval()
    total = 0.0
    with torch.no_grad():
        for b in tuner.eval_set:
            logits = model(input_ids=torch.from_numpy(b.inputs), attention_mask=torch.from_numpy(b.attention_mask)).logits
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.from_numpy(b.targets).flatten(),
                                                       ignore_index=IGNORE, reduction="sum").item()
    return total / sum(b.target_count for b in tuner.eval_set)


def complete(edge, cloud, prompt: str, tokens: int) -> str:
    """Greedy completion through the split, in this process."""
    from plcli.runtime.generate import Sampling, generate

    ids = edge.tokenizer(prompt)["input_ids"]
    return edge.tokenizer.decode(list(generate(edge, cloud.new_session(), ids, Sampling(max_new_tokens=tokens, ignore_eos=True))))


def run(model_dir: Path, work: Path, *, rank: int, steps: int | None, pl_lr: float | None, lora_lrs: tuple[float, ...],
        seed: int, threads: int, targets: tuple[str, ...] = DEFAULT_TARGETS, progress=print) -> dict:
    import torch

    from plcli.exporters.split import split_checkpoint
    from plcli.runtime.cloud import CloudModel
    from plcli.runtime.cloud_tune import local_train_link
    from plcli.runtime.edge import EdgeModel
    from plcli.runtime.tune import Tuner, TuneConfig

    from .private_notes import demo_fact, write_corpus

    torch.set_num_threads(threads)
    train_path, held_path = write_corpus(work / "notes", seed)
    split_checkpoint(model_dir, work / "split", rank=rank, seed=seed, targets=targets, force=True)
    edge = EdgeModel(work / "split" / "edge")
    config = TuneConfig(seed=seed, save_every=0, **({"steps": steps} if steps else {}), **({"lr": pl_lr} if pl_lr else {}))
    tuner = Tuner(edge, local_train_link(work / "split" / "cloud", threads=threads), [train_path], config,
                  work / "adapter", eval_data=[held_path])
    arch, targets = edge.arch, edge.manifest.targets
    pl_params = arch.num_layers * len(targets) * rank * rank
    r_lora = lora_rank(pl_params, arch, targets)
    progress(f"data: {len(tuner.train.rows)} rows of {config.seq_len} tokens for training, {tuner.eval.target_count} "
             f"held-out tokens; {tuner.total_steps} steps of {config.batch_size * config.grad_accum} rows")

    cloud = CloudModel(work / "split" / "cloud", threads=threads)
    prompt, answer = demo_fact(seed)
    before = complete(edge, cloud, prompt, 6)
    started = time.perf_counter()
    summary = tuner.run()
    pl_seconds = time.perf_counter() - started
    edge.set_adapter(tuner.adapter_matrices())
    after = complete(edge, cloud, prompt, 6)
    progress(f"PrivateLoRA lr {config.lr:g}: held-out loss {summary.eval_loss_before:.4f} -> {summary.eval_loss_after:.4f}")

    from transformers import AutoModelForCausalLM

    base_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    base_torch_loss = torch_eval_loss(base_model, tuner)  # the split's loss before tuning must be this one
    lora = []
    for lr in lora_lrs:
        loss, params, seconds = train_lora(model_dir, tuner, r_lora, lr)
        lora.append({"lr": lr, "loss": loss, "perplexity": math.exp(loss), "params": params, "seconds": seconds})
        progress(f"LoRA r={r_lora} lr {lr:g}: held-out loss {loss:.4f}")
    best = min(lora, key=lambda x: x["loss"])

    base_ppl, pl_ppl, lora_ppl = summary.eval_perplexity_before, summary.eval_perplexity_after, best["perplexity"]
    share = (base_ppl - pl_ppl) / (base_ppl - lora_ppl) if base_ppl > lora_ppl else float("nan")
    loss_share = (summary.eval_loss_before - summary.eval_loss_after) / (summary.eval_loss_before - best["loss"])
    return {
        "model": str(model_dir), "seed": seed, "rank": rank, "targets": list(targets),
        "steps": tuner.total_steps, "batch_size": config.batch_size, "seq_len": config.seq_len, "warmup": config.warmup,
        "train_rows": len(tuner.train.rows), "heldout_tokens": tuner.eval.target_count,
        "base": {"perplexity": base_ppl, "loss": summary.eval_loss_before, "loss_in_transformers": base_torch_loss},
        "privatelora": {"perplexity": pl_ppl, "loss": summary.eval_loss_after, "lr": config.lr, "params": pl_params,
                        "seconds": pl_seconds, "tokens_per_s": summary.tokens_per_s},
        "lora": {**best, "rank": r_lora, "alpha": 2 * r_lora, "grid": lora},
        "share_of_lora_perplexity_reduction": share, "share_of_lora_loss_reduction": loss_share,
        "target_share": TARGET_SHARE, "meets_target": bool(share >= TARGET_SHARE),
        "demo": {"prompt": prompt, "expected": answer, "before": before, "after": after,
                 "learned": after.startswith(answer) and not before.startswith(answer)},
    }


def print_table(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"held-out perplexity on private notes · {r['steps']} steps · rank {r['rank']} · {','.join(r['targets'])}")
    for col in ("method", "trainable parameters", "learning rate", "held-out perplexity", "reduction"):
        table.add_column(col, justify="left" if col == "method" else "right")
    base = r["base"]["perplexity"]
    table.add_row("base (demo model)", "0", "-", f"{base:.2f}", "-")
    for name, d in (("PrivateLoRA (plcli tune, across the split)", r["privatelora"]),
                    (f"LoRA r={r['lora']['rank']} (peft, one process, best lr)", r["lora"])):
        table.add_row(name, f"{d['params']:,}", f"{d['lr']:g}", f"{d['perplexity']:.2f}", f"{base - d['perplexity']:.2f}")
    console = Console()
    console.print(table)
    console.print(f"PrivateLoRA reaches {r['share_of_lora_perplexity_reduction']:.0%} of LoRA's perplexity reduction "
                  f"(target {r['target_share']:.0%}): {'[green]met[/]' if r['meets_target'] else '[red]not met[/]'}")
    d = r["demo"]
    console.print(f"{d['prompt']!r} -> before {d['before']!r}, after {d['after']!r} (the notes say {d['expected']!r})")


def main(argv: list[str] | None = None) -> None:
    from .demo_model import demo_model_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="checkpoint (default: the demo model)")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--targets", type=lambda s: tuple(s.split(",")), default=DEFAULT_TARGETS,
                   help="adapted projections, as `plcli split --targets` (default q_proj,k_proj,v_proj)")
    p.add_argument("--steps", type=int, default=None, help="default: plcli tune's default epochs")
    p.add_argument("--lr", type=float, default=None, help="PrivateLoRA learning rate (default: plcli tune's)")
    p.add_argument("--lora-lrs", type=lambda s: tuple(float(x) for x in s.split(",")), default=LORA_LRS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="plcli-tune-quality-") as work:
        result = run(a.model or demo_model_dir(), Path(work), rank=a.rank, steps=a.steps, pl_lr=a.lr,
                     lora_lrs=a.lora_lrs, seed=a.seed, threads=a.threads, targets=a.targets, progress=(lambda *_: None) if a.json else print)
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)


if __name__ == "__main__":
    main()
