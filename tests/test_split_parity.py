"""The split reproduces transformers for every family and option the exporter accepts.

Each case is a tiny random checkpoint (hidden 64, 2 layers) split and then run
through `verify`: ONNX Runtime segments and a random non-zero M against
transformers' own model with `W + B M A` merged, prefill and cached decode.
Cases share shapes where they can, since exported graphs are cached by shape.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from plcli.exporters.verify import verify
from plcli.recipes.base import rope_frequencies
from plcli.runtime.bundle import BundleError, fingerprint, read_manifest
from plcli.runtime.plan import ALL_TARGETS

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
LINEAR_ROPE = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
YARN_ROPE = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
DYNAMIC_ROPE = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}
WINDOW = 8  # shorter than the verify prompts, so the window changes the logits

# name -> (checkpoint name, family, config overrides, split options). Each new combination of shape, rope,
# rank and targets costs a graph export, so the rope variants double as the target-set and rank variants.
CASES = {
    "llama-gqa": ("llama", "llama", {}, {"rank": 8}),
    "llama-tied": ("llama-tied", "llama", {"tie_word_embeddings": True}, {"rank": 8}),
    "llama-bias-all-targets": ("llama-bias", "llama", {"attention_bias": True, "mlp_bias": True},
                               {"rank": 8, "targets": ",".join(ALL_TARGETS)}),
    "llama-rope-llama3-o-rank-1": ("llama-rope-llama3", "llama", {"rope_parameters": LLAMA3_ROPE},
                                   {"rank": 1, "targets": "o_proj"}),
    "llama-rope-linear-down-rank-half": ("llama-rope-linear", "llama", {"rope_parameters": LINEAR_ROPE},
                                         {"rank": 32, "targets": "down_proj"}),
    "llama-rope-yarn-gate-up": ("llama-rope-yarn", "llama", {"rope_parameters": YARN_ROPE},
                                {"rank": 8, "targets": "gate_proj,up_proj"}),
    "llama-rope-dynamic": ("llama-rope-dynamic", "llama", {"rope_parameters": DYNAMIC_ROPE}, {"rank": 8}),
    # transformers' names for the same formulas as ours: swish is silu, gelu_new the tanh approximation.
    "llama-swish": ("llama-swish", "llama", {"hidden_act": "swish"}, {"rank": 8}),
    "llama-gelu-new": ("llama-gelu-new", "llama", {"hidden_act": "gelu_new"}, {"rank": 8}),
    "mistral-window": ("mistral-window", "mistral", {"sliding_window": WINDOW}, {"rank": 8}),
    "qwen2": ("qwen2", "qwen2", {}, {"rank": 8}),
    "qwen2-window": ("qwen2-window", "qwen2",
                     {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1}, {"rank": 8}),
}


def _case(checkpoint_factory, bundle_factory, name):
    ckpt_name, family, overrides, options = CASES[name]
    ckpt = checkpoint_factory(ckpt_name, family, **overrides)
    return ckpt, bundle_factory(ckpt, **options)


def _config(ckpt):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(ckpt, local_files_only=True)


def _hf_model(ckpt, **config_overrides):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, local_files_only=True, **config_overrides)
    return model.eval()


@pytest.mark.parametrize("name", list(CASES))
def test_split_matches_transformers(checkpoint_factory, bundle_factory, name):
    ckpt, bundle = _case(checkpoint_factory, bundle_factory, name)
    assert read_manifest(bundle / "cloud").architecture.family == CASES[name][1]
    results = verify(bundle, ckpt, decode_steps=3)
    assert len(results) == 3 * 4
    assert all(r.ok for r in results), [r for r in results if not r.ok]


@pytest.mark.parametrize("name, targets", [
    ("llama-gqa", ("q_proj", "k_proj", "v_proj")),
    ("llama-bias-all-targets", ALL_TARGETS),
    ("llama-rope-llama3-o-rank-1", ("o_proj",)),
    ("llama-rope-linear-down-rank-half", ("down_proj",)),
    ("llama-rope-yarn-gate-up", ("gate_proj", "up_proj")),
])
def test_bundle_records_rank_and_targets(checkpoint_factory, bundle_factory, name, targets):
    _, bundle = _case(checkpoint_factory, bundle_factory, name)
    rank = CASES[name][3]["rank"]
    for side in ("cloud", "edge"):
        m = read_manifest(bundle / side, side=side)
        assert (m.rank, m.targets) == (rank, targets)


def test_biases_reach_the_cloud_bundle(checkpoint_factory, bundle_factory):
    from safetensors import safe_open

    _, bundle = _case(checkpoint_factory, bundle_factory, "llama-bias-all-targets")
    arch = read_manifest(bundle / "cloud").architecture
    assert (arch.qkv_bias, arch.o_bias, arch.mlp_bias) == (True, True, True)
    with safe_open(str(bundle / "cloud" / "weights.safetensors"), framework="numpy") as f:
        keys = set(f.keys())
    for layer in range(arch.num_layers):
        assert {f"layers.{layer}.{t}.b" for t in ALL_TARGETS} <= keys


@pytest.mark.parametrize("name, rope", [
    ("llama-rope-llama3-o-rank-1", LLAMA3_ROPE), ("llama-rope-linear-down-rank-half", LINEAR_ROPE),
    ("llama-rope-yarn-gate-up", YARN_ROPE),
])
def test_rope_scaling_takes_effect(checkpoint_factory, bundle_factory, name, rope):
    ckpt, bundle = _case(checkpoint_factory, bundle_factory, name)
    config = _config(ckpt)
    head_dim = config.hidden_size // config.num_attention_heads
    default = 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    ours, scaling = rope_frequencies(config)
    used = _hf_model(ckpt).model.rotary_emb
    # The frequencies the split freezes into its graphs are the ones transformers runs with, and they are scaled.
    torch.testing.assert_close(ours, used.inv_freq, rtol=0, atol=0)
    assert float(scaling) == pytest.approx(float(used.attention_scaling))
    assert not torch.allclose(used.inv_freq, default)
    assert read_manifest(bundle / "cloud").architecture.rope_type == rope["rope_type"]


def test_dynamic_rope_runs_as_transformers_over_the_whole_context(checkpoint_factory, bundle_factory):
    """transformers rescales dynamic rope only past max_position_embeddings, where no plcli context goes."""
    from plcli.exporters.verify import merged_reference, random_adapter
    from plcli.runtime.cloud import CloudModel
    from plcli.runtime.edge import EdgeModel, forward

    ckpt, bundle = _case(checkpoint_factory, bundle_factory, "llama-rope-dynamic")
    cloud, edge = CloudModel(bundle / "cloud"), EdgeModel(bundle / "edge")
    edge.set_adapter(random_adapter(edge, seed=1))
    positions = cloud.arch.max_position_embeddings
    ids = np.random.default_rng(0).integers(0, edge.vocab_limit, (1, positions))
    got = forward(edge, cloud.new_session(), ids)
    model = merged_reference(ckpt, cloud, edge.adapter_matrices())
    with torch.no_grad():
        want = model(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, rope_frequencies(_config(ckpt))[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match=f"exceeds this session's limit of {positions}"):
        forward(edge, cloud.new_session(), np.zeros((1, positions + 1), np.int64))


@pytest.mark.parametrize("stored, tied", [("a head unlike the embedding", False), ("the head alone", True)])
def test_the_checkpoint_overrules_a_config_that_ties_the_embeddings(checkpoint_factory, bundle_factory, tmp_path,
                                                                    stored, tied):
    """transformers runs a tied config with the head a checkpoint stores, also as its embedding when it stores no other."""
    from safetensors.torch import load_file, save_file

    ckpt = shutil.copytree(_case(checkpoint_factory, bundle_factory, "llama-tied")[0], tmp_path / "ckpt")
    weights = load_file(ckpt / "model.safetensors")
    embed = weights["model.embed_tokens.weight"]
    if tied:
        weights["lm_head.weight"] = weights.pop("model.embed_tokens.weight")
    else:
        weights["lm_head.weight"] = torch.randn(embed.shape, generator=torch.Generator().manual_seed(1)) * 0.08
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})

    bundle = bundle_factory(ckpt, rank=8)
    assert read_manifest(bundle / "edge").architecture.tie_word_embeddings is tied
    results = verify(bundle, ckpt, decode_steps=2)
    assert results and all(r.ok for r in results), [r for r in results if not r.ok]


def _long_ids(vocab: int, n: int = 24) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).integers(0, vocab, size=(1, n)))


@pytest.mark.parametrize("name, windows, full_attention", [
    ("mistral-window", (WINDOW, WINDOW), {"sliding_window": None}),
    ("qwen2-window", (None, WINDOW), {"layer_types": ["full_attention", "full_attention"]}),
])
def test_sliding_window_matters(checkpoint_factory, bundle_factory, name, windows, full_attention):
    ckpt, bundle = _case(checkpoint_factory, bundle_factory, name)
    assert read_manifest(bundle / "cloud").architecture.sliding_windows == windows
    # transformers itself applies the window: the same weights without it give other logits past the window.
    ids = _long_ids(_config(ckpt).vocab_size)
    with torch.no_grad():
        windowed = _hf_model(ckpt)(ids).logits
        full = _hf_model(ckpt, **full_attention)(ids).logits
    torch.testing.assert_close(windowed[:, :WINDOW], full[:, :WINDOW])
    assert (windowed[:, WINDOW + 1:] - full[:, WINDOW + 1:]).abs().max() > 1e-2
    # ...and the parity check runs prompts longer than the window.
    assert max(r.tokens for r in verify(bundle, ckpt, decode_steps=1)) > WINDOW


def test_zero_m_verifies(llama_bundle, llama_checkpoint):
    results = verify(llama_bundle, llama_checkpoint, decode_steps=3, zero_m=True)
    assert results and all(r.ok for r in results), [r for r in results if not r.ok]


def test_fresh_split_reproduces_the_unmodified_model(llama_bundle, llama_checkpoint):
    """The bundle's own (zero) M, against transformers' untouched model: logits and greedy ids."""
    from plcli.runtime.cloud import CloudModel
    from plcli.runtime.edge import EdgeModel, forward

    edge, cloud = EdgeModel(llama_bundle / "edge"), CloudModel(llama_bundle / "cloud")
    assert all(not m.any() for m in edge.adapter_matrices().values())
    model = _hf_model(llama_checkpoint)
    prompt = _long_ids(edge.arch.vocab_size, 12)

    with torch.no_grad():
        want = model(prompt).logits.numpy()
    got = forward(edge, cloud.new_session(), prompt.numpy())
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
    last = forward(edge, cloud.new_session(), prompt.numpy(), last=True)  # what generation samples from
    assert last.shape == (1, 1, want.shape[2]) and np.abs(last - want[:, -1:]).max() / np.abs(want).max() < 1e-4

    new_tokens = 8
    model.generation_config.eos_token_id = None  # compare a fixed number of greedy steps
    with torch.no_grad():
        # The mask is explicit, or `generate` would mask the prompt's tokens that are the pad token.
        want_ids = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  pad_token_id=0)[0, prompt.shape[1]:].tolist()
    session, got_ids = cloud.new_session(), []
    logits = forward(edge, session, prompt.numpy())
    for _ in range(new_tokens):
        got_ids.append(int(logits[0, -1].argmax()))
        logits = forward(edge, session, np.asarray([[got_ids[-1]]], np.int64))
    assert got_ids == want_ids


def test_edge_and_cloud_are_paired_by_fingerprint(llama_bundle, llama_checkpoint, bundle_factory, tmp_path):
    from safetensors.numpy import load_file

    cloud, edge = read_manifest(llama_bundle / "cloud"), read_manifest(llama_bundle / "edge")
    assert cloud.ab_fingerprint == edge.ab_fingerprint
    weights = load_file(str(llama_bundle / "cloud" / "weights.safetensors"))
    ab = {k: v for k, v in weights.items() if ".A." in k or ".B." in k}
    assert cloud.ab_fingerprint == fingerprint(ab, source=cloud.source_hash)

    reseeded = bundle_factory(llama_checkpoint, rank=8, seed=1)
    other = read_manifest(reseeded / "cloud")
    assert other.ab_fingerprint == read_manifest(reseeded / "edge").ab_fingerprint
    assert other.ab_fingerprint != cloud.ab_fingerprint
    assert other.source_hash == cloud.source_hash

    # An edge from one split and a cloud from another are refused.
    mixed = tmp_path / "mixed"
    shutil.copytree(llama_bundle / "edge", mixed / "edge")
    shutil.copytree(reseeded / "cloud", mixed / "cloud")
    with pytest.raises(BundleError, match="not split together"):
        verify(mixed, llama_checkpoint, decode_steps=1)


def test_splits_of_two_checkpoints_of_one_shape_do_not_pair(llama_bundle, llama_checkpoint, checkpoint_factory,
                                                            bundle_factory, tmp_path):
    """A and B come from the seed and the shapes alone: another checkpoint of this shape, split with the same seed,
    draws the same A and B. Its edge (embedding, head, M) on this cloud's layers would generate garbage, so the
    fingerprint binds the checkpoint too, and the pair is refused like any other."""
    other = bundle_factory(checkpoint_factory("llama-other-weights", seed=1), rank=8)
    ours, theirs = read_manifest(llama_bundle / "edge"), read_manifest(other / "edge")
    assert ours.source_hash != theirs.source_hash and ours.seed == theirs.seed
    assert ours.ab_fingerprint != theirs.ab_fingerprint
    mixed = tmp_path / "mixed"
    shutil.copytree(other / "edge", mixed / "edge")
    shutil.copytree(llama_bundle / "cloud", mixed / "cloud")
    with pytest.raises(BundleError, match="not split together"):
        verify(mixed, llama_checkpoint, decode_steps=1)


def test_split_is_reproducible_from_seed(llama_bundle, llama_checkpoint, tmp_path):
    from plcli.exporters.split import split_checkpoint

    again = split_checkpoint(llama_checkpoint, tmp_path / "again", rank=8)
    assert again.cloud.ab_fingerprint == read_manifest(llama_bundle / "cloud").ab_fingerprint
    assert json.loads(again.edge.to_json()) == json.loads(read_manifest(llama_bundle / "edge").to_json())


@pytest.mark.parametrize("layout", ["sharded", "bfloat16", "pytorch_model.bin"])
def test_checkpoints_as_they_ship_split_to_what_transformers_computes(llama_checkpoint, llama_bundle, bundle_factory,
                                                                      tmp_path, layout):
    """Real checkpoints come in shards with an index, in bfloat16, or, older ones, as `pytorch_model.bin`."""
    from safetensors.numpy import load_file

    model, ckpt = _hf_model(llama_checkpoint), tmp_path / layout
    if layout == "sharded":
        model.save_pretrained(ckpt, max_shard_size="100KB")
        assert len(list(ckpt.glob("model-*.safetensors"))) > 1 and (ckpt / "model.safetensors.index.json").is_file()
    elif layout == "bfloat16":
        model.to(torch.bfloat16).save_pretrained(ckpt)
        assert _config(ckpt).dtype == torch.bfloat16
    else:
        ckpt.mkdir()
        shutil.copy(llama_checkpoint / "config.json", ckpt)
        torch.save(model.state_dict(), ckpt / "pytorch_model.bin")
    for f in llama_checkpoint.glob("tokenizer*"):
        shutil.copy(f, ckpt)

    bundle = bundle_factory(ckpt, rank=8)
    results = verify(bundle, ckpt, decode_steps=2)
    assert results and all(r.ok for r in results), [r for r in results if not r.ok]
    # The same weights, however stored, give the same bundle; bfloat16 ones, the same rounded to bfloat16.
    got, want = (load_file(str(b / "cloud" / "weights.safetensors")) for b in (bundle, llama_bundle))
    assert got.keys() == want.keys()
    for name in want:
        expected = want[name]
        if layout == "bfloat16" and ".A." not in name and ".B." not in name:  # A and B are drawn by the split, in fp32
            expected = torch.from_numpy(expected).to(torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(got[name], expected, err_msg=name)
