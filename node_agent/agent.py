"""The node agent: sample in the kernel, drain every interval, symbolize, ship."""

from __future__ import annotations

import logging
import math
import os
import random
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fleetprof.node_agent.assignment import assigned_aggregator
from fleetprof.node_agent.batch import Batch, BatchBuilder
from fleetprof.node_agent.control import ControlClient
from fleetprof.node_agent.host_sampling import HostSampling
from fleetprof.node_agent.jobs import JobResolver
from fleetprof.node_agent.jvms import Jvms
from fleetprof.node_agent.kubernetes import KubernetesMetadata
from fleetprof.node_agent.owners import ProcessOwners
from fleetprof.node_agent.process_events import ProcessEvents
from fleetprof.node_agent.samplers import SamplerOptions
from fleetprof.node_agent.samplers.bpf_sampler import release_free_memory
from fleetprof.node_agent.samplers.registry import check_events, samplers_for
from fleetprof.node_agent.samplers.stack_maps import StackSample
from fleetprof.node_agent.sessions import PreparedSamplers, SessionRun
from fleetprof.node_agent.shipper import Shipper
from fleetprof.node_agent.spool import Spool
from fleetprof.node_agent.symbolize.debuginfod import DebuginfodClient, DebuginfodOptions
from fleetprof.node_agent.symbolize.symbolizer import Symbolizer
from fleetprof.node_agent.unwind.hotspot import CodeCaches
from fleetprof.node_agent.unwind.native import NativeUnwinder
from fleetprof.proto import schema
from fleetprof.proto.control.v1 import control_pb2
from fleetprof.proto.security import ClientSecurity

log = logging.getLogger(__name__)

# Exec, exit and new-code events wait this long at most (first samples wake the agent).
EVENT_POLL_MS = 250
# A process that maps new code (dlopen) is read again this long after, once for all it
# maps meanwhile: an interpreter importing extension modules maps dozens in a few seconds,
# and each reading costs a snapshot and a reload of its unwind ranges.
NEW_CODE_SETTLE_S = 0.5
SAMPLING = control_pb2.SessionState.SESSION_STATE_SAMPLING
FINISHED = control_pb2.SessionState.SESSION_STATE_FINISHED
FAILED = control_pb2.SessionState.SESSION_STATE_FAILED
SHUTDOWN_DELIVERY_S = 10.0


