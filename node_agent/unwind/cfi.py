"""x86-64 call frame information (.eh_frame, .debug_frame) as compact unwind rows.

The kernel-side walk (samplers/user_stacks.bpf.h) needs, for any instruction address of a
file, three things only: how to find the canonical frame address (CFA = rsp+n, rbp+n, or the
PLT's fixed expression), where the return address is (always CFA-8 on x86-64), and where the
caller's rbp was saved, if it was. This module runs each FDE's CFA program and keeps one row
per address where those three change: the OpenTelemetry eBPF profiler's "stack deltas".

A row is one 64-bit word, the layout of `struct unwind_row_t` in user_stacks.bpf.h:
    bits  0-31  pc          file virtual address where the row starts applying
    bits 32-47  cfa_offset  bytes added to the CFA register
    bits 48-55  cfa_kind    one of the CFA_* constants below
    bits 56-63  rbp_slot    signed: the caller's rbp is at CFA + 8 * rbp_slot (0: rbp kept)
Rows are sorted by pc; the row for an address is the last one at or below it.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Iterator

# cfa_kind values (user_stacks.bpf.h has the same).
CFA_UNKNOWN = 0  # no rule here (no FDE, or one we cannot follow): fall back to frame pointers
CFA_RSP = 1
CFA_RBP = 2
CFA_PLT = 3  # PLT entries: rsp + 8, + 8 more past the entry's push (offset = that threshold)
CFA_END = 4  # the return address is undefined: the outermost frame (_start, clone)
CFA_INTERPRETER = 5  # HotSpot's template interpreter (unwind/hotspot.py)

_RBP, _RSP, _RA = 6, 7, 16
_MAX_OFFSET = 0xFFFF
_MAX_PC = 0xFFFFFFFF
_ALIGNMENT = 16
# The expression GCC and binutils emit for .plt entries: rsp + 8 + ((rip & 15) >= N) * 8.
_PLT_EXPRESSION_HEAD = bytes((0x77, 0x08, 0x80, 0x00, 0x3F, 0x1A))
_PLT_EXPRESSION_TAIL = bytes((0x2A, 0x33, 0x24, 0x22))
_LIT0 = 0x30

# DW_EH_PE pointer encodings.
_PE_OMIT = 0xFF
_PE_FORMATS = {0x00: "<Q", 0x02: "<H", 0x03: "<I", 0x04: "<Q", 0x0A: "<h", 0x0B: "<i", 0x0C: "<q"}
_PE_PCREL = 0x10
_PE_DATAREL = 0x30


class CfiError(ValueError):
    """The section is corrupt or uses what this reader does not follow."""


def pack_row(pc: int, cfa_kind: int, cfa_offset: int, rbp_slot: int) -> int:
    return pc | cfa_offset << 32 | cfa_kind << 48 | (rbp_slot & 0xFF) << 56


def unpack_row(row: int) -> tuple[int, int, int, int]:
    """(pc, cfa_kind, cfa_offset, rbp_slot) of a packed row."""
    slot = row >> 56
    return row & _MAX_PC, row >> 48 & 0xFF, row >> 32 & 0xFFFF, slot - 256 if slot > 127 else slot


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes | memoryview, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    def u8(self) -> int:
        value = self.data[self.pos]
        self.pos += 1
        return value

    def fixed(self, fmt: str) -> int:
        value = struct.unpack_from(fmt, self.data, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def uleb(self) -> int:
        result = shift = 0
        data = self.data
        while True:
            byte = data[self.pos]
            self.pos += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result
            shift += 7

    def sleb(self) -> int:
        result = shift = 0
        data = self.data
        while True:
            byte = data[self.pos]
            self.pos += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return result - (1 << shift) if byte & 0x40 else result

    def cstring(self) -> bytes:
        end = bytes(self.data[self.pos : self.pos + 64]).find(b"\0")
        if end < 0:
            raise CfiError("unterminated augmentation string")
        value = bytes(self.data[self.pos : self.pos + end])
        self.pos += end + 1
        return value

    def pointer(self, encoding: int, section_address: int) -> int:
        """A DW_EH_PE-encoded pointer; pc-relative ones against the section's address."""
        if encoding == _PE_OMIT:
            return 0
        fmt = _PE_FORMATS.get(encoding & 0x0F)
        if fmt is None:
            raise CfiError(f"pointer encoding {encoding:#x}")
        here = section_address + self.pos
        value = self.fixed(fmt)
        if encoding & 0x70 == _PE_PCREL:
            value += here
        elif encoding & 0x70 not in (0, _PE_DATAREL):
            raise CfiError(f"pointer application {encoding:#x}")
        return value & 0xFFFFFFFFFFFFFFFF


