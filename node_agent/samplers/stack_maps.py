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

import errno
import time
from collections.abc import Callable
from typing import Any, NamedTuple

# Longest a BPF program runs (microseconds); waiting this long after the flip means no
# program still writes into the generation being drained.
_FLIP_SETTLE_S = 0.002
# sample_key_t.user_stack values that are not hashes (user_stacks.bpf.h).
_USER_STACK_NONE = 0
_USER_STACK_LOST = 1
# python_stacks.bpf.h: sample_key_t.python_stack values that are not hashes, and the flag
# of py_stack_t.depth saying deeper frames were left out.
_PYTHON_STACK_NONE = 0
_PYTHON_STACK_LOST = 1
_PY_TRUNCATED = 1 << 63

# One Python frame as BPF records it: (code object address, instruction offset with the
# PY_ENTRY flag, tag); see python_stacks.bpf.h. A (0, 0, 0) root: deeper frames were left out.
PythonFrame = tuple[int, int, int]
TRUNCATED = (0, 0, 0)


class StackSample(NamedTuple):
    """One in-kernel aggregated count: a (pid, tid, comm, stack) and its weight."""

    pid: int
    tid: int
    comm: str
    # Instruction addresses, leaf first; empty when that part does not exist (user stack
    # of a kernel thread, kernel stack of a sample taken in user mode); None when the
    # kernel could not record it (stack map full or hash collision).
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


class GenerationalStackMaps:
    def __init__(self, bpf: Any, describe: Callable[[int], str]) -> None:
        """`describe` names the leaf frame of a key's `detail` (see StackSample.leaf)."""
        self._bpf = bpf
        self._epoch_map = bpf[b"epoch"]
        self._epoch = 0
        self._describe = describe

    def flip(self) -> int:
        """Start a new epoch; returns the generation that is now safe to read and clear."""
        previous = self._epoch & 1
        self._epoch += 1
        self._epoch_map[self._epoch_map.Key(0)] = self._epoch_map.Leaf(self._epoch)
        time.sleep(_FLIP_SETTLE_S)
        return previous

    def take(self, generation: int) -> list[StackSample]:
        """Read and clear one generation's counts and stacks."""
        counts = self._bpf[f"counts_{generation}".encode()]
        stacks = self._bpf[f"stacks_{generation}".encode()]
        user_stacks = self._bpf[f"user_stacks_{generation}".encode()]
        walked: dict[int, tuple[int, ...] | None] = {}
        users: dict[int, tuple[int, ...] | None] = {
            key.value: tuple(stack.ips[: stack.depth]) for key, stack in user_stacks.items()
        }
        users[_USER_STACK_NONE] = ()
        python_stacks = self._bpf[f"python_stacks_{generation}".encode()]
        pythons: dict[int, tuple[PythonFrame, ...] | None] = {
            key.value: _python_frames(stack) for key, stack in python_stacks.items()
        }
        pythons[_PYTHON_STACK_NONE] = ()

        def walk(stack_id: int) -> tuple[int, ...] | None:
            if stack_id not in walked:
                walked[stack_id] = _read_stack(stacks, stack_id)
            return walked[stack_id]

        samples = []
        for key, value in counts.items():
            samples.append(
                StackSample(
                    pid=key.pid,
                    tid=key.tid,
                    comm=key.comm.decode(errors="replace"),
                    kernel_stack=walk(key.kernel_stack_id),
                    user_stack=users.get(key.user_stack),
                    weight=value.value,
                    leaf=self._describe(key.detail),
                    python_stack=pythons.get(key.python_stack),
                    detail=key.detail,
                )
            )
        counts.clear()
        stacks.clear()
        user_stacks.clear()
        python_stacks.clear()
        return samples

    def drain(self) -> list[StackSample]:
        return self.take(self.flip())


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


def _python_frames(stack: Any) -> tuple[PythonFrame, ...]:
    depth = stack.depth & ~_PY_TRUNCATED
    frames = tuple((f.code, f.instr, f.tag) for f in stack.frames[:depth])
    return (*frames, TRUNCATED) if stack.depth & _PY_TRUNCATED else frames
