"""On-CPU stacks: a cpu-clock perf event on every CPU, counted in the kernel (cpu.bpf.c)."""

from __future__ import annotations

from pathlib import Path

from bcc import BPF, PerfSWConfig, PerfType

from fleetprof.node_agent.samplers import SamplerOptions
from fleetprof.node_agent.samplers.stack_maps import GenerationalStackMaps, StackSample

BPF_SOURCE = Path(__file__).with_name("cpu.bpf.c")


class CpuSampler:
    """Samples on-CPU stacks at `options.frequency` Hz; weight = number of samples."""

    event = "cpu"
    unit = "samples"

    def __init__(self, options: SamplerOptions) -> None:
        self._bpf = BPF(text=BPF_SOURCE.read_bytes(), cflags=options.cflags())
        self._bpf.attach_perf_event(
            ev_type=PerfType.SOFTWARE,
            ev_config=PerfSWConfig.CPU_CLOCK,
            fn_name=b"on_cpu_sample",
            sample_freq=options.frequency,
            cpu=-1,
        )
        self._maps = GenerationalStackMaps(self._bpf)

    def drain(self) -> list[StackSample]:
        return self._maps.drain()

    def dropped_samples(self) -> int:
        return int(self._bpf[b"dropped_samples"].sum(0).value)

    def close(self) -> None:
        self._bpf.cleanup()
