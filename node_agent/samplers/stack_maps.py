"""Draining in-kernel stack counts kept in two generations of BPF maps.

Every sampler's BPF program (see stack_counts.bpf.h) counts into `counts_<g>`, with stacks
in `stacks_<g>` (kernel), `user_stacks_<g>` (user, see user_stacks.bpf.h) and
`python_stacks_<g>` (the interpreter's frames, see python_stacks.bpf.h), for the
generation g = epoch & 1 of its `epoch` array. To drain, user space
bumps the epoch, lets programs already running finish, then reads and clears the previous
generation: each sample lands in exactly one drain. Samplers with more per-generation maps
(io's latency histograms) read theirs for the generation `flip` returns.
"""

from __future__ import annotations

import ctypes
import errno
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
from bcc.libbcc import lib

# Longest a BPF program runs (microseconds); waiting this long after the flip means no
# program still writes into the generation being drained.
_FLIP_SETTLE_S = 0.002
# sample_key_t.user_stack values that are not hashes (user_stacks.bpf.h).
_USER_STACK_NONE = 0
_USER_STACK_LOST = 1
# user_stacks.bpf.h: frames per stored value, the flag of user_stack_t.depth saying deeper
# frames were left out, and the last address of a user stack so cut (its "[truncated]" root).
_USER_FRAMES = 128
_USER_TRUNCATED = 1 << 63
USER_TRUNCATED = 0
# python_stacks.bpf.h: sample_key_t.python_stack values that are not hashes, and the flag
# of py_stack_t.depth saying deeper frames were left out.
_PYTHON_STACK_NONE = 0
_PYTHON_STACK_LOST = 1
_PY_TRUNCATED = 1 << 63

# One Python frame as BPF records it: (code object address, instruction offset with the
# PY_ENTRY flag, tag); see python_stacks.bpf.h. A (0, 0, 0) root: deeper frames were left out.
PythonFrame = tuple[int, int, int]
TRUNCATED = (0, 0, 0)
# Bytes of entries read per BPF_MAP_LOOKUP_AND_DELETE_BATCH call: 256 KiB is 4096 counts
# or 240 user stacks, the buffers of every sampler's maps a few MB in all.
_BATCH_BYTES = 256 << 10
# Kernel stacks are deleted by the ids the counts name; the few a flip leaves unnamed (a
# sample whose count went to the next generation) are swept out every this many drains.
_SWEEP_EVERY = 32


class StackSample(NamedTuple):
    """One in-kernel aggregated count: a (pid, tid, comm, stack) and its weight."""

    pid: int
    tid: int
    comm: str
    # Instruction addresses, leaf first; empty when that part does not exist (user stack
    # of a kernel thread, kernel stack of a sample taken in user mode); None when the
    # kernel could not record it (stack map full or hash collision). A user stack cut short
    # (deeper than BPF keeps) ends with USER_TRUNCATED.
    kernel_stack: tuple[int, ...] | None
    user_stack: tuple[int, ...] | None
    weight: int
    # A synthetic leaf frame naming what the stack alone does not say ("[syscall fsync]",
    # "[block write vda]"); empty for none.
    leaf: str = ""
    # The interpreter's frames (python_stacks.bpf.h), leaf first; empty for none, None if
    # they were lost.
    python_stack: tuple[PythonFrame, ...] | None = ()
    # The key's detail (stack_counts.bpf.h), for the sampler's event_of.
    detail: int = 0


