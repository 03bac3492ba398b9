"""The node agent: sample in the kernel, drain every interval, symbolize, ship."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

from fleetprof.node_agent.batch import Batch, BatchBuilder
from fleetprof.node_agent.jvms import Jvms
from fleetprof.node_agent.process_events import ProcessEvents
from fleetprof.node_agent.samplers import SamplerOptions
from fleetprof.node_agent.samplers.registry import SAMPLERS
from fleetprof.node_agent.samplers.stack_maps import StackSample
from fleetprof.node_agent.shipper import Shipper
from fleetprof.node_agent.spool import Spool
from fleetprof.node_agent.symbolize.symbolizer import Symbolizer
from fleetprof.proto import schema
from fleetprof.proto.security import ClientSecurity

log = logging.getLogger(__name__)

EVENT_POLL_MS = 100
SHUTDOWN_DELIVERY_S = 10.0


@dataclass(frozen=True)
class AgentConfig:
    aggregator: str
    node: str = socket.gethostname()
    interval_s: float = 10.0
    events: tuple[str, ...] = ("cpu",)
    # Undelivered batches wait here (bounded) while the aggregator is unreachable.
    spool_dir: str = "/var/lib/fleetprof/spool"
    spool_max_bytes: int = 256 * 1024 * 1024
    security: ClientSecurity = field(default_factory=ClientSecurity)
    sampling: SamplerOptions = field(default_factory=SamplerOptions)


def release_free_memory() -> None:
    """Give freed heap back to the system (after BCC's compiler ran: ~60 MB of RSS)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.symbolizer = Symbolizer()
        # JVMs are found in the snapshots; their perf maps refreshed at most once an interval.
        self.jvms = Jvms(self.symbolizer.reload_perf_map, interval_s=config.interval_s)
        self.symbolizer.on_snapshot = self.jvms.observe
        self._exited: set[int] = set()
        self._new_code: set[int] = set()
        # Before the sampler starts, so no process is sampled before it can be remembered.
        self._events = ProcessEvents(on_new_code=self._new_code.add, on_exit=self._on_exit)
        unknown = set(config.events) - SAMPLERS.keys()
        if unknown:
            raise ValueError(f"unknown event {sorted(unknown)[0]!r}; known: {sorted(SAMPLERS)}")
        self._samplers = [SAMPLERS[event](config.sampling) for event in config.events]
        release_free_memory()
        self._builder = BatchBuilder(self.symbolizer)
        # A fresh id per agent process: sequence numbers restart with it.
        agent_id = f"{config.node}/{uuid.uuid4().hex[:12]}"
        spool = Spool(config.spool_dir, config.spool_max_bytes)
        self.shipper = Shipper(config.aggregator, agent_id, config.node, spool, config.security)
        self.stats = {"drains": 0, "samples": 0}
        self._dropped = dict.fromkeys(config.events, 0)
        log.info(
            "agent %s sampling %s (cpu at %d Hz), shipping every %g s to %s",
            agent_id,
            ",".join(config.events),
            config.sampling.frequency,
            config.interval_s,
            config.aggregator,
        )

    def _on_exit(self, pid: int) -> None:
        self._remember_new_code()
        self.jvms.exited(pid)
        self._exited.add(pid)

    def _remember_new_code(self) -> None:
        while self._new_code:
            self.symbolizer.remember(self._new_code.pop())

    def run(self, stop: threading.Event) -> None:
        """Sample until `stop` is set, then drain the last interval and detach."""
        try:
            next_drain = time.monotonic() + self.config.interval_s
            while not stop.is_set():
                wait_ms = (next_drain - time.monotonic()) * 1000
                self._events.poll(int(max(0, min(EVENT_POLL_MS, wait_ms))))
                self._remember_new_code()
                self.jvms.poll(next_drain)
                if self.shipper.retry_due:
                    self.shipper.flush()
                if time.monotonic() >= next_drain:
                    self.drain_once()
                    next_drain = max(next_drain + self.config.interval_s, time.monotonic())
            self.drain_once()
            if not self.shipper.drain_pending(SHUTDOWN_DELIVERY_S):
                log.warning("exiting with %d undelivered batches", self.shipper.pending)
        finally:
            self.close()
        log.info(
            "agent stopped: %d samples in %d drains, %d batches acked, %d left in the spool",
            self.stats["samples"],
            self.stats["drains"],
            self.shipper.stats["acked"],
            self.shipper.pending,
        )

    def drain_once(self) -> None:
        # Processes that exited before the flip have all their samples in this drain.
        exited, self._exited = self._exited, set()
        now = datetime.now(UTC)
        for sampler in self._samplers:
            drained = sampler.drain()
            dropped = sampler.dropped_samples() - self._dropped[sampler.event]
            if dropped:
                # The kernel's counts map was full: keep their weight under [lost stack].
                log.warning(
                    "%s: %d %s of weight found the kernel counts map full",
                    sampler.event,
                    dropped,
                    sampler.unit,
                )
                drained.samples.append(StackSample(0, 0, "[dropped]", None, (), dropped))
                self._dropped[sampler.event] += dropped
            self.shipper.ship(self._builder.build(sampler.event, now, drained))
            self.stats["samples"] += sum(s.weight for s in drained.samples)
        self.jvms.after_drain(*self.symbolizer.take_jit_activity())
        processes = self.jvms.take_processes()
        if processes is not None:
            self.shipper.ship(Batch(schema.SAMPLES.empty_table(), {}, processes))
        for pid in exited:
            self.symbolizer.forget(pid)
            self.jvms.forget(pid)
        # Symbol tables of new processes leave parse garbage behind: hand it back.
        release_free_memory()
        self.stats["drains"] += 1

    def close(self) -> None:
        for sampler in self._samplers:
            sampler.close()
        self._events.close()
        self.jvms.close()
        self.shipper.close()
