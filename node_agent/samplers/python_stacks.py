"""What python_stacks.bpf.h needs from user space: each Python process's interpreter
layout in every sampler's `python_procs` map (task_struct's layout: kernel_layout.py).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any


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
