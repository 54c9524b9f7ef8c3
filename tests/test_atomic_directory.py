"""`atomic_directory`, which every bundle, adapter and peft export is written through: a good result is never lost.

Replacing renames the old result aside and the new one into place; whatever stops it between the two renames
(an error, Ctrl-C, SIGKILL) must leave the old result at its name, or let the next write put it back.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from plcli.runtime.bundle import BundleError, atomic_directory


def good_result(parent: Path) -> Path:
    final = parent / "out"
    final.mkdir()
    (final / "result.txt").write_text("good")
    return final


def beside(final: Path) -> list[str]:
    return sorted(p.name for p in final.parent.iterdir())


@pytest.mark.parametrize("failure", [KeyboardInterrupt(), OSError(errno.EIO, os.strerror(errno.EIO))],
                         ids=["ctrl-c", "oserror"])
def test_a_failure_between_the_renames_puts_the_old_result_back(tmp_path, monkeypatch, failure):
    final = good_result(tmp_path)
    real_rename, calls = os.rename, []

    def second_rename_fails(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the old result is aside, the new one not yet in place
            raise failure
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", second_rename_fails)
    with pytest.raises(type(failure)):
        with atomic_directory(final, replace=True) as tmp:
            (tmp / "result.txt").write_text("new")
    assert len(calls) == 3  # aside, the failed one, back
    assert (final / "result.txt").read_text() == "good" and beside(final) == ["out"]


KILLED_BETWEEN_THE_RENAMES = textwrap.dedent("""
    import os, signal, sys
    from plcli.runtime.bundle import atomic_directory

    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append(src)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_rename(src, dst)

    os.rename = rename
    with atomic_directory(sys.argv[1], replace=True) as tmp:
        (tmp / "result.txt").write_text("new")
""")


def test_a_replacement_killed_between_the_renames_is_put_back_by_the_next_write(tmp_path):
    final = good_result(tmp_path)
    killed = subprocess.run([sys.executable, "-c", KILLED_BETWEEN_THE_RENAMES, str(final)], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    # What SIGKILL leaves: no result at its name, the good one hidden beside it (and the new one, half moved).
    left = beside(final)
    assert "out" not in left and len([n for n in left if n.startswith(".out.old-")]) == 1, left

    with pytest.raises(BundleError, match="exists \\(use --force to replace it\\)"):
        with atomic_directory(final, replace=False):
            pass
    assert (final / "result.txt").read_text() == "good"
    assert [n for n in beside(final) if ".old-" in n] == []


KILLED_WHILE_WRITING = textwrap.dedent("""
    import os, signal, sys
    from plcli.runtime.bundle import atomic_directory

    with atomic_directory(sys.argv[1], replace=True) as tmp:
        (tmp / "result.txt").write_text("half")
        os.kill(os.getpid(), signal.SIGKILL)
""")


def test_what_a_writer_killed_mid_write_left_is_deleted_by_the_next_write_and_a_live_ones_is_not(tmp_path):
    final = good_result(tmp_path)
    killed = subprocess.run([sys.executable, "-c", KILLED_WHILE_WRITING, str(final)], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    [dead] = [n for n in beside(final) if n.startswith(".out.partial-")]
    assert (tmp_path / dead / "result.txt").read_text() == "half"
    stem, host, pid, rand = dead.split("-")
    assert stem == ".out.partial" and int(pid) > 0
    live = tmp_path / f"{stem}-{host}-{os.getpid()}-{rand}"  # this process's: alive
    other_host = tmp_path / ".out.partial-0000beef-1-abcd"
    for kept in (live, other_host):
        kept.mkdir()
    with pytest.raises(BundleError, match="exists"):  # even a refused write clears them, before refusing
        with atomic_directory(final, replace=False):
            pass
    assert beside(final) == sorted([".out.partial-0000beef-1-abcd", live.name, "out"])
    assert (final / "result.txt").read_text() == "good"


def test_a_copy_superseded_before_the_kill_is_deleted_by_the_next_write(tmp_path):
    final = good_result(tmp_path)
    stale = tmp_path / ".out.old-4242"  # killed after its second rename, before deleting the copy it moved aside
    stale.mkdir()
    (stale / "result.txt").write_text("older")
    with atomic_directory(final, replace=True) as tmp:
        (tmp / "result.txt").write_text("new")
    assert (final / "result.txt").read_text() == "new" and beside(final) == ["out"]


def test_several_hidden_copies_are_refused_not_guessed_between(tmp_path):
    final = tmp_path / "out"
    for pid in (11, 12):
        (tmp_path / f".out.old-{pid}").mkdir()
    with pytest.raises(BundleError, match=r"out is missing and .* 2 earlier copies \(\.out\.old-11, \.out\.old-12\)"):
        with atomic_directory(final, replace=True):
            pytest.fail("the block ran")
    assert beside(final) == [".out.old-11", ".out.old-12"]


@pytest.mark.parametrize("replace", [False, True])
def test_a_file_in_the_way_is_refused_and_kept(tmp_path, replace):
    final = tmp_path / "out"
    final.write_text("mine")
    with pytest.raises(BundleError, match="out exists and is not a directory"):
        with atomic_directory(final, replace=replace):
            pytest.fail("the block ran")
    assert final.read_text() == "mine" and beside(final) == ["out"]


def test_the_result_gets_the_permissions_of_a_directory_made_by_mkdir(tmp_path):
    (tmp_path / "plain").mkdir()
    with atomic_directory(tmp_path / "out", replace=False) as tmp:
        (tmp / "result.txt").write_text("good")
    assert (tmp_path / "out").stat().st_mode == (tmp_path / "plain").stat().st_mode
