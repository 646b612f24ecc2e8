"""`backends.huge_pages`: the CPU engine's resident memory moves to 2 MiB pages, its contents
unchanged, and memory that is mostly not resident is left alone (the process does not grow).
The onnxruntime backend's own collapse is checked in a fresh process, as a server runs it: inside
this one, an allocator may place a pool in memory that earlier tests left behind."""

from __future__ import annotations

import mmap
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from apar_rt.backends import huge_pages as hp

pytestmark = pytest.mark.skipif(not hp.available() or not Path("/proc/self/smaps").exists(),
                                reason="needs Linux with transparent huge pages not set to never")


def _mapping_stats(addr: int) -> dict[str, int]:
    """Rss and AnonHugePages (bytes) of the mapping that holds `addr`."""
    stats, inside = {}, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=1)[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= addr < end
        elif inside and head in ("Rss:", "AnonHugePages:"):
            stats[head[:-1]] = int(line.split()[1]) * 1024
    return stats


def _small_pages(nbytes: int, fill) -> np.ndarray:
    """A fresh anonymous mapping in 4 KiB pages, as onnxruntime's are, written by `fill(array)`
    and then left to the kernel's default (so that it may be collapsed). It is unmapped once the
    array is dropped."""
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_NOHUGEPAGE)
    a = np.frombuffer(m, np.uint8)
    fill(a)
    m.madvise(mmap.MADV_NORMAL)
    return a


def _refused(got: hp.Collapse) -> None:
    if got.asked and not got.collapsed:
        pytest.skip("the kernel refused MADV_COLLAPSE (before Linux 6.1?)")


def test_resident_memory_is_collapsed_with_its_contents():
    before = hp.anonymous_mappings()
    want = np.random.default_rng(0).integers(0, 256, 16 << 20, dtype=np.uint8)
    a = _small_pages(16 << 20, lambda x: np.copyto(x, want))
    assert _mapping_stats(a.ctypes.data).get("AnonHugePages", 0) == 0
    got = hp.collapse_new(before)
    _refused(got)
    assert got.asked >= 14 << 20 and got.collapsed >= 14 << 20
    assert _mapping_stats(a.ctypes.data)["AnonHugePages"] >= 14 << 20
    assert np.array_equal(a, want)


def test_mostly_untouched_memory_is_left_alone():
    """An allocator's reserve is not filled in: RSS stays what was touched."""
    before = hp.anonymous_mappings()
    a = _small_pages(64 << 20, lambda x: x.__setitem__(slice(None, None, 1 << 20), 1))   # 64 of 16384 pages
    hp.collapse_new(before)
    stats = _mapping_stats(a.ctypes.data)
    assert stats["Rss"] < 1 << 20 and stats.get("AnonHugePages", 0) == 0, stats


def test_mappings_from_before_are_left_alone_unless_named():
    old = _small_pages(8 << 20, lambda x: x.fill(7))
    got = hp.collapse_new(hp.anonymous_mappings())   # nothing new since
    assert _mapping_stats(old.ctypes.data).get("AnonHugePages", 0) == 0 and got.asked < 8 << 20
    got = hp.collapse_new(hp.anonymous_mappings(), [(old.ctypes.data, old.nbytes)])
    _refused(got)
    assert _mapping_stats(old.ctypes.data)["AnonHugePages"] >= 6 << 20 and (old == 7).all()


_IN_A_FRESH_PROCESS = """
import sys
from apar_rt.backends.onnxruntime_backend import OnnxRuntimeBackend
be = OnnxRuntimeBackend(sys.argv[1])
be.allocate_kv(8192, 4)
print(be.huge_pages.wait().asked)
"""


def test_the_onnxruntime_cpu_backend_collapses_its_weights_and_pool(tiny_gqa, tmp_path_factory):
    from apar_rt.build.builder import BuildOptions, build

    path, _, _ = tiny_gqa
    engine = build(BuildOptions(model=str(path), output=str(tmp_path_factory.mktemp("hp") / "e"), block_size=4,
                                max_batch_size=4), progress=False, log=lambda m: None).output
    res = subprocess.run([sys.executable, "-c", _IN_A_FRESH_PROCESS, str(engine)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert int(res.stdout.split()[-1]) >= 6 << 20     # at least the 8 MiB pool
