// Demo and test workload: spends CPU in two named functions in a 3:1 ratio.
// Build with frame pointers so the agent unwinds it:
//   gcc -O1 -fno-omit-frame-pointer -o hotspots hotspots.c -lpthread
// Usage: hotspots SECONDS [THREADS [ROUNDS]]
// With ROUNDS > 0 each thread does that many rounds of work (fixed work, for benchmarks)
// instead of running for SECONDS.
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define WORK_UNIT 2000000

static volatile uint64_t sink;

// Inlined, so the samples' instruction pointers fall inside the named functions.
static inline __attribute__((always_inline)) void spin(uint64_t iterations)
{
    uint64_t x = sink;
    for (uint64_t i = 0; i < iterations; i++)
        x = x * 6364136223846793005ULL + 1442695040888963407ULL;
    sink = x;
}

// Three units of work for every one of compute_beta's.
__attribute__((noinline)) void compute_alpha(void) { spin(3 * WORK_UNIT); }
__attribute__((noinline)) void compute_beta(void) { spin(WORK_UNIT); }

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double deadline;
static long rounds;

static void *worker(void *arg)
{
    (void)arg;
    for (long round = 0; rounds > 0 ? round < rounds : now() < deadline; round++) {
        compute_alpha();
        compute_beta();
    }
    return NULL;
}

int main(int argc, char **argv)
{
    double seconds = argc > 1 ? atof(argv[1]) : 10;
    int threads = argc > 2 ? atoi(argv[2]) : 1;
    rounds = argc > 3 ? atol(argv[3]) : 0;
    pthread_t ids[64];
    if (threads < 1 || threads > 64)
        threads = 1;
    deadline = now() + seconds;
    for (int i = 1; i < threads; i++)
        pthread_create(&ids[i], NULL, worker, NULL);
    worker(NULL);
    for (int i = 1; i < threads; i++)
        pthread_join(ids[i], NULL);
    return 0;
}
