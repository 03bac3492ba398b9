// Process lifecycle events the symbolizer needs: a process exec'd (new binary),
// mapped new executable code (shared libraries, dlopen) or exited.
// Sent through a ring buffer; user space snapshots /proc/PID/maps on exec/mmap so
// samples of processes that exit before the next drain still get named frames.
#include <linux/sched.h>

#define PROT_EXEC 0x4

enum process_event_kind { EVENT_EXEC = 1, EVENT_EXEC_MMAP = 2, EVENT_EXIT = 3 };

struct process_event_t {
    u32 pid;
    u32 kind;
};

BPF_RINGBUF_OUTPUT(process_events, 64);
// Threads inside an mmap(PROT_EXEC) call: reported when the call returns, once mapped.
BPF_HASH(exec_mmap_calls, u32, u8, 16384);

static inline void emit(u32 pid, u32 kind)
{
    struct process_event_t event = {.pid = pid, .kind = kind};
    process_events.ringbuf_output(&event, sizeof(event), 0);
}

TRACEPOINT_PROBE(sched, sched_process_exec)
{
    emit(bpf_get_current_pid_tgid() >> 32, EVENT_EXEC);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    // Only the whole process leaving matters, not each of its threads.
    if ((u32)pid_tgid == pid_tgid >> 32)
        emit(pid_tgid >> 32, EVENT_EXIT);
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
        emit(pid_tgid >> 32, EVENT_EXEC_MMAP);
    }
    return 0;
}
