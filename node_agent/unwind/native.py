"""The native unwinder's kernel tables: every sampled process's executable file mappings,
and each mapped build's unwind rows once (samplers/unwind_tables.bpf.h).

Work is done only for processes that samples hit: the agent announces each process's first
sample (sampled(pid)), and a sample of a process without tables puts its pid in
`unwind_pending` (what no announcement covers: sessions' samplers, evicted processes). The
agent's event loop loads an announced process once it has lived LOAD_AFTER_S since
(load_due), and a loader thread looks through `unwind_pending` every LOADER_PERIOD_S, with
the files already parsed; parser threads add the others when parsed (libjvm.so: ~0.5 s
on a quiet machine, then cached on disk). Until then its frames are walked by frame
pointer, so its stacks are complete from the next interval on. Rows live in one array,
each build's at its own range, referenced by the processes mapping it and freed with the
last of them.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import threading
import time
import uuid
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from bcc import BPF

from fleetprof.node_agent.samplers import SamplerOptions
from fleetprof.node_agent.samplers.bpf_sampler import BCC_LOCK, release_compiler_memory
from fleetprof.node_agent.symbolize.elf import MappedFiles
from fleetprof.node_agent.symbolize.process import Mapping, executable_mappings
from fleetprof.node_agent.unwind.tables import FileIdentity, FileRows, UnwindTables

log = logging.getLogger(__name__)

TABLES_SOURCE = Path(__file__).parents[1] / "samplers" / "unwind_tables.bpf.h"
# unwind_tables.bpf.h's STAT_* indices.
STAT_NAMES = (
    "table_frames",
    "pointer_frames",
    "unknown_pid_stacks",
    "no_row_frames",
    "truncated_stacks",
    "bad_reads",
)
# When rows run out, processes not sampled for this long make room.
IDLE_S = 30.0
# A sampled process is loaded once it has outlived its first sample by this long: most
# processes of a busy node are sampled once or twice and gone, and a load and its removal
# cost a millisecond. Until then its stacks are walked by frame pointer.
LOAD_AFTER_S = 0.1
# The loader looks at `unwind_pending` this often when none is left there: what first-sample
# events do not announce (sessions' samplers, processes evicted and sampled again) waits
# this long.
LOADER_PERIOD_S = 1.0
# Files at least this large are parsed by a thread of their own.
LARGE_FILE = 16 << 20
_DELETED = " (deleted)"
_VDSO = "[vdso]"


@dataclass
class _Wait:
    """A file some loaded processes map, whose rows are not parsed yet."""

    size: int
    paths: tuple[str, ...]  # where it can be opened
    mappings: list[tuple[_Process, int, int, int]]  # (process, start, end, file offset)
    parsing: bool = False


@dataclass
class _FileSlot:
    start: int
    count: int
    users: int  # processes mapping the file


@dataclass
class _Code:
    """Rows of code a runtime generates (a JVM's code cache), over [low, high)."""

    low: int
    high: int
    rows: array
    slot: tuple[int, int] | None = None  # (start, count) in the kernel array, once put there
    keys: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class _Process:
    pid: int
    keys: list[tuple[int, int]]  # (address prefix, prefix length) inserted
    files: list[FileIdentity | bytes]  # build id, or the file's identity without one


class NativeUnwinder:
    """Owns the shared tables; samplers built with `options` unwind with them."""

    def __init__(self, options: SamplerOptions, cache_dir: str | None = None) -> None:
        self.id = f"u{uuid.uuid4().hex[:10]}"
        self.options = replace(options, native_unwind=self.id)
        self._tables = UnwindTables(cache_dir)
        text = TABLES_SOURCE.read_bytes().replace(b"UNWIND_ID", self.id.encode())
        with BCC_LOCK:
            self._bpf = BPF(text=text, cflags=[*self.options.cflags(), "-DUNWIND_OWNER=1"])
            release_compiler_memory()
        self._rows_fd = self._bpf[f"unwind_rows_{self.id}".encode()].map_fd
        self._ranges = self._bpf[f"unwind_ranges_{self.id}".encode()]
        self._pids = self._bpf[f"unwind_pids_{self.id}".encode()]
        self._pending = self._bpf[f"unwind_pending_{self.id}".encode()]
        self._stats = self._bpf[f"unwind_stats_{self.id}".encode()]
        self._files: dict[FileIdentity | bytes, _FileSlot] = {}
        self._free: list[tuple[int, int]] = [(0, options.max_unwind_rows)]  # (start, count)
        self._processes: dict[int, _Process] = {}
        self._waiting: dict[FileIdentity, _Wait] = {}
        # When the loader first saw each pending pid.
        self._pending_since: dict[int, float] = {}
        # Pids announced (first samples, new code) -> (when, their mappings if given): loaded
        # by the agent's event thread (load_due), without a look through `unwind_pending`,
        # a syscall per entry.
        self._announced: dict[int, tuple[float, Sequence[Mapping] | None]] = {}
        # Mapped files' identities: a new process's common libraries need no stat each.
        self._mapped = MappedFiles()
        self._announced_lock = threading.Lock()
        self._code: dict[int, _Code] = {}
        self.counts = {
            "processes_loaded": 0,
            "evicted": 0,
            "rows_full": 0,
            "ranges_full": 0,
            "no_cfi_files": 0,
        }
        # The worker threads and the agent's event thread (load_due, forget) share the state.
        self._lock = threading.Lock()
        # Notified when files wait to be parsed: the parser threads sleep until then.
        self._files_waiting = threading.Condition(self._lock)
        self._stop = threading.Event()
        # Processes load at once; files are parsed smallest first, large ones (seconds
        # each) in a thread of their own, so a small binary never waits behind them.
        self._threads = [
            threading.Thread(target=self._load_pending, name="unwind-loader", daemon=True),
            *(
                threading.Thread(target=self.parse, args=(large,), name=name, daemon=True)
                for name, large in (("unwind-parser", False), ("unwind-large-parser", True))
            ),
        ]
        for thread in self._threads:
            thread.start()

    # Process lifecycle.

    def sampled(self, pid: int, mappings: Sequence[Mapping] | None = None) -> None:
        """pid was sampled for the first time, or mapped new code: load_due loads it once
        it has outlived that by LOAD_AFTER_S. `mappings`: pid's executable mappings as just
        read (the symbolizer's snapshot), which spares reading them again."""
        with self._announced_lock:
            since = self._announced.get(pid, (time.monotonic(), None))[0]
            self._announced[pid] = (since, mappings)

    def load_due(self) -> None:
        """Load the announced processes sampled at least LOAD_AFTER_S ago: a millisecond
        each, with their files parsed (the others are added when they are).

        Called at every wake-up of the agent's event loop, which wakes for first samples
        and at least every EVENT_POLL_MS: loads come 0.1-0.35 s after the first sample,
        without a wake-up of their own (a cold wake costs a process as much as its load)."""
        now = time.monotonic()
        with self._announced_lock:
            due = [
                (pid, mappings)
                for pid, (since, mappings) in self._announced.items()
                if now - since >= LOAD_AFTER_S
            ]
            for pid, _ in due:
                del self._announced[pid]
        for pid, mappings in due:
            self.load(pid, mappings)
            self._pending.pop(self._pending.Key(pid), None)  # its samples' own report

    def _load_pending(self) -> None:
        while not self._stop.is_set():
            self._stop.wait(LOAD_AFTER_S if self.poll_pending() else LOADER_PERIOD_S)

    def poll_pending(self) -> bool:
        """Load the processes the kernel reports sampled without tables that nobody
        announced (sessions' samplers, processes evicted and sampled again) once they have
        been pending for LOAD_AFTER_S; those gone are dropped. Whether some are left."""
        now = time.monotonic()
        with self._announced_lock:
            announced = set(self._announced)
        left, since = False, {}
        for key in list(self._pending):
            pid = key.value
            if pid in announced:
                continue
            first = self._pending_since.get(pid, now)
            if now - first >= LOAD_AFTER_S or not os.path.exists(f"/proc/{pid}"):
                self.load(pid)
                self._pending.pop(key, None)
            else:
                since[pid] = first
                left = True
        self._pending_since = since
        return left

    def parse(self, large: bool) -> None:
        """Parse the files loaded processes wait for (of those at least LARGE_FILE bytes if
        `large`, else of those below), until close(), in the order that has processes
        wait least in all: by size over the number of mappings waiting for it (a small
        binary before libc, libc before a library as large that one process maps)."""
        while not self._stop.is_set():
            with self._lock:
                candidates = [
                    (wait.size / len(wait.mappings), wait.size, identity)
                    for identity, wait in self._waiting.items()
                    if not wait.parsing and (wait.size >= LARGE_FILE) == large
                ]
                if not candidates:
                    self._files_waiting.wait()
                    continue
                identity = min(candidates)[2]
                wait = self._waiting[identity]
                wait.parsing = True
            found = self._tables.get(wait.paths)  # not under the lock: seconds, for some
            with self._lock:
                del self._waiting[identity]
                if found is None or found[0] != identity:
                    continue  # gone or replaced since: its processes load it anew if sampled
                for process, start, end, offset in wait.mappings:
                    if self._processes.get(process.pid) is process:
                        self._map(process, identity, found[1], start, end, offset)

    def load(self, pid: int, mappings: Sequence[Mapping] | None = None) -> bool:
        """(Re)load pid's mappings (read now if not given); False if it is gone (nothing is
        left of it then). Mappings of files not parsed yet are added when they are."""
        if mappings is None:
            mappings = _file_mappings(pid)
        elif not os.path.exists(f"/proc/{pid}"):
            mappings = []  # exited since: its exit may already have been handled
        with self._lock:
            self._forget(pid)
            if not mappings:
                return False
            process = self._processes[pid] = _Process(pid, [], [])
            for mapping in mappings:
                start, end, offset, path = mapping.start, mapping.end, mapping.offset, mapping.path
                if not path.startswith("/") and path != _VDSO:
                    continue  # JIT code, [vsyscall]: frame pointers
                found = self._tables.vdso if path == _VDSO else self._peek(pid, mapping)
                if found is None:
                    continue
                identity, rows = found
                if rows is not None:
                    self._map(process, identity, rows, start, end, offset)
                else:
                    paths = (f"/proc/{pid}/map_files/{start:x}-{end:x}", _under_root(pid, path))
                    wait = self._waiting.setdefault(identity, _Wait(identity[2], paths, []))
                    wait.mappings.append((process, start, end, offset))
                    self._files_waiting.notify_all()
            code = self._code.get(pid)
            if code is not None:
                self._put_code(pid, code)
            self._pids[self._pids.Key(pid)] = self._pids.Leaf(time.monotonic_ns())
            self.counts["processes_loaded"] += 1
            return True

    def _peek(self, pid: int, mapping: Mapping) -> tuple[FileIdentity, FileRows | None] | None:
        """The mapped file's identity and its rows if in memory (UnwindTables.peek), without
        a stat for a file whose identity is known (MappedFiles)."""
        identity = self._mapped.recent(mapping.dev, mapping.inode)
        rows = self._tables.in_memory(identity) if identity is not None else None
        if identity is not None and rows is not None:
            return identity, rows
        map_file = f"/proc/{pid}/map_files/{mapping.start:x}-{mapping.end:x}"
        found = self._tables.peek((map_file, _under_root(pid, mapping.path)))
        if found is not None:
            self._mapped.seen(mapping.dev, mapping.inode, found[0])
        return found

    def _map(
        self,
        process: _Process,
        identity: FileIdentity,
        rows: FileRows,
        start: int,
        end: int,
        offset: int,
    ) -> None:
        """Put one mapping of a parsed file in the kernel's ranges."""
        address = rows.layout.file_address(offset)
        if address is None:
            return
        slot = self._attach(identity, rows, process)
        value = self._ranges.Leaf(
            start - address, slot.start if slot else 0, slot.count if slot else 0
        )
        self._insert_range(process.pid, start, end, value, process.keys)

    def pids(self) -> set[int]:
        """The processes loaded."""
        with self._lock:
            return set(self._processes)

    def forget(self, pid: int) -> None:
        """pid exited (or exec'd): drop its ranges, its files' references and any load
        it waits for; most sampled processes of a busy node go before their load is due."""
        with self._announced_lock:
            self._announced.pop(pid, None)
        self._pending.pop(self._pending.Key(pid), None)  # its samples' own report
        with self._lock:
            self._forget(pid)
            self._code.pop(pid, None)

    def _forget(self, pid: int) -> bool:
        process = self._processes.pop(pid, None)
        if process is None:
            return False
        self._pids.pop(self._pids.Key(pid), None)
        for address, length in process.keys:
            self._ranges.pop(self._range_key(pid, address, length), None)
        code = self._code.get(pid)
        if code is not None:
            self._take_code(pid, code)  # kept, to be put back when pid loads again
        for identity in process.files:
            slot = self._files[identity]
            slot.users -= 1
            if not slot.users:
                del self._files[identity]
                self._release(slot.start, slot.count)
        return True

    def complete(self, pid: int) -> bool:
        """pid is loaded and every file it maps is parsed: its stacks are whole from now."""
        with self._lock:
            process = self._processes.get(pid)
            return process is not None and not any(
                waiting is process
                for wait in self._waiting.values()
                for waiting, *_ in wait.mappings
            )

    def stats(self) -> dict[str, int]:
        kernel = {name: int(self._stats.sum(i).value) for i, name in enumerate(STAT_NAMES)}
        used = sum(slot.count for slot in self._files.values())
        return {
            **kernel,
            **self.counts,
            "files": len(self._files),
            "files_waiting": len(self._waiting),
            "rows": used,
        }

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            self._files_waiting.notify_all()
        for thread in self._threads:
            thread.join()
        with BCC_LOCK:
            self._bpf.cleanup()

    # Files and their rows.

    def _attach(
        self, identity: FileIdentity, rows: FileRows, process: _Process
    ) -> _FileSlot | None:
        """The file's rows in the kernel array, written on first use; None without rows.
        Copies of one build (a library in every virtualenv, every container image) share
        them."""
        identity = rows.layout.build_id or identity
        slot = self._files.get(identity)
        if slot is None:
            if not rows.rows:
                self.counts["no_cfi_files"] += 1
                return None
            start = self._allocate(len(rows.rows))
            while start is None and self._evict_idle(process):
                start = self._allocate(len(rows.rows))
            if start is None:
                self.counts["rows_full"] += 1
                log.warning(
                    "unwind rows full: %d rows of a file left to frame pointers", len(rows.rows)
                )
                return None
            self._write_rows(start, rows.rows)
            slot = self._files[identity] = _FileSlot(start, len(rows.rows), 0)
        if identity not in process.files:
            slot.users += 1
            process.files.append(identity)
        return slot

    def _evict_idle(self, keep: _Process) -> bool:
        """Forget the process sampled least recently, if it has not been for IDLE_S (it
        loads again at its next sample); False if none has been idle that long."""
        idle_since = time.monotonic_ns() - int(IDLE_S * 1e9)
        last = {}
        for pid in self._processes:
            sampled = self._pids.get(self._pids.Key(pid))
            if pid != keep.pid and sampled is not None and sampled.value < idle_since:
                last[pid] = sampled.value
        if not last:
            return False
        self._forget(min(last, key=last.__getitem__))
        self.counts["evicted"] += 1
        return True

    def _write_rows(self, start: int, rows: array) -> None:
        """Write rows at index start of the kernel's array, through a mapping of just their
        pages: the whole array (64 MiB) mapped into the agent would count in its RSS."""
        first = start * 8 // mmap.PAGESIZE * mmap.PAGESIZE
        end = (start + len(rows)) * 8
        with mmap.mmap(self._rows_fd, end - first, offset=first) as window:
            window[start * 8 - first : end - first] = rows.tobytes()

    def _allocate(self, count: int) -> int | None:
        for i, (start, free) in enumerate(self._free):
            if free >= count:
                if free == count:
                    del self._free[i]
                else:
                    self._free[i] = (start + count, free - count)
                return start
        return None

    def _release(self, start: int, count: int) -> None:
        self._free.append((start, count))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for at, free in self._free:
            if merged and merged[-1][0] + merged[-1][1] == at:
                merged[-1] = (merged[-1][0], merged[-1][1] + free)
            else:
                merged.append((at, free))
        self._free = merged

    # Code generated at run time: its rows are given, not parsed (unwind/hotspot.py).

    def set_code_rows(self, pid: int, low: int, high: int, rows: array) -> None:
        """pid's generated code in [low, high) unwinds by `rows` (addresses from low) from
        now on, in place of the rows given before; kept until forget_code_rows or its exit."""
        with self._lock:
            old = self._code.get(pid)
            code = self._code[pid] = _Code(low, high, rows)
            if pid in self._processes:
                self._put_code(pid, code)
            if old is not None:
                # Keys the new ranges did not overwrite, and the old rows, once unused.
                for key in set(old.keys) - set(code.keys):
                    self._ranges.pop(self._range_key(pid, *key), None)
                if old.slot is not None:
                    self._release(*old.slot)

    def forget_code_rows(self, pid: int) -> None:
        with self._lock:
            code = self._code.pop(pid, None)
            if code is not None:
                self._take_code(pid, code)

    def _put_code(self, pid: int, code: _Code) -> None:
        start = self._allocate(len(code.rows)) if code.rows else None
        while code.rows and start is None and self._evict_idle(self._processes[pid]):
            start = self._allocate(len(code.rows))
        if start is None:
            self.counts["rows_full"] += bool(code.rows)
            return
        self._write_rows(start, code.rows)
        code.slot = (start, len(code.rows))
        value = self._ranges.Leaf(code.low, start, len(code.rows))
        self._insert_range(pid, code.low, code.high, value, code.keys)

    def _take_code(self, pid: int, code: _Code) -> None:
        for address, length in code.keys:
            self._ranges.pop(self._range_key(pid, address, length), None)
        code.keys.clear()
        if code.slot is not None:
            self._release(*code.slot)
            code.slot = None

    # Ranges: a mapping as the aligned address blocks an LPM trie matches.

    def _insert_range(
        self, pid: int, start: int, end: int, value: ctypes.Structure, keys: list[tuple[int, int]]
    ) -> bool:
        for address, length in _prefixes(start, end):
            try:
                self._ranges[self._range_key(pid, address, length)] = value
            except Exception:  # BCC raises a bare Exception when the trie is full
                self.counts["ranges_full"] += 1
                log.warning("unwind ranges full: pid %d left to frame pointers past here", pid)
                return False
            keys.append((address, length))
        return True

    def _range_key(self, pid: int, address: int, length: int) -> ctypes.Structure:
        key = self._ranges.Key()
        key.prefixlen = 32 + length
        key.pid = int.from_bytes(pid.to_bytes(4, "big"), "little")
        key.address = int.from_bytes(address.to_bytes(8, "big"), "little")
        return key


def _under_root(pid: int, path: str) -> str:
    """A mapped file's path as the agent opens it: under the process's root (containers)."""
    return f"/proc/{pid}/root{path.removesuffix(_DELETED)}"


def _file_mappings(pid: int) -> list[Mapping]:
    """pid's executable mappings (no symbols); [] if it is gone."""
    try:
        found = executable_mappings(pid)
    except OSError:
        return []
    return [
        Mapping(start, end, offset, path, dev, inode, "", None)
        for start, end, offset, dev, inode, path in found
    ]


def _prefixes(start: int, end: int) -> list[tuple[int, int]]:
    """[start, end) as aligned power-of-two blocks: (address, prefix length in bits)."""
    blocks = []
    while start < end:
        size = start & -start if start else 1 << 64
        while size > end - start:
            size >>= 1
        blocks.append((start, 65 - size.bit_length()))
        start += size
    return blocks
