// Test workload: worker threads contending on one lock in a named method, next to a thread
// pool whose threads (idle-pool-N) sit idle, parked waiting for tasks. The lock is a monitor
// (`synchronized`, in appendToJournal) or a java.util.concurrent ReentrantLock (in
// postToLedger).
// Run with -XX:+PreserveFramePointer so frame-pointer unwinding walks Java frames.
// Usage: java -XX:+PreserveFramePointer demo.Contention SECONDS [THREADS [monitor|reentrant]]
package demo;

import java.util.concurrent.LinkedBlockingQueue;
import java.util.concurrent.ThreadPoolExecutor;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.concurrent.locks.ReentrantLock;

public final class Contention {
    private static final Object JOURNAL = new Object();
    private static final ReentrantLock LEDGER = new ReentrantLock();
    private static volatile long sink;

    // Holds the journal's monitor for ~1 ms of work: the other threads block on it here.
    static void appendToJournal() {
        synchronized (JOURNAL) {
            work();
        }
    }

    // The same with a ReentrantLock: the other threads block in its lock() here.
    static void postToLedger() {
        LEDGER.lock();
        try {
            work();
        } finally {
            LEDGER.unlock();
        }
    }

    private static void work() {
        long until = System.nanoTime() + 1_000_000;
        long x = sink;
        while (System.nanoTime() < until) {
            x = x * 6364136223846793005L + 1442695040888963407L;
        }
        sink = x;
    }

    static final int IDLE_THREADS = 3;

    public static void main(String[] args) throws InterruptedException {
        double seconds = args.length > 0 ? Double.parseDouble(args[0]) : 10;
        int threads = args.length > 1 ? Integer.parseInt(args[1]) : 4;
        boolean reentrant = args.length > 2 && args[2].equals("reentrant");
        AtomicInteger idleNumber = new AtomicInteger();
        ThreadPoolExecutor idle = new ThreadPoolExecutor(
            IDLE_THREADS, IDLE_THREADS, 1, TimeUnit.HOURS, new LinkedBlockingQueue<>(),
            task -> new Thread(task, "idle-pool-" + idleNumber.getAndIncrement()));
        idle.prestartAllCoreThreads();
        long deadline = System.nanoTime() + (long) (seconds * 1e9);
        Thread[] workers = new Thread[threads];
        for (int t = 0; t < threads; t++) {
            workers[t] = new Thread(() -> {
                while (System.nanoTime() < deadline) {
                    if (reentrant) {
                        postToLedger();
                    } else {
                        appendToJournal();
                    }
                }
            }, "journal-writer-" + t);
            workers[t].start();
        }
        for (Thread worker : workers) {
            worker.join();
        }
        idle.shutdown();
    }
}
