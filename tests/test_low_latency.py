"""`--low-latency`: a PM QoS request held exactly while a command runs, and a clear error where none can be made."""

from __future__ import annotations

import os
import struct

import pytest
from typer.testing import CliRunner

from plcli.cli import app
from plcli.runtime import cpu_latency
from plcli.runtime.cpu_latency import CpuLatencyError, CpuLatencyRequest, latency_in_force
from processes import edge_ids, listening, spawn_plcli, stop

# The real device, where this machine lets the tests use it (root, or a udev rule): the kernel's own behaviour.
REAL = os.access(cpu_latency.DEVICE, os.W_OK)
needs_device = pytest.mark.skipif(not REAL, reason=f"{cpu_latency.DEVICE} is missing or not writable here")


def test_a_request_writes_its_latency_and_closes_once(tmp_path):
    device = tmp_path / "cpu_dma_latency"
    device.write_bytes(b"")
    with CpuLatencyRequest(25, device=device) as request:
        assert device.read_bytes() == struct.pack("=i", 25)
    request.close()  # a second close does nothing
    with pytest.raises(ValueError):
        CpuLatencyRequest(-1, device=device)


def test_no_device_is_one_clear_error_and_a_command_exits_2(tmp_path, monkeypatch, llama_checkpoint):
    monkeypatch.setattr(cpu_latency, "DEVICE", tmp_path / "absent")
    with pytest.raises(CpuLatencyError, match="needs Linux PM QoS"):
        CpuLatencyRequest(0)
    # Refused before any slow work: the checkpoint is never loaded.
    result = CliRunner().invoke(app, ["bench", "decode", str(llama_checkpoint), "--low-latency"])
    assert result.exit_code == 2 and "needs Linux PM QoS" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output


@needs_device
def test_the_kernel_holds_the_request_only_while_it_is_open():
    before = latency_in_force()
    with CpuLatencyRequest(0):
        assert latency_in_force() == 0
    assert latency_in_force() == before


@needs_device
def test_serve_cloud_holds_it_while_serving_and_the_edge_generates_the_same_ids(llama_bundle):
    """The two commands with --low-latency: the request lives exactly as long as serve-cloud, and changes no token."""
    before = latency_in_force()
    server = spawn_plcli("serve-cloud", llama_bundle / "cloud", "--bind", "tcp://127.0.0.1:*", "--no-tune", "--threads", 1,
                         "--low-latency", "--json")
    try:
        endpoint = listening(server)["endpoint"]
        assert latency_in_force() == 0
        plain, polling = edge_ids(llama_bundle / "edge", endpoint, [], ["--low-latency"])
        assert plain == polling
    finally:
        stop(server)
    assert server.returncode == 0
    assert latency_in_force() == before
