"""On-demand sessions on one node: sample one job's processes, in the kernel, until a deadline.

A session builds its own samplers (compiled with SESSION_FILTER, at the session's
frequency): only pids in their `session_pids` map count. The job's processes are found by
scanning /proc when the session starts and by every exec while it runs; the kernel adds a
counted process's children at their fork (stack_counts.bpf.h), so they count from their
first instant. It stops by itself
at the deadline, whether or not the aggregator is still there.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from datetime import UTC, datetime

from fleetprof.node_agent.batch import Batch, BatchBuilder
from fleetprof.node_agent.owners import ProcessOwners
from fleetprof.node_agent.samplers import Sampler, SamplerOptions
from fleetprof.node_agent.samplers.cpu import CpuSampler
from fleetprof.node_agent.samplers.registry import check_events, samplers_for
from fleetprof.proto.control.v1 import control_pb2

log = logging.getLogger(__name__)


class PreparedSamplers:
    """A cpu session sampler compiled and loaded at agent start-up, attached when a session
    starts: compiling and loading take seconds, attaching milliseconds. One session at a
    time uses it."""

    def __init__(self, options: SamplerOptions) -> None:
        session_options = replace(options, session_filter=True)
        self.cpu = CpuSampler(session_options, attach=False)
        # The first attach loads the program through the kernel's verifier (a second or
        # more on a busy machine); BCC keeps it loaded. Nothing counts meanwhile: no pids.
        self.cpu.attach(session_options)
        self.cpu.detach()
        self.in_use = False

    def close(self) -> None:
        self.cpu.close()


class SessionRun:
    def __init__(
        self,
        order: control_pb2.SessionOrder,
        options: SamplerOptions,
        owners: ProcessOwners,
        prepared: PreparedSamplers,
    ) -> None:
        self.order = order
        self._owners = owners
        check_events(order.events)
        session_options = replace(
            options, frequency=order.frequency or options.frequency, session_filter=True
        )
        self._prepared = prepared if "cpu" in order.events and not prepared.in_use else None
        self._attached = False
        self._samplers: list[Sampler] = []
        others = list(order.events)
        if self._prepared:
            self._prepared.in_use = True
            self._prepared.cpu.attach(session_options)
            self._attached = True
            self._samplers.append(self._prepared.cpu)
            others = [event for event in others if event != "cpu"]
        if others:
            self._samplers += samplers_for(others, session_options)
        self.pids: set[int] = set()
        self.samples = 0
        for pid in all_pids():
            self.consider(pid)
        log.info(
            "session %s: job %s, %d processes here, until %s",
            order.session_id,
            order.job,
            len(self.pids),
            datetime.fromtimestamp(order.deadline_unix_ms / 1000, UTC).isoformat(),
        )

    @property
    def expired(self) -> bool:
        return time.time() * 1000 >= self.order.deadline_unix_ms

    def consider(self, pid: int) -> None:
        """Sample pid from now on if it belongs to the session's job."""
        if pid not in self.pids and self._owners.job(pid) == self.order.job:
            self.pids.add(pid)
            for sampler in self._samplers:
                sampler.add_pids((pid,))

    def drain(self, builder: BatchBuilder) -> list[Batch]:
        now = datetime.now(UTC)
        batches = []
        for sampler in self._samplers:
            drain = sampler.drain()
            self.samples += sum(sample.weight for sample in drain.samples)
            batches.append(builder.build(sampler, now, drain, self.order.session_id))
        return batches

    def finish(self, builder: BatchBuilder) -> list[Batch]:
        """Stop sampling, then drain: the last batches hold all the session counted."""
        self._detach()
        batches = self.drain(builder)
        self.close()
        return batches

    def close(self) -> None:
        self._detach()
        for sampler in self._samplers:
            if self._prepared and sampler is self._prepared.cpu:
                sampler.drain()  # the next session starts from empty maps
                sampler.reset_pids()
                self._prepared.in_use = False
            else:
                sampler.close()

    def _detach(self) -> None:
        """Stop the prepared sampler; the others stop when closed."""
        if self._prepared and self._attached:
            self._prepared.cpu.detach()
            self._attached = False


def all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]
