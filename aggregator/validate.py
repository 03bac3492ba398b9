"""Checks every ingest batch before anything is stored: schema, version, sizes, values.

The checks are functions another ingest path (the OTLP receiver) calls too: check_identifier
for names, check_time_window, check_weights and StreamStacks for what a stream may refer to.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fleetprof.aggregator.id_set import IdSet
from fleetprof.aggregator.label_sets import ROW_LABELS
from fleetprof.proto import schema
from fleetprof.proto.ingest.v1 import ingest_pb2

MAX_ID_CHARS = 256
# Agents' clocks may run a little ahead; far-future rows would escape retention.
MAX_CLOCK_SKEW = timedelta(minutes=10)
# A spool holds batches through an outage, not for ever; older rows would be sealed into
# hours long closed (a 1970 timestamp into the lake).
MAX_SAMPLE_AGE = timedelta(days=7)
_CONTROL = re.compile(schema.CONTROL_CHARACTERS)


@dataclass(frozen=True)
class ValidBatch:
    agent_id: str
    sequence: int
    node: str
    samples: pa.Table
    stacks: pa.Table
    processes: pa.Table
    io_latency: pa.Table
    incarnation: str


def validate_batch(batch: ingest_pb2.IngestBatch) -> ValidBatch:
    """Decode and check one batch; raises schema.SchemaError saying what is wrong."""
    if batch.schema_version not in schema.SUPPORTED_SCHEMA_VERSIONS:
        raise schema.SchemaError(
            f"unknown schema version {batch.schema_version}; "
            f"this aggregator reads {sorted(schema.SUPPORTED_SCHEMA_VERSIONS)}"
        )
    check_identifier("agent_id", batch.agent_id)
    check_identifier("node", batch.node)
    if batch.incarnation:
        check_identifier("incarnation", batch.incarnation)
    samples = schema.decode_samples(batch.samples, batch.schema_version)
    stacks = schema.decode(batch.stacks, schema.STACKS)
    processes = schema.decode(batch.processes, schema.PROCESSES)
    io_latency = schema.decode(batch.io_latency, schema.IO_LATENCY)
    _check_samples(samples)
    _check_stacks(stacks)
    _check_processes(processes)
    _check_io_latency(io_latency)
    return ValidBatch(
        batch.agent_id,
        batch.sequence,
        batch.node,
        samples,
        stacks,
        processes,
        io_latency,
        batch.incarnation,
    )


def check_identifier(name: str, value: str) -> None:
    """A node, agent or incarnation name: 1 to MAX_ID_CHARS characters, none a control."""
    if not value or len(value) > MAX_ID_CHARS:
        raise schema.SchemaError(f"{name} must have 1 to {MAX_ID_CHARS} characters")
    if _CONTROL.search(value):
        raise schema.SchemaError(f"{name} {value[:64]!r} has control characters")


def check_text(name: str, table: pa.Table, columns: Iterable[str]) -> None:
    """String columns without control characters (labels are names, like identifiers)."""
    for column in columns:
        if any(_has_control(chunk) for chunk in table[column].chunks):
            raise schema.SchemaError(f"{name}: {column} has control characters")


def _has_control(strings: pa.Array) -> bool:
    """Whether a string array holds a control character: a scan of its UTF-8 bytes (a
    regex per value costs ~50 times more), C0 and DEL as bytes, C1 as 0xC2 0x80-0x9F."""
    if len(strings) == 0:
        return False
    _, offsets, data = strings.buffers()
    if data is None:
        return False
    bounds = np.frombuffer(offsets, np.int32)[[strings.offset, strings.offset + len(strings)]]
    text = np.frombuffer(data, np.uint8)[bounds[0] : bounds[1]]
    if not len(text) or (text.min() >= 0x20 and text.max() < 0x7F):
        return False  # printable ASCII, as names nearly always are: two passes, no copies
    if ((text < 0x20) | (text == 0x7F)).any():
        return True
    lead = np.flatnonzero(text[:-1] == 0xC2)
    return bool(((text[lead + 1] >= 0x80) & (text[lead + 1] <= 0x9F)).any())


def check_time_window(name: str, table: pa.Table, now: datetime | None = None) -> None:
    """Row timestamps (`ts`) within [now - MAX_SAMPLE_AGE, now + MAX_CLOCK_SKEW]."""
    now = now or datetime.now(UTC)
    earliest, latest = pc.min_max(table["ts"]).values()
    if latest.as_py() > now + MAX_CLOCK_SKEW:
        raise schema.SchemaError(f"{name}: timestamp {latest.as_py().isoformat()} is in the future")
    if earliest.as_py() < now - MAX_SAMPLE_AGE:
        raise schema.SchemaError(
            f"{name}: timestamp {earliest.as_py().isoformat()} is older than "
            f"{MAX_SAMPLE_AGE.days} days"
        )


def check_weights(samples: pa.Table) -> None:
    """Weights in [0, schema.MAX_WEIGHT of the event's unit]: a poisoned weight could otherwise
    dwarf a fleet's profile (or overflow sums)."""
    low, high = pc.min_max(samples["weight"]).values()
    if low.as_py() < 0:
        raise schema.SchemaError("samples: negative weight")
    if high.as_py() <= min(schema.MAX_WEIGHT.values()):
        return
    for event, unit in schema.EVENT_UNITS.items():
        weights = pc.filter(samples["weight"], pc.equal(samples["event"], event))
        heaviest = pc.max(weights).as_py() or 0
        if heaviest > schema.MAX_WEIGHT[unit]:
            raise schema.SchemaError(
                f"samples: {event} weight {heaviest} exceeds {schema.MAX_WEIGHT[unit]} {unit} "
                f"(one thread for {schema.MAX_INTERVAL_S} s)"
            )


class StreamStacks:
    """The stack ids one ingest stream has sent (a batch carries the stacks first used in
    it): a sample must refer to one of them, else SQL sums and flame graphs, which join
    samples to stacks, would disagree."""

    def __init__(self) -> None:
        self._sent = IdSet()

    def check(self, samples: pa.Table, stacks: pa.Table) -> None:
        """Refuse samples whose stacks were not sent; then count `stacks` as sent. Call
        it only for a batch that will be stored or acknowledged as a duplicate."""
        # Most batches carry no stacks: nothing of them to convert or to look in.
        new = stacks["stack_id"].to_numpy() if stacks.num_rows else None
        used = samples["stack_id"].to_numpy()
        unsent = used[~self._sent.contains(used)]
        if len(unsent) and new is not None:
            unsent = unsent[~np.isin(unsent, new)]
        if len(unsent):
            raise schema.SchemaError(
                f"samples: stack {int(unsent[0])} was never sent on this stream"
            )
        if new is not None:
            self._sent.add(new)


def _check_known(name: str, table: pa.Table, column: str, known: Iterable[str]) -> None:
    unknown = set(pc.unique(table[column].drop_null()).to_pylist()) - set(known)
    if unknown:
        raise schema.SchemaError(f"{name}: unknown {column} {sorted(unknown)[0]!r}")


def _check_lengths(name: str, table: pa.Table, columns: tuple[str, ...]) -> None:
    for column in columns:
        if (pc.max(pc.binary_length(table[column])).as_py() or 0) > schema.MAX_STRING_BYTES:
            raise schema.SchemaError(f"{name}: {column} longer than {schema.MAX_STRING_BYTES}")


def _check_samples(samples: pa.Table) -> None:
    if samples.num_rows == 0:
        return
    check_time_window("samples", samples)
    _check_known("samples", samples, "event", schema.EVENT_UNITS)
    check_weights(samples)
    _check_lengths("samples", samples, ROW_LABELS)
    check_text("samples", samples, ROW_LABELS)


def _check_stacks(stacks: pa.Table) -> None:
    if stacks.num_rows == 0:
        return
    depth = pc.list_value_length(stacks["frames"])
    if pc.max(depth).as_py() > schema.MAX_FRAMES_PER_STACK:
        raise schema.SchemaError(f"stacks: deeper than {schema.MAX_FRAMES_PER_STACK} frames")
    for column in ("modules", "kinds"):
        if not pc.all(pc.equal(pc.list_value_length(stacks[column]), depth)).as_py():
            raise schema.SchemaError(f"stacks: {column} and frames differ in length")
    names = pc.list_flatten(stacks["frames"])
    if len(names) and pc.max(pc.binary_length(names)).as_py() > schema.MAX_STRING_BYTES:
        raise schema.SchemaError(f"stacks: frame name longer than {schema.MAX_STRING_BYTES}")


def _check_processes(processes: pa.Table) -> None:
    if processes.num_rows == 0:
        return
    if pc.min(processes["pid"]).as_py() <= 0 or pc.min(processes["nspid"]).as_py() <= 0:
        raise schema.SchemaError("processes: pid must be positive")
    _check_known("processes", processes, "runtime", schema.RUNTIMES)
    check_text("processes", processes, ("comm",))
    for column in ("comm", "exe", "attach"):
        longest = pc.max(pc.binary_length(processes[column])).as_py() or 0
        if longest > schema.MAX_STRING_BYTES:
            raise schema.SchemaError(f"processes: {column} longer than {schema.MAX_STRING_BYTES}")


def _check_io_latency(io_latency: pa.Table) -> None:
    if io_latency.num_rows == 0:
        return
    check_time_window("io_latency", io_latency)
    if pc.min(io_latency["count"]).as_py() < 0:
        raise schema.SchemaError("io_latency: negative count")
    buckets = io_latency["bucket_le_ns"]
    # A power of two: n & (n - 1) == 0.
    if (
        pc.min(buckets).as_py() <= 0
        or pc.any(pc.not_equal(pc.bit_wise_and(buckets, pc.subtract(buckets, 1)), 0)).as_py()
    ):
        raise schema.SchemaError("io_latency: bucket_le_ns must be a power of two")
    _check_known("io_latency", io_latency, "op", schema.IO_OPS)
    _check_lengths("io_latency", io_latency, ("comm", "device"))
    check_text("io_latency", io_latency, ("comm", "device"))
