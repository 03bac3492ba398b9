// Demo and test workload: worker threads spending CPU in two named methods, 2:1.
// Run with -XX:+PreserveFramePointer so frame-pointer unwinding walks Java frames.
// Usage: java -XX:+PreserveFramePointer Hotspots SECONDS [THREADS]
package demo;

public final class Hotspots {
    private static volatile long sink;

    // Long-running calls with their own loops: the JIT compiles each method on its own
    // (rather than inlining it into a caller), so samples land in the named method.
    static long ledgerReconcile(long rounds) {
        long x = sink;
        for (long i = 0; i < rounds * 2; i++) {
            x = x * 6364136223846793005L + 1442695040888963407L;
            x ^= (x >>> 17);
        }
        return x;
    }

    static long ledgerAudit(long rounds) {
        long x = sink;
        for (long i = 0; i < rounds; i++) {
            x = x * 2862933555777941757L + 3037000493L;
            x ^= (x >>> 13);
        }
        return x;
    }

    public static void main(String[] args) throws InterruptedException {
        double seconds = args.length > 0 ? Double.parseDouble(args[0]) : 10;
        int threads = args.length > 1 ? Integer.parseInt(args[1]) : 2;
        long deadline = System.nanoTime() + (long) (seconds * 1e9);
        Thread[] workers = new Thread[threads];
        for (int t = 0; t < threads; t++) {
            workers[t] = new Thread(() -> {
                while (System.nanoTime() < deadline) {
                    sink += ledgerReconcile(5_000_000);
                    sink += ledgerAudit(5_000_000);
                }
            }, "ledger-worker-" + t);
            workers[t].start();
        }
        for (Thread worker : workers) {
            worker.join();
        }
    }
}
