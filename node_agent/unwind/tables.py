"""Unwind rows per ELF file, prepared once per file and kept on disk by build id.

A file is known by the opened file's (st_dev, st_ino, size, mtime) in memory, so a library
mapped by a thousand processes is read once and a file replaced on disk is read anew; on
disk by its build id (or, without one, that identity), so an agent restart or another
agent on the same host does not parse libjvm.so's 1.4 MB of CFI again.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import stat
import subprocess
import sys
import time
from array import array
from pathlib import Path
from typing import NamedTuple

from fleetprof.node_agent.symbolize.elf import (
    ElfLayout,
    FileIdentity,
    Reader,
    file_reader,
    read_layout,
)
from fleetprof.node_agent.symbolize.frame import LruCache
from fleetprof.node_agent.symbolize.process import vdso_image
from fleetprof.node_agent.unwind import cfi

log = logging.getLogger(__name__)

# Bumped whenever rows change meaning: older cache files are then ignored.
_CACHE_VERSION = b"fleetprof-unwind-rows-1\n"
# Files larger than this (bytes of CFI) are not parsed: the maps would not hold them anyway.
MAX_CFI_BYTES = 64 << 20
# How long parsing one file may take (libLLVM-14's 5 MB of CFI: ~5 s here).
PARSE_TIMEOUT_S = 300.0


class FileRows(NamedTuple):
    rows: array  # packed cfi rows, sorted by pc; empty: no usable CFI (frame pointers)
    layout: ElfLayout
    error: str  # why rows is empty, if it is


# The vDSO has no file: it is known by this identity (no device or inode is 0).
VDSO_IDENTITY = (0, 0, 0, 0)


class UnwindTables:
    """FileRows for files opened by path, cached in memory and in `cache_dir`."""

    def __init__(self, cache_dir: str | None, max_rows_in_memory: int = 1 << 20) -> None:
        self._dir = Path(cache_dir) if cache_dir else None
        self._memory: LruCache[FileIdentity, FileRows] = LruCache(
            max_rows_in_memory, lambda rows: max(1, len(rows.rows))
        )
        self.stats = {"parsed": 0, "from_disk": 0, "parse_seconds": 0.0, "no_cfi": 0}

    def peek(self, paths: tuple[str, ...]) -> tuple[FileIdentity, FileRows | None] | None:
        """The identity of the first of paths that opens, with its rows if they are in
        memory (None: `get` has to read them); None if no path opens."""
        for path in paths:
            try:
                st = os.stat(path)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
                return identity, self._memory.get(identity)
        return None

    def in_memory(self, identity: FileIdentity) -> FileRows | None:
        """The rows of a file known by its identity, if they are in memory."""
        return self._memory.get(identity)

    def get(self, paths: tuple[str, ...]) -> tuple[FileIdentity, FileRows] | None:
        """The rows of the first of paths that opens, read from the disk cache or parsed."""
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    continue
                identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
                rows = self._memory.get(identity)
                if rows is None:
                    rows = self._load(fd, path, st.st_size, identity)
                    self._memory.put(identity, rows)
                return identity, rows
            except OSError:
                continue
            finally:
                os.close(fd)
        return None

    @functools.cached_property
    def vdso(self) -> tuple[FileIdentity, FileRows]:
        """The vDSO's rows: the same image in every process (the agent's own is read)."""
        image = vdso_image()
        read = lambda offset, size: image[offset : offset + size]  # noqa: E731
        try:
            layout = read_layout(read, len(image))
        except ValueError as error:
            return VDSO_IDENTITY, FileRows(array("Q"), ElfLayout([], {}, b""), str(error))
        rows, error = _parse_sections(read, layout.sections)
        return VDSO_IDENTITY, FileRows(rows, layout, error)

    def _load(self, fd: int, path: str, size: int, identity: FileIdentity) -> FileRows:
        try:
            layout = read_layout(file_reader(fd), size)
        except ValueError as error:
            return FileRows(array("Q"), ElfLayout([], {}, b""), str(error))
        build_id = layout.build_id.hex()
        cached = self._cache_path(build_id, identity)
        if cached is not None:
            rows = _read_cache(cached)
            if rows is not None:
                self.stats["from_disk"] += 1
                return FileRows(rows, layout, "" if rows else "no CFI")
        started = time.monotonic()
        rows, error = self._parse(path, identity)
        self.stats["parse_seconds"] += time.monotonic() - started
        self.stats["parsed"] += 1
        if error:
            self.stats["no_cfi"] += 1
        elif cached is not None:
            _write_cache(cached, rows)
        return FileRows(rows, layout, error)

    def _parse(self, path: str, identity: FileIdentity) -> tuple[array, str]:
        """Parse in a process of its own: seconds of pure Python for a large file would
        hold the agent's interpreter lock from the threads that name processes as they
        start, and a parser stuck on a hostile file is killed, not the agent."""
        command = [sys.executable, "-m", __name__, path, *map(str, identity)]
        try:
            done = subprocess.run(command, capture_output=True, timeout=PARSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return array("Q"), f"parse took over {PARSE_TIMEOUT_S:g} s"
        rows = array("Q")
        if done.returncode or len(done.stdout) % 8:
            return rows, done.stderr.decode("utf-8", "replace").strip()[-200:] or "parser failed"
        rows.frombytes(done.stdout)
        return rows, "" if rows else "no CFI"

    def _cache_path(self, build_id: str, identity: FileIdentity) -> Path | None:
        if self._dir is None:
            return None
        name = build_id or hashlib.sha1(repr(identity).encode()).hexdigest()
        return self._dir / f"{name}.rows"


def parse_file(path: str, identity: FileIdentity) -> tuple[array, str]:
    """(rows, why empty) of the file at path, if it still is `identity`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        return array("Q"), f"gone: {error}"
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != identity:
            return array("Q"), "replaced while read"
        layout = read_layout(file_reader(fd), st.st_size)
        return _parse_sections(file_reader(fd), layout.sections)
    except (OSError, ValueError) as error:
        return array("Q"), str(error)
    finally:
        os.close(fd)


