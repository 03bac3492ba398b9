"""On-CPU stacks: a cpu-clock perf event on every CPU, counted in the kernel (cpu.bpf.c)."""

from __future__ import annotations

from bcc import PerfSWConfig, PerfType

from fleetprof.node_agent.samplers import SamplerOptions
from fleetprof.node_agent.samplers.bpf_sampler import BpfSampler


class CpuSampler(BpfSampler):
    """Samples on-CPU stacks at `options.frequency` Hz; weight = number of samples."""

    events = ("cpu",)
    unit = "samples"
    sources = ("cpu.bpf.c",)

    def attach(self, options: SamplerOptions) -> None:
        self._bpf.attach_perf_event(
            ev_type=PerfType.SOFTWARE,
            ev_config=PerfSWConfig.CPU_CLOCK,
            fn_name=b"on_cpu_sample",
            sample_freq=options.frequency,
            cpu=-1,
        )

    def detach(self) -> None:
        self._bpf.detach_perf_event(ev_type=PerfType.SOFTWARE, ev_config=PerfSWConfig.CPU_CLOCK)
