"""`plcli bench`: it runs on a tiny model and reports every field. Speed itself is never asserted here."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from plcli.cli import app
from plcli.recipes.bench_decode import LINK_PRESETS, parse_link, transformers_run
from plcli.runtime.cpus import SPIN_US, usable_cpus
from plcli.runtime.estimate import Link

DECODE_ROW = {"method", "decode_tokens_per_s", "ttft_s", "greedy_ids_identical"}
SPLIT_ROW = DECODE_ROW | {"bytes_up_per_token", "bytes_down_per_token", "round_trips_per_token"}


def run_cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def test_bench_decode_reports_every_method_and_ratio(llama_checkpoint, llama_bundle, tmp_path):
    code, out, err = run_cli("bench", "decode", llama_checkpoint, "--bundles", llama_bundle, "--new-tokens", 4,
                             "--prompt-len", 8, "--rounds", 1, "--float16", "--link", "up=50,down=80,rtt=1",
                             "--plot", tmp_path / "rank.png", "--edges", "3,2", "--pin", "--json")
    assert code == 0, err
    r = json.loads(out)
    rows = {row["method"]: row for row in r["rows"]}
    assert set(rows) == {"transformers", "onnx", "split", "split-link", "split-fp16"}
    for name, row in rows.items():
        assert set(row) == (SPLIT_ROW if name.startswith("split") else DECODE_ROW), name
        assert row["decode_tokens_per_s"] > 0 and row["ttft_s"] > 0
    # With M = 0 the split is the checkpoint: same greedy ids as transformers, in every place.
    assert all(row["greedy_ids_identical"] for row in rows.values())
    assert rows["split"]["round_trips_per_token"] == 3  # two layers, one cut each, and the last hidden state
    assert rows["split-fp16"]["bytes_up_per_token"] < rows["split"]["bytes_up_per_token"]
    assert set(r["ratios"]) == {"split_vs_transformers", "split_vs_onnx", "split_link_vs_transformers", "split_vs_onnx_ceiling"}
    assert r["empty_round_trip_ms"] > 0 and 0 < r["ratios"]["split_vs_onnx_ceiling"] < 1
    assert r["link"] == {"up_mbps": 50, "down_mbps": 80, "rtt_ms": 1} and r["model"]["rank"] == 8
    assert r["low_latency"] is False and r["huge_pages"] is True
    # --pin: where a core is to spare, the cloud computes on the first, polling; all else runs on the others.
    cpus = sorted(usable_cpus())
    placed = None if len(cpus) < 2 else {"cloud_cpus": cpus[:1], "other_cpus": cpus[1:], "spin_us": SPIN_US}
    assert r["placement"] == placed and all(e["placement"] == placed for e in r["edges"])
    assert (tmp_path / "rank.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Two, then three edges at once on one cloud (the plot's second panel), each edge with its solo ids.
    assert [e["edges"] for e in r["edges"]] == [2, 3]
    for edges in r["edges"]:
        assert edges["identical"] and edges["aggregate_tokens_per_s"] > 0 and edges["ratio"] > 0
        assert edges["rounds"] == 1 and len(edges["ratio_per_round"]) == 1
        # /proc counts CPU in clock ticks: a tiny run may take none of them.
        assert (edges["edge_cpu_ms_per_token"] > 0 and edges["cloud_cpu_ms_per_token_alone"] >= 0
                and edges["cloud_cpu_ms_per_token"] >= 0)


def test_bench_decode_table_names_every_method_and_the_ceiling(llama_checkpoint, llama_bundle):
    code, out, err = run_cli("bench", "decode", llama_checkpoint, "--bundles", llama_bundle, "--new-tokens", 2,
                             "--prompt-len", 4, "--rounds", 1, "--edges", 2)
    assert code == 0, err
    for text in ("transformers", "onnx", "split-link", "split / onnx", "an empty round trip to the cloud takes",
                 "were each of the 3 per token that cheap", "concurrent edges on one cloud", "ids as alone"):
        assert text in " ".join(out.split()), text
    assert "cloud compute on cores" not in out  # without --pin, every thread runs wherever the scheduler puts it


def test_bench_reference_goes_on_past_an_end_of_text_token_as_the_split_does(llama_checkpoint, llama_bundle):
    import torch
    from transformers import AutoModelForCausalLM

    from plcli.runtime.cloud import CloudModel
    from plcli.runtime.edge import EdgeModel
    from plcli.runtime.generate import Sampling, generate

    edge, cloud = EdgeModel(llama_bundle / "edge"), CloudModel(llama_bundle / "cloud")
    prompt = [5, 9, 2, 7]
    want = list(generate(edge, cloud.new_session(), prompt, Sampling(max_new_tokens=4, ignore_eos=True)))
    model = AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32, local_files_only=True)
    model.generation_config.eos_token_id = want[1]  # greedy picks the end-of-text token second, as trained models do
    assert transformers_run(model, prompt, 4, edge.vocab_limit).ids == want


def test_bench_tune_reports_both_methods_and_their_losses_agree(llama_checkpoint, llama_bundle):
    code, out, err = run_cli("bench", "tune", llama_checkpoint, "--bundles", llama_bundle, "--steps", 2, "--batch-size", 2,
                             "--seq-len", 16, "--rounds", 1, "--json")
    assert code == 0, err
    r = json.loads(out)
    assert [row["method"] for row in r["rows"]] == ["one-process", "split"]
    assert all(row["tokens_per_s"] > 0 and row["steps"] == 2 for row in r["rows"])
    assert r["losses_agree"] and r["ratios"]["split_vs_one_process"] > 0 and r["low_latency"] is False

    code, out, err = run_cli("bench", "tune", llama_checkpoint, "--bundles", llama_bundle, "--steps", 1, "--batch-size", 1,
                             "--seq-len", 8, "--rounds", 1)
    assert code == 0, err
    for text in ("one-process", "split", "training tok/s", "losses agree"):
        assert text in out, text


def test_links_parse_and_bad_input_is_one_line_exit_2(llama_checkpoint, llama_bundle, checkpoint_factory, bundle_factory,
                                                      tmp_path):
    assert parse_link("5g") == LINK_PRESETS["5g"] == Link(up_mbps=60, down_mbps=100, rtt_ms=20)
    assert parse_link("up=1.5,down=3,rtt=40") == Link(1.5, 3, 40)
    for args, message in [
        (["--link", "up=1"], "--link"),
        (["--link", "up=1,down=0"], "must be positive"),
        # NaN passed every comparison and an infinite wait overflowed time.sleep: internal errors, after the split
        (["--rank", 8, "--link", "up=nan,down=1,rtt=1"], "must be positive finite"),
        (["--rank", 8, "--link", "up=1,down=inf,rtt=1"], "must be positive finite"),
        (["--rank", 8, "--link", "up=1,down=1,rtt=1e300"], "rtt 0 to 60000 ms"),
        (["--rank", "8,x"], "--rank"),
        (["--bundles", tmp_path, "--rank", "8,16"], "--bundles fixes the rank"),
        (["--bundles", llama_bundle, "--rank", 8], "--bundles fixes the rank"),  # was silently ignored
        (["--new-tokens", 1], "at least 2"),
        (["--edges", 1], "--edges 1 is out of range"),
        (["--edges", "0,4"], "--edges 0,4 is out of range"),
        (["--edges", "2,x"], "--edges '2,x'"),
        # the small Llama holds 256 positions; the bundle's count when one is given
        (["--rank", 8, "--prompt-len", 100000],
         "--prompt-len 100000 and --new-tokens 64 need a context of 100063 tokens; the model holds 256"),
        (["--prompt-len", 200, "--new-tokens", 58], "need a context of 257 tokens; the model holds 256"),
        (["--bundles", llama_bundle, "--prompt-len", 256, "--new-tokens", 2], "need a context of 257 tokens"),
    ]:
        code, _, err = run_cli("bench", "decode", llama_checkpoint, *args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
    # A split of another checkpoint of the same shape ran, and every method's ids "differed" from transformers'.
    other = bundle_factory(checkpoint_factory("llama-other-weights", seed=1), rank=8)
    code, _, err = run_cli("bench", "decode", llama_checkpoint, "--bundles", other)
    assert code == 2 and f"--bundles {other} was not split from {llama_checkpoint}" in err, err
    code, _, err = run_cli("bench", "tune", tmp_path / "nothing")
    assert code == 2 and "no such checkpoint" in err
    code, _, err = run_cli("bench", "tune", llama_checkpoint, "--bundles", llama_bundle, "--rank", 8)
    assert code == 2 and "--bundles fixes the rank" in err, err
    code, _, err = run_cli("bench", "tune", llama_checkpoint, "--seq-len", 257)
    assert code == 2 and "--seq-len 257 is out of range: the model holds 256 tokens" in err, err




def test_bench_sessions_alternates_rounds_and_reports_each(llama_bundle):
    from plcli.recipes.bench_sessions import aggregate_decode

    r = aggregate_decode(llama_bundle / "cloud", llama_bundle / "edge", edges=2, new_tokens=3, prompt_len=4, rounds=2)
    assert r["edges"] == 2 and r["rounds"] == 2 and len(r["ratio_per_round"]) == 2 and all(x > 0 for x in r["ratio_per_round"])
    # Both edges, alone and together, in both rounds: the ids of their first solo run.
    assert r["identical"] and r["edge_cpu_ms_per_token"] > 0


def test_bench_group_cost_runs_every_group_size(llama_bundle):
    from plcli.recipes.bench_sessions import group_cost
    from plcli.runtime.bundle import read_manifest

    segments = len(read_manifest(llama_bundle / "cloud", side="cloud").plan.segments)
    rows = group_cost(llama_bundle / "cloud", sessions=3, new_tokens=2, prompt_len=3, group_sizes=(1, 3))
    assert [r["group"] for r in rows] == [1, 3]
    for r in rows:
        # Every session's every segment answered, in groups no larger than asked and, sessions in lockstep, that large.
        assert r["session_steps"] == 3 * 2 * segments and r["largest_group"] == r["group"]
        assert r["cpu_us_per_session_step"] > 0 and r["cpu_ms_per_token"] > 0


def test_measure_split_reports_a_first_split_of_a_small_shape(tmp_path, capsys):
    from plcli.recipes.measure_split import measure, print_table
    from plcli.runtime.bundle import read_manifest

    shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=160, vocab_size=256, max_position_embeddings=128)
    said = []
    r = measure(tmp_path, 8, "q_proj,v_proj", said.append, shape=shape)
    assert said and r["shape"] == shape and r["rank"] == 8 and r["targets"] == ["q_proj", "v_proj"]
    assert r["split_wall_seconds"] >= r["split_reported_seconds"] > 0 and r["split_cpu_seconds"] > 0
    assert r["split_peak_rss_bytes"] > r["checkpoint_bytes"] > 0  # the child loads torch, and the weights
    cloud = read_manifest(tmp_path / "split" / "cloud", side="cloud")
    assert r["cloud"]["parameters"] > r["edge"]["parameters"] > 0 and cloud.targets == ("q_proj", "v_proj")
    assert r["per_token"]["float32"]["round_trips"] == len(cloud.plan.segments)
    assert any((tmp_path / "cache").iterdir())  # the split ran with its own, first-use graph cache
    print_table(r)
    assert "peak resident memory" in capsys.readouterr().out
