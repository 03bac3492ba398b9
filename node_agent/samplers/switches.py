"""The events seen at context switches, lock, wait and offcpu, counted by one pair of BPF
programs however many of them are on (switches.bpf.c): the cost every switch pays for
running programs at all is paid once."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from fleetprof.node_agent.samplers import SamplerOptions
from fleetprof.node_agent.samplers.bpf_sampler import BpfSampler
from fleetprof.node_agent.samplers.lock import DETAIL_FUTEX, DETAIL_KERNEL_LOCK, lock_or_wait
from fleetprof.node_agent.samplers.offcpu import DETAIL_OFFCPU
from fleetprof.node_agent.symbolize.frame import Frame

EVENTS = ("lock", "wait", "offcpu")


class SwitchSampler(BpfSampler):
    """Weight = nanoseconds blocked acquiring a lock (lock), blocked in any other futex
    wait (wait), or off CPU (offcpu), per (pid, tid, stack when switched out)."""

    unit = "ns"
    sources = ("switches.bpf.h", "lock.bpf.c", "offcpu.bpf.c", "switches.bpf.c")

    def __init__(self, options: SamplerOptions, events: Iterable[str], attach: bool = True) -> None:
        wanted = set(events)
        if not wanted or not wanted <= set(EVENTS):
            raise ValueError(f"switch events are some of {EVENTS}, not {sorted(wanted)}")
        self.events = tuple(event for event in EVENTS if event in wanted)
        super().__init__(options, attach)

    def cflags(self) -> list[str]:
        on = set(self.events)
        return [
            # Futex waits are timed for either: which one a wait is, only frames tell.
            f"-DCOUNT_FUTEX={int(bool(on & {'lock', 'wait'}))}",
            f"-DCOUNT_KERNEL_LOCKS={int('lock' in on)}",
            f"-DCOUNT_OFFCPU={int('offcpu' in on)}",
        ]

    def event_of(self, detail: int, frames: Sequence[Frame]) -> str | None:
        kind = detail >> 56
        if kind == DETAIL_FUTEX:
            event = lock_or_wait(detail & 0xFFFF, frames)
        elif kind == DETAIL_KERNEL_LOCK:
            event = "lock"
        elif kind == DETAIL_OFFCPU:
            event = "offcpu"
        else:
            return self.events[0]
        return event if event in self.events else None
