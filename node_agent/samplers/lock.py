"""Lock contention: time blocked in futex waits and on kernel locks (lock.bpf.c)."""

from __future__ import annotations

from fleetprof.node_agent.samplers.bpf_sampler import BpfSampler


class LockSampler(BpfSampler):
    """Weight = nanoseconds blocked, per (pid, tid, stack at the wait)."""

    event = "lock"
    unit = "ns"
    source = "lock.bpf.c"
    headers = ("switches.bpf.h",)
