"""A minimal ELF64 little-endian symbol reader: function symbols of .symtab and .dynsym.

Only the headers and the symbol/string tables are read (os.pread, never the whole file and
never mmap: a binary truncated under us must not SIGBUS the agent). Samples give runtime
addresses; the caller turns them into file offsets through /proc/PID/maps, and the PT_LOAD
segments turn those into the symbol table's virtual addresses, which works the same for PIE
and non-PIE executables and shared libraries.
"""

from __future__ import annotations

import lzma
import os
import stat
import struct
import time
from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from itertools import accumulate
from typing import NamedTuple, Protocol

import numpy as np

from fleetprof.node_agent.symbolize.frame import LruCache

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_ELF64_LE = b"\x7fELF\x02\x01"
_PT_LOAD = 1
_PF_X = 1
_STT_OBJECT = 1
_STT_FUNC = 2
_STT_GNU_IFUNC = 10
_STB_LOCAL = 0
_STB_GLOBAL = 1
_MAX_ADDRESS = (1 << 64) - 1


class ElfSymbols:
    """The function symbols of one ELF file, sorted for bisection."""

    __slots__ = ("__weakref__", "_ends", "_names", "_segments", "_starts", "variables")

    def __init__(
        self,
        segments: list[tuple[int, int, int]] | None = None,
        symbols: SymbolColumns | None = None,
        variables: dict[str, int] | None = None,
    ) -> None:
        # (p_offset, p_offset + p_filesz, p_vaddr - p_offset), executable segments first.
        self._segments = segments or []
        # Addresses (p_vaddr) of the exported variables runtimes describe themselves with
        # (HotSpot's gHotSpotVM* tables: symbolize/hotspot.py); only those, so few.
        self.variables = variables or {}
        starts, ends, self._names = (symbols or SymbolColumns.empty()).best_per_address()
        # Arrays, not numpy's: bisect on them is several times faster for one address.
        self._starts = array("Q", starts.tobytes())
        self._ends = array("Q", ends.tobytes())

    @classmethod
    def load(cls, path: str) -> ElfSymbols:
        """Read path's symbols; an unreadable, non-ELF or corrupt file gives an empty table."""
        try:
            with opened(path) as found:
                return cls._from_fd(*found, path) if found else cls()
        except OSError:
            return cls()

    @classmethod
    def from_bytes(cls, image: bytes) -> ElfSymbols:
        """Symbols of an in-memory ELF image (the vDSO)."""
        return cls._parse(lambda offset, size: image[offset : offset + size], len(image))

    @classmethod
    def _from_fd(
        cls, fd: int, st: os.stat_result, path: str = "", remote: RemoteDebugInfo | None = None
    ) -> ElfSymbols:
        # Mappings can name devices or FIFOs; only regular files are worth (and safe) reading.
        if not stat.S_ISREG(st.st_mode):
            return cls()
        return cls._parse(file_reader(fd), st.st_size, path, remote)

    @classmethod
    def _parse(
        cls,
        read: Callable[[int, int], bytes],
        file_size: int,
        path: str = "",
        remote: RemoteDebugInfo | None = None,
    ) -> ElfSymbols:
        variables: dict[str, int] = {}
        try:
            layout = read_layout(read, file_size)
            symbols = layout_symbols(read, layout, variables)
        except ValueError:
            return cls()
        if not layout.segments:
            return cls()
        if ".symtab" in layout.sections:
            return cls(layout.segments, symbols, variables)
        # Stripped: the full symbol table may be in a separate debug file, here or remote.
        cached = remote.cached(layout.build_id) if remote and len(layout.build_id) > 1 else None
        separate = separate_debug_symbols(read, layout, path, [cached] if cached else [])
        extra = separate if separate is not None else mini_debug_symbols(read, layout)
        table = cls(layout.segments, SymbolColumns.join([symbols, extra]), variables)
        if separate is None and remote is not None and len(layout.build_id) > 1:
            remote.request(layout.build_id, table)  # named from it once it arrives
        return table

    def __len__(self) -> int:
        return len(self._starts)

    def vaddr(self, offset: int) -> int | None:
        """The virtual address of a file offset, if a loaded segment holds it."""
        for start, end, delta in self._segments:
            if start <= offset < end:
                return offset + delta
        return None

    def take_names(self, other: ElfSymbols) -> None:
        """Name addresses as `other` does from now on (its symbols were found later: a
        debug file fetched in the background). Call it from the thread that resolves."""
        self._starts, self._ends, self._names = other._starts, other._ends, other._names

    def resolve_file_offset(self, offset: int) -> str | None:
        """The function containing the code at this offset of the file, if any."""
        vaddr = self.vaddr(offset)
        if vaddr is None:
            return None
        i = bisect_right(self._starts, vaddr) - 1
        if i < 0 or vaddr >= self._ends[i]:
            return None
        return self._names[i]


