"""Checks every ingest batch before anything is stored: schema, version, sizes, values."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.compute as pc

from fleetprof.aggregator.label_sets import ROW_LABELS
from fleetprof.proto import schema
from fleetprof.proto.ingest.v1 import ingest_pb2

MAX_ID_CHARS = 256
# Agents' clocks may run a little ahead; far-future rows would escape retention.
MAX_CLOCK_SKEW = timedelta(minutes=10)


@dataclass(frozen=True)
class ValidBatch:
    agent_id: str
    sequence: int
    node: str
    samples: pa.Table
    stacks: pa.Table
    processes: pa.Table
    io_latency: pa.Table


def validate_batch(batch: ingest_pb2.IngestBatch) -> ValidBatch:
    """Decode and check one batch; raises schema.SchemaError saying what is wrong."""
    if batch.schema_version not in schema.SUPPORTED_SCHEMA_VERSIONS:
        raise schema.SchemaError(
            f"unknown schema version {batch.schema_version}; "
            f"this aggregator reads {sorted(schema.SUPPORTED_SCHEMA_VERSIONS)}"
        )
    for name, value in (("agent_id", batch.agent_id), ("node", batch.node)):
        if not value or len(value) > MAX_ID_CHARS:
            raise schema.SchemaError(f"{name} must have 1 to {MAX_ID_CHARS} characters")
    samples = schema.decode_samples(batch.samples, batch.schema_version)
    stacks = schema.decode(batch.stacks, schema.STACKS)
    processes = schema.decode(batch.processes, schema.PROCESSES)
    io_latency = schema.decode(batch.io_latency, schema.IO_LATENCY)
    _check_samples(samples)
    _check_stacks(stacks)
    _check_processes(processes)
    _check_io_latency(io_latency)
    return ValidBatch(
        batch.agent_id, batch.sequence, batch.node, samples, stacks, processes, io_latency
    )


def _check_not_future(name: str, table: pa.Table) -> None:
    latest = pc.max(table["ts"]).as_py()
    if latest > datetime.now(UTC) + MAX_CLOCK_SKEW:
        raise schema.SchemaError(f"{name}: timestamp {latest.isoformat()} is in the future")


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
    _check_not_future("samples", samples)
    if pc.min(samples["weight"]).as_py() < 0:
        raise schema.SchemaError("samples: negative weight")
    _check_known("samples", samples, "event", schema.EVENT_UNITS)
    _check_lengths("samples", samples, ROW_LABELS)


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
    for column in ("comm", "exe", "attach"):
        longest = pc.max(pc.binary_length(processes[column])).as_py() or 0
        if longest > schema.MAX_STRING_BYTES:
            raise schema.SchemaError(f"processes: {column} longer than {schema.MAX_STRING_BYTES}")


def _check_io_latency(io_latency: pa.Table) -> None:
    if io_latency.num_rows == 0:
        return
    _check_not_future("io_latency", io_latency)
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