class _Cie:
    __slots__ = ("code_align", "data_align", "fde_encoding", "has_augmentation", "initial")

    def __init__(self) -> None:
        self.code_align = 1
        self.data_align = -8
        self.fde_encoding = 0
        self.has_augmentation = False
        self.initial = b""


class _State:
    """The part of a CFA program's row we keep."""

    __slots__ = ("cfa_kind", "cfa_offset", "cfa_register", "ra_undefined", "rbp_offset")

    def __init__(self) -> None:
        self.cfa_kind = CFA_UNKNOWN
        self.cfa_register = _RSP
        self.cfa_offset = 0
        self.rbp_offset: int | None = None  # bytes from the CFA; None: rbp kept
        self.ra_undefined = False

    def copy(self) -> _State:
        other = _State()
        other.cfa_kind = self.cfa_kind
        other.cfa_register = self.cfa_register
        other.cfa_offset = self.cfa_offset
        other.rbp_offset = self.rbp_offset
        other.ra_undefined = self.ra_undefined
        return other

    def rule(self) -> tuple[int, int, int]:
        """(cfa_kind, cfa_offset, rbp_slot) as a row stores them."""
        if self.ra_undefined:
            return CFA_END, 0, 0
        kind = self.cfa_kind
        if kind in (CFA_RSP, CFA_RBP):
            kind = CFA_RSP if self.cfa_register == _RSP else CFA_RBP
            if self.cfa_register not in (_RSP, _RBP) or not 0 <= self.cfa_offset <= _MAX_OFFSET:
                return CFA_UNKNOWN, 0, 0
        slot = 0
        if self.rbp_offset is not None:
            if self.rbp_offset % 8 or not -1024 <= self.rbp_offset < 0:
                return CFA_UNKNOWN, 0, 0
            slot = self.rbp_offset // 8
        return kind, self.cfa_offset, slot


def _plt_threshold(expression: bytes) -> int | None:
    if (
        len(expression) == 11
        and expression.startswith(_PLT_EXPRESSION_HEAD)
        and expression.endswith(_PLT_EXPRESSION_TAIL)
        and _LIT0 <= expression[6] < _LIT0 + 32
    ):
        return expression[6] - _LIT0
    return None


