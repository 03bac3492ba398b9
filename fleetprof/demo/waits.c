// Workloads that wait: for the lock, io and offcpu tests and benchmarks.
// Build with frame pointers so the agent unwinds it:
//   gcc -O1 -fno-omit-frame-pointer -o waits waits.c -lpthread
// Usage:
//   waits mutex SECONDS THREADS    threads contend on one mutex in update_shared_ledger(),
//                                  each holding it for 500 µs (asleep: so the others wait
//                                  in the kernel however busy the CPUs are)
//   waits fsync SECONDS FILE       write + fsync a record at a time in commit_record()
//   waits pingpong ROUNDS SPIN_NS  one thread pair per CPU (pinned) passing a turn through
//                                  futexes, spinning SPIN_NS per turn; prints futex waits/s
//   waits syscalls ROUNDS FILE     pread 4 KiB of FILE and write it to /dev/null, ROUNDS times
//   waits mmap SECONDS THREADS     threads map, touch and unmap memory in remap_scratch():
//                                  they contend for the process's mmap lock, in the kernel
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void spin_ns(long ns)
{
    double until = now() + ns / 1e9;
    while (now() < until)
        ;
}

// --- mutex: all threads but one wait for the ledger's lock at any time.
static pthread_mutex_t ledger_lock = PTHREAD_MUTEX_INITIALIZER;
static double deadline;
static volatile uint64_t ledger;

__attribute__((noinline)) void update_shared_ledger(void)
{
    const struct timespec slow_write = {.tv_nsec = 500000};
    pthread_mutex_lock(&ledger_lock);
    nanosleep(&slow_write, NULL);
    ledger++;
    pthread_mutex_unlock(&ledger_lock);
}

static void *ledger_worker(void *arg)
{
    (void)arg;
    while (now() < deadline) {
        update_shared_ledger();
        sched_yield();  // let a waiter take the lock
    }
    return NULL;
}

static int run_mutex(double seconds, int threads)
{
    pthread_t ids[64];
    if (threads < 1 || threads > 64)
        return 2;
    deadline = now() + seconds;
    for (int i = 0; i < threads; i++)
        pthread_create(&ids[i], NULL, ledger_worker, NULL);
    for (int i = 0; i < threads; i++)
        pthread_join(ids[i], NULL);
    return 0;
}

// --- fsync: durable appends, one record at a time.
__attribute__((noinline)) void commit_record(int fd, const char *record, size_t size)
{
    if (write(fd, record, size) != (ssize_t)size || fsync(fd) != 0)
        exit(1);
}

static int run_fsync(double seconds, const char *path)
{
    char record[4096];
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0)
        return 1;
    memset(record, 'r', sizeof(record));
    for (double until = now() + seconds; now() < until;)
        commit_record(fd, record, sizeof(record));
    return close(fd);
}

// --- pingpong: a turn passed back and forth through a futex.
struct pair {
    _Atomic int turn;
    int cpu;
    long rounds, spin, waits[2];
};

static void wait_for_turn(struct pair *pair, int me)
{
    int turn;
    while ((turn = atomic_load(&pair->turn)) != me) {
        syscall(SYS_futex, &pair->turn, FUTEX_WAIT_PRIVATE, turn, NULL, NULL, 0);
        pair->waits[me]++;
    }
}

static void play(struct pair *pair, int me)
{
    cpu_set_t cpus;
    CPU_ZERO(&cpus);
    CPU_SET(pair->cpu, &cpus);
    sched_setaffinity(0, sizeof(cpus), &cpus);
    for (long i = 0; i < pair->rounds; i++) {
        wait_for_turn(pair, me);
        spin_ns(pair->spin);
        atomic_store(&pair->turn, 1 - me);
        syscall(SYS_futex, &pair->turn, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
    }
}

static void *pong(void *arg)
{
    play(arg, 1);
    return NULL;
}

static void *ping(void *arg)
{
    pthread_t partner;
    pthread_create(&partner, NULL, pong, arg);
    play(arg, 0);
    pthread_join(partner, NULL);
    return NULL;
}

static int run_pingpong(long rounds, long spin)
{
    int cpus = sysconf(_SC_NPROCESSORS_ONLN);
    struct pair pairs[64] = {0};
    pthread_t ids[64];
    long waits = 0;
    double start = now();
    if (cpus > 64)
        cpus = 64;
    for (int i = 0; i < cpus; i++) {
        pairs[i] = (struct pair){.cpu = i, .rounds = rounds, .spin = spin};
        pthread_create(&ids[i], NULL, ping, &pairs[i]);
    }
    for (int i = 0; i < cpus; i++) {
        pthread_join(ids[i], NULL);
        waits += pairs[i].waits[0] + pairs[i].waits[1];
    }
    printf("%.0f futex waits/s\n", waits / (now() - start));
    return 0;
}

// --- syscalls: small reads and writes served from the page cache.
static int run_syscalls(long rounds, const char *path)
{
    char block[4096];
    int in = open(path, O_RDONLY), out = open("/dev/null", O_WRONLY);
    if (in < 0 || out < 0)
        return 1;
    for (long i = 0; i < rounds; i++) {
        if (pread(in, block, sizeof(block), 0) < 0 || write(out, block, sizeof(block)) < 0)
            return 1;
    }
    return 0;
}

// --- mmap: every map and unmap takes the process's mmap lock (a kernel rwsem) to write.
__attribute__((noinline)) int remap_scratch(void)
{
    const size_t size = 16 * 4096;
    char *scratch = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (scratch == MAP_FAILED)
        return -1;
    for (size_t i = 0; i < size; i += 4096)
        scratch[i] = 1;
    return munmap(scratch, size);
}

static void *remap_worker(void *arg)
{
    (void)arg;
    while (now() < deadline) {
        if (remap_scratch() < 0)
            return (void *)1;
    }
    return NULL;
}

static int run_mmap(double seconds, int threads)
{
    pthread_t ids[64];
    void *failed = NULL;
    int result = 0;
    if (threads < 1 || threads > 64)
        return 2;
    deadline = now() + seconds;
    for (int i = 0; i < threads; i++)
        pthread_create(&ids[i], NULL, remap_worker, NULL);
    for (int i = 0; i < threads; i++) {
        pthread_join(ids[i], &failed);
        result |= failed != NULL;
    }
    return result;
}

int main(int argc, char **argv)
{
    if (argc == 4 && !strcmp(argv[1], "mutex"))
        return run_mutex(atof(argv[2]), atoi(argv[3]));
    if (argc == 4 && !strcmp(argv[1], "fsync"))
        return run_fsync(atof(argv[2]), argv[3]);
    if (argc == 4 && !strcmp(argv[1], "pingpong"))
        return run_pingpong(atol(argv[2]), atol(argv[3]));
    if (argc == 4 && !strcmp(argv[1], "syscalls"))
        return run_syscalls(atol(argv[2]), argv[3]);
    if (argc == 4 && !strcmp(argv[1], "mmap"))
        return run_mmap(atof(argv[2]), atoi(argv[3]));
    fprintf(stderr, "usage: see the top of waits.c\n");
    return 2;
}
