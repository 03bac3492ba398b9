// Process lifecycle events the agent needs: a process exec'd (new binary), mapped new
// executable code (shared libraries, dlopen) or exited. Compiled after
// samplers/new_pids.bpf.h (the event and its ring buffer). None of them wakes user space:
// they wait for its next poll (at most EVENT_POLL_MS), so churn costs no wake-ups. Only
// processes the agent keeps state of are reported: most processes of a busy node are
// never sampled, and their exec and exit would cost user space as much as the rest.
#define PROT_EXEC 0x4

// Threads inside an mmap(PROT_EXEC) call: reported when the call returns, once mapped.
BPF_HASH(exec_mmap_calls, u32, u8, 16384);
// Processes whose new code matters: those sampled since their exec (user space adds each at
// its first sample). Every process start maps a few libraries: the others' are not sent.
BPF_HASH(watched_pids, u32, u8, 65536);
// Processes whose exec and exit are reported: user space adds each process it keeps state
// of (at its first sample); an exit removes it.
BPF_HASH(tracked_pids, u32, u8, 65536);
// Set while on-demand sessions run: they consider every exec'd process (and count children
// the kernel adds at fork), so every exec and exit is reported.
BPF_ARRAY(report_every_process, u8, 1);

static __always_inline bool reported(u32 pid)
{
    u32 zero = 0;
    u8 *every = report_every_process.lookup(&zero);
    return (every && *every) || tracked_pids.lookup(&pid);
}

TRACEPOINT_PROBE(sched, sched_process_exec)
{
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    watched_pids.delete(&pid);
    if (reported(pid))
        emit_process_event(pid, EVENT_EXEC, BPF_RB_NO_WAKEUP);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 pid = pid_tgid >> 32;
    // Only the whole process leaving matters, not each of its threads.
    if ((u32)pid_tgid == pid) {
        watched_pids.delete(&pid);
        if (reported(pid)) {
            tracked_pids.delete(&pid);
            emit_process_event(pid, EVENT_EXIT, BPF_RB_NO_WAKEUP);
        }
    }
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_mmap)
{
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    if ((args->prot & PROT_EXEC) && watched_pids.lookup(&pid)) {
        u32 tid = (u32)bpf_get_current_pid_tgid();
        u8 one = 1;
        exec_mmap_calls.update(&tid, &one);
    }
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_mmap)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tid = (u32)pid_tgid;
    if (exec_mmap_calls.lookup(&tid)) {
        exec_mmap_calls.delete(&tid);
        emit_process_event(pid_tgid >> 32, EVENT_EXEC_MMAP, BPF_RB_NO_WAKEUP);
    }
    return 0;
}