def _run(
    program: bytes | memoryview,
    cie: _Cie,
    state: _State,
    initial: _State | None,
    pc: int,
    end: int,
    emit: list[tuple[int, int, int, int]],
) -> None:
    """Run a CFA program from pc, appending (pc, kind, offset, slot) wherever the kept rule
    changes. `initial` is the state after the CIE's program (for DW_CFA_restore)."""
    reader = _Reader(program)
    stack: list[_State] = []
    size = len(program)
    code_align, data_align = cie.code_align, cie.data_align

    def advance(delta: int) -> None:
        nonlocal pc
        rule = state.rule()
        if not emit or emit[-1][1:] != rule:
            emit.append((pc, *rule))
        pc += delta * code_align

    while reader.pos < size:
        op = reader.u8()
        high, low = op & 0xC0, op & 0x3F
        if high == 0x40:  # advance_loc
            advance(low)
        elif high == 0x80:  # offset
            _set_offset(state, low, reader.uleb() * data_align)
        elif high == 0xC0:  # restore
            _restore(state, initial, low)
        elif op == 0x00:  # nop
            pass
        elif op == 0x01:  # set_loc: absolute, which relative runs (see _parse_fde) cannot be
            raise CfiError("DW_CFA_set_loc")
        elif op == 0x02:
            advance(reader.u8())
        elif op == 0x03:
            advance(reader.fixed("<H"))
        elif op == 0x04:
            advance(reader.fixed("<I"))
        elif op == 0x05:  # offset_extended
            register = reader.uleb()
            _set_offset(state, register, reader.uleb() * data_align)
        elif op == 0x06:  # restore_extended
            _restore(state, initial, reader.uleb())
        elif op == 0x07:  # undefined
            register = reader.uleb()
            if register == _RA:
                state.ra_undefined = True
            elif register == _RBP:
                state.rbp_offset = None
        elif op == 0x08:  # same_value
            if reader.uleb() == _RBP:
                state.rbp_offset = None
        elif op == 0x09:  # register
            register = reader.uleb()
            reader.uleb()
            if register == _RBP:
                state.rbp_offset = 1  # in another register: not followable (rule() says so)
        elif op == 0x0A:  # remember_state
            stack.append(state.copy())
        elif op == 0x0B:  # restore_state
            if not stack:
                raise CfiError("restore_state without remember_state")
            saved = stack.pop()
            state.cfa_kind, state.cfa_register = saved.cfa_kind, saved.cfa_register
            state.cfa_offset, state.rbp_offset = saved.cfa_offset, saved.rbp_offset
            state.ra_undefined = saved.ra_undefined
        elif op == 0x0C:  # def_cfa
            state.cfa_register = reader.uleb()
            state.cfa_offset = reader.uleb()
            state.cfa_kind = CFA_RSP
        elif op == 0x0D:  # def_cfa_register
            state.cfa_register = reader.uleb()
            if state.cfa_kind == CFA_PLT or state.cfa_kind == CFA_UNKNOWN:
                state.cfa_kind = CFA_RSP
        elif op == 0x0E:  # def_cfa_offset
            state.cfa_offset = reader.uleb()
        elif op == 0x0F:  # def_cfa_expression
            length = reader.uleb()
            threshold = _plt_threshold(bytes(program[reader.pos : reader.pos + length]))
            reader.pos += length
            state.cfa_kind = CFA_UNKNOWN if threshold is None else CFA_PLT
            state.cfa_offset = threshold or 0
        elif op in (0x10, 0x16):  # expression, val_expression
            register = reader.uleb()
            length = reader.uleb()
            reader.pos += length
            if register == _RBP:
                state.rbp_offset = 1
            elif register == _RA:
                state.cfa_kind = CFA_UNKNOWN
        elif op == 0x11:  # offset_extended_sf
            register = reader.uleb()
            _set_offset(state, register, reader.sleb() * data_align)
        elif op == 0x12:  # def_cfa_sf
            state.cfa_register = reader.uleb()
            state.cfa_offset = reader.sleb() * data_align
            state.cfa_kind = CFA_RSP
        elif op == 0x13:  # def_cfa_offset_sf
            state.cfa_offset = reader.sleb() * data_align
        elif op in (0x14, 0x15):  # val_offset(_sf): a value, not a saved slot
            register = reader.uleb()
            reader.uleb() if op == 0x14 else reader.sleb()
            if register == _RBP:
                state.rbp_offset = 1
        elif op == 0x2E:  # GNU_args_size
            reader.uleb()
        elif op == 0x2F:  # GNU_negative_offset_extended
            register = reader.uleb()
            _set_offset(state, register, -reader.uleb() * data_align)
        else:
            raise CfiError(f"call frame instruction {op:#x}")
    if end > pc:
        advance(0)


def _set_offset(state: _State, register: int, offset: int) -> None:
    if register == _RBP:
        state.rbp_offset = offset


def _restore(state: _State, initial: _State | None, register: int) -> None:
    if register == _RBP:
        state.rbp_offset = initial.rbp_offset if initial else None


def parse(section: bytes | memoryview, address: int, debug_frame: bool = False) -> array:
    """Unwind rows (packed, sorted by pc) of an .eh_frame (or .debug_frame) section whose
    contents are `section`, loaded at virtual address `address`. Raises CfiError."""
    fdes: list[tuple[int, int, list[tuple[int, int, int, int]]]] = []
    for start, end, rows in _fdes(memoryview(section), address, debug_frame):
        fdes.append((start, end, rows))
    fdes.sort(key=lambda fde: fde[0])
    out = array("Q")
    last_rule: tuple[int, int, int] | None = None
    previous_end = 0
    for start, end, rows in fdes:
        if start > _MAX_PC or end > _MAX_PC + 1:
            raise CfiError(f"code above 4 GiB ({start:#x})")
        if start < previous_end:
            continue  # overlapping FDEs: the first one wins
        # Gaps up to the next function's alignment are padding no sample lands in.
        if out and start >= previous_end + _ALIGNMENT:
            out.append(pack_row(previous_end, CFA_UNKNOWN, 0, 0))
            last_rule = (CFA_UNKNOWN, 0, 0)
        for pc, kind, offset, slot in rows:
            if pc >= end:
                break
            if (kind, offset, slot) == last_rule:
                continue
            if out and unpack_row(out[-1])[0] == pc:
                out.pop()
            out.append(pack_row(pc, kind, offset, slot))
            last_rule = (kind, offset, slot)
        previous_end = end
    if out:
        out.append(pack_row(min(previous_end, _MAX_PC), CFA_UNKNOWN, 0, 0))
    return out


