"""HotSpot frames named from the JVM's own memory: no attach, no perf map, no JVM flag.

HotSpot describes its C++ classes to debuggers in tables libjvm.so exports
(gHotSpotVMStructs, gHotSpotVMTypes: field offsets, static addresses and class sizes). With
them and /proc/PID/mem (root reads any process, in any container, as any user, attach
disabled or not):

- a JIT PC is found in a CodeCache heap, its code blob through the heap's segment map, and if
  the blob is an nmethod, the PcDesc nearest the PC gives the chain of scopes (ScopeDesc, a
  compressed stream) from the inlined leaf out to the compiled method: one frame each, the
  inlined ones of kind "inlined";
- an interpreted frame is named from the Method* of its interpreter frame, which the BPF
  walk (unwind/hotspot.py's CFA_INTERPRETER rows) records as a word of its own after the
  frame's PC;
- a Method* is named through ConstMethod, ConstantPool, its holder Klass and their Symbols,
  as HotSpot's perf map writes it (`long demo.Hotspots.run(long)`), so names match those of
  the perf-map fallback.

Everything read is checked (bounds, back pointers, UTF-8, a re-read after decoding): what does
not hold together is counted in stats and gives no name, never a wrong one; the caller then
falls back to the perf map. Code compiled a moment ago is named as soon as its samples drain.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import threading
import time
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from fleetprof.node_agent.symbolize.elf import ElfSymbols
from fleetprof.node_agent.symbolize.frame import Frame, LruCache
from fleetprof.node_agent.symbolize.names import runtime_frame
from fleetprof.node_agent.symbolize.process import ProcessSnapshot

log = logging.getLogger(__name__)

_U64 = struct.Struct("<Q")
_MAX_ENTRIES = 1 << 15  # vmStructs tables hold a few thousand entries
_MAX_STRIDE = 256
_MAX_HEAPS = 16
_MAX_SCOPES = 64  # inlining depth is ~15 at most
_MAX_SEGMAP_HOPS = 256
_MAX_DEBUG_INFO = 4 << 20  # bytes of scopes/metadata one nmethod may have
_MAX_SYMBOL = 4096
# Where the interpreter keeps a frame's Method*: rbp - 3 words (frame_x86.hpp,
# interpreter_frame_method_offset), and the caller's sp, rbp - 1 word.
INTERPRETER_METHOD_SLOT = 3
# Class names of hidden classes (lambdas) end in +0x<address> (Klass::_name), shown as
# /0x<address> by HotSpot (external_name), which names.runtime_frame drops.
_HIDDEN = re.compile(r"\+(0x[0-9a-f]+)$")
_PRIMITIVES = {
    "B": "byte", "C": "char", "D": "double", "F": "float", "I": "int", "J": "long",
    "S": "short", "Z": "boolean", "V": "void",
}  # fmt: skip

# Fields read, as (type, field) of gHotSpotVMStructs; each tuple lists the names a field
# had across JDK versions (17, 21, 25), the first found wins.
_FIELDS: dict[str, tuple[tuple[str, str], ...]] = {
    "heaps": (("CodeCache", "_heaps"),),
    "low_bound": (("CodeCache", "_low_bound"),),
    "high_bound": (("CodeCache", "_high_bound"),),
    "array_len": (("GrowableArrayBase", "_len"),),
    "array_data": (("GrowableArray<int>", "_data"),),
    "heap_memory": (("CodeHeap", "_memory"),),
    "heap_segmap": (("CodeHeap", "_segmap"),),
    "heap_log2_segment": (("CodeHeap", "_log2_segment_size"),),
    "vs_low_boundary": (("VirtualSpace", "_low_boundary"),),
    "vs_high_boundary": (("VirtualSpace", "_high_boundary"),),
    "vs_high": (("VirtualSpace", "_high"),),
    "blob_name": (("CodeBlob", "_name"),),
    "blob_size": (("CodeBlob", "_size"),),
    "blob_frame_size": (("CodeBlob", "_frame_size"),),
    "blob_frame_complete": (("CodeBlob", "_frame_complete_offset"),),
    "blob_code_begin": (("CodeBlob", "_code_begin"), ("CodeBlob", "_code_offset")),
    "blob_code_end": (("CodeBlob", "_code_end"), ("CodeBlob", "_data_offset")),
    "blob_mutable_data": (("CodeBlob", "_mutable_data"),),
    "blob_mutable_data_size": (("CodeBlob", "_mutable_data_size"),),
    "blob_relocation_size": (("CodeBlob", "_relocation_size"),),
    "nm_method": (("nmethod", "_method"), ("CompiledMethod", "_method")),
    "nm_compile_id": (("nmethod", "_compile_id"),),
    "nm_metadata_offset": (("nmethod", "_metadata_offset"),),
    "nm_scopes_pcs_offset": (("nmethod", "_scopes_pcs_offset"),),
    "nm_dependencies_offset": (("nmethod", "_dependencies_offset"),),
    "nm_scopes_data": (
        ("nmethod", "_scopes_data_offset"),
        ("CompiledMethod", "_scopes_data_begin"),
        ("nmethod", "_scopes_data_begin"),
    ),
    "nm_immutable_data": (("nmethod", "_immutable_data"),),
    "nm_immutable_data_size": (("nmethod", "_immutable_data_size"),),
    "pc_offset": (("PcDesc", "_pc_offset"),),
    "pc_scope": (("PcDesc", "_scope_decode_offset"),),
    "method_const": (("Method", "_constMethod"),),
    "const_constants": (("ConstMethod", "_constants"),),
    "const_name_index": (("ConstMethod", "_name_index"),),
    "const_signature_index": (("ConstMethod", "_signature_index"),),
    "pool_holder": (("ConstantPool", "_pool_holder"),),
    "klass_name": (("Klass", "_name"),),
    "symbol_length": (("Symbol", "_length"),),
    "symbol_length_refcount": (("Symbol", "_length_and_refcount"),),
    "symbol_body": (("Symbol", "_body"),),
    "interpreter_code": (("AbstractInterpreter", "_code"),),
    "stubs_buffer": (("StubQueue", "_stub_buffer"),),
    "stubs_limit": (("StubQueue", "_buffer_limit"),),
    "jdk_version": (("JDK_Version", "_current"),),
    "vm_major": (("Abstract_VM_Version", "_vm_major_version"),),
}
_OPTIONAL = frozenset(
    {"nm_metadata_offset", "nm_dependencies_offset", "nm_immutable_data",
     "nm_immutable_data_size", "blob_mutable_data", "blob_mutable_data_size",
     "blob_relocation_size", "symbol_length", "symbol_length_refcount", "jdk_version",
     "vm_major"}
)  # fmt: skip
_TYPES = ("ConstantPool", "HeapBlock", "nmethod", "PcDesc", "CodeBlob")


# An interpreted frame whose Method* the unwinder did not record, as the perf map names it.
INTERPRETER = Frame("Interpreter", "Interpreter", "interpreted")


class LayoutError(ValueError):
    """A vmStructs layout this reader does not know: the JVM gets no names from memory."""


class Unreadable(Exception):
    """Memory that could not be read, or that does not hold what it should."""


class Memory:
    """Another process's memory, read through /proc/PID/mem (pread: no ptrace stop)."""

    def __init__(self, pid: int) -> None:
        self.fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        self.reads = 0
        self.exited = False  # its memory is gone: what was read before is all there is

    def read(self, address: int, size: int) -> bytes:
        if address <= 0 or size < 0 or address + size >= 1 << 47:
            raise Unreadable(f"address 0x{address:x}")
        self.reads += 1
        try:
            data = os.pread(self.fd, size, address)
        except OSError as exc:
            raise Unreadable(f"0x{address:x}: {exc.strerror}") from None
        if len(data) != size:
            self.exited |= not data
            raise Unreadable(f"0x{address:x}: short read")
        return data

    def word(self, address: int) -> int:
        return int.from_bytes(self.read(address, 8), "little")

    def cstring(self, address: int, most: int = 256) -> str:
        data = self.read(address, most) if address else b""
        end = data.find(b"\0")
        if end < 0 or not data[:end].isascii():
            raise Unreadable(f"string at 0x{address:x}")
        return data[:end].decode("ascii")

    def close(self) -> None:
        os.close(self.fd)


