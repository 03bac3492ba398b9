// Process events for user space (process_events.py dispatches them), and the first sample
// of each process image: the agent's per-process work (maps, symbol tables, job) is done
// only for processes that samples hit, once each, when the kernel says so here, rather
// than at every exec and executable mmap on the node.
//
// bpf_sampler.py puts this file before stack_counts.bpf.h, whose record_stacks calls
// note_sampled_pid; process_events.bpf.c is compiled after it too (NOTE_SAMPLED_PIDS 0).
#include <linux/sched.h>

enum process_event_kind {
    EVENT_EXEC = 1,          // a new program image (sched_process_exec)
    EVENT_EXEC_MMAP = 2,     // new executable code mapped (a shared library, dlopen)
    EVENT_EXIT = 3,          // the whole process left
    EVENT_FIRST_SAMPLE = 4,  // the first sample of a process since it started or exec'd
};

struct process_event_t {
    u64 ts;  // bpf_ktime_get_ns: user space orders events of several rings by it
    u32 pid;
    u32 kind;
};

BPF_RINGBUF_OUTPUT(process_events, PROCESS_EVENT_PAGES);

// flags: 0 wakes user space now; BPF_RB_NO_WAKEUP leaves the event for its next poll.
static __always_inline void emit_process_event(u32 pid, u32 kind, u64 flags)
{
    struct process_event_t event = {.ts = bpf_ktime_get_ns(), .pid = pid, .kind = kind};
    process_events.ringbuf_output(&event, sizeof(event), flags);
}

#if NOTE_SAMPLED_PIDS
// Processes sampled since their exec. An evicted entry only means a repeated event, which
// user space drops.
BPF_TABLE("lru_hash", u32, u8, sampled_pids, 65536);

// Called for every sample: a lookup, and for a process's first sample one event, which
// wakes user space so that it reads the process before a short life ends.
static __always_inline void note_sampled_pid(u32 pid)
{
    u8 one = 1;
    if (sampled_pids.lookup(&pid))
        return;
    // insert (BPF_NOEXIST): of two CPUs sampling a new process at once, one reports it.
    if (sampled_pids.insert(&pid, &one) == 0)
        emit_process_event(pid, EVENT_FIRST_SAMPLE, 0);
}

// A new image needs new maps and symbols (and maybe has another job): its next sample is
// a first one again. An exited pid may be reused by another process.
TRACEPOINT_PROBE(sched, sched_process_exec)
{
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    sampled_pids.delete(&pid);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 pid = pid_tgid >> 32;
    if ((u32)pid_tgid == pid)
        sampled_pids.delete(&pid);
    return 0;
}
#else
static __always_inline void note_sampled_pid(u32 pid) {}
#endif
