"""The samplers by event name, as `fleetprof agent --events` names them."""

from __future__ import annotations

from collections.abc import Callable

from fleetprof.node_agent.samplers import Sampler, SamplerOptions
from fleetprof.node_agent.samplers.cpu import CpuSampler
from fleetprof.node_agent.samplers.io import IoSampler
from fleetprof.node_agent.samplers.lock import LockSampler
from fleetprof.node_agent.samplers.offcpu import OffCpuSampler

SAMPLERS: dict[str, Callable[[SamplerOptions], Sampler]] = {
    "cpu": CpuSampler,
    "lock": LockSampler,
    "offcpu": OffCpuSampler,
    "io": IoSampler,
}
