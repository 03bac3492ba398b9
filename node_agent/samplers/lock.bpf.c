// Lock contention: time threads spend blocked
//  - asleep in futex waits (pthread mutexes and condition variables, JVM monitors, Java
//    locks), with the user stack at the wait;
//  - on contended kernel locks (lock:contention_begin/end), with kernel and user stacks.
// Futex waits are seen from the scheduler (switches.bpf.h), not from syscall tracepoints:
// a thread that went to sleep counts when it runs again if the syscall it sleeps in is a
// futex wait. Tracing every syscall's entry and exit would tax all syscalls of the machine
// (even empty programs cost several % of a futex-heavy workload); this taxes only switches.
#include <linux/futex.h>
#include <linux/ptrace.h>
#include <asm/unistd.h>

#ifndef __NR_futex_wait
#define __NR_futex_wait 454  // futex2 wait (Linux 6.7), newer than the build headers
#endif

struct contending_t {
    u64 since;  // ns; 0 when not waiting for a kernel lock
    u64 lock;
};
BPF_TASK_STORAGE(contending, struct contending_t);

// Whether the current thread is in a futex syscall that waits.
static __always_inline bool in_futex_wait(void)
{
    struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
    // si, di and orig_ax follow each other in pt_regs: one read for the syscall number and
    // futex(uaddr = di, op = si, ...)'s op.
    unsigned long si_di_nr[3] = {};

    bpf_probe_read_kernel(si_di_nr, sizeof(si_di_nr), &regs->si);
    if (si_di_nr[2] == __NR_futex_waitv || si_di_nr[2] == __NR_futex_wait)
        return true;
    if (si_di_nr[2] != __NR_futex)
        return false;
    switch (si_di_nr[0] & FUTEX_CMD_MASK) {
    case FUTEX_WAIT:
    case FUTEX_WAIT_BITSET:
    case FUTEX_LOCK_PI:
    case FUTEX_LOCK_PI2:
    case FUTEX_WAIT_REQUEUE_PI:
        return true;
    }
    return false;
}

// args: bool preempt, struct task_struct *prev, *next, unsigned int prev_state
RAW_TRACEPOINT_PROBE(sched_switch)
{
    // Preempted threads (or any still TASK_RUNNING) are runnable, not waiting. Which thread
    // and which syscall are checked only for the few waits sampled_wait keeps: here they
    // would cost more than the stamp.
    if (!ctx->args[0] && ctx->args[3])
        stamp_switch_out(ctx);
    return 0;
}

// args: bool is_switch, unsigned long ip
RAW_TRACEPOINT_PROBE(sched_exit_tp)
{
    u64 ns = time_switched_out(ctx);
    if (!ns)
        return 0;
    u64 weight = sampled_wait(ns);
    if (weight && !ignored(bpf_get_current_pid_tgid() >> 32) && in_futex_wait())
        count_current(ctx, weight, NO_KERNEL_STACK, 0);
    return 0;
}

// args: void *lock, unsigned int flags
RAW_TRACEPOINT_PROBE(contention_begin)
{
    // A futex wait's own kernel locks (FUTEX_LOCK_PI's rt_mutex) count as that futex wait.
    if (ignored(bpf_get_current_pid_tgid() >> 32) || in_futex_wait())
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
        count_current(ctx, weight, RAW_TP_FRAMES, 0);
    return 0;
}
