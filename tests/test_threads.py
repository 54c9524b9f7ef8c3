"""Thread settings: a cloud's threads are the model's, not each session's (every ONNX Runtime session of it
shares one pool), and the edge's pool sleeps between calls.

A prepacked cloud holds two sessions per decoder layer; with a pool each, `--threads 2` started a spinning thread
per session and decoded 13 times slower on two cores. ORT's shared pool is made once per process and for good, so
the cloud's case runs in a fresh interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SHARED_POOL = """
import json, os, sys
import numpy as np
from plcli.runtime.cloud import CloudModel
from plcli.runtime.ort import share_threads

def threads():
    return len(os.listdir("/proc/self/task"))

def step(cloud, embeds):
    session = cloud.new_session()
    out = session.start(embeds)
    while not out.done:
        out = session.resume(0.5 * out.ax)
    return out.hidden

alone = CloudModel(sys.argv[1], threads=1, prepack=True)  # no pool: every call in this thread
before = threads()
pooled = CloudModel(sys.argv[1], threads=2, prepack=True)
gained = threads() - before
embeds = np.random.default_rng(0).standard_normal((1, 5, alone.arch.hidden_size)).astype(np.float32)
try:
    share_threads(3)
    refused = None
except ValueError as e:
    refused = str(e)
json.dump({"sessions": sum(s is not None for pair in pooled._packed for s in pair), "gained": gained,
           "alone": step(alone, embeds).tolist(), "pooled": step(pooled, embeds).tolist(), "refused": refused}, sys.stdout)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts the process's threads in /proc")
def test_a_cloud_with_two_threads_starts_one_pool_for_all_its_sessions(llama_bundle):
    import numpy as np

    done = subprocess.run([sys.executable, "-c", SHARED_POOL, str(llama_bundle / "cloud")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["sessions"] > 4  # a pool per session would have started a thread for each
    assert 1 <= out["gained"] <= 2  # the shared pool's one worker (the caller is the other thread), and no more
    np.testing.assert_allclose(out["pooled"], out["alone"], rtol=1e-5, atol=1e-5)
    assert "shared pool of 2 threads" in out["refused"]


def test_the_edge_head_pool_sleeps_between_calls(llama_bundle):
    from plcli.runtime.edge import EdgeModel

    # The edge calls its head once per token and then waits for the cloud, often on the same machine.
    head = EdgeModel(llama_bundle / "edge", threads=2).head
    assert head.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
