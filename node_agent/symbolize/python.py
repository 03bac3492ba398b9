"""CPython frames: the interpreter layout of each Python process, for the BPF walker
(samplers/python_stacks.bpf.h), and the names of the code objects it records, merged
into the native stack where the interpreter's evaluation function runs them.

An interpreter is found by its mappings: a `python3.X` executable (static builds, venvs
whose python is a symlink: maps shows the real file) or a `libpython3.X.so` (shared
builds, embedders), read as the process sees it (/proc/PID/map_files, else
/proc/PID/root/PATH: containers). Its `_PyRuntime` symbol locates the thread states. From
3.13 the structure offsets are the interpreter's own `_Py_DebugOffsets`, the first member
of `_PyRuntime`, read from the file (its initial value); before, they come from the table
below, one per minor version, as CPython keeps these layouts within one.

Code objects are read from the process's memory when a drain names them, and cached by
(process, address, tag): the tag is what BPF read of the code object at the sample, so an
address freed and reused by other code is read again, and a sample whose code is gone is
shown as such, never as another function (what is read must also be a code object: its
type is the interpreter's PyCode_Type). A forked child (multiprocessing, PySpark's and
gunicorn's workers) that exited before its last samples were named has its code read from
its parent, where code from before the fork lives at the same address: the same checks
apply, and code the child made itself stays unnamed.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from fleetprof.node_agent.samplers.python_stacks import TARGETS, PythonTargets
from fleetprof.node_agent.samplers.stack_maps import TRUNCATED, PythonFrame
from fleetprof.node_agent.symbolize.elf import FileIdentity, MappedFiles
from fleetprof.node_agent.symbolize.frame import Frame, LruCache
from fleetprof.node_agent.symbolize.process import Mapping, ProcessSnapshot
from fleetprof.proto.python_frames import KIND, frame_module, frame_name

log = logging.getLogger(__name__)

# The interpreter's evaluation function: one C frame per group of Python frames it runs
# (GCC's out-of-line part is `.cold`).
EVAL_FUNCTION = "_PyEval_EvalFrameDefault"
_INTERPRETER_FILE = re.compile(r"(?:lib)?python3\.(\d+)(?:[dmu]*)(?:\.so(?:\.[\d.]+)?)?")
_PY_ENTRY = 0x80000000
_PY_NO_FIELD = 0xFFFF
_STYLE_FRAME_OBJECTS, _STYLE_IS_ENTRY, _STYLE_SHIM = 0, 1, 2
# struct py_proc_t of python_stacks.bpf.h.
_PROC = struct.Struct("<Q16H")
_CODE_HEADER_BYTES = 256
_MAX_STRING_BYTES = 4096
_MAX_LINETABLE_BYTES = 1 << 20
SUPPORTED = range(9, 14)


@dataclass(frozen=True)
class Layout:
    """Where one interpreter build keeps what the walker and the namer read (byte offsets)."""

    minor: int
    interpreters_head: int  # in _PyRuntime
    interp_threads_head: int
    tstate_next: int
    tstate_thread_id: int
    tstate_frame: int
    cframe_current_frame: int  # _PY_NO_FIELD: tstate_frame is the frame
    frame_previous: int
    frame_code: int
    frame_instr: int
    frame_owner: int
    frame_is_entry: int
    code_instructions: int  # co_code_adaptive; _PY_NO_FIELD: f_lasti
    code_firstlineno: int
    code_argcount: int
    code_filename: int
    code_name: int
    code_qualname: int  # _PY_NO_FIELD before 3.11: co_name
    code_linetable: int  # co_lnotab up to 3.9
    ascii_data: int  # sizeof(PyASCIIObject)
    style: int


_BEFORE_311 = dict(
    interpreters_head=32, interp_threads_head=8, tstate_next=8, tstate_thread_id=176,
    tstate_frame=24, cframe_current_frame=_PY_NO_FIELD, frame_previous=24, frame_code=32,
    frame_owner=_PY_NO_FIELD, frame_is_entry=_PY_NO_FIELD, code_instructions=_PY_NO_FIELD,
    code_firstlineno=40, code_argcount=16, code_filename=104, code_name=112,
    code_qualname=_PY_NO_FIELD, code_linetable=120, ascii_data=48, style=_STYLE_FRAME_OBJECTS,
)  # fmt: skip
# Read from the debug builds of each version (gdb: ptype/o), as CPython has no
# introspection data before 3.13.
LAYOUTS = {
    9: Layout(minor=9, frame_instr=104, **_BEFORE_311),
    10: Layout(minor=10, frame_instr=96, **_BEFORE_311),
    11: Layout(
        minor=11, interpreters_head=40, interp_threads_head=16, tstate_next=8,
        tstate_thread_id=152, tstate_frame=56, cframe_current_frame=8, frame_previous=48,
        frame_code=32, frame_instr=56, frame_owner=69, frame_is_entry=68,
        code_instructions=184, code_firstlineno=72, code_argcount=56, code_filename=112,
        code_name=120, code_qualname=128, code_linetable=136, ascii_data=48,
        style=_STYLE_IS_ENTRY,
    ),
    12: Layout(
        minor=12, interpreters_head=40, interp_threads_head=72, tstate_next=8,
        tstate_thread_id=136, tstate_frame=56, cframe_current_frame=0, frame_previous=8,
        frame_code=0, frame_instr=56, frame_owner=70, frame_is_entry=_PY_NO_FIELD,
        code_instructions=192, code_firstlineno=68, code_argcount=52, code_filename=112,
        code_name=120, code_qualname=128, code_linetable=136, ascii_data=40,
        style=_STYLE_SHIM,
    ),
}  # fmt: skip

# _Py_DebugOffsets of 3.13 (Include/internal/pycore_debug_offsets.h): the fields used, by
# their place in the struct (a u64 each).
_DEBUG_COOKIE = b"xdebugpy"
_DEBUG_FIELDS = {
    "version": 8, "interpreters_head": 40, "interp_threads_head": 72, "tstate_next": 168,
    "tstate_current_frame": 184, "tstate_thread_id": 192, "frame_previous": 232,
    "frame_executable": 240, "frame_instr_ptr": 248, "frame_owner": 264,
    "code_filename": 280, "code_name": 288, "code_qualname": 296, "code_linetable": 304,
    "code_firstlineno": 312, "code_argcount": 320, "code_adaptive": 344,
    "unicode_ascii_size": 560,
}  # fmt: skip
_DEBUG_BYTES = 584


def layout_from_debug_offsets(data: bytes) -> Layout | None:
    """The layout a 3.13 interpreter describes in its _Py_DebugOffsets; None if `data`
    is not one (or of a version whose struct differs)."""
    if len(data) < _DEBUG_BYTES or not data.startswith(_DEBUG_COOKIE):
        return None
    field = {
        name: int.from_bytes(data[at : at + 8], "little") for name, at in _DEBUG_FIELDS.items()
    }
    if field["version"] >> 24 != 3 or (field["version"] >> 16) & 0xFF != 13:
        return None
    return Layout(
        minor=13,
        interpreters_head=field["interpreters_head"],
        interp_threads_head=field["interp_threads_head"],
        tstate_next=field["tstate_next"],
        tstate_thread_id=field["tstate_thread_id"],
        tstate_frame=field["tstate_current_frame"],
        cframe_current_frame=_PY_NO_FIELD,
        frame_previous=field["frame_previous"],
        frame_code=field["frame_executable"],
        frame_instr=field["frame_instr_ptr"],
        frame_owner=field["frame_owner"],
        frame_is_entry=_PY_NO_FIELD,
        code_instructions=field["code_adaptive"],
        code_firstlineno=field["code_firstlineno"],
        code_argcount=field["code_argcount"],
        code_filename=field["code_filename"],
        code_name=field["code_name"],
        code_qualname=field["code_qualname"],
        code_linetable=field["code_linetable"],
        ascii_data=field["unicode_ascii_size"],
        style=_STYLE_SHIM,
    )


def proc_info(layout: Layout, runtime: int) -> bytes:
    """struct py_proc_t for a process whose _PyRuntime is at `runtime`."""
    tag_a, tag_b = layout.code_firstlineno, layout.code_argcount
    window = min(tag_a, tag_b) & ~7
    if max(tag_a, tag_b) + 4 > window + 32:  # both must fit one 32-byte read
        tag_b = tag_a
    return _PROC.pack(
        runtime + layout.interpreters_head,
        layout.interp_threads_head,
        layout.tstate_next,
        layout.tstate_thread_id,
        layout.tstate_frame,
        layout.cframe_current_frame,
        layout.frame_previous,
        layout.frame_code,
        layout.frame_instr,
        layout.frame_owner,
        layout.frame_is_entry,
        layout.code_instructions,
        window,
        tag_a - window,
        tag_b - window,
        layout.style,
        0,
    )


def code_tag(layout: Layout, header: bytes) -> int:
    """The tag BPF computes of a code object (python_stacks.bpf.h), from its first bytes."""
    tag_a, tag_b = layout.code_firstlineno, layout.code_argcount
    if max(tag_a, tag_b) + 4 > (min(tag_a, tag_b) & ~7) + 32:
        tag_b = tag_a
    a = int.from_bytes(header[tag_a : tag_a + 4], "little")
    b = int.from_bytes(header[tag_b : tag_b + 4], "little")
    return (a ^ (b << 20)) & 0xFFFFFFFF


# ---- ELF: the few symbols and segments needed to place _PyRuntime ----

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_SYM = struct.Struct("<IBBHQQ")
_WANTED = (b"_PyRuntime", b"Py_Version", b"PyCode_Type")


class _Image(NamedTuple):
    """What one interpreter file says: its loadable segments (p_offset, p_filesz, p_vaddr),
    the wanted symbols' addresses, and the bytes of _PyRuntime's start (3.13's offsets)."""

    segments: list[tuple[int, int, int]]
    symbols: dict[bytes, int]
    runtime_head: bytes
    version: int  # Py_Version (3.11+), else 0


def _read_image(path: str) -> _Image | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size

        def read(offset: int, length: int) -> bytes:
            if offset < 0 or length < 0 or offset + length > size:
                raise ValueError("beyond end of file")
            return os.pread(fd, length, offset)

        header = read(0, _EHDR.size)
        if not header.startswith(b"\x7fELF\x02\x01"):
            return None
        *_, phoff, shoff, _, _, phentsize, phnum, shentsize, shnum, _ = _EHDR.unpack(header)
        if phentsize != _PHDR.size or shentsize != _SHDR.size or not shoff:
            return None
        segments = [
            (offset, filesz, vaddr)
            for p_type, _, offset, vaddr, _, filesz, _, _ in _PHDR.iter_unpack(
                read(phoff, phnum * _PHDR.size)
            )
            if p_type == 1
        ]
        sections = list(_SHDR.iter_unpack(read(shoff, shnum * _SHDR.size)))
        symbols: dict[bytes, int] = {}
        for _, sh_type, _, _, offset, length, link, _, _, entsize in sections:
            if sh_type not in (2, 11) or entsize != _SYM.size:
                continue
            strings = read(sections[link][4], sections[link][5])
            table = read(offset, length - length % _SYM.size)
            for name_at, _, _, shndx, value, _ in _SYM.iter_unpack(table):
                if shndx and value and strings.startswith(_WANTED, name_at):
                    name = strings[name_at : strings.index(b"\0", name_at)]
                    if name in _WANTED:
                        symbols[name] = value

        def at(vaddr: int, length: int) -> bytes:
            for offset, filesz, start in segments:
                if start <= vaddr and vaddr + length <= start + filesz:
                    return read(offset + vaddr - start, length)
            return b""

        runtime = symbols.get(b"_PyRuntime")
        version = symbols.get(b"Py_Version")
        return _Image(
            segments,
            symbols,
            at(runtime, _DEBUG_BYTES) if runtime else b"",
            int.from_bytes(at(version, 4), "little") if version else 0,
        )
    except (OSError, ValueError, struct.error, IndexError):
        return None
    finally:
        os.close(fd)


def _bias(image: _Image, mapping: Mapping) -> int | None:
    """Load bias of the file in the process, from one of its mappings."""
    for offset, filesz, vaddr in image.segments:
        if offset <= mapping.offset < offset + max(filesz, 1):
            return mapping.start - (vaddr + mapping.offset - offset)
    return None


# ---- Code objects and line numbers ----


class CodeInfo(NamedTuple):
    name: str  # module.qualname
    filename: str
    firstlineno: int
    linetable: bytes


# A code object that could not be read (cached too: its process is gone, or the address
# holds other code now).
_UNREADABLE = CodeInfo("", "", 0, b"")


@functools.lru_cache(maxsize=1 << 16)
def line_of(minor: int, code: CodeInfo, instr: int) -> int:
    """The line a frame is at: `instr` is in code units from 3.10, bytes before. Cached:
    a hot loop's few offsets come back in every drain, and decoding a table is slow."""
    table = code.linetable
    if minor >= 11:
        return _location_table_line(table, code.firstlineno, instr)
    if minor == 10:
        return _line_table_line(table, code.firstlineno, instr * 2)
    return _lnotab_line(table, code.firstlineno, instr)


def _location_table_line(table: bytes, line: int, unit: int) -> int:
    """3.11+ (Objects/locations.md): entries of (kind, length in code units, line delta)."""
    at, start = 0, 0
    found = line

    def varint() -> int:
        nonlocal at
        value, shift = 0, 0
        while at < len(table):
            byte = table[at]
            at += 1
            value |= (byte & 63) << shift
            shift += 6
            if not byte & 64:
                break
        return value

    def signed() -> int:
        value = varint()
        return -(value >> 1) if value & 1 else value >> 1

    while at < len(table):
        first = table[at]
        at += 1
        kind, length = (first >> 3) & 15, (first & 7) + 1
        if kind == 15:  # no location
            found = -1
        elif kind == 14:  # long form
            line += signed()
            varint(), varint(), varint()
            found = line
        elif kind == 13:  # no columns
            line += signed()
            found = line
        elif kind >= 10:  # one line, two column bytes
            line += kind - 10
            at += 2
            found = line
        else:  # short form, same line
            at += 1
            found = line
        if start <= unit < start + length:
            return max(found, 0)
        start += length
    return max(line, 0)


def _line_table_line(table: bytes, line: int, offset: int) -> int:
    """3.10 (Objects/lnotab_notes.txt): (bytes delta, signed line delta) pairs."""
    end = 0
    for i in range(0, len(table) - 1, 2):
        start_delta, line_delta = table[i], table[i + 1] - (table[i + 1] >= 128) * 256
        start, end = end, end + start_delta
        if line_delta == -128:
            continue
        line += line_delta
        if start <= offset < end:
            return line
    return line


def _lnotab_line(table: bytes, line: int, offset: int) -> int:
    """Up to 3.9: co_lnotab's (bytes delta, signed line delta) pairs."""
    address = 0
    for i in range(0, len(table) - 1, 2):
        address += table[i]
        if address > offset:
            break
        line += table[i + 1] - (table[i + 1] >= 128) * 256
    return line


class _Process(NamedTuple):
    start_time: int
    exe: str  # an exec keeps pid and start time: a new exe is a new program
    layout: Layout
    code_type: int  # PyCode_Type's address in the process; 0: unknown (not checked)
    parent: int  # where code is read once the process is gone (it may be a fork)


class PythonProcesses:
    """Python processes: their layouts (published to the BPF walker through `targets`)
    and their code objects' names.

    stats: processes found and refused (unsupported version), code objects read, those
    read from the parent of an exited fork, reads that failed (process gone, address no
    longer a code object), frames named, stacks merged whole into their native stack and
    those whose native part was cut short.
    """

    def __init__(self, targets: PythonTargets = TARGETS, max_code_objects: int = 65536) -> None:
        self._targets = targets
        self._processes: dict[int, _Process] = {}
        self._refused: set[tuple[int, int, str]] = set()
        self._images: LruCache[FileIdentity, _Image | None] = LruCache(64)
        self._mapped = MappedFiles()
        self._codes: LruCache[tuple[int, int, int, int], CodeInfo] = LruCache(max_code_objects)
        # /proc/PID/mem of each Python process, open until it is forgotten: opening it
        # (a ptrace access check) costs more than the reads of a code object.
        self._memory: dict[int, int] = {}
        self.stats = dict.fromkeys(
            ("processes", "unsupported", "code_reads", "code_from_parent", "code_unreadable",
             "frames", "merged", "cut_native"), 0,
        )  # fmt: skip

    def observe(self, snapshot: ProcessSnapshot) -> None:
        """Find a CPython interpreter in a new snapshot and have BPF walk its threads."""
        if (snapshot.pid, snapshot.start_time, snapshot.exe) in self._refused:
            return
        known = self._processes.get(snapshot.pid)
        if known is not None:
            if (known.start_time, known.exe) == (snapshot.start_time, snapshot.exe):
                return
            self.forget(snapshot.pid)  # exec'd another program, or its pid was reused
        for mapping in snapshot.mappings:
            match = _INTERPRETER_FILE.fullmatch(mapping.module.removesuffix(" (deleted)"))
            if match is None:
                continue
            image = self._image(snapshot.pid, mapping)
            runtime = image.symbols.get(b"_PyRuntime") if image else None
            if image is None or runtime is None:
                continue  # python3.X of a shared build: _PyRuntime is in libpython
            minor = (image.version >> 16) & 0xFF if image.version else int(match[1])
            layout = layout_from_debug_offsets(image.runtime_head) or LAYOUTS.get(minor)
            bias = _bias(image, mapping)
            if layout is None or layout.minor != minor or bias is None:
                self.stats["unsupported"] += 1
                self._refused.add((snapshot.pid, snapshot.start_time, snapshot.exe))
                log.warning(
                    "pid %d (%s): Python 3.%d in %s is not supported (3.%d-3.%d are): "
                    "its samples keep their native stacks only",
                    snapshot.pid, snapshot.comm, minor, mapping.path,
                    SUPPORTED.start, SUPPORTED.stop - 1,
                )  # fmt: skip
                return
            code_type = image.symbols.get(b"PyCode_Type")
            self._processes[snapshot.pid] = _Process(
                snapshot.start_time,
                snapshot.exe,
                layout,
                bias + code_type if code_type else 0,
                snapshot.ppid,
            )
            self._targets.set(snapshot.pid, proc_info(layout, bias + runtime))
            self.stats["processes"] += 1
            # Debug: a node of Python workers starts hundreds a minute (the stop line counts them).
            log.debug("pid %d (%s): Python 3.%d, frames walked", snapshot.pid, snapshot.comm, minor)
            return

    def forget(self, pid: int) -> None:
        self._processes.pop(pid, None)
        memory = self._memory.pop(pid, None)
        if memory is not None:
            os.close(memory)
        self._targets.remove(pid)
        self._refused = {refused for refused in self._refused if refused[0] != pid}

    def frames(self, pid: int, stack: Sequence[PythonFrame]) -> list[tuple[Frame, bool]]:
        """(frame, outermost of its eval call) for each recorded frame, leaf first."""
        process = self._processes.get(pid) or self._fork_of(pid)
        named = []
        for code, instr, tag in stack:
            if (code, instr, tag) == TRUNCATED:
                named.append((Frame("[python frames truncated]", "", KIND), True))
                continue
            entry = bool(instr & _PY_ENTRY)
            info = self._code(pid, process, code, tag) if process is not None else None
            if info is None or process is None:
                frame = Frame(f"[python code 0x{code:x}]", "", KIND)
            else:
                line = line_of(process.layout.minor, info, instr & ~_PY_ENTRY)
                frame = Frame(info.name, frame_module(info.filename, line), KIND)
            named.append((frame, entry))
        self.stats["frames"] += len(named)
        return named

    def _fork_of(self, pid: int) -> _Process | None:
        """A child BPF walked with its parent's layout, gone before the agent looked at
        it: its code is read from the parent (see _code)."""
        parent = self._targets.parent_of(pid)
        known = self._processes.get(parent) if parent else None
        return known._replace(parent=parent) if known is not None and parent else None

    def merge(self, native: list[Frame], python: list[tuple[Frame, bool]]) -> list[Frame]:
        """The native stack (leaf first) with each eval function frame replaced by the
        Python frames it ran, in order (as py-spy --native does); C frames between them
        stay. Python frames its eval frames do not account for (a native stack cut short)
        go just below the last one replaced, or below the whole native part if it has
        none: shown, never dropped."""
        groups: list[list[Frame]] = [[]]
        for frame, entry in python:
            groups[-1].append(frame)
            if entry:
                groups.append([])
        groups = [group for group in groups if group]
        merged: list[Frame] = []
        used = last = 0
        for frame in native:
            if used < len(groups) and frame.kind == "native" and _is_eval(frame.name):
                merged.extend(groups[used])
                used += 1
                last = len(merged)
            else:
                merged.append(frame)
        if used == len(groups):
            self.stats["merged"] += 1
            return merged
        self.stats["cut_native"] += 1
        rest = [frame for group in groups[used:] for frame in group]
        if not used:
            return merged + rest
        return merged[:last] + rest + merged[last:]

    def _image(self, pid: int, mapping: Mapping) -> _Image | None:
        identity = self._mapped.recent(mapping.dev, mapping.inode)
        image = self._images.get(identity) if identity is not None else None
        if image is not None:
            return image
        for path in (
            f"/proc/{pid}/map_files/{mapping.start:x}-{mapping.end:x}",
            f"/proc/{pid}/root{mapping.path.removesuffix(' (deleted)')}",
        ):
            try:
                st = os.stat(path)
            except OSError:
                continue
            identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            self._mapped.seen(mapping.dev, mapping.inode, identity)
            image = self._images.get(identity)
            if image is None:
                image = _read_image(path)
                self._images.put(identity, image)
            return image
        return None

    def _code(self, pid: int, process: _Process, code: int, tag: int) -> CodeInfo | None:
        key = (pid, process.start_time, code, tag)
        info = self._codes.get(key)
        if info is None:
            self.stats["code_reads"] += 1
            try:
                info = _read_code(self._memory_of(pid), process, code, tag)
            except ProcessLookupError:
                # Gone: if it was forked, its parent holds the code it did not make itself.
                info = self._read_from_parent(process, code, tag)
            if info is None:
                self.stats["code_unreadable"] += 1
            info = info or _UNREADABLE
            self._codes.put(key, info)
        return info if info is not _UNREADABLE else None

    def _read_from_parent(self, process: _Process, code: int, tag: int) -> CodeInfo | None:
        if not process.parent:
            return None
        try:
            memory = _open_memory(process.parent)
        except ProcessLookupError:
            return None
        try:
            info = _read_code(memory, process, code, tag)
        except ProcessLookupError:
            return None
        finally:
            os.close(memory)
        self.stats["code_from_parent"] += info is not None
        return info

    def _memory_of(self, pid: int) -> int:
        """pid's memory, opened once until forget(pid)."""
        memory = self._memory.get(pid)
        if memory is None:
            memory = self._memory[pid] = _open_memory(pid)
        return memory


def _open_memory(pid: int) -> int:
    try:
        return os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ProcessLookupError(pid) from exc


def _read_code(memory: int, process: _Process, code: int, tag: int) -> CodeInfo | None:
    """The code object sampled at `code` of a process's memory (an open /proc/PID/mem),
    laid out as `process`'s; None if it is not there any more. Raises ProcessLookupError if
    the memory has nothing at `code`: the process exited (its memory reads as empty), or
    freed that memory."""
    try:
        header = _pread(memory, _CODE_HEADER_BYTES, code)
    except ValueError:
        return None  # no user-space address: not a code object
    except OSError:
        header = b""
    if len(header) < _CODE_HEADER_BYTES:
        raise ProcessLookupError(code)
    layout = process.layout
    if code_tag(layout, header) != tag or (
        process.code_type and int.from_bytes(header[8:16], "little") != process.code_type
    ):
        return None  # not the code object sampled

    def pointer(offset: int) -> int:
        return int.from_bytes(header[offset : offset + 8], "little")

    try:
        filename = _read_str(memory, layout, pointer(layout.code_filename))
        qualname_at = layout.code_qualname
        if qualname_at == _PY_NO_FIELD:
            qualname_at = layout.code_name
        qualname = _read_str(memory, layout, pointer(qualname_at))
        linetable = _read_bytes(memory, pointer(layout.code_linetable))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    firstlineno = int.from_bytes(
        header[layout.code_firstlineno : layout.code_firstlineno + 4], "little"
    )
    return CodeInfo(frame_name(qualname, filename), filename, firstlineno, linetable)


def _is_eval(name: str) -> bool:
    return name == EVAL_FUNCTION or name.startswith(EVAL_FUNCTION + ".")


def _pread(fd: int, size: int, address: int) -> bytes:
    """`size` bytes of a process's memory at `address`, read from a pointer in it: a code
    object freed and reused since it was sampled can hold any 64 bits there."""
    if not 0 < address < 1 << 63:  # past what pread takes (an off_t)
        raise ValueError(f"no user-space address: {address:#x}")
    return os.pread(fd, size, address)


def _read_str(fd: int, layout: Layout, address: int) -> str:
    """A compact str object's text (code objects' names and file names are compact)."""
    head = _pread(fd, 40, address)
    if len(head) < 40:
        raise ValueError("short read")
    length = int.from_bytes(head[16:24], "little")
    state = int.from_bytes(head[32:36], "little")
    kind, compact, ascii_only = (state >> 2) & 7, state >> 5 & 1, state >> 6 & 1
    if not compact or kind not in (1, 2, 4) or length * kind > _MAX_STRING_BYTES:
        raise ValueError("not a compact str")
    # Non-ASCII compact strings have utf8_length and utf8 (and wstr_length before 3.12).
    data = layout.ascii_data + (0 if ascii_only else (24 if layout.minor < 12 else 16))
    raw = _pread(fd, length * kind, address + data)
    encoding = {1: "latin-1", 2: "utf-16-le", 4: "utf-32-le"}[kind]
    return raw.decode(encoding)


def _read_bytes(fd: int, address: int) -> bytes:
    """A bytes object's content (PyBytesObject: ob_size at 16, ob_sval at 32)."""
    head = _pread(fd, 32, address)
    if len(head) < 32:
        raise ValueError("short read")
    size = int.from_bytes(head[16:24], "little")
    if size > _MAX_LINETABLE_BYTES:
        raise ValueError("line table too large")
    return _pread(fd, size, address + 32)
