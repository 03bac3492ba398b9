// Off-CPU time (switches.bpf.h), counted with the stacks at switch-out. Only times of at
// least OFFCPU_MIN_NS record stacks: walking them at every switch would cost more than the
// switch itself.

// args: bool preempt, struct task_struct *prev, *next, unsigned int prev_state
RAW_TRACEPOINT_PROBE(sched_switch)
{
    // Which thread is checked only for the few times off CPU long enough to count.
    stamp_switch_out(ctx);
    return 0;
}

// args: bool is_switch, unsigned long ip
RAW_TRACEPOINT_PROBE(sched_exit_tp)
{
    u64 ns = time_switched_out(ctx);
    if (ns < OFFCPU_MIN_NS || ignored(bpf_get_current_pid_tgid() >> 32))
        return 0;
    count_current(ctx, ns, RAW_TP_FRAMES, 0);
    return 0;
}
