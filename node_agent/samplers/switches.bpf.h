// Times off CPU, seen from the scheduler (switches.bpf.c's programs, which lock, wait and
// offcpu share): sched_switch stamps the thread leaving a CPU; when that thread runs again
// the sched_exit_tp raw tracepoint (end of __schedule, Linux 6.16+) runs in it, so its
// stacks are still those it had when it left.
//
// Both programs run at every context switch, so each helper counts: reading the clock is the
// dearest (~60 ns here, as much as running an empty program), so sched_switch reads it once
// and leaves it, per CPU, to the sched_exit_tp that follows it on that CPU.
// ns when the thread left its CPU, its lowest bit set if it went to sleep (rather than
// being preempted); 0 when on it.
BPF_TASK_STORAGE(switched_out, u64);

struct last_switch_t {
    u64 ns;    // when the last stamping sched_switch of this CPU ran
    u64 next;  // the thread it switched to
};
BPF_PERCPU_ARRAY(last_switch, struct last_switch_t, 1);

// In sched_switch (whose current thread is prev).
static __always_inline void stamp_switch_out(struct bpf_raw_tracepoint_args *ctx, bool asleep)
{
    u32 zero = 0;
    struct last_switch_t *last = last_switch.lookup(&zero);
    u64 *since = switched_out.task_storage_get(
        bpf_get_current_task_btf(), 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
    if (!last || !since)
        return;
    last->ns = bpf_ktime_get_ns();
    last->next = ctx->args[2];
    // A nanosecond of precision for a flag: no other storage to look up.
    *since = last->ns | asleep;
}

// In sched_exit_tp: how long the current thread was off CPU, and whether asleep; 0 if it
// was not stamped or never left (args[0], is_switch, false: __schedule kept it).
static __always_inline u64 time_switched_out(struct bpf_raw_tracepoint_args *ctx, bool *asleep)
{
    if (!ctx->args[0])
        return 0;
    struct task_struct *task = bpf_get_current_task_btf();
    u64 *since = switched_out.task_storage_get(task, 0, 0);
    if (!since || !*since)
        return 0;
    u64 then = *since & ~1ULL;
    u32 zero = 0;
    struct last_switch_t *last = last_switch.lookup(&zero);
    u64 now;
    // The switch to this thread was stamped (else read the clock): its time is now's.
    if (last && last->next == (u64)task && last->ns >= then)
        now = last->ns;
    else
        now = bpf_ktime_get_ns();
    *asleep = *since & 1;
    *since = 0;
    return now - then;
}