@dataclass(frozen=True)
class Layout:
    """What one libjvm.so says of itself: field offsets, static addresses, type sizes."""

    offsets: dict[str, int]  # _FIELDS key -> field offset, or static address
    sizes: dict[str, int]
    major: int

    def __getitem__(self, key: str) -> int:
        return self.offsets[key]

    def has(self, key: str) -> bool:
        return key in self.offsets


def _table(
    memory: Memory, variables: dict[str, int], bias: int, table: str, entry: str, names: list[str]
) -> list[dict[str, int]]:
    """The entries of one vmStructs table, as {column: raw 8-byte value}, until the first
    whose type name is NULL."""

    def variable(name: str) -> int:
        if name not in variables:
            raise LayoutError(f"libjvm.so exports no {name}")
        return memory.word(bias + variables[name])

    base = variable(table)
    stride = variable(f"{entry}ArrayStride")
    columns = {name: variable(f"{entry}{name}Offset") for name in names}
    if not base or not stride:
        raise Unreadable(f"{table}: not initialised yet")  # a JVM just started
    if not stride <= _MAX_STRIDE or any(o + 8 > stride for o in columns.values()):
        raise LayoutError(f"{table}: stride {stride}, columns {columns}")
    rows = []
    chunk = 256
    for start in range(0, _MAX_ENTRIES, chunk):
        data = memory.read(base + start * stride, chunk * stride)
        for i in range(chunk):
            row = {
                name: _U64.unpack_from(data, i * stride + offset)[0]
                for name, offset in columns.items()
            }
            if not row["TypeName"]:
                return rows
            rows.append(row)
    raise LayoutError(f"{table}: no end")


