"""Snapshots of a process's executable mappings, usable after the process is gone."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import os
import re
import struct
import threading
import time
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import NamedTuple

from fleetprof.node_agent.symbolize.elf import ElfCache, ElfSymbols

_DELETED = " (deleted)"
# The bracketed pseudo-paths that are not anonymous (JIT) memory.
_VDSO = "[vdso]"  # an ELF image, the same in every process
_VSYSCALL = "[vsyscall]"  # legacy fixed-address entry points, not ELF


class Mapping(NamedTuple):
    start: int
    end: int
    offset: int  # file offset of start
    path: str  # as in /proc/PID/maps, in the process's mount namespace; "" when anonymous
    dev: str  # "major:minor", hex
    inode: int
    module: str  # the path's file name, as frames show it
    # Loaded at snapshot time; None for code that is not in an ELF file (JIT, anonymous).
    symbols: ElfSymbols | None

    @property
    def anonymous(self) -> bool:
        """Code with no file behind it: where JITs put theirs (memfd included)."""
        return _anonymous(self.path)


def _anonymous(path: str) -> bool:
    if path in (_VDSO, _VSYSCALL):
        return False
    return not path or path.startswith(("[", "/memfd:"))


class ProcessIdentity(NamedTuple):
    """What /proc/PID/stat and status say of a process, as the kernel gave it at the
    process's first sample (samplers/new_pids.bpf.h): then only its maps are left to read."""

    comm: str
    start_time: int  # clock ticks after boot
    ppid: int
    nspid: int


@dataclass
class ProcessSnapshot:
    pid: int
    nspid: int  # the pid the process sees, in its innermost PID namespace
    comm: str
    start_time: int  # clock ticks after boot: (pid, start_time) names one process
    exe: str
    mappings: list[Mapping]  # executable ones, sorted by start
    # When taken, or last found still current (time.monotonic()).
    checked_at: float = field(default_factory=time.monotonic)
    ppid: int = 0  # its parent when taken (0: unknown)
    _starts: list[int] = field(init=False, repr=False)
    # A HotSpot JVM: its libjvm.so is mapped (OpenJ9's is libj9vm*, GraalVM native images
    # have none). Asked for every stack: found once.
    hotspot: bool = field(init=False)

    def __post_init__(self) -> None:
        self._starts = [m.start for m in self.mappings]
        self.hotspot = any(m.module == "libjvm.so" for m in self.mappings)

    def mapping(self, addr: int) -> Mapping | None:
        i = bisect_right(self._starts, addr) - 1
        if i >= 0 and addr < self.mappings[i].end:
            return self.mappings[i]
        return None


def take_snapshot(
    pid: int, elf_cache: ElfCache, identity: ProcessIdentity | None = None
) -> ProcessSnapshot | None:
    """Snapshot pid, loading the symbols of its executable mappings (shared via elf_cache);
    its identity read from /proc unless given.

    None if the process is gone, is a zombie or kernel thread (no mappings), or is not ours to
    read: races with exit are normal here and never raise.
    """
    try:
        found = executable_mappings(pid)
        if identity is None:
            comm, start_time = read_stat(pid)
            status = read_proc(f"/proc/{pid}/status").decode("utf-8", "replace")
            identity = ProcessIdentity(comm, start_time, _ppid(status), _nspid(status, pid))
    except OSError:
        return None
    mappings = []
    for start, end, offset, dev, inode, path in found:
        file = path.removesuffix(_DELETED)
        symbols = None
        if path == _VDSO:
            symbols = vdso_symbols()
        elif path != _VSYSCALL and not _anonymous(path):
            symbols = _load(pid, start, end, file, dev, inode, elf_cache)
        module = file.rpartition("/")[2]
        mappings.append(Mapping(start, end, offset, path, dev, inode, module, symbols))
    if not mappings:
        return None
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        exe = ""
    return ProcessSnapshot(
        pid, identity.nspid, identity.comm, identity.start_time, exe, mappings, ppid=identity.ppid
    )


