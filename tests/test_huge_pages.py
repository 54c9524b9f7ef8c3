"""Huge pages under a loaded model: which regions are asked for, that the kernel takes them, and that no output changes."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest
from plcli.runtime.huge_pages import collapsible_regions, thp_mode
from processes import edge_ids, listening, spawn_plcli, stop

MiB = 1 << 20
SMAPS = """\
00400000-00600000 r-xp 00000000 08:01 123   /usr/bin/python3.11
00800000-01000000 rw-p 00000000 00:00 0   [heap]
Rss:                8192 kB
7f0000000000-7f0004000000 rw-p 00000000 00:00 0
Size:              65536 kB
Rss:               65536 kB
7f0004000000-7f0008000000 rw-p 00000000 00:00 0
Rss:                1024 kB
7f0008000000-7f000c000000 rw-s 00000000 00:01 77   /dev/zero (deleted)
Rss:               65536 kB
7f000c000000-7f0010000000 rw-p 00000000 08:01 99   /data/model.safetensors
Rss:               65536 kB
7f0010000000-7f0010400000 r--p 00000000 00:00 0
Rss:                4096 kB
7f0010400000-7f0010800000 rw-p 00000000 00:00 0   [anon:ort arena]
Rss:                4096 kB
7ffc00000000-7ffc00400000 rw-p 00000000 00:00 0   [stack]
Rss:                4096 kB
"""


def test_only_resident_private_writable_anonymous_regions_are_chosen():
    regions = collapsible_regions(SMAPS)
    # The heap, the full anonymous region and the named one; not the sparse arena, shared, file, read-only or stack.
    assert [(r.start, r.end) for r in regions] == [(0x800000, 0x1000000), (0x7f0000000000, 0x7f0004000000),
                                                  (0x7f0010400000, 0x7f0010800000)]
    assert regions[1].resident == 64 * MiB
    assert collapsible_regions(SMAPS, min_resident=0.01)[2].start == 0x7f0004000000


def test_the_kernels_mode_is_the_bracketed_word(tmp_path):
    enabled = tmp_path / "enabled"
    enabled.write_text("always [madvise] never\n")
    assert thp_mode(enabled) == "madvise"
    assert thp_mode(tmp_path / "absent") == "unavailable"


def _kernel_collapses() -> bool:
    """MADV_COLLAPSE came with Linux 6.1; THP must not be off."""
    if not sys.platform.startswith("linux") or thp_mode() not in ("always", "madvise"):
        return False
    major, minor = (int(p) for p in platform.release().split(".")[:2])
    return (major, minor) >= (6, 1)


CHILD = """
import json, sys
import numpy as np
from plcli.runtime.cloud import CloudModel
from plcli.runtime.huge_pages import back_with_huge_pages, huge_page_bytes

model = CloudModel(sys.argv[1], threads=1, prepack=True)
embeds = np.random.default_rng(0).standard_normal((1, 5, model.arch.hidden_size)).astype(np.float32)
before_ax = model.new_session().start(embeds).ax
written = bytearray(b"\\x01") * (64 << 20)  # glibc maps it on its own, every page written: on small pages
before = huge_page_bytes()
report = back_with_huge_pages()
after_ax = model.new_session().start(embeds).ax
print(json.dumps({"before": before, "after": report.bytes, "regions": report.regions, "collapsed": report.collapsed,
                  "same": bool((before_ax == after_ax).all()), "intact": written.count(1) == len(written)}))
"""


@pytest.mark.skipif(not _kernel_collapses(), reason="needs Linux 6.1 or later with transparent huge pages not off")
def test_a_loaded_model_goes_onto_huge_pages_and_computes_the_same(llama_bundle):
    out = subprocess.run([sys.executable, "-c", CHILD, str(llama_bundle / "cloud")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["regions"] >= 1 and r["collapsed"] >= 1
    # At least the aligned middle of the 64 MiB written, which in `always` mode may have been on huge pages already.
    assert r["after"] - (r["before"] if thp_mode() == "madvise" else 0) >= 32 * MiB
    assert r["same"] and r["intact"]


def test_serve_cloud_reports_its_huge_pages_and_either_setting_generates_the_same_ids(llama_bundle):
    server = spawn_plcli("serve-cloud", llama_bundle / "cloud", "--bind", "tcp://127.0.0.1:*", "--no-tune", "--threads", 1,
                         "--json")
    try:
        event = listening(server)
        assert type(event["huge_pages_bytes"]) is int and event["huge_pages_bytes"] >= 0
        huge, small = edge_ids(llama_bundle / "edge", event["endpoint"], ["--huge-pages"], ["--no-huge-pages"])
        assert huge == small
    finally:
        stop(server)
    assert server.returncode == 0
