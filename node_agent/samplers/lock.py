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

# The functions a thread calls to take a lock, or to wait for something else, by runtime.
# Leading underscores and glibc's symbol versions (___pthread_mutex_lock, ..._time64) are
# ignored: names are matched after them.
LOCKING_PATTERN = "|".join(
    (
        # glibc: mutexes (and its internal locks), rwlocks
        r"pthread_mutex_(timed|clock|cond_)?lock\w*",
        r"lll_lock_wait\w*",
        r"pthread_rwlock_(timed|clock)?(rd|wr)lock\w*",
        # HotSpot: monitor entry (synchronized), whoever asks for it
        r"ObjectSynchronizer::enter\w*",
        r"ObjectMonitor::(enter\w*|EnterI)",
        # java.util.concurrent locks (AQS.acquire: a lock's acquire, the JIT having
        # inlined the lock method into its caller)
        r"java\.util\.concurrent\.locks\.(ReentrantLock|ReentrantReadWriteLock)\S*\.(lock|tryLock)\w*",
        r"java\.util\.concurrent\.locks\.StampedLock\.\w*([Ll]ock|acquire)\w*",
        r"java\.util\.concurrent\.locks\.AbstractQueued(Long)?Synchronizer\.(acquire|acquireInterruptibly|tryAcquireNanos)",
        # Go: the runtime's own mutexes
        r"runtime\.lock2?",
        r"runtime\.lockWithRank",
    )
)
WAITING_PATTERN = "|".join(
    (
        # glibc
        r"pthread_cond_(timed|clock)?wait\w*",
        r"pthread_(timed|clock|try)?join\w*",
        r"pthread_barrier_wait",
        r"(new_)?sem_(timed|clock)?wait\w*",
        # HotSpot: Object.wait, Thread.sleep
        r"ObjectMonitor::wait",
        r"ObjectSynchronizer::wait\w*",
        r"JavaThread::sleep\w*",
        r"JVM_(Sleep|MonitorWait)",
        r"java\.lang\.(Object\.wait|Thread\.(sleep|join))\w*",
        # java.util.concurrent: conditions, latches, barriers, semaphores, futures
        r"java\.util\.concurrent\.locks\.AbstractQueued(Long)?Synchronizer\$ConditionObject\.await\w*",
        r"java\.util\.concurrent\.locks\.AbstractQueued(Long)?Synchronizer\.\w*Shared\w*",
        r"java\.util\.concurrent\.(CountDownLatch|CyclicBarrier)\.await",
        r"java\.util\.concurrent\.Phaser\.\w*[Aa]wait\w*",
        r"java\.util\.concurrent\.Semaphore\.(acquire|tryAcquire)\w*",
        r"java\.util\.concurrent\.(FutureTask|CompletableFuture)\.(get|join|awaitDone)",
        r"java\.util\.concurrent\.Exchanger\.exchange",
        # Go: idle threads of the scheduler
        r"runtime\.note(t)?sleep\w*",
    )
)

# (Python's and DuckDB's RE2 syntax alike: old_events.py converts stored rows with them.)
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
