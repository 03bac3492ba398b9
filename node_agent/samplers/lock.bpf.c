// Lock contention: time threads spend blocked
//  - asleep in futex waits (pthread mutexes and condition variables, JVM monitors, Java
//    locks), with the user stack at the wait;
//  - on contended kernel locks (lock:contention_begin/end), with kernel and user stacks.
// Futex waits are seen from the scheduler, not from syscall tracepoints: sched_switch
// stamps a thread going to sleep and, when it runs again (sched_exit_tp, in that thread),
// the wait counts if the syscall it sleeps in is a futex wait. Tracing every syscall's
// entry and exit would tax all syscalls of the machine (measured: several % of a
// futex-heavy workload with empty programs); this taxes only context switches.
#include <linux/futex.h>
#include <linux/ptrace.h>
#include <asm/unistd.h>

#ifndef __NR_futex_wait
#define __NR_futex_wait 454  // futex2 wait (Linux 6.7), newer than the build headers
#endif

struct blocked_t {
    u64 asleep_since;  // ns; 0 when not asleep
    u64 lock_since;    // ns; 0 when not waiting for a kernel lock
    u64 lock_addr;
};
BPF_TASK_STORAGE(blocked, struct blocked_t);

// Whether the current thread is in a futex syscall that waits.
static __always_inline bool in_futex_wait(void)
{
    struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
    long nr = -1;
    unsigned long op = 0;

    bpf_probe_read_kernel(&nr, sizeof(nr), &regs->orig_ax);
    if (nr == __NR_futex_waitv || nr == __NR_futex_wait)
        return true;
    if (nr != __NR_futex)
        return false;
    bpf_probe_read_kernel(&op, sizeof(op), &regs->si);  // futex(uaddr, op, ...)
    switch (op & FUTEX_CMD_MASK) {
    case FUTEX_WAIT:
    case FUTEX_WAIT_BITSET:
    case FUTEX_LOCK_PI:
    case FUTEX_LOCK_PI2:
    case FUTEX_WAIT_REQUEUE_PI:
        return true;
    }
    return false;
}

// args: bool preempt, struct task_struct *prev, *next, unsigned int prev_state;
// it runs in prev (current).
RAW_TRACEPOINT_PROBE(sched_switch)
{
    if (ctx->args[0] || !ctx->args[3])
        return 0;  // preempted: runnable, not waiting
    if (ignored(bpf_get_current_pid_tgid() >> 32))
        return 0;
    struct blocked_t *b = blocked.task_storage_get(
        bpf_get_current_task_btf(), 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
    if (b)
        b->asleep_since = bpf_ktime_get_ns();
    return 0;
}

// args: bool is_switch, unsigned long ip; it runs in the thread that runs next.
RAW_TRACEPOINT_PROBE(sched_exit_tp)
{
    if (!ctx->args[0])
        return 0;
    struct blocked_t *b = blocked.task_storage_get(bpf_get_current_task_btf(), 0, 0);
    if (!b || !b->asleep_since)
        return 0;
    u64 ns = bpf_ktime_get_ns() - b->asleep_since;
    b->asleep_since = 0;
    if (in_futex_wait())
        count_wait(ctx, ns, NO_KERNEL_STACK, 0);
    return 0;
}

// args: void *lock, unsigned int flags
RAW_TRACEPOINT_PROBE(contention_begin)
{
    if (ignored(bpf_get_current_pid_tgid() >> 32))
        return 0;
    // A futex wait's own kernel locks (FUTEX_LOCK_PI's rt_mutex) are counted as the futex
    // wait they are part of.
    if (in_futex_wait())
        return 0;
    struct blocked_t *b = blocked.task_storage_get(
        bpf_get_current_task_btf(), 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
    // A lock taken while waiting for another is part of that wait.
    if (!b || b->lock_since)
        return 0;
    b->lock_since = bpf_ktime_get_ns();
    b->lock_addr = ctx->args[0];
    return 0;
}

// args: void *lock, int ret
RAW_TRACEPOINT_PROBE(contention_end)
{
    struct blocked_t *b = blocked.task_storage_get(bpf_get_current_task_btf(), 0, 0);
    if (!b || !b->lock_since || b->lock_addr != ctx->args[0])
        return 0;
    u64 ns = bpf_ktime_get_ns() - b->lock_since;
    b->lock_since = 0;
    count_wait(ctx, ns, RAW_TP_FRAMES, 0);
    return 0;
}
