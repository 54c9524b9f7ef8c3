"""Which cores a process's threads run on (Linux): a cloud's compute on cores of its own, ZeroMQ's I/O elsewhere.

Every message of the split passes through a ZeroMQ I/O thread on each side
(runtime/cpu_latency.py). Left to the scheduler, the cloud's I/O thread shares
the compute thread's core, or wakes an idle one that has halted, and the
compute thread cannot poll for its next message without taking the core its
own I/O thread needs. Given a core of its own (`serve-cloud --cpus`), with its
I/O thread and the edge on the others (`--io-cpus`, `run-edge --cpus`), the
compute thread shares its core with nothing, and may wait for the next message
polling instead of sleeping (`serve-cloud --spin-us`), so that its core does
not halt between the edge's answers. `plcli bench decode --pin` places its
processes that way where the machine has a core to spare (`apart`).

Measured on the 2-core machine plcli is built on (512 shape, one edge): an
empty round trip to the cloud went from 0.16 to 0.10 ms, but whole decodes
did not follow it: split / onnx had a median of 0.764 placed this way and
0.762 left to the scheduler (six alternating pairs each), since the cloud's
thread is busy 88% of the time and what it spends is its own CPU per message,
not waiting. So nothing is placed unless asked.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from typing import Iterator

import zmq

MAX_SPIN_US = 1_000_000  # a second of polling is past any round trip worth waiting for
# How long a cloud on cores of its own polls, where plcli's benches place it: past the longest wait between an
# edge's answers there, its LM head (1 ms on the bench's 512 shape, 3.6 on its 1024 one).
SPIN_US = 10_000
_SPAN = re.compile(r"([0-9]{1,5})(?:-([0-9]{1,5}))?")  # a core or a range of cores in a taskset-style list


def usable_cpus() -> frozenset[int]:
    """The cores this process may run on (its affinity mask); every core where the system cannot tell."""
    try:
        return frozenset(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return frozenset(range(os.cpu_count() or 1))


def parse_cpus(text: str, option: str) -> frozenset[int]:
    """`0`, `0-3` or `0,2,4-5` (as taskset -c): cores this process may use; ValueError in one line otherwise."""
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError(f"{option} needs Linux: this system does not let a process choose its cores")
    cpus: set[int] = set()
    for part in text.split(","):
        span = _SPAN.fullmatch(part.strip())
        lo, hi = (int(span[1]), int(span[2] or span[1])) if span else (0, -1)
        if not 0 <= hi - lo <= 4096:
            raise ValueError(f"{option} {text!r}: give cores as taskset does, e.g. 0, 0-3 or 0,2,4-5")
        cpus.update(range(lo, hi + 1))
    usable = usable_cpus()
    if not cpus <= usable:
        raise ValueError(f"{option} {text}: core {min(cpus - usable)} is not one this process may use "
                         f"({format_cpus(usable)})")
    return frozenset(cpus)


def format_cpus(cpus) -> str:
    """The shortest taskset-style list: 0-3,6."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in runs)


def _threads() -> list[int]:
    try:
        return [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        return [0]  # no /proc: the calling thread, whose later threads inherit its cores


@contextlib.contextmanager
def pinned(cpus: frozenset[int] | None) -> Iterator[None]:
    """Run every thread of this process, and every thread started meanwhile, on `cpus` (None: leave them be).

    On exit every thread gets back its cores: a thread started meanwhile, the cores the process had.
    """
    if cpus is None:
        yield
        return
    process, before = os.sched_getaffinity(0), {}
    for tid in _threads():
        with contextlib.suppress(OSError):  # a thread that has ended since it was listed
            before[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, cpus)
    try:
        yield
    finally:
        for tid in _threads():
            with contextlib.suppress(OSError):  # a thread that has ended since
                os.sched_setaffinity(tid, before.get(tid, process))


def io_context(cpus: frozenset[int]) -> zmq.Context:
    """A ZeroMQ context whose I/O threads run on `cpus` only (libzmq sets it as it starts them, at the first socket)."""
    context = zmq.Context()
    for cpu in sorted(cpus):
        context.set(zmq.THREAD_AFFINITY_CPU_ADD, cpu)
    return context


@dataclass(frozen=True)
class Apart:
    """A cloud and its edges on one machine: the cloud's compute on cores of its own, all else on the others."""

    cloud: frozenset[int]
    rest: frozenset[int]  # the cloud's ZeroMQ I/O thread, the edges, and whatever else runs in their process
    spin_us: int

    def serve_options(self) -> list[str]:
        return ["--cpus", format_cpus(self.cloud), "--io-cpus", format_cpus(self.rest), "--spin-us", str(self.spin_us)]

    def as_json(self) -> dict:
        return {"cloud_cpus": sorted(self.cloud), "other_cpus": sorted(self.rest), "spin_us": self.spin_us}


def apart(cloud_threads: int, spin_us: int = SPIN_US) -> Apart | None:
    """The first `cloud_threads` usable cores for the cloud, the rest for everything else; None without a core to spare."""
    cpus = sorted(usable_cpus())
    if len(cpus) <= cloud_threads or not hasattr(os, "sched_setaffinity"):
        return None
    return Apart(frozenset(cpus[:cloud_threads]), frozenset(cpus[cloud_threads:]), spin_us)
