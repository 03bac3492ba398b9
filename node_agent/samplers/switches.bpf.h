// Times off CPU, seen from the scheduler (for samplers that list it in `headers`):
// sched_switch stamps the thread leaving a CPU; when that thread runs again the
// sched_exit_tp raw tracepoint (end of __schedule, Linux 6.16+) runs in it, so its stacks
// are still those it had when it left.
BPF_TASK_STORAGE(switched_out, u64);  // ns when the thread left its CPU; 0 when on it

// In sched_switch (whose current thread is prev).
static __always_inline void stamp_switch_out(void)
{
    u64 *since = switched_out.task_storage_get(
        bpf_get_current_task_btf(), 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
    if (since)
        *since = bpf_ktime_get_ns();
}

// In sched_exit_tp: how long the current thread was off CPU; 0 if it was not stamped or
// never left (args[0], is_switch, false: __schedule kept it).
static __always_inline u64 time_switched_out(struct bpf_raw_tracepoint_args *ctx)
{
    if (!ctx->args[0])
        return 0;
    u64 *since = switched_out.task_storage_get(bpf_get_current_task_btf(), 0, 0);
    if (!since || !*since)
        return 0;
    u64 ns = bpf_ktime_get_ns() - *since;
    *since = 0;
    return ns;
}
