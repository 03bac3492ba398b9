"""Off-CPU time above a minimum duration, with the stacks at switch-out (offcpu.bpf.c).

Needs the sched_exit_tp raw tracepoint (Linux 6.16+).
"""

from __future__ import annotations

from fleetprof.node_agent.samplers.bpf_sampler import BpfSampler


class OffCpuSampler(BpfSampler):
    """Weight = nanoseconds off CPU, per (pid, tid, stack when switched out)."""

    event = "offcpu"
    unit = "ns"
    source = "offcpu.bpf.c"
    headers = ("switches.bpf.h",)