@dataclass(frozen=True)
class AgentConfig:
    # HOST:PORT, or a comma-separated list of aggregators sharing the fleet (one is chosen).
    aggregator: str
    node: str = socket.gethostname()
    interval_s: float = 10.0
    events: tuple[str, ...] = ("cpu",)
    # Undelivered batches wait here (bounded) while the aggregator is unreachable.
    spool_dir: str = "/var/lib/fleetprof/spool"
    spool_max_bytes: int = 256 * 1024 * 1024
    security: ClientSecurity = field(default_factory=ClientSecurity)
    sampling: SamplerOptions = field(default_factory=SamplerOptions)
    # Job resolver specs (node_agent/jobs.py); empty: the defaults (FLEETPROF_JOB, Spark...).
    job_resolvers: tuple[dict[str, Any], ...] = ()
    # Outside a pod, a kubeconfig gives pod metadata; with neither, pod columns stay NULL.
    kubeconfig: str | None = None
    # Probability that an interval's continuous-mode samples ship (weights scaled by 1/p);
    # the seed makes the choices reproducible (tests).
    host_sampling: float = 1.0
    host_sampling_seed: int | None = None
    # User stacks unwound from each binary's .eh_frame (else frame pointers only); the
    # rows prepared from each file are kept here, by build id.
    native_unwind: bool = True
    unwind_cache_dir: str | None = "/var/cache/fleetprof/unwind"
    # Debug files of stripped binaries from debuginfod servers (none: no client); the CLI
    # reads DEBUGINFOD_URLS and the rest of elfutils' variables.
    debuginfod: DebuginfodOptions = field(default_factory=DebuginfodOptions)


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.debuginfod = DebuginfodClient(config.debuginfod) if config.debuginfod.urls else None
        self.symbolizer = Symbolizer(debuginfod=self.debuginfod)
        # JVMs are found in the snapshots; their perf maps refreshed at most once an interval.
        self.jvms = Jvms(
            self.symbolizer.reload_perf_map,
            interval_s=config.interval_s,
            unwinds_java=lambda pid: (
                self.code_caches is not None and not self.symbolizer.hotspot.failed(pid)
            ),
        )
        self.symbolizer.on_snapshot = self.jvms.observe
        self._exited: set[int] = set()
        self._every_process_reported = False  # see _run_sessions
        # Sampled processes to read (maps, symbols, job) after this poll's events.
        self._new_code: set[int] = set()
        # Processes that mapped new code, read again when due (see NEW_CODE_SETTLE_S).
        self._new_code_due: dict[int, float] = {}
        check_events(config.events)
        self.unwinder = (
            NativeUnwinder(config.sampling, config.unwind_cache_dir)
            if config.native_unwind
            else None
        )
        # What every sampler is built with, sessions' too: the unwinder's tables named.
        self.sampling = self.unwinder.options if self.unwinder else config.sampling
        self._samplers = samplers_for(config.events, self.sampling)
        self._prepared = PreparedSamplers(self.sampling)
        # JVMs whose memory the symbolizer reads: their code caches as unwind rows too.
        self.code_caches = (
            CodeCaches(
                self.symbolizer.hotspot,
                self.unwinder.set_code_rows,
                self.unwinder.forget_code_rows,
            )
            if self.unwinder
            else None
        )
        pods = KubernetesMetadata.from_environment(config.node, config.kubeconfig)
        pods.start()
        # Owners are resolved when a process is first sampled, or a session asks.
        self.owners = ProcessOwners(JobResolver.from_config(config.job_resolvers, pods), pods)
        # The samplers report each process's first sample: only those are read.
        self._events = ProcessEvents(
            fd for fd in (s.process_events_fd() for s in self._samplers) if fd is not None
        )
        self._events.subscribe(
            on_first_sample=self._on_first_sample,
            on_new_code=self._on_new_code,
            on_exec=self._on_exec,
            on_exit=self._on_exit,
        )
        if self.unwinder:
            # Given each process read (_remember_new_code); a new image is read anew.
            self._events.subscribe(on_exec=self.unwinder.forget, on_exit=self.unwinder.forget)
        self._builder = BatchBuilder(self.symbolizer, self.owners)
        self.host_sampling = HostSampling(
            config.host_sampling, random.Random(config.host_sampling_seed)
        )
        # Loaded now rather than in the first drain, which must stay short: process events
        # wait while a drain runs, and a short-lived process can be gone by then.
        self.symbolizer.symbolize_kernel([0])
        # A fresh id per agent process: sequence numbers restart with it.
        agent_id = f"{config.node}/{uuid.uuid4().hex[:12]}"
        spool = Spool(config.spool_dir, config.spool_max_bytes)
        # One aggregator of the configured list, by consistent hashing of the node name.
        self.aggregator = assigned_aggregator(config.aggregator, config.node)
        self.shipper = Shipper(self.aggregator, agent_id, config.node, spool, config.security)
        # On-demand sessions: ordered over the control stream, one SessionRun each.
        self._control = ControlClient(self.aggregator, config.security, config.node, agent_id)
        self._sessions: dict[str, SessionRun] = {}
        # samples: weight shipped (scaled by host sampling); drained: weight counted.
        self.stats = {"drains": 0, "skipped": 0, "samples": 0, "drained": 0}
        self.python_walks: dict[str, int] = {}  # set at close
        self._dropped = [0] * len(self._samplers)
        # The native unwinder's and the debuginfod client's counters at the last drain.
        self.unwind_stats: dict[str, int] = {}
        self.debuginfod_stats: dict[str, int] = {}
        log.info(
            "agent %s sampling %s (cpu at %d Hz), shipping every %g s (p = %g) to %s",
            agent_id,
            ",".join(config.events),
            config.sampling.frequency,
            config.interval_s,
            config.host_sampling,
            self.aggregator,
        )

    def _on_first_sample(self, pid: int) -> None:
        # A new image: its job is asked anew, even if cached as another process's ancestor
        # (whose exec the kernel does not report unless it was sampled).
        self.owners.forget(pid)
        self._new_code.add(pid)

    def _on_exec(self, pid: int) -> None:
        # A new environment and command line may name another job: asked again when needed.
        self.owners.forget(pid)
        for session in self._sessions.values():
            session.consider(pid)

    def _on_new_code(self, pid: int) -> None:
        self._new_code_due.setdefault(pid, time.monotonic() + NEW_CODE_SETTLE_S)

    def _on_exit(self, pid: int) -> None:
        # Gone: nothing left to read (its maps went before the exit event).
        self._new_code.discard(pid)
        self._new_code_due.pop(pid, None)
        self.jvms.exited(pid)
        self._exited.add(pid)

    def _remember_new_code(self) -> None:
        now = time.monotonic()
        for pid in [pid for pid, due in self._new_code_due.items() if due <= now]:
            del self._new_code_due[pid]
            self._new_code.add(pid)
        while self._new_code:
            pid = self._new_code.pop()
            identity = self._events.identity(pid)
            snapshot = self.symbolizer.remember(pid, identity)
            if self.unwinder and snapshot is not None:
                self.unwinder.sampled(pid, snapshot.mappings)
            # Its owner now, while /proc/PID is there to answer (cached until it exits).
            self.owners.owner(pid, identity.ppid if identity else None)

    def run(self, stop: threading.Event) -> None:
        """Sample until `stop` is set, then drain the last interval and detach."""
        try:
            next_drain = time.monotonic() + self.config.interval_s
            while not stop.is_set():
                wait_s = min(next_drain - time.monotonic(), EVENT_POLL_MS / 1000)
                self._events.poll(max(0, math.ceil(wait_s * 1000)))
                self._remember_new_code()
                if self.unwinder:
                    self.unwinder.load_due()
                self.jvms.poll(next_drain)
                self._run_sessions()
                if self.shipper.retry_due:
                    self.shipper.flush()
                if time.monotonic() >= next_drain:
                    self.drain_once()
                    next_drain = max(next_drain + self.config.interval_s, time.monotonic())
            # Exits of the last moments, so the last drain lets go of those processes.
            self._events.poll(0)
            self._remember_new_code()
            self.drain_once()
            if not self.shipper.drain_pending(SHUTDOWN_DELIVERY_S):
                log.warning("exiting with %d undelivered batches", self.shipper.pending)
        finally:
            self.close()
        log.info(
            "agent stopped: %d samples in %d drains (%d skipped), %d batches acked, "
            "%d left in the spool",
            self.stats["samples"],
            self.stats["drains"],
            self.stats["skipped"],
            self.shipper.stats["acked"],
            self.shipper.pending,
        )
        if self.symbolizer.python.stats["processes"] or self.symbolizer.python.stats["unsupported"]:
            log.info(
                "python frames: %s; BPF walks: %s", self.symbolizer.python.stats, self.python_walks
            )

    def _run_sessions(self) -> None:
        """Start what the aggregator ordered; finish what reached its deadline."""
        # Sessions consider every exec: reported from before a session's start (its scan of
        # the running processes), until none is left.
        self._report_every_process(not self._control.orders.empty() or bool(self._sessions))
        self._order_sessions()
        self._report_every_process(bool(self._sessions))

    def _report_every_process(self, every: bool) -> None:
        if every != self._every_process_reported:
            self._every_process_reported = every
            self._events.report_every_process(every)

    def _order_sessions(self) -> None:
        while not self._control.orders.empty():
            order = self._control.orders.get()
            if order.session_id in self._sessions:
                continue  # re-sent after a reconnect: already running
            try:
                session = SessionRun(order, self.sampling, self.owners, self._prepared)
            except Exception as exc:  # a BPF program that will not load, an unknown event
                log.error("session %s cannot start: %s", order.session_id, exc)
                self._control.report(order.session_id, FAILED, 0, 0, str(exc))
                continue
            self._sessions[order.session_id] = session
            self._control.report(order.session_id, SAMPLING, 0, len(session.pids))
        for session in [s for s in self._sessions.values() if s.expired]:
            for batch in session.finish(self._builder):
                self.shipper.ship(batch)
            del self._sessions[session.order.session_id]
            delivered = self.shipper.pending == 0
            self._control.report(
                session.order.session_id,
                FINISHED,
                session.samples,
                len(session.pids),
                "" if delivered else "some batches wait in the spool",
            )

    def _ship_session(self, session: SessionRun) -> None:
        for batch in session.drain(self._builder):
            self.shipper.ship(batch)
        self._control.report(session.order.session_id, SAMPLING, session.samples, len(session.pids))

    def drain_once(self) -> None:
        # Processes that exited before the flip have all their samples in this drain.
        exited, self._exited = self._exited, set()
        unreported = self._unreported_exits(exited)
        exited |= unreported
        # Debug files fetched since the last drain name this drain's frames.
        self.symbolizer.take_debug_info()
        now = datetime.now(UTC)
        profiled = self.host_sampling.profile_this_interval()
        self.stats["skipped"] += not profiled
        for index, sampler in enumerate(self._samplers):
            # Drained even when skipped: the kernel maps must start the next interval empty.
            drained = sampler.drain()
            dropped = sampler.dropped_samples() - self._dropped[index]
            self._dropped[index] += dropped
            self.stats["drained"] += sum(s.weight for s in drained.samples) + dropped
            if not profiled:
                continue  # not symbolized, not shipped
            if dropped:
                # The kernel's counts map was full: keep their weight under [lost stack].
                # (Of a sampler of several events, shipped as the first one's.)
                log.warning(
                    "%s: %d %s of weight found the kernel counts map full",
                    ",".join(sampler.events),
                    dropped,
                    sampler.unit,
                )
                drained.samples.append(StackSample(0, 0, "[dropped]", None, (), dropped))
            drained = self.host_sampling.scale_drain(drained)
            self.shipper.ship(self._builder.build(sampler, now, drained))
            self.stats["samples"] += sum(s.weight for s in drained.samples)
        for session in self._sessions.values():
            self._ship_session(session)
        self.jvms.after_drain(*self.symbolizer.take_jit_activity())
        processes = self.jvms.take_processes()
        if processes is not None:
            self.shipper.ship(Batch(schema.SAMPLES.empty_table(), {}, processes))
        for pid in exited:
            self.symbolizer.forget(pid)
            self.jvms.forget(pid)
            self.owners.forget(pid)
        self._events.forget(unreported)
        if self.unwinder:
            for pid in unreported:
                self.unwinder.forget(pid)
        if self.unwinder:
            self._log_unwinding(self.unwinder.stats())
        if self.debuginfod:
            self._log_debuginfod(dict(self.debuginfod.stats))
        # Symbol tables of new processes leave parse garbage behind: hand it back.
        release_free_memory()
        self.stats["drains"] += 1

    def _unreported_exits(self, reported: set[int]) -> set[int]:
        """Processes the agent keeps state of that exited unreported: the kernel reports the
        exit of a process once user space has read its first sample, and it may be gone
        before (or have been counted by a session since ended, or be a job's ancestor)."""
        # By start time: a reused pid is caught too.
        gone = self.symbolizer.exited_pids(known=reported)
        kept = self.owners.pids() | self._events.sampled
        if self.unwinder:
            kept |= self.unwinder.pids()
        gone |= {pid for pid in kept - reported - gone if not os.path.exists(f"/proc/{pid}")}
        return gone - reported

    def _log_unwinding(self, stats: dict[str, int]) -> None:
        """Say when stacks fell back to frame pointers for want of rows (counters grew)."""
        fallbacks = ("no_row_frames", "bad_reads", "rows_full", "ranges_full", "no_cfi_files")
        what = "native unwinding fell back to frame pointers"
        _log_growth(what, stats, self.unwind_stats, fallbacks)
        self.unwind_stats = stats

    def _log_debuginfod(self, stats: dict[str, int]) -> None:
        """Say what the debuginfod client did since the last drain, when it did anything."""
        _log_growth("debuginfod", stats, self.debuginfod_stats, tuple(stats))
        self.debuginfod_stats = stats

    def close(self) -> None:
        if self.debuginfod:
            self.debuginfod.close()
        self._control.close()
        for session in self._sessions.values():
            session.close()
        self._prepared.close()
        # BPF's Python walks by outcome (python_stacks.bpf.h PY_STAT_*), for the stop line.
        walks = [sampler.python_walks() for sampler in self._samplers]
        self.python_walks = {
            outcome: sum(counts[i] for counts in walks)
            for i, outcome in enumerate(("walked", "no_thread", "unreadable", "truncated"))
        }
        for sampler in self._samplers:
            sampler.close()
        if self.code_caches:
            self.code_caches.close()
        if self.unwinder:
            self.unwinder.close()
        self._events.close()
        self.jvms.close()
        self.owners.close()
        self.shipper.close()


def _log_growth(
    what: str, stats: dict[str, int], before: dict[str, int], keys: tuple[str, ...]
) -> None:
    """Log the counters of `keys` that grew since `before`, and every total, if any grew."""
    grown = {k: stats[k] - before.get(k, 0) for k in keys}
    if any(grown.values()):
        growth = ", ".join(f"{k} +{v}" for k, v in grown.items() if v)
        log.info("%s: %s (totals: %s)", what, growth, stats)
