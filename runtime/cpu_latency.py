"""Keep idle cores from sleeping while a latency-bound loop runs: Linux PM QoS, /dev/cpu_dma_latency.

Every round trip of the split wakes threads: the sender's ZeroMQ I/O thread,
the receiver's, then the receiver. A core that had nothing to do has gone to
sleep, and must come back first. On the virtual two-core machines plcli was
built on, idle cores halt, and coming back costs 0.1-0.3 ms and cold caches:
a bare loopback ZeroMQ round trip took 250 us with halting cores, 120 us with
polling ones. The kernel's PM QoS interface lets a process ask for the largest
wake-up latency it tolerates, for as long as it holds /dev/cpu_dma_latency open;
asking for 0 keeps idle cores polling instead of halting (what tuned's
latency-performance profile and cyclictest do). The price is power: idle cores
spin. The request holds for the whole machine and ends when the file is closed,
however the process ends, so nothing outlives it.
"""

from __future__ import annotations

import contextlib
import os
import struct
from pathlib import Path

from .errors import PlcliError

DEVICE = Path("/dev/cpu_dma_latency")
_VALUE = struct.Struct("=i")  # the device reads and writes one native s32, in microseconds


class CpuLatencyError(PlcliError):
    """The request cannot be made here; the message says why and what would allow it."""


class CpuLatencyRequest:
    """Hold this machine's CPU wake-up latency at `max_us` microseconds (0: idle cores poll) until `close`."""

    def __init__(self, max_us: int = 0, *, device: Path | None = None):
        if max_us < 0:
            raise ValueError("a wake-up latency is at least 0 us")
        device = device or DEVICE
        try:
            self._fd: int | None = os.open(device, os.O_WRONLY)
        except FileNotFoundError:
            raise CpuLatencyError(f"--low-latency needs Linux PM QoS, and this system has no {device}") from None
        except PermissionError:
            raise CpuLatencyError(f"--low-latency needs write access to {device} (run as root, or grant it to this "
                                  "user with a udev rule)") from None
        except OSError as e:
            raise CpuLatencyError(f"--low-latency: cannot open {device}: {e.strerror or e}") from None
        try:
            os.write(self._fd, _VALUE.pack(max_us))
        except OSError as e:
            self.close()
            raise CpuLatencyError(f"--low-latency: {device} refused the request: {e.strerror or e}") from None

    def close(self) -> None:
        """End the request (safe to call twice); the kernel forgets it with the file."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "CpuLatencyRequest":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def hold_low_latency(enabled: bool) -> contextlib.AbstractContextManager:
    """What `--low-latency` holds: a request made here and now, so that a machine that refuses it fails before any
    slow work; nothing when not `enabled`."""
    return CpuLatencyRequest(0) if enabled else contextlib.nullcontext()


def latency_in_force(device: Path | None = None) -> int:
    """The wake-up latency the kernel now allows, in microseconds: the smallest that any process holds."""
    with open(device or DEVICE, "rb") as f:
        return _VALUE.unpack(f.read(_VALUE.size))[0]