class NameBlob:
    """Many names in one str: a str per symbol would cost ~50 bytes of overhead each, and a
    process can map several hundred thousand symbols. Being few large objects, it also
    leaves no small ones scattered among the parser's garbage, which would keep that
    garbage's memory from going back to the system."""

    __slots__ = ("_blob", "_offsets")

    def __init__(self, names: Sequence[str]) -> None:
        self._offsets = array("Q", accumulate(map(len, names), initial=0))
        self._blob = "".join(names)

    @classmethod
    def joined(cls, blob: str, offsets: array) -> NameBlob:
        """Names already joined: name i is blob[offsets[i]:offsets[i + 1]]."""
        names = cls(())
        names._blob, names._offsets = blob, offsets
        return names

    def __getitem__(self, index: int) -> str:
        return self._blob[self._offsets[index] : self._offsets[index + 1]]

    def __len__(self) -> int:
        return len(self._offsets) - 1


_VARIABLE_PREFIX = b"gHotSpotVM"


# Elf64_Sym, as numpy reads a whole table of them at once.
_SYM_DTYPE = np.dtype(
    [
        ("name", "<u4"),
        ("info", "u1"),
        ("other", "u1"),
        ("shndx", "<u2"),
        ("value", "<u8"),
        ("size", "<u8"),
    ]
)


