// Off-CPU time (switches.bpf.h), counted with the stacks at switch-out. Only times of at
// least OFFCPU_MIN_NS record stacks: walking them at every switch would cost more than the
// switch itself.

// args: bool preempt, struct task_struct *prev, *next, unsigned int prev_state
RAW_TRACEPOINT_PROBE(sched_switch)
{
    if (!ignored(bpf_get_current_pid_tgid() >> 32))
        stamp_switch_out();
    return 0;
}

// args: bool is_switch, unsigned long ip
RAW_TRACEPOINT_PROBE(sched_exit_tp)
{
    u64 ns = time_switched_out(ctx);
    if (ns < OFFCPU_MIN_NS)
        return 0;
    struct sample_key_t key = {};
    u32 at = current_epoch();
    current_key(&key, 0);
    record_stacks(ctx, &key, at, RAW_TP_FRAMES);
    add_weight(&key, at, ns);
    return 0;
}
