"""One sampler per signal, each owning its BPF C file next to its Python module.

Every sampler counts (pid, tid, comm, kernel stack, user stack) → weight in the kernel, in
the two-generation maps that stack_maps.GenerationalStackMaps drains.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

from fleetprof.node_agent.samplers.stack_maps import StackSample


@dataclass(frozen=True)
class SamplerOptions:
    # On-CPU sampling rate per CPU; a prime, like the peers, so it does not beat with timers.
    frequency: int = 19
    include_idle: bool = False
    max_sample_keys: int = 65_536
    max_stacks: int = 32_768

    def cflags(self) -> list[str]:
        """Defines every BPF program of ours understands."""
        return [
            f"-DAGENT_PID={os.getpid()}",
            f"-DINCLUDE_IDLE={int(self.include_idle)}",
            f"-DMAX_SAMPLE_KEYS={self.max_sample_keys}",
            f"-DMAX_STACKS={self.max_stacks}",
        ]


class Sampler(Protocol):
    event: str
    # "samples" (counts) or "ns" (time): what `weight` means for this event.
    unit: str

    def drain(self) -> list[StackSample]: ...

    def dropped_samples(self) -> int:
        """Events the kernel could not count since start (map full)."""
        ...

    def close(self) -> None: ...
