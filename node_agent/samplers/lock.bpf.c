// Lock contention and other waits: time threads spend blocked
//  - asleep in futex waits (pthread mutexes, rwlocks and condition variables, joins, JVM
//    monitors, parks and sleeps), with the user stack at the wait and the futex command,
//    from which (and the frames) lock.py tells a lock acquisition (event lock) from any
//    other wait (event wait);
//  - on contended kernel locks (lock:contention_begin/end), with kernel and user stacks:
//    always lock.
// Futex waits are seen from the scheduler (switches.bpf.c), not from syscall tracepoints:
// a thread that went to sleep counts when it runs again if the syscall it sleeps in is a
// futex wait. Tracing every syscall's entry and exit would tax all syscalls of the machine
// (even empty programs cost several % of a futex-heavy workload); this taxes only switches.
#include <linux/futex.h>
#include <linux/ptrace.h>
#include <asm/unistd.h>

#ifndef __NR_futex_wait
#define __NR_futex_wait 454  // futex2 wait (Linux 6.7), newer than the build headers
#endif

// sample_key_t.detail (lock.py's DETAIL_*): a futex wait, then its command (FUTEX_WAIT...,
// FUTEX2_WAIT for futex_wait and futex_waitv); or a kernel lock.
#define DETAIL_FUTEX (1ULL << 56)
#define DETAIL_KERNEL_LOCK (2ULL << 56)
#define FUTEX2_WAIT 0x100

// The detail of the futex wait the current thread is in; 0 if it is in none.
static __always_inline u64 futex_wait_detail(void)
{
    struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
    // si, di and orig_ax follow each other in pt_regs: one read for the syscall number and
    // futex(uaddr = di, op = si, ...)'s op.
    unsigned long si_di_nr[3] = {};

    bpf_probe_read_kernel(si_di_nr, sizeof(si_di_nr), &regs->si);
    if (si_di_nr[2] == __NR_futex_waitv || si_di_nr[2] == __NR_futex_wait)
        return DETAIL_FUTEX | FUTEX2_WAIT;
    if (si_di_nr[2] != __NR_futex)
        return 0;
    u32 command = si_di_nr[0] & FUTEX_CMD_MASK;
    switch (command) {
    case FUTEX_WAIT:
    case FUTEX_WAIT_BITSET:
    case FUTEX_LOCK_PI:
    case FUTEX_LOCK_PI2:
    case FUTEX_WAIT_REQUEUE_PI:
        return DETAIL_FUTEX | command;
    }
    return 0;
}

#if COUNT_KERNEL_LOCKS
struct contending_t {
    u64 since;  // ns; 0 when not waiting for a kernel lock
    u64 lock;
};
BPF_TASK_STORAGE(contending, struct contending_t);

// args: void *lock, unsigned int flags
RAW_TRACEPOINT_PROBE(contention_begin)
{
    // A futex wait's own kernel locks (FUTEX_LOCK_PI's rt_mutex) count as that futex wait.
    if (ignored(bpf_get_current_pid_tgid() >> 32) || futex_wait_detail())
        return 0;
    struct contending_t *c = contending.task_storage_get(
        bpf_get_current_task_btf(), 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
    // A lock taken while waiting for another is part of that wait.
    if (!c || c->since)
        return 0;
    c->since = bpf_ktime_get_ns();
    c->lock = ctx->args[0];
    return 0;
}

// args: void *lock, int ret
RAW_TRACEPOINT_PROBE(contention_end)
{
    struct contending_t *c = contending.task_storage_get(bpf_get_current_task_btf(), 0, 0);
    if (!c || !c->since || c->lock != ctx->args[0])
        return 0;
    u64 weight = sampled_wait(bpf_ktime_get_ns() - c->since);
    c->since = 0;
    if (weight)
        count_current(ctx, weight, RAW_TP_FRAMES, DETAIL_KERNEL_LOCK);
    return 0;
}
#endif
