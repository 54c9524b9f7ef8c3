"""`plcli estimate`: the paper's Table 3 within 10%, each term following its flag, bad flags refused."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from plcli.cli import app
from plcli.runtime.estimate import DEFAULT_CLOUD_EFFICIENCY, PAPER_CLOUD

runner = CliRunner()
TABLE3_PRIVATELORA = {"llama2-7b": 27.1, "llama2-13b": 20.5, "llama-30b": 12.9}
TABLE3_CLOUD_ONLY = {"llama2-7b": 37.2, "llama2-13b": 27.8, "llama-30b": 16.7}


def strict_json(text: str):
    """JSON as a strict parser reads it: Python's NaN and Infinity are not JSON."""

    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def run_json(*args: str) -> dict:
    result = runner.invoke(app, ["estimate", *args, "--json"])
    assert result.exit_code == 0, result.output
    return strict_json(result.stdout)


def row(report: dict, method: str, model: str | None = None) -> dict:
    return next(r for r in report["rows"] if r["method"] == method and model in (None, r["model"]))


@pytest.fixture(scope="module")
def paper() -> dict:
    return run_json("--paper")


def test_paper_privatelora_within_ten_percent_of_table3(paper):
    for r in paper["rows"]:
        assert {"model", "method", "tps_estimated", "tps_paper"} <= set(r)
    for model, expected in TABLE3_PRIVATELORA.items():
        r = row(paper, "privatelora", model)
        assert r["tps_paper"] == expected
        assert abs(r["tps_estimated"] / expected - 1) < 0.10, r
        # the paper's cloud term is its measured cloud-only rate, taken as given
        assert row(paper, "cloud-only", model)["tps_estimated"] == pytest.approx(TABLE3_CLOUD_ONLY[model], abs=1e-3)
    assert row(paper, "device-only", "llama2-7b")["tps_paper"] == 8.1
    assert row(paper, "device-only", "llama2-13b")["tps_paper"] is None


def test_paper_traffic_and_head_by_hand(paper):
    seven_b = next(m for m in paper["models"] if m["model"] == "llama2-7b")
    # embedding (4096) + 32 layers x q, k, v x rank 128, 16 bits each, each way; 32 cuts + 1
    assert seven_b["bits_up"] == seven_b["bits_down"] == (4096 + 32 * 3 * 128) * 16
    assert seven_b["round_trips"] == 33
    pl = row(paper, "privatelora", "llama2-7b")["ms_per_token"]
    assert pl["transfer"] == pytest.approx(262144 / 60e6 * 1e3 + 262144 / 100e6 * 1e3, rel=1e-4)
    head_bandwidth_ms = 32000 * 4096 * 2 / 42.7e9 * 1e3
    assert head_bandwidth_ms < pl["head"] < head_bandwidth_ms * 1.05  # plus its FLOPs
    assert pl["latency"] == 0


@pytest.mark.parametrize("columns", ["100", "80", "40"])
def test_paper_human_output_names_its_sources(columns):
    # 80 is what rich assumes where no terminal is attached; none may cut a number of the tables short.
    result = runner.invoke(app, ["estimate", "--paper"], env={"COLUMNS": columns})
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "paper's measured cloud-only rates" in " ".join(out.split())
    assert "27.1" in out and "RTT 20 ms" in out and "RTT 50 ms" in out
    assert "165.50" in out and "416.14" in out and "paper" in out and "…" not in out


def pl_terms(*args: str) -> dict:
    return row(run_json("--model", "llama2-7b", *args), "privatelora")["ms_per_token"]


def test_link_terms_follow_their_flags():
    base = pl_terms()
    faster_up = pl_terms("--up-mbps", "120")
    assert faster_up["transfer"] < base["transfer"]
    assert base["transfer"] - faster_up["transfer"] == pytest.approx(262144 / 120e6 * 1e3, rel=1e-4)
    assert pl_terms("--bits", "8")["transfer"] == pytest.approx(base["transfer"] / 2, rel=1e-4)
    assert pl_terms("--rtt-ms", "20")["latency"] == pytest.approx((32 + 1) * 20)
    # o_proj adds a second cut per layer: 2 x 32 + 1 exchanges
    assert pl_terms("--rtt-ms", "20", "--targets", "q_proj,k_proj,v_proj,o_proj")["latency"] == pytest.approx((2 * 32 + 1) * 20)