def _fdes(
    data: memoryview, address: int, debug_frame: bool
) -> Iterator[tuple[int, int, list[tuple[int, int, int, int]]]]:
    cies: dict[int, tuple[_Cie, _State]] = {}
    # Rows of a program relative to its FDE's start, by (CIE, program): most functions'
    # programs are a few common prologues (libjvm.so: 43,666 FDEs, 15,857 programs).
    runs: dict[tuple[int, bytes], list[tuple[int, int, int, int]]] = {}
    pos = 0
    size = len(data)
    try:
        while pos + 4 <= size:
            length = struct.unpack_from("<I", data, pos)[0]
            if length == 0:
                if debug_frame:
                    pos += 4
                    continue
                break  # .eh_frame's terminator
            if length == 0xFFFFFFFF:
                raise CfiError("64-bit DWARF CFI")
            entry_start = pos + 4
            entry_end = entry_start + length
            if entry_end > size:
                raise CfiError("entry beyond the section")
            cie_id = struct.unpack_from("<I", data, entry_start)[0]
            is_cie = cie_id == (0xFFFFFFFF if debug_frame else 0)
            if not is_cie:
                cie_at = cie_id if debug_frame else entry_start - cie_id
                cie = cies.get(cie_at)
                if cie is None:
                    cie = _parse_cie(data, cie_at, address, debug_frame)
                    cies[cie_at] = cie
                yield _parse_fde(
                    data, entry_start + 4, entry_end, address, cie_at, cie, runs, debug_frame
                )
            pos = entry_end
    except (IndexError, struct.error) as error:
        raise CfiError(f"truncated entry at {pos:#x}") from error


def _parse_cie(data: memoryview, at: int, address: int, debug_frame: bool) -> tuple[_Cie, _State]:
    length = struct.unpack_from("<I", data, at)[0]
    reader = _Reader(data, at + 8)
    end = at + 4 + length
    cie = _Cie()
    version = reader.u8()
    augmentation = reader.cstring()
    if debug_frame and version >= 4:
        reader.u8()  # address size
        reader.u8()  # segment selector size
    if b"eh" in augmentation:
        reader.fixed("<Q")
    cie.code_align = reader.uleb()
    cie.data_align = reader.sleb()
    if version == 1:
        reader.u8()
    else:
        reader.uleb()
    if augmentation.startswith(b"z"):
        cie.has_augmentation = True
        augmentation_end = reader.uleb() + reader.pos
        for char in augmentation[1:]:
            if char == ord("R"):
                cie.fde_encoding = reader.u8()
            elif char == ord("P"):
                reader.pointer(reader.u8(), address)
            elif char == ord("L"):
                reader.u8()
            elif char not in (ord("S"), ord("B")):
                break
        reader.pos = augmentation_end
    elif augmentation:
        raise CfiError(f"augmentation {augmentation!r}")
    state = _State()
    discard: list[tuple[int, int, int, int]] = []
    _run(data[reader.pos : end], cie, state, None, 0, 0, discard)
    return cie, state


def _parse_fde(
    data: memoryview,
    pos: int,
    end: int,
    address: int,
    cie_at: int,
    cie: tuple[_Cie, _State],
    runs: dict[tuple[int, bytes], list[tuple[int, int, int, int]]],
    debug_frame: bool,
) -> tuple[int, int, list[tuple[int, int, int, int]]]:
    reader = _Reader(data, pos)
    info, initial = cie
    if debug_frame:
        start = reader.fixed("<Q")
        length = reader.fixed("<Q")
    else:
        start = reader.pointer(info.fde_encoding, address)
        length = reader.pointer(info.fde_encoding & 0x0F, address)
    if info.has_augmentation:
        skip = reader.uleb()
        reader.pos += skip
    program = bytes(data[reader.pos : end])
    relative = runs.get((cie_at, program))
    if relative is None:
        relative = []
        _run(program, info, initial.copy(), initial, 0, 1 << 62, relative)
        runs[(cie_at, program)] = relative
    return start, start + length, [(start + pc, *rule) for pc, *rule in relative]
