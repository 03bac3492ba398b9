"""The node agent: sample in the kernel, drain every interval, symbolize, ship."""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from fleetprof.node_agent.batch import BatchBuilder
from fleetprof.node_agent.process_events import ProcessEvents
from fleetprof.node_agent.samplers.cpu import CpuSampler
from fleetprof.node_agent.samplers.stack_maps import StackSample
from fleetprof.node_agent.shipper import Shipper
from fleetprof.node_agent.symbolize.symbolizer import Symbolizer

log = logging.getLogger(__name__)

EVENT_POLL_MS = 100
SHUTDOWN_DELIVERY_S = 10.0


@dataclass(frozen=True)
class AgentConfig:
    aggregator: str
    node: str = socket.gethostname()
    # A prime, like the peers' default, so sampling does not beat with periodic work.
    frequency: int = 19
    interval_s: float = 10.0
    include_idle: bool = False


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.symbolizer = Symbolizer()
        self._exited: set[int] = set()
        self._new_code: set[int] = set()
        # Before the sampler starts, so no process is sampled before it can be remembered.
        self._events = ProcessEvents(on_new_code=self._new_code.add, on_exit=self._on_exit)
        self._sampler = CpuSampler(config.frequency, include_idle=config.include_idle)
        self._builder = BatchBuilder(self.symbolizer)
        # A fresh id per agent process: sequence numbers restart with it.
        agent_id = f"{config.node}/{uuid.uuid4().hex[:12]}"
        self.shipper = Shipper(config.aggregator, agent_id=agent_id, node=config.node)
        self.stats = {"drains": 0, "samples": 0, "dropped_samples": 0}
        log.info(
            "agent %s sampling at %d Hz, shipping every %g s to %s",
            agent_id,
            config.frequency,
            config.interval_s,
            config.aggregator,
        )

    def _on_exit(self, pid: int) -> None:
        self._remember_new_code()
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
                if time.monotonic() >= next_drain:
                    self.drain_once()
                    next_drain = max(next_drain + self.config.interval_s, time.monotonic())
            self.drain_once()
            if not self.shipper.drain_pending(SHUTDOWN_DELIVERY_S):
                log.warning("exiting with %d undelivered batches", self.shipper.pending)
        finally:
            self.close()

    def drain_once(self) -> None:
        # Processes that exited before the flip have all their samples in this drain.
        exited, self._exited = self._exited, set()
        drained = self._sampler.drain()
        dropped = self._sampler.dropped_samples() - self.stats["dropped_samples"]
        if dropped:
            # The kernel's counts map was full: keep their weight, under a [lost stack] frame.
            log.warning("%d samples found the kernel counts map full", dropped)
            drained.append(StackSample(0, 0, "[dropped]", None, (), dropped))
            self.stats["dropped_samples"] += dropped
        batch = self._builder.build(self._sampler.event, datetime.now(UTC), drained)
        self.shipper.ship(batch)
        for pid in exited:
            self.symbolizer.forget(pid)
        self.stats["drains"] += 1
        self.stats["samples"] += sum(s.weight for s in drained)

    def close(self) -> None:
        self._sampler.close()
        self._events.close()
        self.shipper.close()
