// Process lifecycle events the agent needs: a process exec'd (new binary), mapped new
// executable code (shared libraries, dlopen) or exited. Compiled after
// samplers/new_pids.bpf.h (the event and its ring buffer). None of them wakes user space:
// they wait for its next poll (at most EVENT_POLL_MS), so churn costs no wake-ups.
#define PROT_EXEC 0x4

// Threads inside an mmap(PROT_EXEC) call: reported when the call returns, once mapped.
BPF_HASH(exec_mmap_calls, u32, u8, 16384);

TRACEPOINT_PROBE(sched, sched_process_exec)
{
    emit_process_event(bpf_get_current_pid_tgid() >> 32, EVENT_EXEC, BPF_RB_NO_WAKEUP);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    // Only the whole process leaving matters, not each of its threads.
    if ((u32)pid_tgid == pid_tgid >> 32)
        emit_process_event(pid_tgid >> 32, EVENT_EXIT, BPF_RB_NO_WAKEUP);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_mmap)
{
    if (args->prot & PROT_EXEC) {
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
