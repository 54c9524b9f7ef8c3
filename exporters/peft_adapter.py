"""`plcli export-peft`: a tuned split -> a standard peft LoRA adapter, for the rest of the ecosystem.

`W x + B M A x` is a LoRA update with `lora_B = B` ([out, r]) and
`lora_A = M A` ([r, in]) at scaling 1 (`lora_alpha = r`), so
`PeftModel.from_pretrained(base, PEFT_DIR)`, vLLM or transformers reproduce the
split model exactly. This is the one place where M meets A and B: the result
is the personalised model, and it is as private as the user keeps it.

Lives in exporters/ (not runtime/) because it writes a Hugging Face format and
needs the model family's module names; it reads bundles through the runtime.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from plcli.recipes.base import families
from plcli.runtime.bundle import (WEIGHTS, BundleError, atomic_directory, read_manifest, read_pair, refuse_overlap,
                                  reported_writes)
from plcli.runtime.edge import load_adapter
from plcli.runtime.ort import read_weights

CONFIG = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_LAYOUT = {CONFIG: None, WEIGHTS_FILE: None}  # all that --force may replace in --out


def peft_lora(cloud_dir: str | Path, edge_dir: str | Path, adapter_dir: str | Path,
              base_model: str | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """(adapter_config, tensors) of the peft LoRA adapter equal to the split with this adapter's M."""
    cloud, edge = read_pair(cloud_dir, edge_dir)
    family = next((f for f in families() if f.name == cloud.architecture.family), None)
    if family is None:  # its module names in transformers are what the adapter must use
        raise BundleError(f"{cloud_dir}: family {cloud.architecture.family!r} is none that plcli splits "
                          f"({', '.join(f.name for f in families())})")
    m = load_adapter(adapter_dir, edge)
    weights = read_weights(Path(cloud_dir) / WEIGHTS)
    r = cloud.rank
    tensors: dict[str, np.ndarray] = {}
    for layer in range(cloud.architecture.num_layers):
        for cut in cloud.plan.cuts:
            a_stack = weights[f"layers.{layer}.A.{cut.stage}"]  # [in, targets * r]
            for i, t in enumerate(cut.targets):
                key = f"layers.{layer}.{t}.M"
                if key not in m or m[key].shape != (r, r):
                    raise BundleError(f"{adapter_dir}: adapter lacks {key} of shape ({r}, {r})")
                a = a_stack[:, i * r:(i + 1) * r].T.astype(np.float64)  # [r, in]
                module = "base_model.model." + family.hf_name(layer, f"{t}.w").removesuffix(".weight")
                tensors[f"{module}.lora_A.weight"] = (m[key].astype(np.float64) @ a).astype(np.float32)
                tensors[f"{module}.lora_B.weight"] = np.ascontiguousarray(weights[f"layers.{layer}.B.{t}"].T)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": r,  # scaling = lora_alpha / r = 1: the split adds B M A x unscaled
        "lora_dropout": 0.0,
        "target_modules": list(cloud.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    return config, tensors


def export_peft(cloud_dir: str | Path, edge_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path,
                *, base_model: str | None = None, force: bool = False) -> Path:
    from safetensors.numpy import save_file

    # --force replaces --out whole: an --out that is, or holds, what is read here would be deleted by it.
    refuse_overlap(out_dir, [("the cloud bundle", cloud_dir), ("the edge bundle", edge_dir), ("the adapter", adapter_dir)])
    config, tensors = peft_lora(cloud_dir, edge_dir, adapter_dir, base_model)
    edge = read_manifest(edge_dir, side="edge")
    out_dir = Path(out_dir)
    with reported_writes(f"cannot write the peft adapter to {out_dir}"), \
            atomic_directory(out_dir, replace=force, layout=PEFT_LAYOUT) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={
            "format": "pt", "plcli_ab_fingerprint": edge.ab_fingerprint, "plcli_source_hash": edge.source_hash,
        })
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir
