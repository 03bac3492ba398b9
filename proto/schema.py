"""The Arrow schemas of the wire contract, defined once for agents and aggregator.

A batch is Arrow IPC streams: SAMPLES rows (one per in-kernel aggregated
(pid, tid, stack) count), STACKS rows (each distinct stack once per connection) and
PROCESSES rows (what the agent learned about processes, when it learned it) and IO_LATENCY
rows (block I/O latency histograms of the `io` event).
Bump SCHEMA_VERSION and keep the old schema readable when a column changes.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.ipc as ipc

SCHEMA_VERSION = 2
SUPPORTED_SCHEMA_VERSIONS = frozenset({1, 2})

# The events (SAMPLES.event) and the unit of their weight: counts, or nanoseconds of time.
# cpu: on-CPU samples; lock: blocked in futex waits and on kernel locks; offcpu: off CPU
# (above a minimum duration); io: in I/O syscalls and block requests (README "Events").
EVENT_UNITS = {"cpu": "samples", "lock": "ns", "offcpu": "ns", "io": "ns"}

# Frame kinds, as used in STACKS.kinds; flame graphs colour by them.
FRAME_KINDS = ("kernel", "native", "jit", "interpreted", "lost", "unknown")

_SAMPLE_FIELDS_V1 = [
    pa.field("ts", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("pid", pa.int32(), nullable=False),
    pa.field("tid", pa.int32(), nullable=False),
    pa.field("comm", pa.string(), nullable=False),
    # A key of EVENT_UNITS, which says what weight counts.
    pa.field("event", pa.string(), nullable=False),
    pa.field("stack_id", pa.int64(), nullable=False),
    pa.field("weight", pa.int64(), nullable=False),
]
# Version 2: who a process belongs to (NULL when unknown): its job, as the agent's resolvers
# name it; the on-demand session that sampled it (NULL: continuous profiling); its pod.
_SAMPLE_FIELDS_V2 = [
    pa.field(name, pa.string(), nullable=True)
    for name in ("job", "session_id", "namespace", "pod", "container")
]
SAMPLES_V1 = pa.schema(
    _SAMPLE_FIELDS_V1, metadata={"fleetprof.table": "samples", "fleetprof.schema_version": "1"}
)
SAMPLES = pa.schema(
    _SAMPLE_FIELDS_V1 + _SAMPLE_FIELDS_V2,
    metadata={"fleetprof.table": "samples", "fleetprof.schema_version": str(SCHEMA_VERSION)},
)

STACKS = pa.schema(
    [
        # 64-bit hash of the frames (see node_agent.stacks.stack_id).
        pa.field("stack_id", pa.int64(), nullable=False),
        # Root first, leaf last, as in folded stacks.
        pa.field("frames", pa.list_(pa.string()), nullable=False),
        pa.field("modules", pa.list_(pa.string()), nullable=False),
        pa.field("kinds", pa.list_(pa.string()), nullable=False),
    ],
    metadata={"fleetprof.table": "stacks", "fleetprof.schema_version": str(SCHEMA_VERSION)},
)

# Language runtimes the agent recognises (PROCESSES.runtime): "jvm" is HotSpot.
RUNTIMES = ("jvm",)

# What the agent learned about a process, sent when it learns it (IngestBatch.processes):
# the latest row of a (node, pid) is the current state.
PROCESSES = pa.schema(
    [
        pa.field("ts", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("pid", pa.int32(), nullable=False),
        # The pid the process sees in its own PID namespace (its container).
        pa.field("nspid", pa.int32(), nullable=False),
        pa.field("comm", pa.string(), nullable=False),
        pa.field("exe", pa.string(), nullable=False),
        # One of RUNTIMES, or null.
        pa.field("runtime", pa.string()),
        # Whether JIT-compiled code keeps frame pointers (JVM: -XX:+PreserveFramePointer);
        # without them stacks stop at the first JIT frame. Null: not known.
        pa.field("frame_pointers", pa.bool_()),
        # The outcome of the agent's last attach to the JVM ("ok", or why it failed or was
        # not tried); null if not tried yet.
        pa.field("attach", pa.string()),
        # Entries of its perf map (JIT symbols) when last read; null if it has none.
        pa.field("perf_map_entries", pa.int64()),
    ],
    metadata={"fleetprof.table": "processes", "fleetprof.schema_version": str(SCHEMA_VERSION)},
)

# Block request ops (IO_LATENCY.op).
IO_OPS = ("read", "write", "flush", "discard", "other")

# Block requests completed in one interval, per (process, device, op), in log2 latency
# buckets (IngestBatch.io_latency): one row per non-empty bucket.
IO_LATENCY = pa.schema(
    [
        pa.field("ts", pa.timestamp("us", tz="UTC"), nullable=False),
        # The process that queued the request.
        pa.field("pid", pa.int32(), nullable=False),
        pa.field("comm", pa.string(), nullable=False),
        # Block device name ("vda", "nvme0n1"), or "major:minor" when it has none.
        pa.field("device", pa.string(), nullable=False),
        # One of IO_OPS.
        pa.field("op", pa.string(), nullable=False),
        # A power of two: these requests took more than half of it and at most it.
        pa.field("bucket_le_ns", pa.int64(), nullable=False),
        pa.field("count", pa.int64(), nullable=False),
    ],
    metadata={"fleetprof.table": "io_latency", "fleetprof.schema_version": str(SCHEMA_VERSION)},
)

# Hostile-input limits, checked before anything is decoded or stored.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_ROWS_PER_BATCH = 5_000_000
MAX_FRAMES_PER_STACK = 1024
MAX_STRING_BYTES = 4096

_WRITE_OPTIONS = ipc.IpcWriteOptions(compression="zstd")


class SchemaError(ValueError):
    """A payload that does not match the contract; the message says what is wrong."""


def encode(table: pa.Table) -> bytes:
    """Serialize a table as a zstd-compressed Arrow IPC stream."""
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, table.schema, options=_WRITE_OPTIONS) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def decode(payload: bytes, expected: pa.Schema) -> pa.Table:
    """Read an Arrow IPC stream and check it carries exactly `expected`'s columns."""
    if not payload:
        return expected.empty_table()
    try:
        table = ipc.open_stream(pa.py_buffer(payload)).read_all()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        raise SchemaError(f"malformed Arrow IPC payload: {exc}") from exc
    name = expected.metadata[b"fleetprof.table"].decode()
    if not table.schema.equals(expected, check_metadata=False):
        raise SchemaError(
            f"{name}: schema does not match version {SCHEMA_VERSION}: "
            f"got {_describe(table.schema)}, expected {_describe(expected)}"
        )
    if table.num_rows > MAX_ROWS_PER_BATCH:
        raise SchemaError(f"{name}: {table.num_rows} rows exceeds {MAX_ROWS_PER_BATCH}")
    return table


def samples_table(columns: dict[str, object]) -> pa.Table:
    """A SAMPLES table from columns; the optional (version 2) ones left out are NULL."""
    rows = len(next(iter(columns.values()))) if columns else 0
    for field in _SAMPLE_FIELDS_V2:
        columns.setdefault(field.name, pa.nulls(rows, field.type))
    return pa.table(columns, schema=SAMPLES)


def decode_samples(payload: bytes, version: int) -> pa.Table:
    """SAMPLES rows of a batch of any supported version, as the current schema."""
    if version == 1:  # agents not yet upgraded: nothing known about jobs or pods
        table = decode(payload, SAMPLES_V1)
        for field in _SAMPLE_FIELDS_V2:
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
        return table
    return decode(payload, SAMPLES)


def _describe(arrow_schema: pa.Schema, most: int = 12) -> str:
    """A schema on one short line (a hostile one may have a million columns)."""
    fields = [f"{field.name}: {field.type}" for field in list(arrow_schema)[:most]]
    if len(arrow_schema) > most:
        fields.append(f"... {len(arrow_schema) - most} more")
    return "(" + ", ".join(fields) + ")"