class HashDrain:
    """Reads and deletes every entry of a BPF hash map with BPF_MAP_LOOKUP_AND_DELETE_BATCH,
    a syscall per few hundred KiB of entries into buffers kept between drains, decoded by numpy:
    BCC's items() and clear() cost three syscalls per entry, each through Python, which
    made most of a busy node's drain."""

    def __init__(self, table: Any) -> None:
        self._fd = table.map_fd
        key, value = np.dtype(table.Key), np.dtype(table.Leaf)
        count = min(max(1, _BATCH_BYTES // (key.itemsize + value.itemsize)), table.max_entries)
        self._keys = np.zeros(count, key)
        self._values = np.zeros(count, value)

    def take(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, values) of every entry, now deleted."""
        keys, values = [], []
        token_in, token_out = ctypes.c_uint32(), ctypes.c_uint32()
        started = False
        while True:
            count = ctypes.c_uint32(len(self._keys))
            result = lib.bpf_lookup_and_delete_batch(
                self._fd,
                ctypes.byref(token_in) if started else None,
                ctypes.byref(token_out),
                self._keys.ctypes.data,
                self._values.ctypes.data,
                ctypes.byref(count),
            )
            error = ctypes.get_errno()
            keys.append(self._keys[: count.value].copy())
            values.append(self._values[: count.value].copy())
            if result != 0:
                if error == errno.ENOENT:  # the end of the map
                    return np.concatenate(keys), np.concatenate(values)
                raise OSError(error, f"BPF_MAP_LOOKUP_AND_DELETE_BATCH: {os.strerror(error)}")
            token_in.value, started = token_out.value, True


class GenerationalStackMaps:
    def __init__(self, bpf: Any, describe: Callable[[int], str]) -> None:
        """`describe` names the leaf frame of a key's `detail` (see StackSample.leaf)."""
        self._bpf = bpf
        self._epoch_map = bpf[b"epoch"]
        self._epoch = 0
        self._describe = describe
        self._drains = {
            f"{table}_{generation}": HashDrain(bpf[f"{table}_{generation}".encode()])
            for table in ("counts", "user_stacks", "python_stacks")
            for generation in (0, 1)
        }
        self._takes = 0

    def flip(self) -> int:
        """Start a new epoch; returns the generation that is now safe to read and clear."""
        previous = self._epoch & 1
        self._epoch += 1
        self._epoch_map[self._epoch_map.Key(0)] = self._epoch_map.Leaf(self._epoch)
        time.sleep(_FLIP_SETTLE_S)
        return previous

    def take(self, generation: int) -> list[StackSample]:
        """Read and clear one generation's counts and stacks."""
        stacks = self._bpf[f"stacks_{generation}".encode()]
        user_keys, user_values = self._drains[f"user_stacks_{generation}"].take()
        users = _UserStacks(
            dict(
                zip(
                    user_keys.tolist(),
                    zip(user_values["depth"].tolist(), user_values["ips"].tolist(), strict=True),
                    strict=True,
                )
            )
        )
        python_keys, python_values = self._drains[f"python_stacks_{generation}"].take()
        pythons: dict[int, tuple[PythonFrame, ...] | None] = {
            key: _python_frames(depth, frames)
            for key, depth, frames in zip(
                python_keys.tolist(),
                python_values["depth"].tolist(),
                python_values["frames"].tolist(),
                strict=True,
            )
        }
        pythons[_PYTHON_STACK_NONE] = ()
        walked: dict[int, tuple[int, ...] | None] = {}

        def walk(stack_id: int) -> tuple[int, ...] | None:
            if stack_id not in walked:
                walked[stack_id] = _read_stack(stacks, stack_id)
            return walked[stack_id]

        keys, weights = self._drains[f"counts_{generation}"].take()
        samples = [
            StackSample(
                pid=pid,
                tid=tid,
                comm=comm.decode(errors="replace"),
                kernel_stack=walk(kernel_stack_id),
                user_stack=users.get(user_stack),
                weight=weight,
                leaf=self._describe(detail),
                python_stack=pythons.get(python_stack),
                detail=detail,
            )
            for pid, tid, kernel_stack_id, user_stack, detail, python_stack, comm, weight in zip(
                *(keys[field].tolist() for field in _KEY_FIELDS),
                _strings(keys["comm"]),
                weights.tolist(),
                strict=True,
            )
        ]
        self._takes += 1
        if self._takes % _SWEEP_EVERY == 0:
            stacks.clear()
        else:
            _delete_stacks(stacks, [stack_id for stack_id in walked if stack_id >= 0])
        return samples

    def drain(self) -> list[StackSample]:
        return self.take(self.flip())


# sample_key_t's fields, in the order take() reads them.
_KEY_FIELDS = ("pid", "tid", "kernel_stack_id", "user_stack", "detail", "python_stack")


def _strings(chars: np.ndarray) -> list[bytes]:
    """A column of C char arrays (numpy reads ctypes' as rows of int8) as bytes, NUL-cut."""
    return np.ascontiguousarray(chars).view(f"S{chars.shape[1]}")[:, 0].tolist()


def _delete_stacks(stacks: Any, stack_ids: list[int]) -> None:
    key = ctypes.c_uint32()
    for stack_id in stack_ids:
        key.value = stack_id
        lib.bpf_delete_elem(stacks.map_fd, ctypes.byref(key))


def _read_stack(stacks: Any, stack_id: int) -> tuple[int, ...] | None:
    """Addresses (leaf first) for a stack id from bpf_get_stackid; None if it was lost."""
    if stack_id == -errno.EFAULT:
        return ()  # no stack of this kind: nothing was lost
    if stack_id < 0:
        return None  # -EEXIST (hash collision), -ENOMEM (map full), -ENOENT (outlived a drain)
    try:
        return tuple(stacks.walk(stack_id))
    except KeyError:
        return None


class _UserStacks:
    """A drain's user stacks by key, from user_stacks_<g>'s values: a stack deeper than one
    value is put together from its chunks (user_stacks.bpf.h), when a count names it."""

    def __init__(self, values: dict[int, tuple[int, list[int]]]) -> None:
        self._values = values
        self._stacks: dict[int, tuple[int, ...] | None] = {_USER_STACK_NONE: ()}

    def get(self, key: int) -> tuple[int, ...] | None:
        if key not in self._stacks:
            self._stacks[key] = self._assemble(key)
        return self._stacks[key]

    def _assemble(self, key: int) -> tuple[int, ...] | None:
        value = self._values.get(key)
        if value is None:
            return None
        depth, ips = value
        frames = depth & ~_USER_TRUNCATED
        if frames > _USER_FRAMES:
            ips = list(ips)
            for k in range(1, (frames + _USER_FRAMES - 1) // _USER_FRAMES):
                chunk = self._values.get(chunk_key(key, k))
                if chunk is None:  # not stored: the stack is cut there
                    frames, depth = len(ips), depth | _USER_TRUNCATED
                    break
                ips.extend(chunk[1])
        kept = tuple(ips[:frames])
        return (*kept, USER_TRUNCATED) if depth & _USER_TRUNCATED else kept


def chunk_key(key: int, k: int) -> int:
    """The key of chunk k of the user stack stored under `key` (user_stacks.bpf.h's
    CHUNK_KEY)."""
    return ((key ^ k) * 0x100000001B3) & 0xFFFF_FFFF_FFFF_FFFF | 2


def _python_frames(depth: int, frames: list[tuple[int, int, int]]) -> tuple[PythonFrame, ...]:
    kept = tuple(frames[: depth & ~_PY_TRUNCATED])
    return (*kept, TRUNCATED) if depth & _PY_TRUNCATED else kept
