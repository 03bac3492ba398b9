"""The Arrow schemas of the wire contract, defined once for agents and aggregator.

A batch is Arrow IPC streams: SAMPLES rows (one per in-kernel aggregated
(pid, tid, stack) count), STACKS rows (each distinct stack once per connection) and
PROCESSES rows (what the agent learned about processes, when it learned it) and IO_LATENCY
rows (block I/O latency histograms of the `block` event).
Bump SCHEMA_VERSION and keep the old schema readable when a column changes.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.ipc as ipc

SCHEMA_VERSION = 2
SUPPORTED_SCHEMA_VERSIONS = frozenset({1, 2})

# The events (SAMPLES.event) and the unit of their weight: counts, or nanoseconds of time.
# Each time event counts a thread's time once, so its weights add up (docs/events.md):
# cpu: on-CPU samples; lock: blocked acquiring a lock (mutex, rwlock, kernel lock, Java
# monitor or lock); wait: blocked waiting for anything else in a futex (condition, join,
# park, sleep, Object.wait); offcpu: off CPU (above a minimum duration); io: in I/O
# syscalls; block: block device requests, issue to completion, on their submitter's stacks.
EVENT_UNITS = {
    "cpu": "samples",
    "lock": "ns",
    "wait": "ns",
    "offcpu": "ns",
    "io": "ns",
    "block": "ns",
}

# Frame kinds, as used in STACKS.kinds; flame graphs colour by them. "inlined" (agents of
# schema version 2 from the JVM frames of docs/jvm.md on): a method the JIT compiled into its
# caller, the frame below it, which is "jit"; readers that predate it treat it as unknown.
# "python": a CPython frame read from the interpreter (name module.qualname, module file:line).
FRAME_KINDS = ("kernel", "native", "jit", "inlined", "interpreted", "python", "lost", "unknown")

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

# Block requests (event block) completed in one interval, per (process, device, op), in log2 latency
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

# Who sent a stored row: the aggregator adds the batch's node and agent to every row of
# SAMPLES, PROCESSES and IO_LATENCY it stores (proto/lake.py orders the stored columns).
ORIGIN = pa.schema(
    [
        pa.field("node", pa.string(), nullable=False),
        pa.field("agent_id", pa.string(), nullable=False),
    ]
)
# DuckDB's name of each Arrow type the schemas above use.
_SQL_TYPES = {
    pa.timestamp("us", tz="UTC"): "TIMESTAMPTZ",
    pa.int32(): "INTEGER",
    pa.int64(): "BIGINT",
    pa.string(): "VARCHAR",
    pa.bool_(): "BOOLEAN",
    pa.list_(pa.string()): "VARCHAR[]",
}


def sql_type(field: pa.Field) -> str:
    """The DuckDB type of a field of the schemas above."""
    return _SQL_TYPES[field.type]


def sql_columns(fields: list[pa.Field]) -> str:
    """The column definitions of a DuckDB table holding `fields`, in order."""
    return ",\n".join(
        f"    {f.name} {sql_type(f)}{'' if f.nullable else ' NOT NULL'}" for f in fields
    )


# Hostile-input limits, checked before anything is decoded or stored.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_ROWS_PER_BATCH = 5_000_000
# Bytes of one payload once decompressed: 5M rows of SAMPLES take ~350 MB; a 35 MB zstd
# message of identical rows would otherwise decode to GBs before its row count is seen.
MAX_DECODED_BYTES = 1 << 30
MAX_FRAMES_PER_STACK = 1024
MAX_STRING_BYTES = 4096
# The heaviest a SAMPLES row can legitimately be (one thread, one stack, one interval): an
# agent ships at least every MAX_INTERVAL_S, samples at most at MAX_FREQUENCY_HZ and scales
# weights by at most 1 / MIN_HOST_SAMPLING (--host-sampling); time is at most the interval.
# Heavier rows are refused: a poisoned weight would dwarf a fleet's profile.
MAX_INTERVAL_S = 3600
MAX_FREQUENCY_HZ = 10_000
MIN_HOST_SAMPLING = 0.001
MAX_WEIGHT = {
    unit: (MAX_FREQUENCY_HZ if unit == "samples" else 1_000_000_000)
    * MAX_INTERVAL_S
    * round(1 / MIN_HOST_SAMPLING)
    for unit in set(EVENT_UNITS.values())
}
# Names (node, agent, labels such as comm) must not hold C0/C1 control characters or DEL: a
# NUL or newline breaks logs, files and the terminals names are printed on. Agents replace
# them (a process may name itself anything); the aggregator refuses them.
CONTROL_CHARACTERS = r"[\x00-\x1f\x7f-\x9f]"
_CONTROL = re.compile(CONTROL_CHARACTERS)

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
    name = expected.metadata[b"fleetprof.table"].decode()
    try:
        check_decoded_size(name, payload)
        table = ipc.open_stream(pa.py_buffer(payload)).read_all()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        raise SchemaError(f"malformed Arrow IPC payload: {exc}") from exc
    if not table.schema.equals(expected, check_metadata=False):
        raise SchemaError(
            f"{name}: schema does not match version {SCHEMA_VERSION}: "
            f"got {_describe(table.schema)}, expected {_describe(expected)}"
        )
    if table.num_rows > MAX_ROWS_PER_BATCH:
        raise SchemaError(f"{name}: {table.num_rows} rows exceeds {MAX_ROWS_PER_BATCH}")
    # IPC does not enforce a field's nullable=False; the checks after this count on it.
    for field in expected:
        if not field.nullable and table[field.name].null_count:
            raise SchemaError(f"{name}: {field.name} has nulls")
    return table


def check_decoded_size(name: str, payload: bytes) -> None:
    """Refuse a payload whose record batches say (in their IPC metadata, read before any
    buffer is decompressed) that they hold more than MAX_ROWS_PER_BATCH rows or
    MAX_DECODED_BYTES bytes; raises pyarrow errors for a malformed stream. The messages are
    found from the stream's framing in place; a stream that is not plain, or not within the
    limits, is read again by pyarrow's reader, which says what is wrong as it always has."""
    try:
        framed = _framed(payload)
        if framed is not None:
            _check_sizes(name, framed)
            return
    except (SchemaError, pa.ArrowInvalid, struct.error):
        pass
    messages = ipc.MessageReader.open_stream(pa.py_buffer(payload))
    _check_sizes(name, ((message.metadata.to_pybytes(), message.body) for message in messages))


