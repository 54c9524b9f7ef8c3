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
