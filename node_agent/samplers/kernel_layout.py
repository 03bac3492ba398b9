"""Where the running kernel keeps the struct members our BPF programs read, from its BTF.

The kernel headers BCC compiles with need not match the running kernel (see
ENVIRONMENT.md), so the layouts of task_struct and struct pid come from the kernel's own
BTF instead, as -D defines (cflags): -1 each when it cannot say, and the programs then read
nothing of them.
"""

from __future__ import annotations

import functools
import logging
import struct

log = logging.getLogger(__name__)

BTF_PATH = "/sys/kernel/btf/vmlinux"
_BTF_HEADER = struct.Struct("<HBBIIIII")
_BTF_TYPE = struct.Struct("<III")
_BTF_MAGIC = 0xEB9F
_KIND_STRUCT, _KIND_UNION, _KIND_TYPEDEF = 4, 5, 8
# Bytes after a type's header, per kind: fixed, and per member (vlen).
_KIND_EXTRA = {1: (4, 0), 3: (12, 0), 4: (0, 12), 5: (0, 12), 6: (0, 8), 13: (0, 8), 14: (4, 0),
               15: (0, 12), 17: (4, 0), 19: (0, 12)}  # fmt: skip

# define -> (struct, member path). python_stacks.bpf.h: thread.fsbase is a thread's
# pthread_self() on x86-64 (what CPython's thread states record as thread_id); a forked
# child that has not exec'd (same self_exec_id as its parent) walks with its parent's
# layout. new_pids.bpf.h: a process's identity at its first sample, as /proc/PID/stat and
# status give it (main thread's comm and start time, parent, pid in its own namespace), and
# whether the sampled thread is exiting (flags).
KERNEL_MEMBERS = {
    "TASK_FSBASE_OFFSET": ("task_struct", ("thread", "fsbase")),
    "TASK_FLAGS_OFFSET": ("task_struct", ("flags",)),
    "TASK_REAL_PARENT_OFFSET": ("task_struct", ("real_parent",)),
    "TASK_TGID_OFFSET": ("task_struct", ("tgid",)),
    "TASK_SELF_EXEC_ID_OFFSET": ("task_struct", ("self_exec_id",)),
    "TASK_GROUP_LEADER_OFFSET": ("task_struct", ("group_leader",)),
    "TASK_START_BOOTTIME_OFFSET": ("task_struct", ("start_boottime",)),
    "TASK_COMM_OFFSET": ("task_struct", ("comm",)),
    "TASK_THREAD_PID_OFFSET": ("task_struct", ("thread_pid",)),
    "PID_LEVEL_OFFSET": ("pid", ("level",)),
    "PID_NUMBERS_OFFSET": ("pid", ("numbers",)),
}


@functools.cache
def kernel_offsets(path: str = BTF_PATH) -> dict[str, int] | None:
    """Offsets of KERNEL_MEMBERS in the running kernel; None if its BTF does not say."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        offsets = _member_offsets(data, KERNEL_MEMBERS)
    except (OSError, ValueError, struct.error, IndexError) as exc:
        log.warning("no kernel struct layouts from %s (%s): no Python frames", path, exc)
        return None
    if offsets is None:
        log.warning("%s lacks some of %s: no Python frames", path, list(KERNEL_MEMBERS))
    return offsets


def cflags() -> list[str]:
    """The defines of KERNEL_MEMBERS, all -1 without the kernel's layout."""
    offsets = kernel_offsets() or dict.fromkeys(KERNEL_MEMBERS, -1)
    return [f"-D{key}={value}" for key, value in offsets.items()]


def _member_offsets(
    data: bytes, wanted: dict[str, tuple[str, tuple[str, ...]]]
) -> dict[str, int] | None:
    magic, _, _, header_len, type_off, type_len, str_off, _ = _BTF_HEADER.unpack_from(data)
    if magic != _BTF_MAGIC:
        raise ValueError("not BTF")
    strings = header_len + str_off

    def name(offset: int) -> str:
        end = data.index(b"\0", strings + offset)
        return data[strings + offset : end].decode()

    # Type id -> (kind, name offset, members' (name offset, type id, bit offset)); id 0 is void.
    types: list[tuple[int, int, int, list[tuple[int, int, int]]]] = [(0, 0, 0, [])]
    at, end = header_len + type_off, header_len + type_off + type_len
    while at < end:
        name_off, info, size_or_type = _BTF_TYPE.unpack_from(data, at)
        kind, vlen, kind_flag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
        at += _BTF_TYPE.size
        fixed, each = _KIND_EXTRA.get(kind, (0, 0))
        fields = []
        if kind in (_KIND_STRUCT, _KIND_UNION):
            for i in range(vlen):
                m_name, m_type, m_offset = _BTF_TYPE.unpack_from(data, at + 12 * i)
                fields.append((m_name, m_type, m_offset & 0xFFFFFF if kind_flag else m_offset))
        types.append((kind, name_off, size_or_type, fields))
        at += fixed + each * vlen

    def find(type_id: int, wanted: str) -> tuple[int, int] | None:
        """(byte offset, type id) of member `wanted`, looking into anonymous members."""
        for m_name, m_type, bits in types[type_id][3]:
            if m_name and name(m_name) == wanted:
                return bits // 8, m_type
            if not m_name:
                inner = find(_resolved(types, m_type), wanted)
                if inner is not None:
                    return bits // 8 + inner[0], inner[1]
        return None

    def offset(type_id: int, members: tuple[str, ...]) -> int | None:
        total = 0
        for member in members:
            found = find(_resolved(types, type_id), member)
            if found is None:
                return None
            total += found[0]
            type_id = found[1]
        return total

    structs = {struct_name for struct_name, _ in wanted.values()}
    found_structs: dict[str, int] = {}
    for type_id, (kind, name_off, _, fields) in enumerate(types):
        if kind == _KIND_STRUCT and fields and name(name_off) in structs:
            found_structs.setdefault(name(name_off), type_id)
    offsets = {}
    for key, (struct_name, members) in wanted.items():
        type_id = found_structs.get(struct_name)
        value = offset(type_id, members) if type_id is not None else None
        if value is None:
            return None
        offsets[key] = value
    return offsets


def _resolved(types: list[tuple[int, int, int, list[tuple[int, int, int]]]], type_id: int) -> int:
    """The struct behind typedefs and qualifiers (const, volatile, restrict, type tags)."""
    for _ in range(16):
        kind = types[type_id][0]
        if kind not in (_KIND_TYPEDEF, 9, 10, 11, 18):
            return type_id
        type_id = types[type_id][2]
    return type_id
