"""Turns a sampler's drain into one wire batch: SAMPLES rows, the STACKS they use and,
for io, IO_LATENCY rows."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime
from typing import NamedTuple

import pyarrow as pa

from fleetprof.node_agent.owners import Owner, ProcessOwners
from fleetprof.node_agent.samplers import Drain, LatencyBucket
from fleetprof.node_agent.symbolize.frame import Frame
from fleetprof.node_agent.symbolize.symbolizer import Symbolizer
from fleetprof.proto import schema

LOST_STACK = Frame("[lost stack]", "", "lost")


class StackRow(NamedTuple):
    """One distinct stack, root first."""

    frames: tuple[str, ...]
    modules: tuple[str, ...]
    kinds: tuple[str, ...]


def stack_row(frames: Sequence[Frame]) -> StackRow:
    return StackRow(
        tuple(fit(f.name) for f in frames),
        tuple(fit(f.module) for f in frames),
        tuple(f.kind for f in frames),
    )


def fit(name: str) -> str:
    """A name cut to what the wire contract accepts: demangled C++ templates (LLVM's reach
    8k characters) would otherwise get the whole batch refused."""
    encoded = name.encode()
    if len(encoded) <= schema.MAX_STRING_BYTES:
        return name
    ellipsis = "…"
    kept = encoded[: schema.MAX_STRING_BYTES - len(ellipsis.encode())]
    return kept.decode(errors="ignore") + ellipsis  # a character cut in two goes


def stack_id(row: StackRow) -> int:
    """64-bit id of a stack: a hash of its frames, equal on every node for equal stacks."""
    frames = zip(row.frames, row.modules, row.kinds, strict=True)
    return keyed_stack_id(b"".join(frame_key(*frame) for frame in frames))


def frame_key(name: str, module: str, kind: str) -> bytes:
    """What one frame adds to its stack's id."""
    return f"{name}\x1f{module}\x1f{kind}\x1e".encode(errors="surrogateescape")


def keyed_stack_id(keys: bytes) -> int:
    """The stack_id of the stack whose frame_keys, root first, are joined in `keys` (for
    readers that key each part of a stack once, as OTLP's locations)."""
    digest = hashlib.blake2b(keys, digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


class Batch(NamedTuple):
    samples: pa.Table
    stacks: dict[int, StackRow]
    # schema.PROCESSES rows, when the agent learned something about processes.
    processes: pa.Table | None = None
    # schema.IO_LATENCY rows, drained with the io event's samples.
    io_latency: pa.Table | None = None


class BatchBuilder:
    """Symbolizes each distinct stack of a drain once and hashes it to its id."""

    def __init__(self, symbolizer: Symbolizer, owners: ProcessOwners | None = None) -> None:
        self._symbolizer = symbolizer
        self._owners = owners

    def build(self, event: str, ts: datetime, drain: Drain, session_id: str | None = None) -> Batch:
        drained = drain.samples
        kernel_frames: dict[tuple[int, ...] | None, list[Frame]] = {}
        ids: dict[tuple[int, tuple[int, ...] | None, tuple[int, ...] | None, str], int] = {}
        stacks: dict[int, StackRow] = {}
        stack_ids = []
        for sample in drained:
            key = (sample.pid, sample.kernel_stack, sample.user_stack, sample.leaf)
            if key not in ids:
                if sample.kernel_stack not in kernel_frames:
                    kernel_frames[sample.kernel_stack] = self._kernel(sample.kernel_stack)
                frames = self._user(sample.pid, sample.user_stack)
                frames.extend(kernel_frames[sample.kernel_stack])
                if sample.leaf:
                    frames.append(Frame(sample.leaf, "", "kernel"))
                row = stack_row(frames or [LOST_STACK])
                ids[key] = stack_id(row)
                stacks[ids[key]] = row
            stack_ids.append(ids[key])
        samples = schema.samples_table(
            {
                "ts": pa.array([ts] * len(drained), pa.timestamp("us", tz="UTC")),
                "pid": [s.pid for s in drained],
                "tid": [s.tid for s in drained],
                "comm": [
                    schema.printable(self._symbolizer.process_name(s.pid) or s.comm)
                    for s in drained
                ],
                "event": [event] * len(drained),
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

    def _user(self, pid: int, addresses: tuple[int, ...] | None) -> list[Frame]:
        if addresses is None:
            return [LOST_STACK]
        return self._symbolizer.symbolize_user(pid, addresses)[::-1]


def stacks_table(stacks: dict[int, StackRow]) -> pa.Table:
    rows = list(stacks.values())
    return pa.table(
        {
            "stack_id": list(stacks),
            "frames": [r.frames for r in rows],
            "modules": [r.modules for r in rows],
            "kinds": [r.kinds for r in rows],
        },
        schema=schema.STACKS,
    )
