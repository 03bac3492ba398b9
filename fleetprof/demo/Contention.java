// Test workload: worker threads contending on one monitor (`synchronized`) in a named method,
// next to a thread pool whose threads (idle-pool-N) sit idle, parked waiting for tasks.
// Run with -XX:+PreserveFramePointer so frame-pointer unwinding walks Java frames.
// Usage: java -XX:+PreserveFramePointer demo.Contention SECONDS [THREADS]
package demo;

import java.util.concurrent.LinkedBlockingQueue;
import java.util.concurrent.ThreadPoolExecutor;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicInteger;

public final class Contention {
    private static final Object JOURNAL = new Object();
    private static volatile long sink;

    // Holds the journal's monitor for ~1 ms of work: the other threads block on it here.
    static void appendToJournal() {
        synchronized (JOURNAL) {
            long until = System.nanoTime() + 1_000_000;
            long x = sink;
            while (System.nanoTime() < until) {
                x = x * 6364136223846793005L + 1442695040888963407L;
            }
            sink = x;
        }
    }

    static final int IDLE_THREADS = 3;

    public static void main(String[] args) throws InterruptedException {
        double seconds = args.length > 0 ? Double.parseDouble(args[0]) : 10;
        int threads = args.length > 1 ? Integer.parseInt(args[1]) : 4;
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
                    appendToJournal();
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
