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
from array import array
from bisect import bisect_right
from collections.abc import Callable, Sequence
from itertools import accumulate
from typing import NamedTuple

from fleetprof.node_agent.symbolize.frame import LruCache

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_SYM = struct.Struct("<IBBHQQ")
_ELF64_LE = b"\x7fELF\x02\x01"
_PT_LOAD = 1
_PF_X = 1
_STT_OBJECT = 1
_STT_FUNC = 2
_STT_GNU_IFUNC = 10
_STB_LOCAL = 0
_STB_GLOBAL = 1
_MAX_ADDRESS = (1 << 64) - 1

# (start, size, binding, name) of one function symbol.
_Symbol = tuple[int, int, int, bytes]


def _rank(symbol: _Symbol) -> tuple[bool, bool, int, bool]:
    """Which of several symbols at one address names it: a sized, non-local one with the
    fewest leading underscores (`nanosleep` rather than `__nanosleep`), global before weak."""
    _, size, binding, name = symbol
    underscores = len(name) - len(name.lstrip(b"_"))
    return size > 0, binding != _STB_LOCAL, -underscores, binding == _STB_GLOBAL


class ElfSymbols:
    """The function symbols of one ELF file, sorted for bisection."""

    __slots__ = ("_ends", "_names", "_segments", "_starts", "variables")

    def __init__(
        self,
        segments: list[tuple[int, int, int]] | None = None,
        symbols: list[_Symbol] | None = None,
        variables: dict[str, int] | None = None,
    ) -> None:
        # (p_offset, p_offset + p_filesz, p_vaddr - p_offset), executable segments first.
        self._segments = segments or []
        # Addresses (p_vaddr) of the exported variables runtimes describe themselves with
        # (HotSpot's gHotSpotVM* tables: symbolize/hotspot.py); only those, so few.
        self.variables = variables or {}
        symbols = sorted(symbols or [])
        # Arrays, not lists: a fifth of the memory, and bisect is as fast on them.
        self._starts = array("Q", [start for start, _, _, _ in symbols])
        # A symbol without size covers its address up to the next symbol.
        self._ends = array(
            "Q",
            [
                min(start + size, _MAX_ADDRESS)
                if size
                else (self._starts[i + 1] if i + 1 < len(symbols) else _MAX_ADDRESS)
                for i, (start, size, _, _) in enumerate(symbols)
            ],
        )
        self._names = NameBlob([name.decode("utf-8", "replace") for _, _, _, name in symbols])

    @classmethod
    def load(cls, path: str) -> ElfSymbols:
        """Read path's symbols; an unreadable, non-ELF or corrupt file gives an empty table."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return cls()
        try:
            return cls._from_fd(fd, os.fstat(fd), path)
        except OSError:
            return cls()
        finally:
            os.close(fd)

    @classmethod
    def from_bytes(cls, image: bytes) -> ElfSymbols:
        """Symbols of an in-memory ELF image (the vDSO)."""
        return cls._parse(lambda offset, size: image[offset : offset + size], len(image))

    @classmethod
    def _from_fd(cls, fd: int, st: os.stat_result, path: str = "") -> ElfSymbols:
        # Mappings can name devices or FIFOs; only regular files are worth (and safe) reading.
        if not stat.S_ISREG(st.st_mode):
            return cls()
        return cls._parse(file_reader(fd), st.st_size, path)

    @classmethod
    def _parse(
        cls, read: Callable[[int, int], bytes], file_size: int, path: str = ""
    ) -> ElfSymbols:
        variables: dict[str, int] = {}
        try:
            layout = read_layout(read, file_size)
            symbols = layout_symbols(read, layout, variables)
        except ValueError:
            return cls()
        if not layout.segments:
            return cls()
        if ".symtab" not in layout.sections:
            # Stripped: the full symbol table may be in a separate debug file.
            for symbol in debug_symbols(read, layout, path):
                known = symbols.get(symbol[0])
                if known is None or _rank(symbol) > _rank(known):
                    symbols[symbol[0]] = symbol
        return cls(layout.segments, list(symbols.values()), variables)

    def __len__(self) -> int:
        return len(self._starts)

    def vaddr(self, offset: int) -> int | None:
        """The virtual address of a file offset, if a loaded segment holds it."""
        for start, end, delta in self._segments:
            if start <= offset < end:
                return offset + delta
        return None

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

    def __getitem__(self, index: int) -> str:
        return self._blob[self._offsets[index] : self._offsets[index + 1]]

    def __len__(self) -> int:
        return len(self._offsets) - 1


_VARIABLE_PREFIX = b"gHotSpotVM"


def _read_functions(
    table: bytes, strings: bytes, into: dict[int, _Symbol], variables: dict[str, int]
) -> None:
    """Add the defined function symbols of a symbol table to `into`, one per address, and
    the runtime description variables (_VARIABLE_PREFIX) to `variables`."""
    for name_at, info, _, shndx, value, size in _SYM.iter_unpack(table):
        kind = info & 0xF
        # shndx 0 is an undefined (imported) symbol.
        if not shndx or not value:
            continue
        if kind == _STT_OBJECT:
            if strings.startswith(_VARIABLE_PREFIX, name_at):
                end = strings.find(b"\0", name_at)
                variables[strings[name_at:end].decode("ascii", "replace")] = value
            continue
        if kind != _STT_FUNC and kind != _STT_GNU_IFUNC:
            continue
        end = strings.find(b"\0", name_at)
        name = strings[name_at : end if end >= 0 else None]
        if not name:
            continue
        symbol = (value, size, info >> 4, name)
        known = into.get(value)
        if known is None or _rank(symbol) > _rank(known):
            into[value] = symbol


class ElfCache:
    """ElfSymbols per file, shared by every process mapping it.

    Keyed by the opened file's (st_dev, st_ino, size, mtime), so a replaced binary is re-read
    while a library mapped by a thousand processes is read once. Bounded by the total number
    of symbols held, which is what the memory follows.
    """

    def __init__(self, max_symbols: int = 1_000_000) -> None:
        self._tables: LruCache[tuple[int, int, int, int], ElfSymbols] = LruCache(
            max_symbols, lambda table: max(1, len(table))
        )

    def get(self, path: str, debug_path: str = "") -> ElfSymbols | None:
        """The symbols of the file at path; None when it cannot be opened. `debug_path`
        is where to look for its debug file by .gnu_debuglink when path cannot say (a
        /proc/PID/map_files link)."""
        # A file already read costs a stat: a new process's libraries are all known.
        try:
            table = self._tables.get(_identity(os.stat(path)))
        except OSError:
            return None
        if table is not None:
            return table
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            table = ElfSymbols._from_fd(fd, st, debug_path or path)
            self._tables.put(_identity(st), table)
            return table
        except OSError:
            return None
        finally:
            os.close(fd)


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
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
) -> dict[int, _Symbol]:
    """The defined function symbols of .symtab and .dynsym, one per address (and the
    runtime description variables into `variables`)."""
    symbols: dict[int, _Symbol] = {}
    variables = {} if variables is None else variables
    try:
        for table, strings in ((".symtab", ".strtab"), (".dynsym", ".dynstr")):
            entries = layout.section(read, table)
            names = layout.section(read, strings)
            if entries and names:
                entries = entries[: len(entries) - len(entries) % _SYM.size]
                _read_functions(entries, names, symbols, variables)
    except (OSError, struct.error) as error:
        raise ValueError(f"corrupt symbol table: {error}") from error
    return symbols


# Separate debug info: where distributions put the full symbol tables of stripped files.
DEBUG_ROOT = "/usr/lib/debug"
# A MiniDebugInfo (.gnu_debugdata) image larger than this decompressed is not read.
_MAX_DEBUGDATA = 64 << 20


def debug_symbols(read: Reader, layout: ElfLayout, path: str = "") -> list[_Symbol]:
    """Function symbols of a stripped file from its separate debug file (by build id, then
    .gnu_debuglink next to `path` or under DEBUG_ROOT), else from its MiniDebugInfo."""
    for candidate in _debug_files(read, layout, path):
        try:
            fd = os.open(candidate, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                continue
            debug = read_layout(file_reader(fd), st.st_size)
            # A debug file of another build would name every address wrongly.
            if layout.build_id and debug.build_id and debug.build_id != layout.build_id:
                continue
            return list(layout_symbols(file_reader(fd), debug).values())
        except ValueError:
            continue
        finally:
            os.close(fd)
    packed = layout.section(read, ".gnu_debugdata")
    if packed:
        try:
            decompressor = lzma.LZMADecompressor()
            image = decompressor.decompress(packed, _MAX_DEBUGDATA)
            embedded = read_layout(lambda at, size: image[at : at + size], len(image))
            return list(layout_symbols(lambda at, size: image[at : at + size], embedded).values())
        except (lzma.LZMAError, ValueError):
            return []
    return []


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
