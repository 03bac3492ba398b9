"""On-CPU stacks: a cpu-clock perf event on every CPU, counted in the kernel (cpu.bpf.c)."""

from __future__ import annotations

import os
from pathlib import Path

from bcc import BPF, PerfSWConfig, PerfType

from fleetprof.node_agent.samplers.stack_maps import GenerationalStackMaps, StackSample

BPF_SOURCE = Path(__file__).with_name("cpu.bpf.c")


class CpuSampler:
    """Samples on-CPU stacks at `frequency` Hz; weight = number of samples."""

    event = "cpu"
    unit = "samples"

    def __init__(
        self,
        frequency: int,
        include_idle: bool = False,
        max_sample_keys: int = 65_536,
        max_stacks: int = 32_768,
    ) -> None:
        cflags = [
            f"-DAGENT_PID={os.getpid()}",
            f"-DINCLUDE_IDLE={int(include_idle)}",
            f"-DMAX_SAMPLE_KEYS={max_sample_keys}",
            f"-DMAX_STACKS={max_stacks}",
        ]
        self._bpf = BPF(text=BPF_SOURCE.read_text(), cflags=cflags)
        self._bpf.attach_perf_event(
            ev_type=PerfType.SOFTWARE,
            ev_config=PerfSWConfig.CPU_CLOCK,
            fn_name="on_cpu_sample",
            sample_freq=frequency,
            cpu=-1,
        )
        self._maps = GenerationalStackMaps(self._bpf)

    def drain(self) -> list[StackSample]:
        return self._maps.drain()

    def dropped_samples(self) -> int:
        """Samples the kernel could not count since start (counts map full)."""
        return int(self._bpf[b"dropped_samples"].sum(0).value)

    def close(self) -> None:
        self._bpf.cleanup()
