"""Lock contention apart from other waits (lock.bpf.c counts both; switches.py runs it).

A futex wait is `lock` when the thread is acquiring a lock, `wait` otherwise (a condition,
a join, a park, a sleep, Object.wait): decided here, from the frames at the wait and the
futex command (docs/events.md says how, and what it cannot tell apart). Kernel lock
contention (lock:contention_*) is always `lock`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from fleetprof.node_agent.symbolize.frame import Frame
from fleetprof.proto.wait_frames import LOCKING_PATTERN, WAITING_PATTERN

# sample_key_t.detail's top byte (lock.bpf.c DETAIL_*), and its futex commands.
DETAIL_FUTEX = 1
DETAIL_KERNEL_LOCK = 2
FUTEX_WAIT = 0
FUTEX_LOCK_PI = 6
FUTEX_LOCK_PI2 = 13
# What a futex wait is when no frame says: glibc's mutexes (__lll_lock_wait) and PI mutexes
# wait with these; its condition variables, joins, semaphores and rwlocks with
# FUTEX_WAIT_BITSET, as do the JVM's parks (pthread_cond_wait, also for monitor entry, so
# monitors need their frames); futex2 waits are anyone's.
_LOCK_COMMANDS = frozenset({FUTEX_WAIT, FUTEX_LOCK_PI, FUTEX_LOCK_PI2})

_LOCKING = re.compile(LOCKING_PATTERN)
_WAITING = re.compile(WAITING_PATTERN)


def lock_or_wait(command: int, frames: Sequence[Frame]) -> str:
    """`lock` or `wait` for a futex wait of `command` with these frames (root first): the
    outermost frame that is a lock's or a wait's function decides (what the program asked
    for, above the primitives it is built on: a monitor entry parks in pthread_cond_wait);
    with none, the futex command."""
    for frame in frames:
        if frame.kind == "kernel":
            break
        name = frame.name.lstrip("_")
        if _LOCKING.fullmatch(name):
            return "lock"
        if _WAITING.fullmatch(name):
            return "wait"
    return "lock" if command in _LOCK_COMMANDS else "wait"
