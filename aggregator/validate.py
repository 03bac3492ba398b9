"""Checks every ingest batch before anything is stored: schema, version, sizes, values."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.compute as pc

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
    samples = schema.decode(batch.samples, schema.SAMPLES)
    stacks = schema.decode(batch.stacks, schema.STACKS)
    _check_samples(samples)
    _check_stacks(stacks)
    return ValidBatch(batch.agent_id, batch.sequence, batch.node, samples, stacks)


def _check_samples(samples: pa.Table) -> None:
    if samples.num_rows == 0:
        return
    latest = pc.max(samples["ts"]).as_py()
    if latest > datetime.now(UTC) + MAX_CLOCK_SKEW:
        raise schema.SchemaError(f"samples: timestamp {latest.isoformat()} is in the future")
    if pc.min(samples["weight"]).as_py() < 0:
        raise schema.SchemaError("samples: negative weight")
    unknown = set(pc.unique(samples["event"]).to_pylist()) - schema.EVENT_UNITS.keys()
    if unknown:
        raise schema.SchemaError(f"samples: unknown event {sorted(unknown)[0]!r}")
    for column in ("comm", "event"):
        if pc.max(pc.utf8_length(samples[column])).as_py() > schema.MAX_STRING_BYTES:
            raise schema.SchemaError(f"samples: {column} longer than {schema.MAX_STRING_BYTES}")


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
    if len(names) and pc.max(pc.utf8_length(names)).as_py() > schema.MAX_STRING_BYTES:
        raise schema.SchemaError(f"stacks: frame name longer than {schema.MAX_STRING_BYTES}")