def read_layout(memory: Memory, variables: dict[str, int], bias: int) -> Layout:
    """Parse libjvm's vmStructs tables in the process (variables: their link-time
    addresses; bias: where libjvm.so is loaded)."""
    strings: dict[int, str] = {}

    def name(address: int) -> str:
        if address not in strings:
            strings[address] = memory.cstring(address)
        return strings[address]

    wanted = {pair for names in _FIELDS.values() for pair in names}
    found: dict[tuple[str, str], int] = {}
    for row in _table(
        memory,
        variables,
        bias,
        "gHotSpotVMStructs",
        "gHotSpotVMStructEntry",
        ["TypeName", "FieldName", "IsStatic", "Offset", "Address"],
    ):
        if not row["FieldName"]:
            continue
        pair = (name(row["TypeName"]), name(row["FieldName"]))
        if pair in wanted:
            static = row["IsStatic"] & 0xFFFFFFFF
            found[pair] = row["Address"] if static else row["Offset"]
    sizes = {}
    for row in _table(
        memory, variables, bias, "gHotSpotVMTypes", "gHotSpotVMTypeEntry", ["TypeName", "Size"]
    ):
        type_name = name(row["TypeName"])
        if type_name in _TYPES:
            sizes[type_name] = row["Size"]
    offsets = {}
    for key, names in _FIELDS.items():
        value = next((found[pair] for pair in names if pair in found), None)
        if value is not None:
            offsets[key] = value
        elif key not in _OPTIONAL:
            raise LayoutError(f"vmStructs has no {'/'.join('::'.join(p) for p in names)}")
    missing = [t for t in _TYPES if t not in sizes or not 0 < sizes[t] <= 4096]
    if missing:
        raise LayoutError(f"vmTypes has no usable size for {missing}")
    if "symbol_length" not in offsets:
        if "symbol_length_refcount" not in offsets:
            raise LayoutError("vmStructs has no Symbol length")
        # JDK 12+: u2 length in the high half of a u4 (symbol.hpp)
        offsets["symbol_length"] = offsets["symbol_length_refcount"] + 2
    if "jdk_version" in offsets:
        major = memory.read(offsets["jdk_version"], 4)[0]
    elif "vm_major" in offsets:
        major = int.from_bytes(memory.read(offsets["vm_major"], 4), "little")
    else:
        raise LayoutError("no JDK version")
    if major < 17:
        raise LayoutError(f"JDK {major}: 17 or later is read from memory")
    two_offsets = "nm_metadata_offset" in offsets and "nm_dependencies_offset" in offsets
    if not (two_offsets or "nm_immutable_data" in offsets):
        raise LayoutError("nmethod debug info layout unknown")
    return Layout(offsets, sizes, major)


class ScopeFrame(NamedTuple):
    method: int  # Method*
    bci: int


@dataclass
class _Nmethod:
    """One compiled method: its code range and the scope chains of its PcDescs; or a stub
    (another kind of code blob: `stub` is its name, and it has no scopes)."""

    blob: int
    compile_id: int
    method: int
    code_begin: int
    code_end: int
    frame_size: int  # bytes
    pcs: list[int]  # PcDesc pc offsets, sorted
    chains: list[tuple[ScopeFrame, ...]]  # per PcDesc, leaf first
    names: dict[tuple[int, int], list[Frame]] = field(default_factory=dict)
    stub: str | None = None


@dataclass
class CodeHeap:
    address: int  # the CodeHeap
    low: int
    high: int
    segmap: int
    shift: int


def _unsigned5(data: bytes, at: int, excluded: int) -> tuple[int, int]:
    """One UNSIGNED5 number of HotSpot's CompressedReadStream at data[at:]; (value, next).
    JDK 20+ keeps zero bytes out of the code (excluded = 1)."""
    value = 0
    for i in range(max(0, min(5, len(data) - at))):
        byte = data[at + i]
        if byte < excluded:
            raise Unreadable("excluded byte in a compressed stream")
        value += (byte - excluded) << (6 * i)
        if byte < 192 or i == 4:
            return value, at + i + 1
    raise Unreadable("compressed stream cut short")