def test_compute_terms_follow_their_flags():
    base = run_json("--model", "llama2-7b")
    pl = row(base, "privatelora")["ms_per_token"]
    assert row(run_json("--model", "llama2-7b", "--rank", "256"), "privatelora")["ms_per_token"]["adapter"] == pytest.approx(4 * pl["adapter"], rel=1e-3)
    faster_device = run_json("--model", "llama2-7b", "--device-bandwidth-gbs", "85.4")
    assert row(faster_device, "privatelora")["ms_per_token"]["head"] < pl["head"]
    assert row(faster_device, "device-only")["tps_estimated"] > row(base, "device-only")["tps_estimated"]
    assert pl_terms("--vocab", "64000")["head"] == pytest.approx(2 * pl["head"], rel=1e-3)
    assert pl_terms("--cloud-tps", "50")["cloud"] == pytest.approx(20.0)
    slower_cloud = pl_terms("--cloud-efficiency", "0.2")["cloud"]
    assert 1.9 * pl["cloud"] < slower_cloud < 2 * pl["cloud"]  # bandwidth part doubles, FLOP part does not
    assert row(run_json("--model", "llama2-7b", "--device-only-bits", "8"), "device-only")["tps_estimated"] < row(base, "device-only")["tps_estimated"]



def test_the_cloud_reads_each_targets_a_and_b_at_that_projections_own_size():
    """A is r x in and B is out x r: the MLP's projections read the intermediate size, not the hidden size, twice."""
    layers, hidden, intermediate, rank = 32, 4096, 11008, 128
    qkv = pl_terms("--rank", str(rank), "--cloud-tflops", "1e9")["cloud"]  # no FLOP term: bytes alone
    for added, (d_in, d_out) in {"o_proj": (hidden, hidden), "gate_proj": (hidden, intermediate),
                                 "down_proj": (intermediate, hidden)}.items():
        more = pl_terms("--rank", str(rank), "--cloud-tflops", "1e9", "--targets", f"q_proj,k_proj,v_proj,{added}")
        bytes_read = layers * rank * (d_in + d_out) * 2  # fp16
        seconds = bytes_read / (PAPER_CLOUD.bandwidth_gbs * 1e9 * DEFAULT_CLOUD_EFFICIENCY)
        assert more["cloud"] - qkv == pytest.approx(seconds * 1e3, abs=1.1e-4), added  # the JSON rounds to 1e-4 ms


def test_mlp_targets_without_an_intermediate_size_are_refused():
    result = runner.invoke(app, ["estimate", "--hidden", "4096", "--layers", "32", "--vocab", "32000", "--params",
                                 "6738415616", "--targets", "q_proj,gate_proj"])
    assert result.exit_code == 2 and "gate_proj is sized by the MLP's intermediate size" in result.stderr, result.output

def test_custom_dimensions_match_the_preset():
    preset = run_json("--model", "llama2-13b")
    custom = run_json("--hidden", "5120", "--layers", "40", "--vocab", "32000", "--intermediate", "13824")
    assert [r["tps_estimated"] for r in custom["rows"]] == [r["tps_estimated"] for r in preset["rows"]]
    assert custom["models"][0]["params"] == 13_015_864_320


@pytest.mark.parametrize("args", [
    ["--paper", "--model", "llama2-7b"],
    ["--paper", "--cloud-tps", "30"],
    ["--model", "llama2-70b"],
    ["--hidden", "4096", "--layers", "32"],
    ["--model", "llama2-7b", "--rank", "0"],
    ["--model", "llama2-7b", "--up-mbps", "0"],
    ["--model", "llama2-7b", "--rtt-ms", "-5"],
    ["--model", "llama2-7b", "--cloud-efficiency", "1.5"],
    ["--model", "llama2-7b", "--targets", "x_proj"],
    ["--model", "llama2-7b", "--cloud-tps", "30", "--cloud-bandwidth-gbs", "900"],
    ["--model", "llama2-7b", "--params", "1000"],
    ["--model", "llama2-7b", "--layers", "99999999999999999999999"],  # hung building a plan of that many layers
    # no NaN or infinity, given or reached: JSON has neither
    ["--model", "llama2-7b", "--rtt-ms", "nan"],
    ["--model", "llama2-7b", "--rtt-ms", "inf"],
    ["--model", "llama2-7b", "--up-mbps", "inf"],
    ["--model", "llama2-7b", "--cloud-tps", "inf"],
    ["--model", "llama2-7b", "--device-only-bits", "inf"],
    ["--model", "llama2-7b", "--up-mbps", "1e-320"],
    ["--model", "llama2-7b", "--rtt-ms", "1e308"],
])
def test_bad_flags_exit_2_with_one_line(args):
    result = runner.invoke(app, ["estimate", *args, "--json"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert result.stdout == ""


def test_json_output_has_no_nan_or_infinity(capsys):
    """What no check foresaw (a NaN error in verify, say) still prints as JSON: null."""
    from plcli.app import print_json

    print_json({"rel_error": float("nan"), "tps": [1.5, float("inf"), -float("inf")], "ok": False})
    assert strict_json(capsys.readouterr().out) == {"rel_error": None, "tps": [1.5, None, None], "ok": False}
