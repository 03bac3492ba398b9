"""JIT symbols from perf maps: /tmp/perf-PID.map, lines of `START SIZE name` in hex.

Written by the JVM (jcmd Compiler.perfmap, -XX:+DumpPerfMapAtExit), node --perf-basic-prof,
python -X perf and others. The files are append-only while the process runs, so the cache
reads only what was appended since its last read.
"""

from __future__ import annotations

import os
import stat
import time
from array import array
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass

from fleetprof.node_agent.symbolize.elf import NameBlob
from fleetprof.node_agent.symbolize.frame import LruCache

# A map larger than this is not a perf map worth holding (or is hostile).
MAX_MAP_BYTES = 256 << 20
_TAIL_BYTES = 64
_MAX_ADDRESS = (1 << 64) - 1


class PerfMap:
    """One process's perf map, sorted by start address for bisection."""

    __slots__ = ("_ends", "_names", "_starts", "bad_lines")

    def __init__(
        self, starts: Sequence[int], ends: Sequence[int], names: Sequence[str], bad_lines: int
    ) -> None:
        """Entries in the order written: of several at one start, the last one wins."""
        # A stable sort keeps entries of equal start in written order.
        order = sorted(range(len(starts)), key=starts.__getitem__)
        last = len(order) - 1
        keep = [i for n, i in enumerate(order) if n == last or starts[order[n + 1]] != starts[i]]
        self._starts = array("Q", [starts[i] for i in keep])
        self._ends = array("Q", [ends[i] for i in keep])
        self._names = NameBlob([names[i] for i in keep])
        self.bad_lines = bad_lines

    @classmethod
    def parse(cls, text: str) -> PerfMap:
        return cls(*_parse(text))

    def updated(self, appended: str) -> PerfMap:
        """This map plus appended lines, which override entries at the same start."""
        starts, ends, names, bad = _parse(appended)
        return PerfMap(
            [*self._starts, *starts],
            [*self._ends, *ends],
            [*map(self._names.__getitem__, range(len(self))), *names],
            self.bad_lines + bad,
        )

    def __len__(self) -> int:
        return len(self._starts)

    def resolve(self, addr: int) -> str | None:
        i = bisect_right(self._starts, addr) - 1
        if i < 0 or addr >= self._ends[i]:
            return None
        return self._names[i]


def _parse(text: str) -> tuple[list[int], list[int], list[str], int]:
    """Starts, ends and names of text's entries, in written order, and how many non-empty
    lines were unusable."""
    starts: list[int] = []
    ends: list[int] = []
    names: list[str] = []
    bad = 0
    for line in text.split("\n"):
        parts = line.split(None, 2)
        if not parts:
            continue
        try:
            start, size, name = int(parts[0], 16), int(parts[1], 16), parts[2].rstrip()
        except (ValueError, IndexError):
            bad += 1
            continue
        if start < 0 or size <= 0 or start + size > _MAX_ADDRESS or not name:
            bad += 1
            continue
        starts.append(start)
        ends.append(start + size)
        names.append(name)
    return starts, ends, names, bad


@dataclass
class _Cached:
    perf_map: PerfMap | None  # None: no readable map (yet)
    version: tuple[int, int, int, int]  # (st_dev, st_ino, size, mtime) when read
    parsed_bytes: int  # up to the last complete line
    tail: bytes  # the last bytes parsed, to tell an append from a rewrite in place
    checked_at: float = 0.0


def _missing() -> _Cached:
    return _Cached(None, (-1, -1, -1, -1), 0, b"")


class PerfMapCache:
    """The last good perf map of each process, read through the process's root.

    The map is named after the pid the process sees (its NSpid) and lives in its mount
    namespace's /tmp: /proc/PID/root/tmp/perf-NSPID.map. The file is checked at most once per
    recheck_interval (its absence too) and re-read only when its size or mtime changed, from
    where the last read stopped when it was appended to. When it vanishes or the process
    exits the last copy stays, so samples drained after exit still get names, until
    forget(pid). Bounded by the total number of entries held.
    """

    def __init__(self, *, max_entries: int = 1_000_000, recheck_interval: float = 1.0) -> None:
        self.recheck_interval = recheck_interval
        self.reads = 0
        self._maps: LruCache[int, _Cached] = LruCache(
            max_entries, lambda cached: 1 + len(cached.perf_map or ())
        )

    def get(
        self, pid: int, nspid: int, root: str | None = None, *, fresh: bool = False
    ) -> PerfMap | None:
        """pid's map; `fresh` reads it even if checked within recheck_interval (it was just
        rewritten). `root` is the process's root directory if not /proc/PID/root (which
        is gone once it exited)."""
        cached = self._maps.get(pid)
        checked = time.monotonic()
        if not fresh and cached is not None and checked - cached.checked_at < self.recheck_interval:
            return cached.perf_map
        latest = self._read(f"{root or f'/proc/{pid}/root'}/tmp/perf-{nspid}.map", cached)
        latest = latest or cached or _missing()
        latest.checked_at = checked
        if latest is not cached:
            self._maps.put(pid, latest)
        return latest.perf_map

    def forget(self, pid: int) -> None:
        self._maps.pop(pid)

    def _read(self, path: str, cached: _Cached | None) -> _Cached | None:
        """The map re-read if it changed (cached itself if not); None if it can't be read."""
        try:
            # O_NOFOLLOW: a container must not point the (root) agent at another file.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_MAP_BYTES:
                return None
            version = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if cached is not None and cached.version == version:
                return cached
            appended = (
                cached is not None
                and cached.version[:2] == version[:2]
                and os.pread(fd, len(cached.tail), cached.parsed_bytes - len(cached.tail))
                == cached.tail
            )
            start = cached.parsed_bytes if cached is not None and appended else 0
            data = _read_all(fd, start)
        except OSError:
            return None
        finally:
            os.close(fd)
        self.reads += 1
        # The writer may be mid-line: leave a partial last line for the next read.
        complete = data[: data.rfind(b"\n") + 1]
        text = complete.decode("utf-8", "replace")
        if cached is not None and cached.perf_map is not None and appended:
            perf_map = cached.perf_map.updated(text)
            tail = (cached.tail + complete)[-_TAIL_BYTES:]
        else:
            perf_map = PerfMap.parse(text)
            tail = complete[-_TAIL_BYTES:]
        return _Cached(perf_map, version, start + len(complete), tail)


def _read_all(fd: int, offset: int) -> bytes:
    chunks = []
    while offset < MAX_MAP_BYTES:
        chunk = os.pread(fd, min(1 << 20, MAX_MAP_BYTES - offset), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)