def _java_type(descriptor: str, at: int) -> tuple[str, int]:
    dims = 0
    while descriptor[at] == "[":
        dims, at = dims + 1, at + 1
    if descriptor[at] == "L":
        end = descriptor.index(";", at)
        name, at = descriptor[at + 1 : end].replace("/", "."), end + 1
    else:
        name, at = _PRIMITIVES[descriptor[at]], at + 1
    return name + "[]" * dims, at


def external_signature(klass: str, method: str, descriptor: str) -> str:
    """HotSpot's perf-map form of a method: `long a.B.c(int[], java.lang.String)`."""
    if not descriptor.startswith("("):
        raise ValueError(descriptor)
    args, at = [], 1
    while descriptor[at] != ")":
        arg, at = _java_type(descriptor, at)
        args.append(arg)
    result, at = _java_type(descriptor, at + 1)
    if at != len(descriptor):
        raise ValueError(descriptor)
    holder = _HIDDEN.sub(r"/\1", klass.replace("/", "."))
    return f"{result} {holder}.{method}({', '.join(args)})"


class HotSpotProcess:
    """One JVM's code cache and methods, read from its memory."""

    def __init__(self, pid: int, memory: Memory, layout: Layout) -> None:
        self.pid = pid
        self.memory = memory
        self.layout = layout
        self._excluded = 1 if layout.major >= 20 else 0
        self._heaps: list[CodeHeap] = []
        self.interpreter = (0, 0)
        self.code_bounds = (0, 0)
        self._methods: LruCache[int, tuple[int, str] | None] = LruCache(65536)
        self._nmethods: LruCache[int, _Nmethod] = LruCache(16384)
        # Code ranges of the nmethods held, for a lookup without the segment map.
        self._starts: list[int] = []
        self._blobs: list[int] = []
        self.stats = dict.fromkeys(
            ("nmethods", "frames", "inlined", "interpreted", "stubs", "stale", "invalid"), 0
        )

    # --- the code cache -----------------------------------------------------------------

    def refresh(self) -> bool:
        """Read the code heaps' bounds and the interpreter's; False if not set up yet."""
        layout, memory = self.layout, self.memory
        array = memory.word(layout["heaps"])
        if not array:
            return False
        count = int.from_bytes(memory.read(array + layout["array_len"], 4), "little")
        data = memory.word(array + layout["array_data"])
        if not 0 < count <= _MAX_HEAPS or not data:
            return False
        heaps = []
        for i in range(count):
            heap = memory.word(data + 8 * i)
            if not heap:
                return False
            low = memory.word(heap + layout["heap_memory"] + layout["vs_low_boundary"])
            high = memory.word(heap + layout["heap_memory"] + layout["vs_high_boundary"])
            segmap = memory.word(heap + layout["heap_segmap"] + layout["vs_low_boundary"])
            shift = int.from_bytes(memory.read(heap + layout["heap_log2_segment"], 4), "little")
            if not (0 < low < high and segmap and 4 <= shift <= 16):
                raise Unreadable(f"code heap {i}: {low:x}-{high:x} segmap {segmap:x} {shift}")
            heaps.append(CodeHeap(heap, low, high, segmap, shift))
        stubs = memory.word(layout["interpreter_code"])
        if not stubs:
            return False  # the interpreter is generated after the heaps: not yet
        buffer = memory.word(stubs + layout["stubs_buffer"])
        limit = int.from_bytes(memory.read(stubs + layout["stubs_limit"], 4), "little")
        if not buffer or not limit:
            return False
        self._heaps = sorted(heaps, key=lambda heap: heap.low)
        self.code_bounds = (memory.word(layout["low_bound"]), memory.word(layout["high_bound"]))
        self.interpreter = (buffer, buffer + limit)
        return True

    @property
    def heaps(self) -> list[CodeHeap]:
        return self._heaps

    def in_code_cache(self, pc: int) -> bool:
        return self.code_bounds[0] <= pc < self.code_bounds[1]

    def in_interpreter(self, pc: int) -> bool:
        return self.interpreter[0] <= pc < self.interpreter[1]

    def blob_at(self, pc: int) -> int | None:
        """The CodeBlob whose block holds pc, through its heap's segment map."""
        for heap in self._heaps:
            if heap.low <= pc < heap.high:
                break
        else:
            return None
        segment = (pc - heap.low) >> heap.shift
        hops = 0
        while True:
            start = max(0, segment - 255)
            window = self.memory.read(heap.segmap + start, segment - start + 1)
            tag = window[-1]
            while tag not in (0, 0xFF) and hops < _MAX_SEGMAP_HOPS and segment - tag >= start:
                segment -= tag
                hops += 1
                tag = window[segment - start]
            if tag in (0, 0xFF) or hops >= _MAX_SEGMAP_HOPS or segment - tag < 0:
                break
        if tag != 0:
            return None  # a free block, or a map being rewritten
        block = heap.low + (segment << heap.shift)
        # HeapBlock::Header: {size_t _length; bool _used}, {u4; bool} since JDK 25.
        header = "<IB" if self.layout.sizes["HeapBlock"] == 8 else "<QB"
        length, used = struct.unpack(header, self.memory.read(block, struct.calcsize(header)))
        if not used or pc >= block + (length << heap.shift):
            return None
        return block + self.layout.sizes["HeapBlock"]

    # --- nmethods -----------------------------------------------------------------------

    def _read_nmethod(self, blob: int) -> _Nmethod:
        """The nmethod at blob, or the stub if it is another kind of blob."""
        layout, memory = self.layout, self.memory
        header = memory.read(blob, layout.sizes["nmethod"])

        def u(key: str, size: int = 4, signed: bool = False) -> int:
            return int.from_bytes(header[layout[key] : layout[key] + size], "little", signed=signed)

        name = memory.cstring(u("blob_name", 8), 128)
        size = u("blob_size")
        if layout.major >= 23:  # offsets from the blob (codeBlob.hpp)
            code_begin, code_end = blob + u("blob_code_begin"), blob + u("blob_code_end")
        else:
            code_begin, code_end = u("blob_code_begin", 8), u("blob_code_end", 8)
        if name != "nmethod":
            if not (name.isprintable() and blob < code_begin <= code_end <= blob + size):
                raise Unreadable(f"code blob 0x{blob:x}: {name!r}")
            return _Nmethod(blob, -1, 0, code_begin, code_end, 0, [], [], stub=name)
        method = u("nm_method", 8)
        if not (blob < code_begin < code_end <= blob + size and method):
            raise Unreadable(f"nmethod 0x{blob:x}: code 0x{code_begin:x}-0x{code_end:x}")
        if layout.has("nm_immutable_data"):
            immutable = u("nm_immutable_data", 8)
            immutable_size = u("nm_immutable_data_size")
            pcs_at, scopes_at = u("nm_scopes_pcs_offset"), u("nm_scopes_data")
            if not (pcs_at <= scopes_at <= immutable_size <= _MAX_DEBUG_INFO):
                raise Unreadable(f"nmethod 0x{blob:x}: immutable data layout")
            data = memory.read(immutable + pcs_at, immutable_size - pcs_at)
            pcs, scopes = data[: scopes_at - pcs_at], data[scopes_at - pcs_at :]
            if layout.has("blob_mutable_data"):  # JDK 25+
                relocations = u("blob_relocation_size")
                mutable_size = u("blob_mutable_data_size")
                if not relocations <= mutable_size <= relocations + _MAX_DEBUG_INFO:
                    raise Unreadable(f"nmethod 0x{blob:x}: mutable data layout")
                metadata = memory.read(
                    u("blob_mutable_data", 8) + relocations, mutable_size - relocations
                )
            else:  # JDK 23-24: after the code, up to the blob's end
                at = code_end - blob + u("nm_metadata_offset", 2)
                metadata = memory.read(blob + at, max(0, size - at))
        else:  # JDK 17-22: metadata, scopes data, scopes pcs, dependencies, in the blob
            metadata_at = u("nm_metadata_offset", 4, signed=True)
            scopes_at = u("nm_scopes_data", 8) - blob
            pcs_at = u("nm_scopes_pcs_offset", 4, signed=True)
            end = u("nm_dependencies_offset", 4, signed=True)
            if not (0 < metadata_at <= scopes_at <= pcs_at <= end <= size):
                raise Unreadable(f"nmethod 0x{blob:x}: debug info layout")
            data = memory.read(blob + metadata_at, end - metadata_at)
            metadata = data[: scopes_at - metadata_at]
            scopes = data[scopes_at - metadata_at : pcs_at - metadata_at]
            pcs = data[pcs_at - metadata_at :]
        pc_size = layout.sizes["PcDesc"]
        entries = sorted(
            (
                int.from_bytes(pcs[at + layout["pc_offset"] : at + layout["pc_offset"] + 4],
                               "little", signed=True),
                int.from_bytes(pcs[at + layout["pc_scope"] : at + layout["pc_scope"] + 4],
                               "little", signed=True),
            )
            for at in range(0, len(pcs) - pc_size + 1, pc_size)
        )  # fmt: skip
        methods = [
            int.from_bytes(metadata[i : i + 8], "little") for i in range(0, len(metadata) - 7, 8)
        ]
        chain_of: dict[int, tuple[ScopeFrame, ...]] = {}
        chains = []
        for _, scope in entries:
            if scope not in chain_of:
                chain_of[scope] = self._scope_chain(scopes, scope, methods)
            chains.append(chain_of[scope])
        return _Nmethod(
            blob,
            u("nm_compile_id"),
            method,
            code_begin,
            code_end,
            u("blob_frame_size") * 8,
            [pc for pc, _ in entries],
            chains,
        )

    def _scope_chain(
        self, scopes: bytes, offset: int, methods: list[int]
    ) -> tuple[ScopeFrame, ...]:
        """The scopes from the one at offset out to the compiled method (ScopeDesc:
        sender offset, metadata index of the Method*, bci + 1 — InvocationEntryBci is -1)."""
        chain = []
        limit = len(scopes)
        while offset > 0:  # DebugInformationRecorder::serialized_null is 0
            if offset >= limit or len(chain) >= _MAX_SCOPES:
                raise Unreadable("scope chain out of bounds")
            limit = offset  # senders are written first: offsets only go down
            sender, at = _unsigned5(scopes, offset, self._excluded)
            index, at = _unsigned5(scopes, at, self._excluded)
            bci, at = _unsigned5(scopes, at, self._excluded)
            if not 0 < index <= len(methods) or not methods[index - 1]:
                raise Unreadable(f"scope method index {index} of {len(methods)}")
            chain.append(ScopeFrame(methods[index - 1], bci - 1))
            offset = sender
        return tuple(chain)

    def _nmethod(self, pc: int) -> _Nmethod | None:
        """The nmethod (or stub) holding pc, from the cache if its header still says the
        same; None if in no blob. Stubs are cached too: an exited JVM's last samples are
        still named."""
        i = bisect_right(self._starts, pc) - 1
        cached = self._nmethods.get(self._blobs[i]) if i >= 0 else None
        if cached is not None and cached.code_begin <= pc < cached.code_end:
            if self._still(cached):
                return cached
            self.stats["stale"] += 1
            self._forget(cached)
        blob = self.blob_at(pc)
        if blob is None:
            return None
        nmethod = self._read_nmethod(blob)
        if not nmethod.code_begin <= pc < nmethod.code_end:
            return None
        self.stats["nmethods"] += nmethod.stub is None
        old = self._nmethods.get(blob)
        if old is not None:
            self._forget(old)
        self._nmethods.put(blob, nmethod)
        i = bisect_right(self._starts, nmethod.code_begin)
        self._starts.insert(i, nmethod.code_begin)
        self._blobs.insert(i, blob)
        if len(self._starts) > 2 * len(self._nmethods):  # evicted ones: rebuild
            held = sorted((n.code_begin, n.blob) for _, n in self._nmethods.items())
            self._starts = [start for start, _ in held]
            self._blobs = [blob for _, blob in held]
        return nmethod

    def _still(self, nmethod: _Nmethod) -> bool:
        """Whether its blob still holds that compilation (a freed blob's space is reused);
        once the JVM exited (its last samples drain after), the last one seen did. Stubs
        live as long as the JVM."""
        if self.memory.exited or nmethod.stub is not None:
            return True
        try:
            at = nmethod.blob + self.layout["nm_compile_id"]
            return int.from_bytes(self.memory.read(at, 4), "little") == nmethod.compile_id
        except Unreadable:
            if self.memory.exited:
                return True
            raise

    def _forget(self, nmethod: _Nmethod) -> None:
        self._nmethods.pop(nmethod.blob)
        i = bisect_right(self._starts, nmethod.code_begin) - 1
        if i >= 0 and self._blobs[i] == nmethod.blob:
            del self._starts[i], self._blobs[i]

    # --- names --------------------------------------------------------------------------

    def _symbol(self, address: int) -> str:
        layout = self.layout
        head = self.memory.read(address, layout["symbol_body"] + 64)
        length = int.from_bytes(
            head[layout["symbol_length"] : layout["symbol_length"] + 2], "little"
        )
        body = head[layout["symbol_body"] :]
        if length > len(body):
            if length > _MAX_SYMBOL:
                raise Unreadable("symbol too long")
            body = self.memory.read(address + layout["symbol_body"], length)
        # Modified UTF-8; names here are printable.
        try:
            text = body[:length].decode("utf-8")
        except UnicodeDecodeError:
            raise Unreadable("symbol not UTF-8") from None
        if not text or not text.isprintable():
            raise Unreadable("symbol not printable")
        return text

    def method_entry(self, method: int) -> str:
        """A Method*'s perf-map form; raises Unreadable if what it points to is no method."""
        cached = self._methods.get(method)
        layout, memory = self.layout, self.memory
        if cached is not None and memory.exited:
            return cached[1]
        const = memory.word(method + layout["method_const"])
        if cached is not None and cached[0] == const:
            return cached[1]
        if method & 7 or const & 7 or not const:
            raise Unreadable(f"Method* 0x{method:x}")
        pool = memory.word(const + layout["const_constants"])
        indexes = (
            memory.read(const + layout["const_name_index"], 2),
            memory.read(const + layout["const_signature_index"], 2),
        )
        holder = memory.word(pool + layout["pool_holder"])
        if not pool or pool & 7 or not holder or holder & 7:
            raise Unreadable(f"Method* 0x{method:x}: pool 0x{pool:x}")
        klass = self._symbol(memory.word(holder + layout["klass_name"]))
        name_index, signature_index = (int.from_bytes(index, "little") for index in indexes)
        base = pool + layout.sizes["ConstantPool"]
        # A resolved entry's low bit may be set (a tag in some versions): masked.
        name = self._symbol(memory.word(base + 8 * name_index) & ~1)
        signature = self._symbol(memory.word(base + 8 * signature_index) & ~1)
        try:
            entry = external_signature(klass, name, signature)
        except (ValueError, IndexError, KeyError):
            raise Unreadable(f"Method* 0x{method:x}: signature {signature!r}") from None
        self._methods.put(method, (const, entry))
        return entry

    def compiled_frames(self, pc: int, leaf: bool) -> list[Frame] | None:
        """The frames at a PC in the code cache, leaf (the innermost inlined method) first:
        a stub as HotSpot's perf map names it; None if pc is in no code blob."""
        nmethod = self._nmethod(pc)
        if nmethod is None:
            return None
        if nmethod.stub is not None:
            self.stats["stubs"] += 1
            return [Frame(nmethod.stub, nmethod.stub, "jit")]
        offset = pc - nmethod.code_begin
        key = (offset, leaf)
        frames = nmethod.names.get(key)
        if frames is None:
            frames = self._name_scopes(nmethod, offset, leaf)
            # Re-read: still the same compilation after decoding (not freed mid-read)?
            if not self._still(nmethod):
                self.stats["stale"] += 1
                self._forget(nmethod)
                return None
            nmethod.names[key] = frames
        self.stats["frames"] += 1
        self.stats["inlined"] += len(frames) - 1
        return frames

    def _name_scopes(self, nmethod: _Nmethod, offset: int, leaf: bool) -> list[Frame]:
        """A return address is the PC of its call's PcDesc; a sampled PC is named by the
        next PcDesc at or after it (HotSpot's pc_desc_near), as AsyncGetCallTrace does."""
        pcs = nmethod.pcs
        i = bisect_right(pcs, offset - 1) if leaf else bisect_right(pcs, offset) - 1
        if not leaf and (i < 0 or pcs[i] != offset):
            i = bisect_right(pcs, offset - 1)
        chain = nmethod.chains[i] if 0 <= i < len(pcs) else ()
        if not chain or chain[-1].method != nmethod.method:
            chain = (ScopeFrame(nmethod.method, -1),)  # no debug info here: the method
        frames = []
        for depth, scope in enumerate(chain):
            entry = self.method_entry(scope.method)
            name, _ = runtime_frame(entry)
            frames.append(Frame(name, entry, "jit" if depth == len(chain) - 1 else "inlined"))
        return frames

    def interpreted_frame(self, method: int) -> Frame:
        entry = self.method_entry(method)
        self.stats["interpreted"] += 1
        return Frame(runtime_frame(entry)[0], entry, "interpreted")

    def held(self) -> dict[str, int]:
        """How much of the JVM this holds: nmethods and methods read and kept."""
        return {"nmethods": len(self._nmethods), "methods": len(self._methods)}

    def close(self) -> None:
        self.memory.close()