class SymbolColumns(NamedTuple):
    """Defined function symbols of one or more tables, column by column: a table of
    several hundred thousand symbols is read in milliseconds, not a Python loop's second.
    Names are [name_start, name_end) byte ranges of `strings`."""

    value: np.ndarray
    size: np.ndarray
    binding: np.ndarray
    name_start: np.ndarray
    name_end: np.ndarray
    strings: bytes

    @classmethod
    def empty(cls) -> SymbolColumns:
        none = np.zeros(0, np.uint64)
        return cls(none, none, np.zeros(0, np.uint8), none, none, b"")

    @classmethod
    def join(cls, parts: Sequence[SymbolColumns]) -> SymbolColumns:
        """One table of several, in order (earlier ones win ties in best_per_address)."""
        shifts = accumulate((len(part.strings) for part in parts[:-1]), initial=0)
        shifted = [
            (part.name_start + np.uint64(shift), part.name_end + np.uint64(shift))
            for part, shift in zip(parts, shifts, strict=True)
        ]
        return cls(
            np.concatenate([part.value for part in parts]),
            np.concatenate([part.size for part in parts]),
            np.concatenate([part.binding for part in parts]),
            np.concatenate([start for start, _ in shifted]),
            np.concatenate([end for _, end in shifted]),
            b"".join(part.strings for part in parts),
        )

    def best_per_address(self) -> tuple[np.ndarray, np.ndarray, NameBlob]:
        """(starts, ends, names) sorted by address, one symbol per address: a sized,
        non-local one with the fewest leading underscores (`nanosleep` rather than
        `__nanosleep`), global before weak, else the first. A symbol without size covers
        its address up to the next one."""
        text = np.frombuffer(self.strings + b"\0", np.uint8)
        underscores = np.zeros(len(self.value), np.uint64)
        counting = np.ones(len(self.value), bool)
        while counting.any():
            at = self.name_start + underscores
            counting &= (at < self.name_end) & (text[np.minimum(at, len(text) - 1)] == 95)
            underscores += counting
        order = np.lexsort(
            (
                -np.arange(len(self.value)),
                self.binding == _STB_GLOBAL,
                -underscores.astype(np.int64),
                self.binding != _STB_LOCAL,
                self.size > 0,
                self.value,
            )
        )
        values = self.value[order]
        chosen = order[np.append(values[1:] != values[:-1], True)] if len(order) else order
        starts, sizes = self.value[chosen], self.size[chosen]
        following = np.append(starts[1:], np.uint64(_MAX_ADDRESS))
        overflow = starts > np.uint64(_MAX_ADDRESS) - sizes
        ends = np.where(sizes == 0, following, np.where(overflow, _MAX_ADDRESS, starts + sizes))
        return starts, ends.astype(np.uint64), self._names(chosen, text)

    def _names(self, chosen: np.ndarray, text: np.ndarray) -> NameBlob:
        begins = self.name_start[chosen].astype(np.int64)
        lengths = self.name_end[chosen].astype(np.int64) - begins
        offsets = np.concatenate(([0], np.cumsum(lengths)))
        gather = np.repeat(begins - offsets[:-1], lengths) + np.arange(offsets[-1])
        joined = text[gather].tobytes()
        if joined.isascii():  # as symbols are: one decode, byte offsets are str offsets
            return NameBlob.joined(joined.decode("ascii"), array("Q", offsets.tobytes()))
        return NameBlob(
            [
                joined[offsets[i] : offsets[i + 1]].decode("utf-8", "replace")
                for i in range(len(lengths))
            ]
        )