# A line of /proc/PID/maps for executable memory: start-end perms offset dev inode [path].
_EXECUTABLE_LINE = re.compile(
    r"^([0-9a-f]+)-([0-9a-f]+) ..x. ([0-9a-f]+) ([0-9a-f]+:[0-9a-f]+) (\d+) *(.*)$", re.M
)

ExecutableMapping = tuple[int, int, int, str, int, str]


def executable_mappings(pid: int) -> list[ExecutableMapping]:
    """(start, end, file offset, device, inode, path) of pid's executable mappings, as
    /proc/PID/maps gives them; raises OSError if the process is gone.

    Asked with PROCMAP_QUERY (Linux 6.11) where the kernel has it: only the executable
    mappings, without the kernel formatting and this parsing every line (a Python process's
    ~20 of ~100: 42 us against 118); else from the text."""
    path = f"/proc/{pid}/maps"
    if _PROCMAP_QUERY.supported:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            found = _PROCMAP_QUERY.executable(fd)
        finally:
            os.close(fd)
        if found is not None:
            return found + _vsyscall()
    return _parsed_executable_mappings(read_proc(path).decode("utf-8", "replace"))


def _parsed_executable_mappings(maps: str) -> list[ExecutableMapping]:
    """The executable mappings of a /proc/PID/maps text."""
    return [
        (int(start, 16), int(end, 16), int(offset, 16), dev, int(inode), path)
        for start, end, offset, dev, inode, path in _EXECUTABLE_LINE.findall(maps)
    ]


class _ProcmapQuery:
    """The PROCMAP_QUERY ioctl on an open /proc/PID/maps (linux/fs.h): the first mapping
    with the asked permissions at or after an address, with its file's path."""

    # struct procmap_query: size, query_flags, query_addr, vma_start, vma_end, vma_flags,
    # vma_page_size, vma_offset, inode, dev_major, dev_minor, vma_name_size,
    # build_id_size, vma_name_addr, build_id_addr.
    _FORMAT = struct.Struct("<QQQQQQQQQIIIIQQ")
    # Set before each call: query_addr, and vma_name_size (in: the buffer's size; out: the
    # name's). Read of the reply: vma_start, vma_end, vma_offset to vma_name_size.
    _ADDRESS, _NAME_SIZE = struct.Struct("<Q"), struct.Struct("<I")
    _REPLY = struct.Struct("<24xQQ16xQQIII")
    _REQUEST = (3 << 30) | (_FORMAT.size << 16) | (ord("f") << 8) | 17  # _IOWR('f', 17, ...)
    _EXECUTABLE, _COVERING_OR_NEXT = 0x04, 0x10
    _NAME_BYTES = 4096  # PATH_MAX

    def __init__(self) -> None:
        self.supported = True
        # Per thread: the symbolizer and the unwinder's loader thread ask at once.
        self._buffers = threading.local()

    def _request(self) -> tuple[bytearray, ctypes.Array[ctypes.c_char]]:
        """This thread's request, its fixed fields set once, and its name buffer."""
        try:
            return self._buffers.request, self._buffers.name
        except AttributeError:
            name = ctypes.create_string_buffer(self._NAME_BYTES)
            request = bytearray(self._FORMAT.size)
            self._FORMAT.pack_into(
                request, 0, self._FORMAT.size, self._EXECUTABLE | self._COVERING_OR_NEXT, 0,
                0, 0, 0, 0, 0, 0, 0, 0, self._NAME_BYTES, 0, ctypes.addressof(name), 0,
            )  # fmt: skip
            self._buffers.request, self._buffers.name = request, name
            return request, name

    def executable(self, fd: int) -> list[ExecutableMapping] | None:
        """fd's process's executable mappings; None if the text must tell (a kernel
        without the ioctl, a path longer than PATH_MAX)."""
        found: list[ExecutableMapping] = []
        request, name = self._request()
        address = 0
        while True:
            self._ADDRESS.pack_into(request, 16, address)
            self._NAME_SIZE.pack_into(request, 80, self._NAME_BYTES)
            try:
                fcntl.ioctl(fd, self._REQUEST, request)
            except OSError as exc:
                if exc.errno == errno.ENOENT:  # no mapping left
                    return found
                if exc.errno in (errno.ENOTTY, errno.EINVAL):
                    self.supported = False
                if exc.errno in (errno.ENOTTY, errno.EINVAL, errno.ENAMETOOLONG):
                    return None
                raise  # ESRCH: its memory is gone
            start, end, offset, inode, major, minor, name_size = self._REPLY.unpack_from(request)
            path = name[: name_size - 1].decode("utf-8", "replace") if name_size else ""
            found.append((start, end, offset, f"{major:02x}:{minor:02x}", inode, path))
            address = end