# The IPC stream's framing: each message after this marker and its metadata's length.
_CONTINUATION = 0xFFFFFFFF


def _framed(payload: bytes) -> list[tuple[bytes, memoryview]] | None:
    """The messages of an IPC stream as (metadata, body), found in place (pyarrow's reader
    costs several times more in a busy aggregator, each message a call that gives up the
    GIL); None for any stream but a plain one: the legacy framing, bytes past its end."""
    view, at, messages = memoryview(payload), 0, []
    while at < len(payload):
        marker, length = struct.unpack_from("<Ii", payload, at)
        if marker != _CONTINUATION or length < 0:
            return None
        if length == 0:  # end of stream
            return messages if at + 8 == len(payload) else None
        start = at + 8 + length
        metadata = payload[at + 8 : start]
        if start > len(payload):
            return None
        meta = _Flatbuffer(metadata)
        at = start + meta.scalar(meta.root(), _BODY_LENGTH, "<q")
        if not start <= at <= len(payload):
            return None
        messages.append((metadata, view[start:at]))
    return messages


def _check_sizes(name: str, messages: Iterable[tuple[bytes, memoryview | pa.Buffer]]) -> None:
    """The limits over the record batches of (metadata, body) messages."""
    rows = size = 0
    for metadata, body in messages:
        header = _record_batch_header(metadata)
        if header is None:
            continue
        length, buffers, compressed = header
        rows += length
        for offset, buffer_length in buffers:
            if offset < 0 or buffer_length < 0 or offset + buffer_length > len(body):
                raise pa.ArrowInvalid("buffer outside the message body")
            if compressed and buffer_length >= 8:
                # A compressed buffer starts with its decompressed length (-1: stored as is).
                (decoded,) = struct.unpack_from("<q", body, offset)
                size += buffer_length if decoded < 0 else decoded
            else:
                size += buffer_length
        if rows > MAX_ROWS_PER_BATCH:
            raise SchemaError(f"{name}: more than {MAX_ROWS_PER_BATCH} rows")
        if size > MAX_DECODED_BYTES:
            raise SchemaError(f"{name}: decodes to more than {MAX_DECODED_BYTES} bytes")