def _read_functions(table: bytes, strings: bytes, variables: dict[str, int]) -> SymbolColumns:
    """The defined function symbols of a symbol table, and the runtime description
    variables (_VARIABLE_PREFIX) into `variables`."""
    entries = np.frombuffer(table, _SYM_DTYPE, len(table) // _SYM_DTYPE.itemsize)
    kind = entries["info"] & 0xF
    name_at = entries["name"].astype(np.uint64)
    # shndx 0 is an undefined (imported) symbol; a name beyond the strings is no name.
    defined = (entries["shndx"] != 0) & (entries["value"] != 0) & (name_at < len(strings))
    text = np.frombuffer(strings, np.uint8)
    objects = np.flatnonzero(defined & (kind == _STT_OBJECT))
    for i in objects[text[name_at[objects]] == _VARIABLE_PREFIX[0]]:
        at = int(name_at[i])
        if strings.startswith(_VARIABLE_PREFIX, at):
            end = strings.find(b"\0", at)
            variables[strings[at:end].decode("ascii", "replace")] = int(entries["value"][i])
    functions = np.flatnonzero(defined & ((kind == _STT_FUNC) | (kind == _STT_GNU_IFUNC)))
    starts = name_at[functions]
    nuls = np.flatnonzero(text == 0).astype(np.uint64)
    after = np.searchsorted(nuls, starts)
    ends = np.append(nuls, np.uint64(len(strings)))[after]
    named = ends > starts
    functions, starts, ends = functions[named], starts[named], ends[named]
    return SymbolColumns(
        entries["value"][functions],
        entries["size"][functions],
        entries["info"][functions] >> 4,
        starts,
        ends,
        strings,
    )


# A file as a stat finds it: (st_dev, st_ino, size, mtime); a replaced binary is another.
FileIdentity = tuple[int, int, int, int]
# How long a mapped file's identity is trusted without a stat (MappedFiles): a library
# rewritten in place (same inode) is read as its old self for at most this.
MAPPED_RECHECK_S = 1.0
MAX_MAPPED_FILES = 65_536


class MappedFiles:
    """Files mapped by processes, by the (device, inode) /proc/PID/maps gives: the identity a
    stat last found, trusted for MAPPED_RECHECK_S. Every new process maps the node's common
    libraries (libc, ld.so, the interpreter): a stat of each, through /proc/PID/map_files,
    was much of what reading a new process cost."""

    def __init__(self) -> None:
        self._known: dict[tuple[str, int], tuple[FileIdentity, float]] = {}

    def recent(self, device: str, inode: int) -> FileIdentity | None:
        known = self._known.get((device, inode))
        if known is not None and time.monotonic() - known[1] < MAPPED_RECHECK_S:
            return known[0]
        return None

    def seen(self, device: str, inode: int, identity: FileIdentity) -> None:
        if len(self._known) >= MAX_MAPPED_FILES:
            self._known.clear()
        self._known[device, inode] = (identity, time.monotonic())


class RemoteDebugInfo(Protocol):
    """Where debug files not on this host come from (symbolize/debuginfod.py)."""

    def cached(self, build_id: bytes) -> str | None:
        """The path of a debug file already fetched for this build id, if any."""
        ...

    def request(self, build_id: bytes, table: ElfSymbols) -> None:
        """Fetch this build id's debug file without waiting; `table` takes its names."""
        ...


class ElfCache:
    """ElfSymbols per file, shared by every process mapping it.

    Keyed by the opened file's (st_dev, st_ino, size, mtime), so a replaced binary is re-read
    while a library mapped by a thousand processes is read once. Bounded by the total number
    of symbols held, which is what the memory follows. `remote`, if given, is asked for the
    debug files of stripped files that have none here.
    """

    def __init__(self, max_symbols: int = 1_000_000, remote: RemoteDebugInfo | None = None) -> None:
        self.remote = remote
        self._tables: LruCache[FileIdentity, ElfSymbols] = LruCache(
            max_symbols, lambda table: max(1, len(table))
        )
        self._mapped = MappedFiles()

    def get(self, path: str, debug_path: str = "") -> ElfSymbols | None:
        """The symbols of the file at path; None when it cannot be opened. `debug_path`
        is where to look for its debug file by .gnu_debuglink when path cannot say (a
        /proc/PID/map_files link)."""
        found = self._get(path, debug_path)
        return found[1] if found is not None else None

    def get_mapped(
        self, device: str, inode: int, paths: Sequence[str], debug_path: str
    ) -> ElfSymbols | None:
        """get() of the first of `paths` that opens, for a file mapped as (device, inode)
        in /proc/PID/maps: one stat'ed recently is not stat'ed again (MappedFiles)."""
        identity = self._mapped.recent(device, inode)
        table = self._tables.get(identity) if identity is not None else None
        if table is not None:
            return table
        for path in paths:
            found = self._get(path, debug_path)
            if found is not None:
                self._mapped.seen(device, inode, found[0])
                return found[1]
        return None

    def _get(self, path: str, debug_path: str) -> tuple[FileIdentity, ElfSymbols] | None:
        # A file already read costs a stat: a new process's libraries are all known.
        try:
            identity = _identity(os.stat(path))
        except OSError:
            return None
        table = self._tables.get(identity)
        if table is not None:
            return identity, table
        try:
            with opened(path) as found:
                if found is None:
                    return None
                table = ElfSymbols._from_fd(*found, debug_path or path, self.remote)
                identity = _identity(found[1])
                self._tables.put(identity, table)
                return identity, table
        except OSError:
            return None


def _identity(st: os.stat_result) -> FileIdentity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


_SHT_NOBITS = 8
_NT_GNU_BUILD_ID = 3
# What file_reader and from_bytes give: read(offset, size) -> bytes.
Reader = Callable[[int, int], bytes]


class ElfLayout(NamedTuple):
    """What readers of an ELF file need of its headers."""

    # (p_offset, p_offset + p_filesz, p_vaddr - p_offset) of PT_LOAD segments, executable
    # ones first.
    segments: list[tuple[int, int, int]]
    # name -> (sh_addr, sh_offset, sh_size) of sections with contents in the file.
    sections: dict[str, tuple[int, int, int]]
    build_id: bytes

    def file_address(self, file_offset: int) -> int | None:
        """The virtual address of the code at this file offset."""
        for start, end, delta in self.segments:
            if start <= file_offset < end:
                return file_offset + delta
        return None

    def section(self, read: Reader, name: str) -> bytes | None:
        found = self.sections.get(name)
        return read(found[1], found[2]) if found else None


@contextmanager
def opened(path: str) -> Iterator[tuple[int, os.stat_result] | None]:
    """(fd, its stat) of the file at path opened read-only, closed after; None if it cannot
    be opened (its stat raises OSError, as a file gone meanwhile)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        yield None
        return
    try:
        yield fd, os.fstat(fd)
    finally:
        os.close(fd)


def file_reader(fd: int) -> Reader:
    """Reads of an open file by offset (os.pread, never mmap: a binary truncated under us
    must not SIGBUS the agent)."""
    return lambda offset, size: os.pread(fd, size, offset)


def read_layout(read: Reader, file_size: int) -> ElfLayout:
    """The layout of an ELF64 little-endian file; raises ValueError if it is not one or its
    headers (untrusted) point outside the file."""

    def checked(offset: int, size: int) -> bytes:
        if offset < 0 or size < 0 or offset + size > file_size:
            raise ValueError("header beyond end of file")
        data = read(offset, size)
        if len(data) != size:
            raise ValueError("short read")
        return data

    try:
        header = checked(0, _EHDR.size)
        if not header.startswith(_ELF64_LE):
            raise ValueError("not an ELF64 little-endian file")
        (_, _, _, _, _, phoff, shoff, _, _, phentsize, phnum, shentsize, shnum, shstrndx) = (
            _EHDR.unpack(header)
        )
        segments = []
        if phentsize == _PHDR.size:
            for p_type, flags, offset, vaddr, _, filesz, _, _ in _PHDR.iter_unpack(
                checked(phoff, phnum * _PHDR.size)
            ):
                if p_type == _PT_LOAD and filesz:
                    segments.append((not flags & _PF_X, offset, offset + filesz, vaddr - offset))
        sections: dict[str, tuple[int, int, int]] = {}
        if shentsize == _SHDR.size and shoff:
            if shnum == 0:  # more than 0xff00 sections: the count is in section 0's sh_size
                shnum = _SHDR.unpack(checked(shoff, _SHDR.size))[5]
            headers = list(_SHDR.iter_unpack(checked(shoff, shnum * _SHDR.size)))
            names = headers[shstrndx]
            strings = checked(names[4], names[5])
            for name_at, sh_type, _, addr, offset, size, _, _, _, _ in headers:
                if sh_type != _SHT_NOBITS and size and offset + size <= file_size:
                    end = strings.find(b"\0", name_at)
                    name = strings[name_at:end].decode("ascii", "replace")
                    sections.setdefault(name, (addr, offset, size))
        build_id = b""
        note = sections.get(".note.gnu.build-id")
        if note and note[2] <= 4096:
            data = checked(note[1], note[2])
            namesz, descsz, kind = struct.unpack_from("<III", data)
            if kind == _NT_GNU_BUILD_ID:
                start = 12 + (namesz + 3) // 4 * 4
                build_id = data[start : start + descsz]
    except (IndexError, OSError, struct.error, OverflowError) as error:
        raise ValueError(f"corrupt ELF headers: {error}") from error
    segments.sort()
    return ElfLayout([segment[1:] for segment in segments], sections, build_id)


def layout_symbols(
    read: Reader, layout: ElfLayout, variables: dict[str, int] | None = None
) -> SymbolColumns:
    """The defined function symbols of .symtab and .dynsym (and the runtime description
    variables into `variables`)."""
    variables = {} if variables is None else variables
    tables = []
    try:
        for table, strings in ((".symtab", ".strtab"), (".dynsym", ".dynstr")):
            entries = layout.section(read, table)
            names = layout.section(read, strings)
            if entries and names:
                tables.append(_read_functions(entries, names, variables))
    except OSError as error:
        raise ValueError(f"corrupt symbol table: {error}") from error
    return SymbolColumns.join(tables) if tables else SymbolColumns.empty()


# Separate debug info: where distributions put the full symbol tables of stripped files.
DEBUG_ROOT = "/usr/lib/debug"
# A MiniDebugInfo (.gnu_debugdata) image larger than this decompressed is not read.
_MAX_DEBUGDATA = 64 << 20


def separate_debug_symbols(
    read: Reader, layout: ElfLayout, path: str = "", more: Sequence[str] = ()
) -> SymbolColumns | None:
    """Function symbols of a stripped file from its separate debug file (by build id, then
    .gnu_debuglink next to `path` or under DEBUG_ROOT, then `more`); None if none is found."""
    for candidate in [*_debug_files(read, layout, path), *more]:
        symbols = debug_file_symbols(candidate, layout.build_id)
        if symbols is not None:
            return symbols
    return None


def debug_file_symbols(path: str, build_id: bytes) -> SymbolColumns | None:
    """Function symbols of the debug file at `path`; None if it cannot be read, is not ELF,
    or is of another build than `build_id` (it would name every address wrongly)."""
    try:
        with opened(path) as found:
            if found is None or not stat.S_ISREG(found[1].st_mode):
                return None
            read = file_reader(found[0])
            debug = read_layout(read, found[1].st_size)
            if build_id and debug.build_id and debug.build_id != build_id:
                return None
            return layout_symbols(read, debug)
    except (OSError, ValueError):
        return None


def mini_debug_symbols(read: Reader, layout: ElfLayout) -> SymbolColumns:
    """Function symbols of a file's MiniDebugInfo (.gnu_debugdata, xz), if it has one."""
    packed = layout.section(read, ".gnu_debugdata")
    if packed:
        try:
            decompressor = lzma.LZMADecompressor()
            image = decompressor.decompress(packed, _MAX_DEBUGDATA)
            embedded = read_layout(lambda at, size: image[at : at + size], len(image))
            return layout_symbols(lambda at, size: image[at : at + size], embedded)
        except (lzma.LZMAError, ValueError):
            return SymbolColumns.empty()
    return SymbolColumns.empty()


def _debug_files(read: Reader, layout: ElfLayout, path: str) -> list[str]:
    """Where a stripped file's debug file may be. `path` is the file as the agent opens it:
    under /proc/PID/root for another mount namespace, whose own DEBUG_ROOT is tried too."""
    root, inside = "", path
    if path.startswith("/proc/") and "/root/" in path:
        root, _, rest = path.partition("/root/")
        root, inside = f"{root}/root", f"/{rest}"
    roots = [DEBUG_ROOT] + ([f"{root}{DEBUG_ROOT}"] if root else [])
    candidates = []
    if len(layout.build_id) > 1:
        hexid = layout.build_id.hex()
        candidates += [f"{debug}/.build-id/{hexid[:2]}/{hexid[2:]}.debug" for debug in roots]
    link = layout.section(read, ".gnu_debuglink")
    directory = os.path.dirname(inside) if inside.startswith("/") else ""
    if link and directory and "/map_files/" not in path:
        name = link.split(b"\0", 1)[0].decode("utf-8", "replace")
        if name and "/" not in name:
            candidates += [f"{root}{directory}/.debug/{name}", f"{root}{directory}/{name}"]
            candidates += [f"{debug}{directory}/{name}" for debug in roots]
    return [candidate for candidate in candidates if candidate != path]
