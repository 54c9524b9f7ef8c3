"""What a split writes: manifests, which weights go to which side, A/B scale, and what `inspect` reports."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from plcli.exporters.split import draw_adapter_pair
from plcli.runtime.bundle import Manifest, read_manifest
from plcli.runtime.plan import ALL_TARGETS
from plcli.runtime.summary import summarize

# Which cut each target's input belongs to; targets of one stage share a round trip.
STAGE_OF = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
            "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_out"}


# name -> (checkpoint name, config overrides, split options). "all-targets" is also a parity case in
# test_split_parity.py, with the same names and options, so one session splits it once.
SPLITS = {
    "default": ("llama", {}, {"rank": 8}),
    "tied": ("llama-tied", {"tie_word_embeddings": True}, {"rank": 8}),
    "all-targets": ("llama-bias", {"attention_bias": True, "mlp_bias": True}, {"rank": 8, "targets": ",".join(ALL_TARGETS)}),
}


@pytest.fixture(params=list(SPLITS))
def split(request, checkpoint_factory, bundle_factory):
    """(checkpoint dir, split output dir)."""
    name, overrides, options = SPLITS[request.param]
    ckpt = checkpoint_factory(name, **overrides)
    return ckpt, bundle_factory(ckpt, **options)


@pytest.fixture
def bundle(split):
    return split[1]


def _weights(bundle, side) -> dict[str, np.ndarray]:
    return load_file(str(bundle / side / "weights.safetensors"))


def test_manifest_round_trips(bundle):
    for side in ("cloud", "edge"):
        m = read_manifest(bundle / side, side=side)
        assert Manifest.from_dict(json.loads(m.to_json())) == m
        assert (bundle / side / "manifest.json").read_text() == m.to_json()


def test_edge_holds_no_decoder_weights(bundle):
    m = read_manifest(bundle / "edge")
    arch = m.architecture
    heads = {"lm_head.w", "norm"} | (set() if arch.tie_word_embeddings else {"embed_tokens"})
    ms = {f"layers.{layer}.{t}.M" for layer in range(arch.num_layers) for t in m.targets}
    weights = _weights(bundle, "edge")
    assert set(weights) == heads | ms
    for k in ms:
        assert weights[k].shape == (m.rank, m.rank) and not weights[k].any()  # M starts at zero, as in the paper
    assert [p.name for p in (bundle / "edge" / "graphs").iterdir()] == ["head.onnx"] and set(m.graphs) == {"head"}


def test_cloud_holds_no_embedding_or_head(bundle):
    arch = read_manifest(bundle / "cloud").architecture
    weights = _weights(bundle, "cloud")
    assert all(k.startswith("layers.") for k in weights)
    assert all(arch.vocab_size not in w.shape for w in weights.values())
    assert not (bundle / "cloud" / "tokenizer").exists()


def test_weights_split_without_loss(split):
    """Cloud + edge = the checkpoint's parameters + the adapter's A, B and M."""
    ckpt, bundle = split
    m = read_manifest(bundle / "cloud")
    arch = m.architecture
    source = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        source.update(load_file(str(f)))
    adapter = sum(
        m.rank * sum(arch.target_dims(t)) + m.rank * m.rank for _ in range(arch.num_layers) for t in m.targets
    )
    cloud, edge = _weights(bundle, "cloud"), _weights(bundle, "edge")
    assert sum(w.size for w in cloud.values()) + sum(w.size for w in edge.values()) == sum(w.size for w in source.values()) + adapter
    np.testing.assert_array_equal(edge["lm_head.w"].T, source["model.embed_tokens.weight" if arch.tie_word_embeddings else "lm_head.weight"])
    np.testing.assert_array_equal(cloud["layers.1.q_proj.w"].T, source["model.layers.1.self_attn.q_proj.weight"])


def test_bundle_holds_the_drawn_adapter_pair(llama_bundle):
    m = read_manifest(llama_bundle / "cloud")
    arch, r = m.architecture, m.rank
    cloud = _weights(llama_bundle, "cloud")
    for layer in range(arch.num_layers):
        for i, t in enumerate(m.targets):
            a, b = draw_adapter_pair(m.seed, layer, t, *arch.target_dims(t), r)
            np.testing.assert_array_equal(cloud[f"layers.{layer}.A.attn_in"][:, i * r:(i + 1) * r], a.T)
            np.testing.assert_array_equal(cloud[f"layers.{layer}.B.{t}"], b.T)


def test_adapter_pair_has_unit_gain():
    """RMS(A x) ~ RMS(x) and RMS(B y) ~ RMS(y): the adapter path's scale is M's alone."""
    rng = np.random.default_rng(0)
    d, r, n = 1024, 64, 256
    for layer, target in ((0, "q_proj"), (3, "down_proj")):
        a, b = draw_adapter_pair(7, layer, target, d, d, r)
        assert a.shape == (r, d) and b.shape == (d, r)
        x = rng.standard_normal((d, n)) * 3.0
        y = rng.standard_normal((r, n)) * 0.5
        assert _rms(a @ x) / _rms(x) == pytest.approx(1.0, abs=0.05)
        assert _rms(b @ y) / _rms(y) == pytest.approx(1.0, abs=0.05)
    # Reproducible from (seed, layer, target), independent across them.
    same = draw_adapter_pair(7, 0, "q_proj", d, d, r)
    np.testing.assert_array_equal(same[0], draw_adapter_pair(7, 0, "q_proj", d, d, r)[0])
    for other in (draw_adapter_pair(8, 0, "q_proj", d, d, r), draw_adapter_pair(7, 1, "q_proj", d, d, r),
                  draw_adapter_pair(7, 0, "k_proj", d, d, r)):
        assert abs(np.corrcoef(same[0].ravel(), other[0].ravel())[0, 1]) < 0.05


def _rms(v: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(v, dtype=np.float64))))


def test_summary_counts(bundle, tmp_path):
    # An adapter that `tune` put at its default place, inside the edge bundle, is no part of the bundle's size.
    bundle = shutil.copytree(bundle, tmp_path / "bundle")
    (bundle / "edge" / "adapter" / "training").mkdir(parents=True)
    (bundle / "edge" / "adapter" / "training" / "moments.safetensors").write_bytes(b"\0" * 4096)
    s = summarize(bundle)
    m = read_manifest(bundle / "cloud")
    arch = m.architecture
    assert s["paired"] is True
    assert (s["family"], s["layers"], s["hidden_size"], s["rank"], s["targets"]) == (
        arch.family, arch.num_layers, arch.hidden_size, m.rank, list(m.targets))
    for side in ("cloud", "edge"):
        got = s["sides"][side]
        assert got["parameters"] == sum(w.size for w in _weights(bundle, side).values())
        assert got["weight_bytes"] == (bundle / side / "weights.safetensors").stat().st_size
        assert got["bundle_bytes"] == sum(p.stat().st_size for p in (bundle / side).rglob("*")
                                          if p.is_file() and p.relative_to(bundle / side).parts[0] != "adapter")
        assert got["ab_fingerprint"] == m.ab_fingerprint
    cuts = len({STAGE_OF[t] for t in m.targets})
    for dtype, size in (("float32", 4), ("float16", 2)):
        per_token = s["per_token"][dtype]
        # Up: the embedding, then every cut's M A x; down: every cut's A x, then the last hidden state.
        expected = (arch.hidden_size + arch.num_layers * len(m.targets) * m.rank) * size
        assert (per_token["bytes_up"], per_token["bytes_down"]) == (expected, expected)
        assert per_token["round_trips"] == arch.num_layers * cuts + 1


def test_inspect_json_reports_the_summary(checkpoint_factory, bundle_factory):
    from typer.testing import CliRunner

    from plcli.cli import app

    name, overrides, options = SPLITS["all-targets"]
    all_targets_bundle = bundle_factory(checkpoint_factory(name, **overrides), **options)
    runner = CliRunner()
    whole = runner.invoke(app, ["inspect", str(all_targets_bundle), "--json"])
    assert whole.exit_code == 0, whole.output
    assert json.loads(whole.stdout) == summarize(all_targets_bundle)
    assert json.loads(whole.stdout)["per_token"]["float32"]["round_trips"] == 2 * 4 + 1
    one = json.loads(runner.invoke(app, ["inspect", str(all_targets_bundle / "edge"), "--json"]).stdout)
    assert set(one["sides"]) == {"edge"} and "paired" not in one
    table = runner.invoke(app, ["inspect", str(all_targets_bundle)])
    assert table.exit_code == 0
    for text in ("cloud", "edge", "per generated token", f"{summarize(all_targets_bundle)['sides']['edge']['parameters']:,}"):
        assert text in table.stdout


EDGE_WITHOUT_TORCH = """
import json, sys
import numpy as np
sys.modules["torch"] = None  # any `import torch` now fails
from plcli.runtime.edge import EdgeModel
from plcli.runtime import generate  # noqa: F401  (the edge's generation loop imports too)
edge = EdgeModel(sys.argv[1])
ids = np.asarray([[1, 2, 3, 4]], np.int64)
embeds = edge.embed(ids)
r = edge.manifest.rank
edge.set_adapter({k: np.eye(r, dtype=np.float32) * 2 for k in edge.adapter_matrices()})
ax = np.ones((1, 4, 3, r), np.float32)
madx = edge.apply_adapter(0, "attn_in", ax)
logits = edge.logits(embeds)
text_ids = edge.tokenizer("the cloud runs the decoder")["input_ids"]
assert not any(name == "torch" or name.startswith("torch.") for name, mod in sys.modules.items() if mod is not None)
json.dump({"embeds": embeds.tolist(), "madx": madx.tolist(), "logits": logits.tolist(), "text_ids": text_ids}, sys.stdout)
"""


def test_edge_runs_without_torch(llama_bundle):
    done = subprocess.run([sys.executable, "-c", EDGE_WITHOUT_TORCH, str(llama_bundle / "edge")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    edge = _weights(llama_bundle, "edge")
    eps = read_manifest(llama_bundle / "edge").architecture.rms_norm_eps
    embeds = np.asarray(out["embeds"], np.float32)
    np.testing.assert_array_equal(embeds, edge["embed_tokens"][[[1, 2, 3, 4]]])
    np.testing.assert_array_equal(np.asarray(out["madx"]), np.full((1, 4, 3, 8), 2.0))
    normed = embeds / np.sqrt(np.mean(embeds.astype(np.float64) ** 2, -1, keepdims=True) + eps) * edge["norm"]
    want = normed @ edge["lm_head.w"]
    np.testing.assert_allclose(np.asarray(out["logits"]), want, rtol=0, atol=1e-4 * np.abs(want).max())
    assert len(out["text_ids"]) >= 2
