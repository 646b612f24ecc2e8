"""Transparent huge pages for a CPU engine's large, resident memory (Linux).

A decode step on the CPU streams every weight matrix once, and the step's context from the KV
pool. With 4 KiB pages that is a TLB miss every 4 KiB of a few hundred MB per step. onnxruntime
allocates its prepacked weights itself, with plain 4 KiB pages unless the whole process runs with
THP "always" (or glibc's hugetlb tunable). So after the session is built and the pool filled,
`collapse_new(before, buffers)` asks the kernel to back with 2 MiB pages the anonymous mappings
made since `before` and those holding the backend's own `buffers`: madvise(MADV_HUGEPAGE), then
madvise(MADV_COLLAPSE) (Linux 6.1+), which moves the pages now, synchronously.
`BackgroundCollapse` does that in a thread for the onnxruntime backend.

Only mappings that are already mostly resident (RESIDENT_FRACTION) are collapsed, so that
collapsing does not fill untouched reservations (an allocator's arena) and grow the process.
Best effort: a kernel without MADV_COLLAPSE, THP set to "never", a non-Linux system, or any
refusal leaves the pages as they were; the data never changes.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20          # x86-64 and arm64 (4 KiB base pages) PMD size
RESIDENT_FRACTION = 0.75     # collapse a mapping only when this much of it is resident already
_MADV_HUGEPAGE, _MADV_COLLAPSE = 14, 25
_MAPS, _SMAPS = Path("/proc/self/maps"), Path("/proc/self/smaps")


@dataclass(frozen=True)
class Collapse:
    """What `collapse_new` did: bytes asked for (2 MiB-aligned ranges of the mappings that
    qualified), bytes the kernel collapsed, and the seconds it took."""

    asked: int
    collapsed: int
    seconds: float


def available() -> bool:
    """Whether this system can back memory with transparent huge pages on request."""
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return sys.platform == "linux" and thp.exists() and "[never]" not in thp.read_text()


def anonymous_mappings() -> set[tuple[int, int]]:
    """The process's private, writable anonymous mappings (and its heap), as (start, end)."""
    if not _MAPS.exists():
        return set()
    out = set()
    for line in _MAPS.read_text().splitlines():
        parts = line.split()
        path = parts[5] if len(parts) > 5 else ""
        if parts[1].startswith("rw") and parts[1].endswith("p") and path in ("", "[heap]"):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            out.add((start, end))
    return out


def _resident() -> dict[int, int]:
    """Resident bytes of each mapping, by start address."""
    rss, start = {}, None
    for line in _SMAPS.read_text().splitlines():
        head = line.split(maxsplit=1)[0]
        if "-" in head and not head.endswith(":"):
            start = int(head.split("-")[0], 16)
        elif head == "Rss:" and start is not None:
            rss[start] = int(line.split()[1]) * 1024
    return rss


def collapse_new(before: set[tuple[int, int]], buffers: Iterable[tuple[int, int]] = ()) -> Collapse:
    """Back with huge pages the anonymous mappings made since `before` (`anonymous_mappings()`
    then) and those that hold any of `buffers` ((address, bytes): memory an allocator may have
    placed in a mapping it already had), where at least RESIDENT_FRACTION of a mapping is
    resident. Never raises."""
    t = time.perf_counter()
    asked = done = 0
    try:
        if not available():
            return Collapse(0, 0, 0.0)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        rss = _resident()
        now = anonymous_mappings()
        spans = [(a, a + n) for a, n in buffers if n > 0]
        chosen = (now - before) | {(s, e) for s, e in now if any(a < e and b > s for a, b in spans)}
        for start, end in sorted(chosen):
            lo, hi = -(-start // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE
            if hi - lo < HUGE_PAGE or rss.get(start, 0) < RESIDENT_FRACTION * (end - start):
                continue
            asked += hi - lo
            libc.madvise(lo, hi - lo, _MADV_HUGEPAGE)
            if libc.madvise(lo, hi - lo, _MADV_COLLAPSE) == 0:
                done += hi - lo
    except OSError as e:   # no libc to call, /proc unreadable: leave the pages as they are
        log.debug("huge pages not requested: %s", e)
    return Collapse(asked, done, time.perf_counter() - t)


class BackgroundCollapse:
    """For the onnxruntime CPU backend (the torch backend's eager CPU step, at 20 ms for the
    hidden-512 model, did not change with huge pages, 19.2-20.2 against 19.7-20.6 ms, so it does
    not use them): made when the backend starts, it notes the mappings there are; `start()`,
    once the weights and the pool are allocated, runs `collapse_new` on what was added since, in a
    daemon thread (about 0.4 s per GB here). The backend serves meanwhile, on the same data, while
    the kernel moves it page by page."""

    def __init__(self) -> None:
        self._before = anonymous_mappings()
        self._thread: threading.Thread | None = None
        self._buffers: list[tuple[int, int]] = []
        self.result: Collapse | None = None

    def start(self, buffers: Iterable[tuple[int, int]] = ()) -> None:
        """`buffers`: (address, bytes) of the backend's own large buffers (see `collapse_new`)."""
        self._buffers = list(buffers)
        self._thread = threading.Thread(target=self._run, name="apar-rt huge pages", daemon=True)
        self._thread.start()

    def wait(self) -> Collapse | None:
        """The last collapse's result, once it has finished (None if never started)."""
        if self._thread is not None:
            self._thread.join()
        return self.result

    def _run(self) -> None:
        self.result = c = collapse_new(self._before, self._buffers)
        log.info("huge pages: %d of %d MiB of weights and KV pool collapsed in %.2f s",
                 c.collapsed >> 20, c.asked >> 20, c.seconds)