def _parse_sections(read: Reader, sections: dict[str, tuple[int, int, int]]) -> tuple[array, str]:
    """(rows, "") from .eh_frame, else .debug_frame; (empty, why) when neither is usable."""
    for name, debug_frame in ((".eh_frame", False), (".debug_frame", True)):
        section = sections.get(name)
        if section is None:
            continue
        address, offset, size = section
        if size > MAX_CFI_BYTES:
            return array("Q"), f"{name} of {size} bytes"
        try:
            rows = cfi.parse(read(offset, size), address, debug_frame)
        except (OSError, cfi.CfiError) as error:
            return array("Q"), f"{name}: {error}"
        if rows:
            return rows, ""
    return array("Q"), "no CFI"


def _read_cache(path: Path) -> array | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if not data.startswith(_CACHE_VERSION) or (len(data) - len(_CACHE_VERSION)) % 8:
        return None
    rows = array("Q")
    rows.frombytes(data[len(_CACHE_VERSION) :])
    return rows


def _write_cache(path: Path, rows: array) -> None:
    """Best effort (a full or read-only disk only costs a parse next time); atomic."""
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_bytes(_CACHE_VERSION + rows.tobytes())
        temporary.replace(path)
    except OSError as error:
        log.debug("unwind cache %s not written: %s", path, error)
        temporary.unlink(missing_ok=True)


if __name__ == "__main__":
    # The parser process of UnwindTables._parse: PATH DEV INO SIZE MTIME_NS -> rows on stdout.
    rows, why = parse_file(sys.argv[1], tuple(int(field) for field in sys.argv[2:6]))
    if not rows:
        sys.exit(why or "no CFI")  # to stderr, exit status 1
    sys.stdout.buffer.write(rows.tobytes())
