// On-CPU sampling: a software cpu-clock perf event on every CPU counts the interrupted
// thread's (kernel stack, user stack) once per sample.
#include <uapi/linux/bpf_perf_event.h>

int on_cpu_sample(struct bpf_perf_event_data *ctx)
{
    struct sample_key_t key = {};
    u32 at = current_epoch();

    current_key(&key, 0);
    if (ignored(key.pid))
        return 0;
    record_stacks(ctx, &key, at, 0);
    add_weight(&key, at, 1);
    return 0;
}
