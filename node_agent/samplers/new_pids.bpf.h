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
    // Of a first sample, what /proc/PID/stat and status would say (nspid 0: not read):
    // user space then reads only the process's maps, while it still has them.
    u64 start_ticks;  // start time in clock ticks after boot, as /proc/PID/stat's
    u32 ppid;
    u32 nspid;  // its pid in its innermost PID namespace
    char comm[TASK_COMM_LEN];  // its main thread's
};

BPF_RINGBUF_OUTPUT(process_events, PROCESS_EVENT_PAGES);

// flags: 0 wakes user space now; BPF_RB_NO_WAKEUP leaves the event for its next poll.
static __always_inline void emit_process_event(u32 pid, u32 kind, u64 flags)
{
    struct process_event_t event = {.ts = bpf_ktime_get_ns(), .pid = pid, .kind = kind};
    process_events.ringbuf_output(&event, sizeof(event), flags);
}

#if NOTE_SAMPLED_PIDS && TASK_START_BOOTTIME_OFFSET >= 0
// The current process's identity, read from its main thread as /proc/PID/stat reads it;
// the kernel's struct layouts from its BTF (kernel_layout.py), not from BCC's headers.
static __always_inline void read_identity(struct process_event_t *event)
{
    void *task = (void *)bpf_get_current_task(), *leader = 0, *parent = 0, *pid = 0;
    unsigned int level = 0;
    u64 boot_ns = 0;
    bpf_probe_read_kernel(&leader, sizeof(leader), task + TASK_GROUP_LEADER_OFFSET);
    if (!leader ||
        bpf_probe_read_kernel(&boot_ns, sizeof(boot_ns), leader + TASK_START_BOOTTIME_OFFSET))
        return;
    bpf_probe_read_kernel(&parent, sizeof(parent), leader + TASK_REAL_PARENT_OFFSET);
    if (parent)
        bpf_probe_read_kernel(&event->ppid, sizeof(event->ppid), parent + TASK_TGID_OFFSET);
    bpf_probe_read_kernel_str(event->comm, sizeof(event->comm), leader + TASK_COMM_OFFSET);
    event->start_ticks = boot_ns / NS_PER_CLOCK_TICK;
    bpf_probe_read_kernel(&pid, sizeof(pid), leader + TASK_THREAD_PID_OFFSET);
    if (pid) {  // last: a non-zero nspid says that all was read
        bpf_probe_read_kernel(&level, sizeof(level), pid + PID_LEVEL_OFFSET);
        // struct upid {int nr; struct pid_namespace *ns;}: 16 bytes, nr first.
        bpf_probe_read_kernel(&event->nspid, sizeof(event->nspid),
                              pid + PID_NUMBERS_OFFSET + 16 * (level & 31));
    }
}
#else
static __always_inline void read_identity(struct process_event_t *event) {}
#endif

#if NOTE_SAMPLED_PIDS
#define PF_EXITING 0x00000004
// Whether the sampled process is the current one and already in do_exit: after
// sched_process_exit has forgotten it, an exiting thread still runs (tearing down its
// memory and files) and may be sampled; that is not a new process to report.
static __always_inline bool current_exiting(u32 pid)
{
#if TASK_FLAGS_OFFSET >= 0
    unsigned int flags = 0;
    if ((bpf_get_current_pid_tgid() >> 32) != pid)
        return false;
    bpf_probe_read_kernel(&flags, sizeof(flags),
                          (void *)bpf_get_current_task() + TASK_FLAGS_OFFSET);
    return flags & PF_EXITING;
#else
    return false;
#endif
}

// Processes sampled since their exec. An evicted entry only means a repeated event, which
// user space drops.
BPF_TABLE("lru_hash", u32, u8, sampled_pids, 65536);

// Called for every sample: a lookup, and for a process's first sample one event, which
// wakes user space so that it reads the process before a short life ends.
static __always_inline void note_sampled_pid(u32 pid)
{
    u8 one = 1;
    if (sampled_pids.lookup(&pid) || current_exiting(pid))
        return;
    // insert (BPF_NOEXIST): of two CPUs sampling a new process at once, one reports it.
    if (sampled_pids.insert(&pid, &one))
        return;
    struct process_event_t event = {
        .ts = bpf_ktime_get_ns(), .pid = pid, .kind = EVENT_FIRST_SAMPLE};
    // Samplers of other threads' events (block I/O completions) leave it to /proc.
    if ((bpf_get_current_pid_tgid() >> 32) == pid)
        read_identity(&event);
    process_events.ringbuf_output(&event, sizeof(event), 0);
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
