"""`--cpus`, `--io-cpus`, `--spin-us`: threads on the cores asked for, the same tokens, and one clear error otherwise."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import zmq
from typer.testing import CliRunner

from plcli.cli import app
from plcli.runtime.cpus import SPIN_US, apart, format_cpus, io_context, parse_cpus, pinned, usable_cpus
from processes import edge_ids, listening, spawn_plcli, stop

linux = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="only Linux lets a process choose its cores")
two_cores = pytest.mark.skipif(len(usable_cpus()) < 2, reason="needs two cores to set one apart")


def threads_of(pid: int | str = "self") -> dict[str, list[frozenset[int]]]:
    """Each thread name of process `pid` and the cores each thread of that name may run on (/proc)."""
    out: dict[str, list[frozenset[int]]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        out.setdefault(fields["Name"].strip(), []).append(parse_cpus(fields["Cpus_allowed_list"].strip(), "test"))
    return out


@linux
def test_cpu_lists_read_as_taskset_writes_them():
    first = min(usable_cpus())
    assert parse_cpus(str(first), "--cpus") == {first}
    assert parse_cpus(format_cpus(usable_cpus()), "--cpus") == usable_cpus()
    assert format_cpus({0, 1, 2, 3, 6, 8, 9}) == "0-3,6,8-9"
    for text in ("", "a", "1-0", "-1", "0,,1", "0-", "1.5"):
        with pytest.raises(ValueError, match="give cores as taskset does"):
            parse_cpus(text, "--cpus")
    with pytest.raises(ValueError, match=f"core {max(usable_cpus()) + 1} is not one this process may use"):
        parse_cpus(str(max(usable_cpus()) + 1), "--cpus")


@linux
def test_pinned_moves_every_thread_and_gives_each_its_cores_back():
    first, before = min(usable_cpus()), os.sched_getaffinity(0)
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait)
    late = threading.Thread(target=stop.wait)
    worker.start()
    try:
        with pinned(frozenset({first})):
            assert os.sched_getaffinity(0) == os.sched_getaffinity(worker.native_id) == {first}
            late.start()  # started while pinned: it inherits the cores, and gets the process's back on exit
            assert os.sched_getaffinity(late.native_id) == {first}
        assert os.sched_getaffinity(0) == os.sched_getaffinity(worker.native_id) == before
        assert os.sched_getaffinity(late.native_id) == before
    finally:
        stop.set()
        worker.join()
        if late.is_alive():
            late.join()


@linux
def test_an_io_context_starts_its_io_threads_on_the_cores_given():
    last = max(usable_cpus())

    def on_last() -> int:
        return threads_of().get("ZMQbg/IO/0", []).count(frozenset({last}))

    before = on_last()
    context = io_context(frozenset({last}))
    socket = context.socket(zmq.DEALER)  # the first socket starts the context's threads
    try:
        deadline = time.monotonic() + 10  # each thread sets its own cores once it runs
        while on_last() == before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert on_last() == before + 1
    finally:
        socket.close(linger=0)
        context.term()


@two_cores
@linux
def test_apart_sets_the_cloud_s_cores_aside_only_with_one_to_spare():
    cpus = sorted(usable_cpus())
    placement = apart(1)
    assert placement.cloud == {cpus[0]} and placement.rest == set(cpus[1:]) and placement.spin_us == SPIN_US
    assert placement.serve_options() == ["--cpus", str(cpus[0]), "--io-cpus", format_cpus(cpus[1:]), "--spin-us", str(SPIN_US)]
    assert apart(len(cpus)) is None


@two_cores
@linux
def test_serve_cloud_runs_compute_and_io_where_asked_and_the_edge_gets_the_same_ids(llama_bundle):
    """Cloud compute on the first core, polling; its I/O thread and the edge on the second: the ids of a plain run."""
    compute, other = sorted(usable_cpus())[:2]
    plain = spawn_plcli("serve-cloud", llama_bundle / "cloud", "--bind", "tcp://127.0.0.1:*", "--no-tune", "--threads", 1,
                        "--json")
    placed = spawn_plcli("serve-cloud", llama_bundle / "cloud", "--bind", "tcp://127.0.0.1:*", "--no-tune", "--threads", 1,
                         "--cpus", compute, "--io-cpus", other, "--spin-us", 2000, "--json")
    try:
        reference, = edge_ids(llama_bundle / "edge", listening(plain)["endpoint"], [])
        event = listening(placed)
        assert event["spin_us"] == 2000 and event["io_cpus"] == [other]
        threads = threads_of(placed.pid)
        assert threads["ZMQbg/IO/0"] == [frozenset({other})]
        assert all(cpus == {compute} for name, group in threads.items() if not name.startswith("ZMQbg") for cpus in group)
        assert edge_ids(llama_bundle / "edge", event["endpoint"], [], ["--cpus", other]) == [reference, reference]
    finally:
        for server in (plain, placed):
            stop(server)


@pytest.mark.parametrize("args, says", [
    (["--cpus", "zero"], "--cpus 'zero': give cores as taskset does"),
    (["--cpus", "99999"], "--cpus 99999: core 99999 is not one this process may use"),
    (["--io-cpus", "3-1"], "--io-cpus '3-1': give cores as taskset does"),
    (["--spin-us", "-1"], "--spin-us -1 is out of range: 0 to 1000000"),
    (["--spin-us", "1000001"], "--spin-us 1000001 is out of range"),
])
@linux
def test_bad_placement_is_one_line_exit_2_before_anything_loads(args, says, tmp_path):
    # The bundle does not exist: the flags are refused before it would be read.
    result = CliRunner().invoke(app, ["serve-cloud", str(tmp_path / "absent"), *args])
    assert result.exit_code == 2 and says in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    if args[0] == "--cpus":
        result = CliRunner().invoke(app, ["run-edge", str(tmp_path / "absent"), "--prompt", "hi", *args])
        assert result.exit_code == 2 and says in result.stderr, result.output
