"""bpf_loop callbacks in BCC's programs.

BCC 0.26 compiles a function whose address is passed to bpf_loop, but does not link it: the
program's `ld_imm64` of the callback's address is left as 0, with no callback after the
program, and loading fails ("R2 type=scalar expected=func"). The kernel wants the callback
appended to the program as a subprogram, the load marked BPF_PSEUDO_FUNC with its offset,
and BTF naming both functions (func_info): "missing btf func_info" otherwise.

LoopBPF does that for the one callback our samplers use (user_stacks.bpf.h's
walk_user_frame, a non-static function so that BCC compiles it as code of its own, map
references resolved): each program that loads the callback's address gets it appended,
and is loaded by the bpf() system call with a small BTF of its own (two functions: the
program and the callback). Programs that do not call it load as BCC loads them.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct
from typing import Any

from bcc import BPF
from bcc.libbcc import lib

CALLBACK = b"walk_user_frame"

_SYS_BPF = 321  # x86-64
_BPF_PROG_LOAD = 5
_BPF_BTF_LOAD = 18
_LD_IMM64 = 0x18
_PSEUDO_FUNC = 4  # bpf_insn.src_reg of a callback's address
_INSN = 8
_LOG_BYTES = 4 << 20
_libc = ctypes.CDLL(None, use_errno=True)


class LoopBPF(BPF):
    """BCC's BPF, whose programs may pass CALLBACK to bpf_loop."""

    def load_func(
        self, func_name: str | bytes, prog_type: int, device: Any = None, attach_type: int = -1
    ) -> Any:
        name = func_name.encode() if isinstance(func_name, str) else func_name
        if name in self.funcs or name == CALLBACK:
            return super().load_func(name, prog_type, device, attach_type)
        callback = _code(self.module, CALLBACK)
        program = _code(self.module, name)
        if callback is None or program is None or not link_callback(program):
            return super().load_func(name, prog_type, device, attach_type)
        fd = load_program(
            prog_type,
            name,
            bytes(program) + bytes(callback),
            (name, CALLBACK),
            (0, len(program) // _INSN),
            ctypes.string_at(lib.bpf_module_license(self.module)),
            attach_type,
        )
        function = BPF.Function(self, name, fd)
        self.funcs[name] = function
        return function


def _code(module: int, name: bytes) -> bytearray | None:
    start = lib.bpf_function_start(module, name)
    if not start:
        return None
    return bytearray(ctypes.string_at(start, lib.bpf_function_size(module, name)))


def link_callback(program: bytearray) -> int:
    """Point each unresolved load of the callback's address in `program` (an ld_imm64 of 0,
    which clang never emits for a constant) at the callback appended after it; how many."""
    count = len(program) // _INSN
    linked = 0
    for i in range(count - 1):
        at = i * _INSN
        if program[at] != _LD_IMM64 or program[at + 1] >> 4:
            continue
        if program[at + 4 : at + 8] != bytes(4) or program[at + 12 : at + 16] != bytes(4):
            continue
        if program[at + 1] & 0xF != 2:  # bpf_loop's callback is its second argument
            raise ValueError(f"an ld_imm64 of 0 into r{program[at + 1] & 0xF} at {i}")
        program[at + 1] = _PSEUDO_FUNC << 4 | 2
        program[at + 4 : at + 8] = struct.pack("<i", count - i - 1)
        linked += 1
    return linked


def func_btf(names: tuple[bytes, bytes]) -> tuple[bytes, tuple[int, int]]:
    """A BTF blob naming a program (long f(void *ctx)) and a bpf_loop callback (static
    long f(long index, void *data)); with their type ids."""
    strings = bytearray(b"\0")

    def text(value: bytes) -> int:
        strings.extend(value + b"\0")
        return len(strings) - len(value) - 1

    def kind(number: int, vlen: int = 0) -> int:
        return number << 24 | vlen

    types = b"".join(
        (
            struct.pack("<IIII", text(b"long"), kind(1), 8, 1 << 24 | 64),  # [1] INT long
            struct.pack("<III", 0, kind(2), 0),  # [2] void *
            # [3] long (void *ctx), [4] long (long index, void *data)
            struct.pack("<IIIII", 0, kind(13, 1), 1, text(b"ctx"), 2),
            struct.pack("<IIIIIII", 0, kind(13, 2), 1, text(b"index"), 1, text(b"data"), 2),
            # [5] the program (global), [6] the callback (static)
            struct.pack("<III", text(names[0]), kind(12, 1), 3),
            struct.pack("<III", text(names[1]), kind(12, 0), 4),
        )
    )
    header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return header + types + bytes(strings), (5, 6)


def _bpf(command: int, attr: ctypes.Array[ctypes.c_uint8]) -> int:
    result = _libc.syscall(_SYS_BPF, command, ctypes.byref(attr), ctypes.sizeof(attr))
    if result < 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
    return int(result)


def load_program(
    prog_type: int,
    name: bytes,
    code: bytes,
    names: tuple[bytes, bytes],
    starts: tuple[int, int],
    license: bytes,
    attach_type: int = -1,
) -> int:
    """Load a program of two functions (at instructions `starts`); its fd. The verifier's
    log is in the exception if it refuses."""
    blob, type_ids = func_btf(names)
    btf = ctypes.create_string_buffer(blob, len(blob))
    attr = (ctypes.c_uint8 * 48)()
    struct.pack_into("<QQIII", attr, 0, ctypes.addressof(btf), 0, len(blob), 0, 0)
    btf_fd = _bpf(_BPF_BTF_LOAD, attr)
    try:
        info = struct.pack("<IIII", starts[0], type_ids[0], starts[1], type_ids[1])
        buffers = [ctypes.create_string_buffer(data, len(data)) for data in (code, info)]
        licence = ctypes.create_string_buffer(license)
        try:
            return _load(prog_type, name, buffers, licence, btf_fd, attach_type, None)
        except OSError as error:
            log = ctypes.create_string_buffer(_LOG_BYTES)
            with contextlib.suppress(OSError):
                _load(prog_type, name, buffers, licence, btf_fd, attach_type, log)
            tail = log.value.decode(errors="replace")[-4000:]
            raise Exception(
                f"Failed to load BPF program {name.decode()}: {error}\n{tail}"
            ) from None
    finally:
        os.close(btf_fd)


def _load(
    prog_type: int,
    name: bytes,
    buffers: list[ctypes.Array[ctypes.c_char]],
    licence: ctypes.Array[ctypes.c_char],
    btf_fd: int,
    attach_type: int,
    log: ctypes.Array[ctypes.c_char] | None,
) -> int:
    code, info = buffers
    attr = (ctypes.c_uint8 * 144)()  # union bpf_attr, BPF_PROG_LOAD's fields
    struct.pack_into(
        "<IIQQIIQ",
        attr,
        0,
        prog_type,
        len(code) // _INSN,
        ctypes.addressof(code),
        ctypes.addressof(licence),
        1 if log is not None else 0,
        len(log) if log is not None else 0,
        ctypes.addressof(log) if log is not None else 0,
    )
    struct.pack_into("<16s", attr, 48, name[:15])
    if attach_type != -1:
        struct.pack_into("<I", attr, 68, attach_type)
    struct.pack_into("<IIQI", attr, 72, btf_fd, 8, ctypes.addressof(info), 2)
    return _bpf(_BPF_PROG_LOAD, attr)