_PROCMAP_QUERY = _ProcmapQuery()


@functools.cache
def _vsyscall() -> list[ExecutableMapping]:
    """The [vsyscall] page, as the text lists it: the same in every process, and not a
    mapping of the process's own that the ioctl would find."""
    with open("/proc/self/maps", encoding="utf-8") as f:
        return [m for m in _parsed_executable_mappings(f.read()) if m[5] == _VSYSCALL]


# Bytes asked of a /proc file per read: most (environ, cmdline, stat) fit in one.
_PROC_READ = 16384


def read_proc(path: str) -> bytes:
    """A /proc file's bytes; raises OSError if it cannot be read (its process is gone).

    Four system calls: open() would add five (fstat twice, a tty check, two seeks) to every
    file of every process sampled."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, _PROC_READ):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_stat(pid: int) -> tuple[str, int]:
    """(comm, start time) of pid, from /proc/PID/stat; raises OSError if it is gone.

    A zombie counts as gone: it has no mappings left and its pid is about to be reused.
    """
    stat = read_proc(f"/proc/{pid}/stat").decode("utf-8", "replace")
    # comm is in parentheses and may itself contain ") ".
    open_paren, close_paren = stat.find("("), stat.rfind(")")
    fields = stat[close_paren + 2 :].split()
    if open_paren < 0 or len(fields) < 20 or fields[0] in ("Z", "X"):
        raise ProcessLookupError(pid)
    return stat[open_paren + 1 : close_paren], int(fields[19])


def _ppid(status: str) -> int:
    for line in status.split("\n"):
        if line.startswith("PPid:"):
            return int(line.split()[1])
    return 0


def _nspid(status: str, pid: int) -> int:
    for line in status.split("\n"):
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    return pid  # kernels before 4.1 have no NSpid: no PID namespaces to worry about


def _load(
    pid: int, start: int, end: int, file: str, dev: str, inode: int, elf_cache: ElfCache
) -> ElfSymbols:
    """The symbols of `file` mapped at start-end, read as the process sees the file.

    map_files opens the very file mapped, even deleted or replaced since, or shadowed in the
    process's mount namespace; it needs CAP_SYS_ADMIN. Else the path, under the process's root.
    """
    path = f"/proc/{pid}/root{file}"
    map_file = f"/proc/{pid}/map_files/{start:x}-{end:x}"
    symbols = elf_cache.get_mapped(dev, inode, (map_file, path), path)
    return symbols if symbols is not None else ElfSymbols()


@functools.cache
def vdso_image() -> bytes:
    """The vDSO, an ELF image: one per kernel, so the agent's own copy serves everyone."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            line = next(line for line in f if line.rstrip().endswith(_VDSO))
        start, end = (int(bound, 16) for bound in line.split()[0].split("-"))
        with open("/proc/self/mem", "rb", buffering=0) as mem:
            mem.seek(start)
            return mem.read(end - start)
    except (OSError, StopIteration):
        return b""


@functools.cache
def vdso_symbols() -> ElfSymbols:
    """The vDSO's symbols."""
    image = vdso_image()
    return ElfSymbols.from_bytes(image) if image else ElfSymbols()
