"""Turns a sampler's drain into one wire batch: SAMPLES rows, the STACKS they use and,
for block, IO_LATENCY rows."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import NamedTuple

import pyarrow as pa

from fleetprof.node_agent.owners import Owner, ProcessOwners
from fleetprof.node_agent.samplers import Drain, LatencyBucket, Sampler
from fleetprof.node_agent.samplers.stack_maps import PythonFrame, StackSample
from fleetprof.node_agent.symbolize.frame import Frame
from fleetprof.node_agent.symbolize.symbolizer import Symbolizer
from fleetprof.proto import schema
from fleetprof.proto.stacks import LOST_FRAME, StackRow, stack_id, stack_row

LOST_STACK = Frame(*LOST_FRAME)


class Batch(NamedTuple):
    samples: pa.Table
    stacks: dict[int, StackRow]
    # schema.PROCESSES rows, when the agent learned something about processes.
    processes: pa.Table | None = None
    # schema.IO_LATENCY rows, drained with the block event's samples.
    io_latency: pa.Table | None = None


class BatchBuilder:
    """Symbolizes each distinct stack of a drain once and hashes it to its id."""

    def __init__(self, symbolizer: Symbolizer, owners: ProcessOwners | None = None) -> None:
        self._symbolizer = symbolizer
        self._owners = owners

    def build(
        self, sampler: Sampler, ts: datetime, drain: Drain, session_id: str | None = None
    ) -> Batch:
        """The drain's samples as rows of the events `sampler.event_of` says; samples of
        an event the sampler counts but does not ship are left out."""
        kernel_frames: dict[tuple[int, ...] | None, list[Frame]] = {}
        # Per (pid, stacks, leaf, detail): its stack id and event.
        keys: dict[tuple[object, ...], tuple[int, str | None]] = {}
        stacks: dict[int, StackRow] = {}
        drained: list[StackSample] = []
        stack_ids, events = [], []
        for sample in drain.samples:
            key = (
                sample.pid,
                sample.kernel_stack,
                sample.user_stack,
                sample.leaf,
                sample.detail,
                sample.python_stack,
            )
            if key not in keys:
                if sample.kernel_stack not in kernel_frames:
                    kernel_frames[sample.kernel_stack] = self._kernel(sample.kernel_stack)
                frames = self._user(sample.pid, sample.user_stack, sample.python_stack)
                frames.extend(kernel_frames[sample.kernel_stack])
                if sample.leaf:
                    frames.append(Frame(sample.leaf, "", "kernel"))
                row = stack_row(frames or [LOST_STACK])
                keys[key] = (stack_id(row), sampler.event_of(sample.detail, frames))
                stacks[keys[key][0]] = row
            row_id, event = keys[key]
            if event is not None:
                drained.append(sample)
                stack_ids.append(row_id)
                events.append(event)
        samples = schema.samples_table(
            {
                "ts": pa.array([ts] * len(drained), pa.timestamp("us", tz="UTC")),
                "pid": [s.pid for s in drained],
                "tid": [s.tid for s in drained],
                "comm": [
                    schema.printable(self._symbolizer.process_name(s.pid) or s.comm)
                    for s in drained
                ],
                "event": events,
                "stack_id": stack_ids,
                "weight": [s.weight for s in drained],
                "session_id": [session_id] * len(drained),
                **self._owner_columns([s.pid for s in drained]),
            }
        )
        io_latency = self._io_latency(ts, drain.io_latency) if drain.io_latency else None
        return Batch(samples, stacks, io_latency=io_latency)

    def _owner_columns(self, pids: list[int]) -> dict[str, list[str | None]]:
        """job, namespace, pod and container of each row's process (resolved once per pid)."""
        if self._owners is None:
            return {}
        owners = {pid: self._owners.owner(pid) for pid in set(pids)}
        return {name: [getattr(owners[pid], name) for pid in pids] for name in Owner._fields}

    def _io_latency(self, ts: datetime, buckets: Sequence[LatencyBucket]) -> pa.Table:
        return pa.table(
            {
                "ts": pa.array([ts] * len(buckets), pa.timestamp("us", tz="UTC")),
                "pid": [b.pid for b in buckets],
                "comm": [
                    schema.printable(self._symbolizer.process_name(b.pid) or b.comm)
                    for b in buckets
                ],
                "device": [b.device for b in buckets],
                "op": [b.op for b in buckets],
                "bucket_le_ns": [b.bucket_le_ns for b in buckets],
                "count": [b.count for b in buckets],
            },
            schema=schema.IO_LATENCY,
        )

    def _kernel(self, addresses: tuple[int, ...] | None) -> list[Frame]:
        if addresses is None:
            return [LOST_STACK]
        return self._symbolizer.symbolize_kernel(addresses)[::-1]

    def _user(
        self, pid: int, addresses: tuple[int, ...] | None, python: Sequence[PythonFrame] | None
    ) -> list[Frame]:
        if addresses is None:
            native = [LOST_STACK]
        else:
            native = self._symbolizer.symbolize_user(pid, addresses)
        if python:
            native = self._symbolizer.with_python(pid, native, python)
        return native[::-1]
