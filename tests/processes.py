"""plcli commands as child processes, for the tests that need a real process: a cloud to kill, a request that outlives none."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def spawn_plcli(*args) -> subprocess.Popen:
    """`plcli ARGS...` in a child process, its output unbuffered and piped."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "plcli.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def listening(server: subprocess.Popen) -> dict:
    """The `listening` event of a `serve-cloud --json` child: its first line, which names the endpoint."""
    line = server.stdout.readline()
    assert '"listening"' in line, (line, server.stderr.read() if server.poll() is not None else "")
    return json.loads(line)


def edge_ids(edge_dir, endpoint: str, *flag_sets: list[str]) -> list[list[int]]:
    """The token ids `run-edge --json` generates against `endpoint`, greedy and past eos, once with each set of flags."""
    from typer.testing import CliRunner

    from plcli.cli import app

    ids = []
    for flags in flag_sets:
        run = CliRunner().invoke(app, ["run-edge", str(edge_dir), "--connect", endpoint, "--prompt", "Private text",
                                       "--max-new-tokens", "6", "--ignore-eos", "--json", *flags])
        assert run.exit_code == 0, run.output
        ids.append(json.loads(run.stdout)["token_ids"])
    return ids
