// What every sampler's BPF program shares; bpf_sampler.py puts it (after
// user_stacks.bpf.h and python_stacks.bpf.h) before each <event>.bpf.c, as text: BCC rewrites map calls only in the
// file it compiles.
//
// Programs count (pid, tid, comm, kernel stack, user stack, detail) -> weight in two
// generations of maps. User space bumps `epoch`, lets running programs finish, then drains
// and clears the maps of the previous generation (epoch & 1), so no weight is lost or
// counted twice across drains.
#include <linux/sched.h>
#include <uapi/linux/errno.h>

struct sample_key_t {
    u32 pid;
    u32 tid;
    // A bpf_get_stackid result; -EFAULT means "no kernel stack" (nothing lost).
    s32 kernel_stack_id;
    u32 pad;
    // A record_user_stack result (user_stacks.bpf.h).
    u64 user_stack;
    // What the stacks alone do not say (io: which syscall, or block device and op); 0 if nothing.
    u64 detail;
    // A record_python_stack result (python_stacks.bpf.h): PYTHON_STACK_NONE for no Python.
    u64 python_stack;
    char comm[TASK_COMM_LEN];
};

BPF_ARRAY(epoch, u32, 1);
BPF_HASH(counts_0, struct sample_key_t, u64, MAX_SAMPLE_KEYS);
BPF_HASH(counts_1, struct sample_key_t, u64, MAX_SAMPLE_KEYS);
BPF_STACK_TRACE(stacks_0, MAX_STACKS);
BPF_STACK_TRACE(stacks_1, MAX_STACKS);
// Weight (in the event's unit) that found the counts map full: reported, never dropped silently.
BPF_PERCPU_ARRAY(dropped_samples, u64, 1);

static __always_inline u32 current_epoch(void)
{
    u32 zero = 0;
    u32 *value = epoch.lookup(&zero);
    return value ? *value : 0;
}

#if SESSION_FILTER
// An on-demand session's sampler counts only the job's processes, which user space puts
// here (and adds to as the job starts new ones).
BPF_HASH(session_pids, u32, u8, 16384);

// A child of a counted process is counted from its first instant (user space checks its
// job again at its exec). Thread ids get in too; each leaves with its thread.
TRACEPOINT_PROBE(sched, sched_process_fork)
{
    u32 parent = bpf_get_current_pid_tgid() >> 32, child = args->child_pid;
    u8 one = 1;
    if (session_pids.lookup(&parent))
        session_pids.update(&child, &one);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    session_pids.delete(&tid);
    return 0;
}
#endif

// The idle task (pid 0) unless asked for, and the agent itself, are never counted.
static __always_inline bool ignored(u32 pid)
{
#if SESSION_FILTER
    if (!session_pids.lookup(&pid))
        return true;
#endif
    return (pid == 0 && !INCLUDE_IDLE) || pid == AGENT_PID;
}

// The current thread as a key, stacks not yet recorded.
static __always_inline void current_key(struct sample_key_t *key, u64 detail)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    key->pid = pid_tgid >> 32;
    key->tid = (u32)pid_tgid;
    key->detail = detail;
    key->kernel_stack_id = -EFAULT;
    key->user_stack = USER_STACK_NONE;
    key->python_stack = PYTHON_STACK_NONE;
    bpf_get_current_comm(&key->comm, sizeof(key->comm));
}

// record_stacks' `kernel`: no kernel stack (it says nothing at a syscall boundary), one
// only for threads without a user stack (kernel threads), or a kernel stack less this many
// frames from its top: 0, or in a raw tracepoint the BPF program and bpf_trace_run<N>.
#define NO_KERNEL_STACK (-1)
#define KERNEL_THREADS_ONLY (-2)
#define RAW_TP_FRAMES 2

// Record the current thread's stacks, as `kernel` says, in the stack maps of `at`'s
// generation.
static __always_inline void record_stacks(void *ctx, struct sample_key_t *key, u32 at,
                                          int kernel)
{
    note_sampled_pid(key->pid);
    key->user_stack = record_user_stack(at);
#if PYTHON_FRAMES
    if (key->user_stack != USER_STACK_NONE)
        key->python_stack = record_python_stack(at);
#endif
    if (kernel == KERNEL_THREADS_ONLY)
        kernel = key->user_stack == USER_STACK_NONE ? 0 : NO_KERNEL_STACK;
    if (kernel == NO_KERNEL_STACK)
        return;
    // BCC resolves map names at compile time, so each generation is spelled out.
    if (at & 1)
        key->kernel_stack_id = stacks_1.get_stackid(ctx, kernel & BPF_F_SKIP_FIELD_MASK);
    else
        key->kernel_stack_id = stacks_0.get_stackid(ctx, kernel & BPF_F_SKIP_FIELD_MASK);
}

// Add weight to a key whose stacks were recorded at epoch `at`. A key recorded before the
// last drain has stack ids of a cleared map: its weight is kept, under lost stacks.
static __always_inline void add_weight(struct sample_key_t *key, u32 at, u64 weight)
{
    u32 now = current_epoch(), index = 0;
    u64 zero = 0, *total;

    if (at != now) {
        key->kernel_stack_id = -ENOENT;
        key->user_stack = USER_STACK_LOST;
        if (key->python_stack != PYTHON_STACK_NONE)
            key->python_stack = PYTHON_STACK_LOST;
    }
    if (now & 1)
        total = counts_1.lookup_or_try_init(key, &zero);
    else
        total = counts_0.lookup_or_try_init(key, &zero);
    if (total)
        __sync_fetch_and_add(total, weight);
    else
        dropped_samples.increment(index, weight);
}

// Per CPU: xorshift64 state for sampled_wait (bpf_get_prandom_u32 costs half an empty
// program's run; this, an inlined per-CPU load and a few shifts).
BPF_PERCPU_ARRAY(sample_random, u64, 1);

// A wait of `ns` as the weight to record, or 0 to record nothing. Waits shorter than
// WAIT_SAMPLE_NS are recorded with probability ns / WAIT_SAMPLE_NS and weigh WAIT_SAMPLE_NS:
// the expected weight of every stack stays its real blocked time, while most stack walks of
// short waits (the cost at 200k waits/s) are skipped. Decided before any other check, so
// that most short waits cost nothing more.
static __always_inline u64 sampled_wait(u64 ns)
{
    u32 zero = 0;
    u64 *random = sample_random.lookup(&zero), x;

    if (ns >= WAIT_SAMPLE_NS)
        return ns;
    if (!random)
        return 0;
    x = *random ? *random : (u64)bpf_get_prandom_u32() << 32 | bpf_get_prandom_u32() | 1;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *random = x;
    return x % WAIT_SAMPLE_NS < ns ? WAIT_SAMPLE_NS : 0;
}

// Count `weight` for the current thread, with its stacks as they are now.
static __always_inline void count_current(void *ctx, u64 weight, int kernel, u64 detail)
{
    struct sample_key_t key = {};
    u32 at = current_epoch();
    current_key(&key, detail);
    record_stacks(ctx, &key, at, kernel);
    add_weight(&key, at, weight);
}
