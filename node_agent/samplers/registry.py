"""The samplers for the events `fleetprof agent --events` names."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from fleetprof.node_agent.samplers import Sampler, SamplerOptions
from fleetprof.node_agent.samplers.block import BlockSampler
from fleetprof.node_agent.samplers.cpu import CpuSampler
from fleetprof.node_agent.samplers.io import IoSampler
from fleetprof.node_agent.samplers.switches import EVENTS as SWITCH_EVENTS
from fleetprof.node_agent.samplers.switches import SwitchSampler

# Samplers of one event each.
SINGLE: dict[str, Callable[[SamplerOptions], Sampler]] = {
    "cpu": CpuSampler,
    "io": IoSampler,
    "block": BlockSampler,
}
EVENTS = (*SINGLE, *SWITCH_EVENTS)


def check_events(events: Iterable[str]) -> None:
    """ValueError naming the first event no sampler counts."""
    unknown = sorted(set(events) - set(EVENTS))
    if unknown:
        raise ValueError(f"unknown event {unknown[0]!r}; known: {sorted(EVENTS)}")


def samplers_for(events: Iterable[str], options: SamplerOptions) -> list[Sampler]:
    """One sampler per event, but one for all the events seen at context switches (lock,
    wait, offcpu): their programs run at every switch, so they run once for all."""
    events = tuple(dict.fromkeys(events))
    check_events(events)
    samplers = [SINGLE[event](options) for event in events if event in SINGLE]
    switches = [event for event in events if event in SWITCH_EVENTS]
    if switches:
        samplers.append(SwitchSampler(options, switches))
    return samplers