def attach_process(snapshot: ProcessSnapshot) -> HotSpotProcess | None:
    """Read a JVM's layout from its memory; None if it is not set up yet (try again later).

    Raises LayoutError for a libjvm.so this module cannot read, OSError if the process is
    gone or its memory unreadable.
    """
    for mapping in snapshot.mappings:
        if mapping.module == "libjvm.so" and mapping.symbols is not None:
            symbols: ElfSymbols = mapping.symbols
            vaddr = symbols.vaddr(mapping.offset)
            if vaddr is not None and symbols.variables:
                break
    else:
        raise LayoutError("libjvm.so without gHotSpotVMStructs")
    bias = mapping.start - vaddr
    memory = Memory(snapshot.pid)
    try:
        layout = read_layout(memory, symbols.variables, bias)
        process = HotSpotProcess(snapshot.pid, memory, layout)
        if not process.refresh():
            memory.close()
            return None
    except Unreadable:
        memory.close()
        return None  # not set up yet, or torn: tried again later
    except BaseException:
        memory.close()
        raise
    return process


class HotSpotSymbolizer:
    """Java frames of every HotSpot JVM sampled, named from its memory (see module doc).

    frames(snapshot, addrs) gives, per address of a user stack, the Java frames it stands for
    ([] for a word the unwinder added: an interpreted frame's Method*), or None to let the
    caller name it (native code, or what could not be read: the perf map then).
    """

    RETRY_S = 0.2

    def __init__(self) -> None:
        self._processes: dict[int, HotSpotProcess] = {}
        self._failed: dict[int, str] = {}
        self._retry_at: dict[int, float] = {}  # not set up yet: not asked again before
        # JVMs sampled before they were set up: tried again by retry_waiting().
        self._waiting: dict[int, ProcessSnapshot] = {}
        # Held to attach and forget, and by a thread other than the drain's reading a
        # process's memory (unwind/hotspot.py): a forgotten process's fd is closed.
        self.lock = threading.RLock()
        # Set when a JVM is first seen: what the code cache thread sleeps on while none is.
        self.jvm_seen = threading.Event()
        self.stats = dict.fromkeys(("jvms", "layout_errors", "unreadable", "named"), 0)

    def process_of(self, pid: int) -> HotSpotProcess | None:
        return self._processes.get(pid)

    def failed(self, pid: int) -> bool:
        """Whether pid's JVM cannot be read from memory (a layout not understood)."""
        return pid in self._failed

    def processes(self) -> dict[int, HotSpotProcess]:
        """The JVMs read from memory, by pid."""
        return dict(self._processes)

    def has_jvms(self) -> bool:
        """Whether any JVM is read from memory or waits to be."""
        return bool(self._processes or self._waiting)

    def process(self, snapshot: ProcessSnapshot) -> HotSpotProcess | None:
        pid = snapshot.pid
        process = self._processes.get(pid)
        if process is not None:
            return process
        if pid in self._failed or not snapshot.hotspot:
            return None
        with self.lock:
            return self._attach(snapshot)

    def retry_waiting(self) -> None:
        """Try again the JVMs that were not set up when first sampled: they are read as soon
        as they are, not when their samples next drain."""
        for snapshot in list(self._waiting.values()):
            self.process(snapshot)

    def _attach(self, snapshot: ProcessSnapshot) -> HotSpotProcess | None:
        pid = snapshot.pid
        if pid in self._processes or time.monotonic() < self._retry_at.get(pid, 0.0):
            return self._processes.get(pid)
        self._retry_at[pid] = time.monotonic() + self.RETRY_S
        self._waiting.pop(pid, None)
        try:
            process = attach_process(snapshot)
        except (LayoutError, ValueError, IndexError, struct.error) as exc:
            self.stats["layout_errors"] += 1
            self._failed[pid] = str(exc)
            log.warning("JVM %d: Java frames not read from memory (%s): perf map only", pid, exc)
            return None
        except OSError:
            process = None  # exited (then forgotten), or not set up
        self.jvm_seen.set()
        if process is None:
            self._waiting[pid] = snapshot
            return None
        self.stats["jvms"] += 1
        log.info("JVM %d: JDK %d, frames named from its memory", pid, process.layout.major)
        self._processes[pid] = process
        return process

    def frames(
        self, snapshot: ProcessSnapshot, addrs: Sequence[int]
    ) -> list[list[Frame] | None] | None:
        """Per address (leaf first), its Java frames, [] for a consumed word, or None."""
        process = self.process(snapshot)
        if process is None:
            return None
        out: list[list[Frame] | None] = [None] * len(addrs)
        for i, addr in enumerate(addrs):
            if out[i] is not None:
                continue
            try:
                if process.in_interpreter(addr):
                    out[i] = [INTERPRETER]
                    if i + 1 < len(addrs) and not process.in_code_cache(addrs[i + 1]):
                        # The unwinder's word after an interpreted frame: its Method*.
                        method = addrs[i + 1]
                        out[i], out[i + 1] = [process.interpreted_frame(method)], []
                elif process.in_code_cache(addr):
                    out[i] = process.compiled_frames(addr, leaf=i == 0)
            except (Unreadable, ValueError, IndexError, struct.error) as exc:
                # (The last three: what validation missed. Never a lost drain.)
                self.stats["unreadable"] += 1
                process.stats["invalid"] += 1
                log.debug("JVM %d: 0x%x: %s", process.pid, addr, exc)
                out[i] = None
            except OSError:
                return out  # exited mid-read: the rest by the perf map
            if out[i]:
                self.stats["named"] += 1
        return out

    def forget(self, pid: int) -> None:
        with self.lock:
            process = self._processes.pop(pid, None)
            if process is not None:
                process.close()
            self._failed.pop(pid, None)
            self._retry_at.pop(pid, None)
            self._waiting.pop(pid, None)

    def close(self) -> None:
        for pid in list(self._processes):
            self.forget(pid)
