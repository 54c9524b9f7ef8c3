"""plcli commands as child processes, for the tests that need a real process: a cloud to kill, a request that outlives none."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys

# What a busy 2-core CI machine may add to a timeout before a test calls it a hang.
SLOW_MACHINE_S = 5.0


def spawn_plcli(*args) -> subprocess.Popen:
    """`plcli ARGS...` in a child process, its output unbuffered and piped."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "plcli.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def listening(server: subprocess.Popen, timeout: float = 120.0) -> dict:
    """The `listening` event of a `serve-cloud --json` child: its first line, which names the endpoint. A child that
    says anything else, or nothing within `timeout`, is killed (the test that started it fails, and leaves nothing)."""
    line = server.stdout.readline() if select.select([server.stdout], [], [], timeout)[0] else ""
    if '"listening"' not in line:
        server.kill()
        _, err = server.communicate()
        raise AssertionError(f"serve-cloud did not start: {line!r} {err[-2000:]!r}")
    return json.loads(line)


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30.0) -> tuple[str, str]:
    """Send `sig` and collect the child's output; one that is still running after `timeout` is killed, and the test
    fails: a child must never outlive the test that started it."""
    if process.poll() is None:
        process.send_signal(sig)
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise AssertionError(f"{process.args} did not stop within {timeout:g} s of {signal.Signals(sig).name}: "
                             f"{err[-2000:]!r}") from None


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
