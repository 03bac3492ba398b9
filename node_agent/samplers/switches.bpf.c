// The programs run at every context switch, for whichever of lock/wait (COUNT_FUTEX) and
// offcpu (COUNT_OFFCPU) are on: one pair of programs however many, so the events together
// pay the per-switch floor (running two programs) once, and walk a user stack once for a
// wait both count.

// args: bool preempt, struct task_struct *prev, *next, unsigned int prev_state
RAW_TRACEPOINT_PROBE(sched_switch)
{
    // Preempted threads (or any still TASK_RUNNING) are runnable, not waiting: only offcpu
    // counts them. Which thread and which syscall are checked only for the few times
    // counted: here they would cost more than the stamp.
    bool asleep = !ctx->args[0] && ctx->args[3];
    if (COUNT_OFFCPU || asleep)
        stamp_switch_out(ctx, asleep);
    return 0;
}

// What sched_exit_tp decided before walking the stacks, kept in a map rather than in
// registers: read back through a volatile pointer, values the verifier does not follow, so
// the walk is verified once however the decisions went (with both events on, the
// combinations carried through the unwinder made the program too large to load).
struct switch_in_t {
    u64 offcpu;  // weight, or 0
    u64 waited;  // weight, or 0
    u64 futex;   // detail, or 0
    s64 kernel;  // record_stacks' `kernel`
};
BPF_PERCPU_ARRAY(switch_in, struct switch_in_t, 1);

// args: bool is_switch, unsigned long ip
RAW_TRACEPOINT_PROBE(sched_exit_tp)
{
    bool asleep = false;
    u64 ns = time_switched_out(ctx, &asleep);
    if (!ns)
        return 0;
    u64 offcpu = offcpu_weight(ns);
    u64 waited = COUNT_FUTEX && asleep ? sampled_wait(ns) : 0;
    if ((!offcpu && !waited) || ignored(bpf_get_current_pid_tgid() >> 32))
        return 0;
    u64 futex = waited ? futex_wait_detail() : 0;
    if (!offcpu && !futex)
        return 0;
    u32 zero = 0;
    volatile struct switch_in_t *in = switch_in.lookup(&zero);
    if (!in)
        return 0;
    in->offcpu = offcpu;
    in->waited = waited;
    in->futex = futex;
    // A futex wait's kernel stack is only the futex code: offcpu's alone has one.
    in->kernel = offcpu ? RAW_TP_FRAMES : NO_KERNEL_STACK;
    struct sample_key_t key = {};
    u32 at = current_epoch();
    current_key(&key, DETAIL_OFFCPU);
    record_stacks(ctx, &key, at, in->kernel);
    if (in->offcpu)
        add_weight(&key, at, in->offcpu);
    if (in->futex) {
        key.kernel_stack_id = -EFAULT;
        key.detail = in->futex;
        add_weight(&key, at, in->waited);
    }
    return 0;
}
