"""`plcli demo` as a user runs it: every act on the embedded demo model, end to end, through the command line.

Its parts have tests of their own (test_serving.py); this one holds the command to what it tells the user.
"""

from __future__ import annotations

import json

from typer.testing import CliRunner

from plcli.cli import app
from plcli.demo import DEMO_PROMPT
from plcli.runtime.edge import EdgeModel


def test_demo_json_reports_parity_identical_ids_and_a_learned_fact(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--json", "--out", str(tmp_path)])
    assert result.exit_code == 0, (result.output, result.exception)
    report = json.loads(result.stdout)

    assert report["verify_ok"] and report["verify_worst_rel_error"] < 1e-4
    assert report["greedy_identical"] and report["token_ids"] == report["reference_token_ids"]
    assert len(report["token_ids"]) == 32 and report["prompt"] == DEMO_PROMPT

    network = report["network"]
    assert network["identical"] and network["token_ids"] == report["token_ids"]
    assert network["endpoint"].startswith("tcp://127.0.0.1:")
    edge = EdgeModel(tmp_path / "bundles" / "edge")
    prompt_len = len(edge.tokenizer(DEMO_PROMPT)["input_ids"])
    assert network["cloud_tokens_served"] == prompt_len + 31  # the last token is sampled, never fed back
    assert network["stats"]["round_trips"] == 32 * len(edge.plan.segments)

    tune = report["tune"]
    assert tune["steps"] > 0 and tune["eval_loss_after"] < tune["eval_loss_before"]
    assert tune["learned"] and tune["after"].startswith(tune["expected"]), tune
    tuned = EdgeModel(tmp_path / "tune-bundles" / "edge", adapter=tmp_path / "tune" / "adapter")
    assert any(m.any() for m in tuned.adapter_matrices().values())  # the saved adapter loads and is not the zeros of a split
