// Off-CPU time (switches.bpf.c counts it), with the stacks at switch-out. Only times of at
// least OFFCPU_MIN_NS record stacks: walking them at every switch would cost more than the
// switch itself.

// sample_key_t.detail of offcpu weight (switches.py's DETAIL_OFFCPU).
#define DETAIL_OFFCPU (3ULL << 56)

// The weight to count for a time off CPU of `ns` (asleep or preempted): 0 for none.
static __always_inline u64 offcpu_weight(u64 ns)
{
    return COUNT_OFFCPU && ns >= OFFCPU_MIN_NS ? ns : 0;
}
