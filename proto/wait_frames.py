"""Which functions make a futex wait a lock, and which another wait: the agent classifies
its samples with them (node_agent/samplers/lock.py), the aggregator its older stored rows
(aggregator/old_events.py). In Python's and DuckDB's RE2 syntax alike.
"""

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
