// Off-CPU time: sched_switch stamps the thread leaving a CPU; when that thread runs again,
// the sched_exit_tp raw tracepoint (end of __schedule, in the resumed thread) weighs the
// time it was away. Only times of at least OFFCPU_MIN_NS record stacks: they are the
// thread's stacks at switch-out, unchanged while it was off CPU, and walking them at every
// switch would cost more than the switch itself.
struct offcpu_t {
    u64 since;  // ns; 0 when on CPU
};
BPF_TASK_STORAGE(switched_out, struct offcpu_t);

// args: bool preempt, struct task_struct *prev, *next, unsigned int prev_state;
// it runs in prev (current).
RAW_TRACEPOINT_PROBE(sched_switch)
{
    if (ignored(bpf_get_current_pid_tgid() >> 32))
        return 0;
    struct offcpu_t *out = switched_out.task_storage_get(
        bpf_get_current_task_btf(), 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
    if (out)
        out->since = bpf_ktime_get_ns();
    return 0;
}

// args: bool is_switch, unsigned long ip
RAW_TRACEPOINT_PROBE(sched_exit_tp)
{
    if (!ctx->args[0])
        return 0;  // __schedule kept the same thread: it never left
    struct offcpu_t *out = switched_out.task_storage_get(bpf_get_current_task_btf(), 0, 0);
    if (!out || !out->since)
        return 0;
    u64 ns = bpf_ktime_get_ns() - out->since;
    out->since = 0;
    if (ns < OFFCPU_MIN_NS)
        return 0;
    struct sample_key_t key = {};
    u32 at = current_epoch();
    current_key(&key, 0);
    record_stacks(ctx, &key, at, RAW_TP_FRAMES);
    add_weight(&key, at, ns);
    return 0;
}
