// A recursion argv[2] calls deep that spins at its leaf for argv[1] seconds; built -O2
// (no frame pointers) by tests and benchmarks/deep_stacks.py.
#include <stdlib.h>
#include <time.h>
volatile double sink;
__attribute__((noinline)) double leaf_spin(double x)
{
    for (int i = 0; i < 20000; i++)
        x = x * 1.0000001 + 0.5 / (x + 1.0);
    return x;
}
__attribute__((noinline)) double recurse(int level, double x)
{
    volatile int here = level;  // a frame per call: no tail call
    double r = here ? recurse(here - 1, x) : leaf_spin(x);
    sink = r;
    return r + here;
}
int main(int argc, char **argv)
{
    int depth = atoi(argv[2]);
    time_t end = time(0) + atoi(argv[1]);
    double acc = 0;
    while (time(0) < end)
        acc += recurse(depth, acc > 1e6 ? 1 : acc);
    return acc == 42;
}
