"""Symbolizer: the agent's one entry point from raw stack addresses to frames."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Container, Iterable, Sequence

from fleetprof.node_agent.samplers.stack_maps import USER_TRUNCATED, PythonFrame
from fleetprof.node_agent.symbolize.debuginfod import DebuginfodClient
from fleetprof.node_agent.symbolize.elf import ElfCache, ElfSymbols
from fleetprof.node_agent.symbolize.frame import Frame, LruCache
from fleetprof.node_agent.symbolize.hotspot import HotSpotSymbolizer
from fleetprof.node_agent.symbolize.kernel import KernelSymbols
from fleetprof.node_agent.symbolize.names import native_name, runtime_frame
from fleetprof.node_agent.symbolize.perfmap import PerfMapCache
from fleetprof.node_agent.symbolize.process import (
    Mapping,
    ProcessIdentity,
    ProcessSnapshot,
    read_stat,
    take_snapshot,
)
from fleetprof.node_agent.symbolize.python import PythonProcesses
from fleetprof.proto.stacks import TRUNCATED_FRAME

UNKNOWN = Frame("[unknown]", "", "unknown")
# The root of a user stack deeper than BPF keeps (stack_maps.USER_TRUNCATED).
TRUNCATED = Frame(*TRUNCATED_FRAME)
# Native frames remembered by file offset (then all forgotten, and remembered anew).
NATIVE_FRAMES_REMEMBERED = 65_536
_NOT_NAMED = Frame("", "", "")


def _callsite(addrs: Sequence[int]) -> Iterable[int]:
    """The addresses to look up: every frame but the leaf holds a return address, which
    points after its call and so can already be in the next function (calls to noreturn
    functions end theirs); one byte back is inside the call instruction."""
    for i, addr in enumerate(addrs):
        yield addr - 1 if i else addr


class Symbolizer:
    """Turns (pid, raw user addresses) and raw kernel addresses into frames.

    Process snapshots are kept from remember(pid) until forget(pid), so samples drained after
    a process exited still resolve; ELF symbol tables and perf maps are cached per file and
    per process, all bounded. Not thread-safe: one drain thread owns it.

    stats counts user and kernel frames looked up, those left unknown, JIT frames with no
    perf map entry, and snapshots taken.

    HotSpot JVMs' Java frames are named from their memory first (symbolize/hotspot.py: inlined
    methods as frames of their own, interpreted methods by name), from their perf maps else.
    A frame named from a perf map has the entry as its module (the full Java signature,
    say) and a readable name (names.runtime_frame); C++ symbols are demangled. on_snapshot,
    if set, sees every snapshot taken (the agent finds its JVMs there).

    With a debuginfod client, stripped files with no debug file here get theirs fetched in
    the background; take_debug_info() names their frames from those that arrived.
    """

    def __init__(
        self,
        *,
        max_processes: int = 8192,
        resnapshot_interval: float = 1.0,
        elf_cache: ElfCache | None = None,
        perf_maps: PerfMapCache | None = None,
        kernel: KernelSymbols | None = None,
        debuginfod: DebuginfodClient | None = None,
    ) -> None:
        self.resnapshot_interval = resnapshot_interval
        self.debuginfod = debuginfod
        self.stats = dict.fromkeys(
            ("user_frames", "kernel_frames", "unknown", "jit_unresolved", "snapshots"), 0
        )
        self._snapshots: LruCache[int, ProcessSnapshot] = LruCache(max_processes)
        self._elf_cache = elf_cache or ElfCache(remote=debuginfod)
        self._perf_maps = perf_maps or PerfMapCache()
        self._kernel = kernel
        self.hotspot = HotSpotSymbolizer()
        # CPython processes: found in snapshots, their frames merged into native stacks.
        self.python = PythonProcesses()
        self.on_snapshot: Callable[[ProcessSnapshot], None] | None = None
        # Per pid since take_jit_activity(): frames looked up in JIT code, and those missed.
        self._jit_lookups: Counter[int] = Counter()
        self._jit_misses: Counter[int] = Counter()
        # (symbol table, file offset, module) -> frame, or None where no symbol covers it.
        self._native_frames: dict[tuple[ElfSymbols | None, int, str], Frame | None] = {}

    def remember(self, pid: int, identity: ProcessIdentity | None = None) -> ProcessSnapshot | None:
        """Snapshot pid, new or changed (exec, new executable mapping), until forget(pid);
        `identity`, if the kernel gave it, spares reading it from /proc. The snapshot taken.

        A failed snapshot (the process already exited) keeps the previous one.
        """
        snapshot = self._take(pid, identity)
        if snapshot is not None:
            # Read its perf map now, if it has code outside files (a JIT's): the process
            # may be gone by the time its samples drain. (JIT code mapped later is new
            # code: remembered again.)
            if any(mapping.anonymous for mapping in snapshot.mappings):
                self._perf_maps.get(pid, snapshot.nspid)
            if snapshot.hotspot:  # and a JVM's layout, for the same reason
                self.hotspot.process(snapshot)
        return snapshot

    def take_debug_info(self) -> int:
        """Name frames from the debug files fetched since the last call (debuginfod) from
        now on; how many symbol tables got names."""
        given = self.debuginfod.deliver() if self.debuginfod is not None else 0
        if given:
            self._native_frames.clear()  # frames found unnamed, or named from .dynsym
        return given

    def forget(self, pid: int) -> None:
        """Drop what is known of pid, once its last samples were symbolized."""
        self._snapshots.pop(pid)
        self._perf_maps.forget(pid)
        self.hotspot.forget(pid)
        self.python.forget(pid)

    def reload_perf_map(self, pid: int, root: str | None = None) -> int | None:
        """Read pid's perf map now (its JVM just rewrote it, or is exiting); its size.

        root: the process's root directory, if /proc/PID/root is gone (see PerfMapCache).
        """
        snapshot = self._snapshots.get(pid)
        if snapshot is None:
            return None
        perf_map = self._perf_maps.get(pid, snapshot.nspid, root, fresh=True)
        return len(perf_map) if perf_map is not None else None

    def take_jit_activity(self) -> tuple[Counter[int], Counter[int]]:
        """(JIT frames looked up, those with no perf map entry) per pid since the last call."""
        activity = self._jit_lookups, self._jit_misses
        self._jit_lookups, self._jit_misses = Counter(), Counter()
        return activity

    def prune(self, pids: Iterable[int]) -> None:
        for pid in pids:
            self.forget(pid)

    def exited_pids(self, known: Container[int] = ()) -> set[int]:
        """Remembered processes that are gone (or whose pid now names another process),
        but for those `known` to be: to prune after the drain that follows, which
        symbolizes their last samples."""
        exited = set()
        for pid, snapshot in self._snapshots.items():
            if pid in known:
                continue
            try:
                alive = read_stat(pid)[1] == snapshot.start_time
            except OSError:
                alive = False
            if not alive:
                exited.add(pid)
        return exited

    def process_name(self, pid: int) -> str | None:
        """The comm of pid's main thread when it was last snapshotted."""
        snapshot = self._snapshots.get(pid)
        return snapshot.comm if snapshot is not None else None

    def symbolize_user(self, pid: int, addrs: Sequence[int]) -> list[Frame]:
        """Frames for a user stack, in the order given (leaf first, as BPF gives them); one
        cut short ends with TRUNCATED."""
        if addrs and addrs[-1] == USER_TRUNCATED:
            return [*self.symbolize_user(pid, addrs[:-1]), TRUNCATED]
        if not addrs:
            return []
        snapshot = self._snapshots.get(pid) or self._take(pid)
        self.stats["user_frames"] += len(addrs)
        if snapshot is None:
            self.stats["unknown"] += len(addrs)
            return [UNKNOWN] * len(addrs)
        java = self.hotspot.frames(snapshot, addrs) if snapshot.hotspot else None
        frames = []
        for i, (addr, site) in enumerate(zip(addrs, _callsite(addrs), strict=True)):
            if java is not None and java[i] is not None:
                frames.extend(java[i])  # leaf first, as the stack
                continue
            mapping = snapshot.mapping(site)
            if mapping is None:
                # Maybe code mapped since the snapshot: look again, at most once in a while.
                snapshot = self._refresh(snapshot)
                mapping = snapshot.mapping(site)
            frames.append(self._user_frame(snapshot, mapping, addr, site))
        return frames

    def with_python(
        self, pid: int, native: list[Frame], python: Sequence[PythonFrame]
    ) -> list[Frame]:
        """A user stack's frames (leaf first) with the Python frames BPF read of the
        interpreter put where its evaluation function ran them (see python.py)."""
        return self.python.merge(native, self.python.frames(pid, python))

    def symbolize_kernel(self, addrs: Sequence[int]) -> list[Frame]:
        if self._kernel is None:
            try:
                self._kernel = KernelSymbols.load()
            except OSError:
                self._kernel = KernelSymbols({})
        frames = [self._kernel.resolve(addr) for addr in _callsite(addrs)]
        self.stats["kernel_frames"] += len(frames)
        self.stats["unknown"] += sum(frame.kind == "unknown" for frame in frames)
        return frames

    def _user_frame(
        self, snapshot: ProcessSnapshot, mapping: Mapping | None, addr: int, site: int
    ) -> Frame:
        if mapping is not None and mapping.symbols is not None:
            frame = self._native_frame(mapping, site - mapping.start + mapping.offset)
            if frame is not None:
                return frame
        elif mapping is None or mapping.anonymous:
            perf_map = self._perf_maps.get(snapshot.pid, snapshot.nspid)
            entry = perf_map.resolve(site) if perf_map is not None else None
            if mapping is not None:
                self._jit_lookups[snapshot.pid] += 1
            if entry is not None:
                name, kind = runtime_frame(entry)
                return Frame(name, entry, kind)
            if mapping is not None:
                self.stats["jit_unresolved"] += 1
                self._jit_misses[snapshot.pid] += 1
                return Frame(f"[jit 0x{addr:x}]", "[anon]", "jit")
        self.stats["unknown"] += 1
        # Like perf, name an unsymbolized frame after its binary: "[libc.so.6]".
        if mapping is not None and mapping.module:
            return Frame(f"[{mapping.module}]", mapping.module, "unknown")
        return UNKNOWN

    def _native_frame(self, mapping: Mapping, offset: int) -> Frame | None:
        """The named frame of the code at `offset` of a mapped ELF file, remembered per
        table: every drain names the same hot code again, in each of its stacks."""
        key = (mapping.symbols, offset, mapping.module)
        frame = self._native_frames.get(key, _NOT_NAMED)
        if frame is not _NOT_NAMED:
            return frame
        if len(self._native_frames) >= NATIVE_FRAMES_REMEMBERED:
            self._native_frames.clear()  # and with it the tables it kept alive
        assert mapping.symbols is not None
        name = mapping.symbols.resolve_file_offset(offset)
        frame = Frame(native_name(name), mapping.module, "native") if name is not None else None
        self._native_frames[key] = frame
        return frame

    def _take(self, pid: int, identity: ProcessIdentity | None = None) -> ProcessSnapshot | None:
        snapshot = take_snapshot(pid, self._elf_cache, identity)
        if snapshot is not None:
            self._store(snapshot)
        return snapshot

    def _refresh(self, snapshot: ProcessSnapshot) -> ProcessSnapshot:
        """A new snapshot of the same process, if the last is old enough and it still runs."""
        now = time.monotonic()
        if now - snapshot.checked_at < self.resnapshot_interval:
            return snapshot
        snapshot.checked_at = now
        fresh = take_snapshot(snapshot.pid, self._elf_cache)
        if fresh is None or fresh.start_time != snapshot.start_time:
            return snapshot  # exited, or its pid reused: the old mappings are the right ones
        self._store(fresh)
        return fresh

    def _store(self, snapshot: ProcessSnapshot) -> None:
        self.stats["snapshots"] += 1
        self._snapshots.put(snapshot.pid, snapshot)
        self.python.observe(snapshot)
        if self.on_snapshot is not None:
            self.on_snapshot(snapshot)