# Arrow's Message.fbs: the Message table's fields, its header union's record batch types.
_HEADER_TYPE, _HEADER, _BODY_LENGTH = 1, 2, 3
_DICTIONARY_BATCH, _RECORD_BATCH = 2, 3


def _record_batch_header(metadata: bytes) -> tuple[int, list[tuple[int, int]], bool] | None:
    """(rows, buffers as (offset, length), compressed) of a record or dictionary batch
    message, from its flatbuffer metadata; None for other messages."""
    meta = _Flatbuffer(metadata)
    root = meta.root()
    kind = meta.scalar(root, _HEADER_TYPE, "<B")
    if kind not in (_DICTIONARY_BATCH, _RECORD_BATCH):
        return None
    batch = meta.table(root, _HEADER)
    if kind == _DICTIONARY_BATCH:  # DictionaryBatch: id, data (a RecordBatch), isDelta
        batch = meta.table(batch, 1)
    # RecordBatch: length, nodes, buffers (structs of two int64), compression
    buffers = meta.vector(batch, 2, 16)
    pairs = list(struct.iter_unpack("<qq", meta.data[buffers.start : buffers.stop]))
    return meta.scalar(batch, 0, "<q"), pairs, meta.offset(batch, 3) != 0


class _Flatbuffer:
    """Just enough of the flatbuffers format to read Arrow IPC message metadata."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def _u32(self, at: int) -> int:
        if not 0 <= at <= len(self.data) - 4:
            raise pa.ArrowInvalid("flatbuffer offset out of range")
        return struct.unpack_from("<I", self.data, at)[0]

    def root(self) -> int:
        return self._u32(0)

    def offset(self, table: int, field: int) -> int:
        """Where a table's field is, relative to the table; 0 when absent."""
        vtable = table - struct.unpack_from("<i", self.data, table)[0]
        entry = 4 + 2 * field
        if not 0 <= vtable <= len(self.data) - 4:
            raise pa.ArrowInvalid("flatbuffer vtable out of range")
        if entry >= struct.unpack_from("<H", self.data, vtable)[0]:
            return 0
        return struct.unpack_from("<H", self.data, vtable + entry)[0]

    def scalar(self, table: int, field: int, fmt: str) -> int:
        at = self.offset(table, field)
        return struct.unpack_from(fmt, self.data, table + at)[0] if at else 0

    def table(self, table: int, field: int) -> int:
        at = self.offset(table, field)
        if not at:
            raise pa.ArrowInvalid("flatbuffer table missing")
        return table + at + self._u32(table + at)

    def vector(self, table: int, field: int, element: int) -> range:
        """Positions of a vector's elements of `element` bytes each."""
        at = self.offset(table, field)
        if not at:
            return range(0)
        start = table + at + self._u32(table + at)
        count = self._u32(start)
        if start + 4 + count * element > len(self.data):
            raise pa.ArrowInvalid("flatbuffer vector out of range")
        return range(start + 4, start + 4 + count * element, element)


def printable(name: str) -> str:
    """A name as the contract accepts it: control characters become `?`."""
    return _CONTROL.sub("?", name)


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
