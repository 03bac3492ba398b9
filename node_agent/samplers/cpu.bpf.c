// On-CPU sampling: a software cpu-clock perf event on every CPU counts
// (pid, tid, comm, kernel stack, user stack) in the kernel.
//
// Two generations of maps: user space flips `generation`, then drains and clears
// the maps of the previous generation, so no sample is lost or counted twice
// across drains.
#include <uapi/linux/bpf_perf_event.h>
#include <linux/sched.h>

struct sample_key_t {
    u32 pid;
    u32 tid;
    s32 kernel_stack_id;
    s32 user_stack_id;
    char comm[TASK_COMM_LEN];
};

BPF_ARRAY(generation, u32, 1);
BPF_HASH(counts_0, struct sample_key_t, u64, MAX_SAMPLE_KEYS);
BPF_HASH(counts_1, struct sample_key_t, u64, MAX_SAMPLE_KEYS);
BPF_STACK_TRACE(stacks_0, MAX_STACKS);
BPF_STACK_TRACE(stacks_1, MAX_STACKS);
// Samples that found the counts map full; reported, never dropped silently.
BPF_PERCPU_ARRAY(dropped_samples, u64, 1);

int on_cpu_sample(struct bpf_perf_event_data *ctx)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 pid = pid_tgid >> 32;
    u32 index = 0;
    u64 zero = 0, *count;

    // pid 0 is the idle task; the agent never samples itself.
    if ((pid == 0 && !INCLUDE_IDLE) || pid == AGENT_PID)
        return 0;

    u32 *gen = generation.lookup(&index);
    if (!gen)
        return 0;
    struct sample_key_t key = {.pid = pid, .tid = (u32)pid_tgid};
    bpf_get_current_comm(&key.comm, sizeof(key.comm));
    // BCC resolves map names at compile time, so each generation is spelled out.
    if (*gen == 0) {
        key.kernel_stack_id = stacks_0.get_stackid(ctx, 0);
        key.user_stack_id = stacks_0.get_stackid(ctx, BPF_F_USER_STACK);
        count = counts_0.lookup_or_try_init(&key, &zero);
    } else {
        key.kernel_stack_id = stacks_1.get_stackid(ctx, 0);
        key.user_stack_id = stacks_1.get_stackid(ctx, BPF_F_USER_STACK);
        count = counts_1.lookup_or_try_init(&key, &zero);
    }
    if (count)
        __sync_fetch_and_add(count, 1);
    else
        dropped_samples.increment(index);
    return 0;
}
