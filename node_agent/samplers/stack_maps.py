"""Draining in-kernel stack counts kept in two generations of BPF maps.

Every sampler's BPF program counts into `counts_<g>` / `stacks_<g>` for the generation g
named in its `generation` array. To drain, user space flips the generation, lets programs
already running finish, then reads and clears the previous generation: each sample lands
in exactly one drain.
"""

from __future__ import annotations

import errno
import time
from typing import Any, NamedTuple

# Longest a BPF program runs (microseconds); waiting this long after the flip means no
# program still writes into the generation being drained.
_FLIP_SETTLE_S = 0.002


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


class GenerationalStackMaps:
    def __init__(self, bpf: Any) -> None:
        self._bpf = bpf
        self._generation = bpf[b"generation"]
        self._current = 0

    def drain(self) -> list[StackSample]:
        previous = self._current
        self._current = 1 - previous
        self._generation[self._generation.Key(0)] = self._generation.Leaf(self._current)
        time.sleep(_FLIP_SETTLE_S)
        counts = self._bpf[f"counts_{previous}".encode()]
        stacks = self._bpf[f"stacks_{previous}".encode()]
        walked: dict[int, tuple[int, ...] | None] = {}

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
                    user_stack=walk(key.user_stack_id),
                    weight=value.value,
                )
            )
        counts.clear()
        stacks.clear()
        return samples


def _read_stack(stacks: Any, stack_id: int) -> tuple[int, ...] | None:
    """Addresses (leaf first) for a stack id from bpf_get_stackid; None if it was lost."""
    if stack_id == -errno.EFAULT:
        return ()  # no stack of this kind: nothing was lost
    if stack_id < 0:
        return None  # -EEXIST (hash collision) or -ENOMEM (map full)
    try:
        return tuple(stacks.walk(stack_id))
    except KeyError:
        return None
