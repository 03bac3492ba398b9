// Time in I/O syscalls (read, write, fsync, ...), from entry to exit, with the user stack,
// whatever the file is (page cache, network file systems, pipes and sockets too): the
// application's view of its I/O. What the block device did meanwhile is block.bpf.c's
// event, so that neither counts the same time twice.
// io.py attaches io_syscall_enter/exit to each one's own syscalls: tracepoints, so other
// syscalls (futex, ...) run no program: the raw sys_enter/sys_exit would.

// sample_key_t.detail: the syscall number.

struct io_call_t {
    u64 since;  // ns; 0 when not in an I/O syscall
    u64 nr;
};
BPF_TASK_STORAGE(io_calls, struct io_call_t);

// The records of syscalls:sys_enter_<name> / sys_exit_<name>.
struct syscall_enter_t {
    u64 common;
    s32 nr;
};

struct syscall_exit_t {
    u64 common;
    s32 nr;
    s64 ret;
};

int io_syscall_enter(struct syscall_enter_t *args)
{
    if (ignored(bpf_get_current_pid_tgid() >> 32))
        return 0;
    struct io_call_t *call = io_calls.task_storage_get(
        bpf_get_current_task_btf(), 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
    if (call) {
        call->since = bpf_ktime_get_ns();
        call->nr = args->nr;
    }
    return 0;
}

int io_syscall_exit(struct syscall_exit_t *args)
{
    struct io_call_t *call = io_calls.task_storage_get(bpf_get_current_task_btf(), 0, 0);
    if (!call || !call->since)
        return 0;
    u64 weight = sampled_wait(bpf_ktime_get_ns() - call->since);
    call->since = 0;
    if (weight)
        count_current(args, weight, NO_KERNEL_STACK, call->nr);
    return 0;
}

