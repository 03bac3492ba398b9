"""What python_stacks.bpf.h needs from user space: where the running kernel's task_struct
keeps a thread's fs base, parent, tgid and exec count, and each Python process's
interpreter layout in every sampler's `python_procs` map.

The kernel headers BCC compiles with need not match the running kernel (see
ENVIRONMENT.md), so task_struct's layout is read from the kernel's own BTF instead.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import struct
import threading
from typing import Any

log = logging.getLogger(__name__)

BTF_PATH = "/sys/kernel/btf/vmlinux"
_BTF_HEADER = struct.Struct("<HBBIIIII")
_BTF_TYPE = struct.Struct("<III")
_BTF_MAGIC = 0xEB9F
_KIND_STRUCT, _KIND_UNION, _KIND_TYPEDEF = 4, 5, 8
# Bytes after a type's header, per kind: fixed, and per member (vlen).
_KIND_EXTRA = {1: (4, 0), 3: (12, 0), 4: (0, 12), 5: (0, 12), 6: (0, 8), 13: (0, 8), 14: (4, 0),
               15: (0, 12), 17: (4, 0), 19: (0, 12)}  # fmt: skip


# The task_struct members python_stacks.bpf.h reads: thread.fsbase is a thread's
# pthread_self() on x86-64 (what CPython's thread states record as thread_id); a forked
# child that has not exec'd (same self_exec_id as its parent) walks with its parent's layout.
TASK_MEMBERS = {
    "TASK_FSBASE_OFFSET": ("thread", "fsbase"),
    "TASK_REAL_PARENT_OFFSET": ("real_parent",),
    "TASK_TGID_OFFSET": ("tgid",),
    "TASK_SELF_EXEC_ID_OFFSET": ("self_exec_id",),
}


@functools.cache
def task_offsets(path: str = BTF_PATH) -> dict[str, int] | None:
    """Offsets of TASK_MEMBERS in the running kernel's task_struct; None if the kernel has
    no BTF saying so."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        offsets = _member_offsets(data, "task_struct", TASK_MEMBERS)
    except (OSError, ValueError, struct.error, IndexError) as exc:
        log.warning("no task_struct layout from %s (%s): no Python frames", path, exc)
        return None
    if offsets is None:
        log.warning("task_struct in %s lacks %s: no Python frames", path, list(TASK_MEMBERS))
    return offsets


def _member_offsets(
    data: bytes, struct_name: str, wanted: dict[str, tuple[str, ...]]
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

    for type_id, (kind, name_off, _, fields) in enumerate(types):
        if kind == _KIND_STRUCT and fields and name(name_off) == struct_name:
            offsets = {key: offset(type_id, members) for key, members in wanted.items()}
            if None in offsets.values():
                return None
            return {key: value for key, value in offsets.items() if value is not None}
    return None


def _resolved(types: list[tuple[int, int, int, list[tuple[int, int, int]]]], type_id: int) -> int:
    """The struct behind typedefs and qualifiers (const, volatile, restrict, type tags)."""
    for _ in range(16):
        kind = types[type_id][0]
        if kind not in (_KIND_TYPEDEF, 9, 10, 11, 18):
            return type_id
        type_id = types[type_id][2]
    return type_id


def cflags() -> list[str]:
    """Defines python_stacks.bpf.h needs: without task_struct's layout it walks nothing."""
    offsets = task_offsets() or dict.fromkeys(TASK_MEMBERS, -1)
    return [f"-D{key}={value}" for key, value in offsets.items()]


class PythonTargets:
    """The Python processes every sampler's BPF program walks: pid -> the packed
    struct py_proc_t (python_stacks.bpf.h), written into each sampler's `python_procs` map;
    and the forked children BPF walked with their parent's layout (`python_forks`).

    Process-wide: samplers come and go (sessions), processes are found by the symbolizer.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._procs: dict[int, bytes] = {}
        self._maps: list[Any] = []
        self._forks: list[Any] = []

    def add_map(self, table: Any, forks: Any = None) -> None:
        """A new sampler's maps: `table` filled with every process known now, then kept
        current; `forks` read by parent_of."""
        with self._lock:
            self._maps.append(table)
            for pid, info in self._procs.items():
                _put(table, pid, info)
            if forks is not None:
                self._forks.append(forks)

    def remove_map(self, table: Any, forks: Any = None) -> None:
        with self._lock:
            self._maps = [known for known in self._maps if known is not table]
            self._forks = [known for known in self._forks if known is not forks]

    def parent_of(self, pid: int) -> int | None:
        """The parent whose layout BPF walked pid with (a fork the agent did not see)."""
        with self._lock:
            for forks in self._forks:
                try:
                    return int(forks[forks.Key(pid)].value)
                except KeyError:
                    continue
        return None

    def set(self, pid: int, info: bytes) -> None:
        with self._lock:
            self._procs[pid] = info
            for table in self._maps:
                _put(table, pid, info)

    def remove(self, pid: int) -> None:
        with self._lock:
            if self._procs.pop(pid, None) is None:
                return
            for table in self._maps:
                with contextlib.suppress(KeyError):
                    del table[table.Key(pid)]

    def __contains__(self, pid: int) -> bool:
        return pid in self._procs


def _put(table: Any, pid: int, info: bytes) -> None:
    leaf = table.Leaf.from_buffer_copy(info)
    table[table.Key(pid)] = leaf


TARGETS = PythonTargets()
