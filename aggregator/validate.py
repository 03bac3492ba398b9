"""Checks every ingest batch before anything is stored: schema, version, sizes, values.

The checks are functions another ingest path (the OTLP receiver) calls too: check_identifier
for names, check_time_window, check_weights and StreamStacks for what a stream may refer to.
"""

from __future__ import annotations

import re
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fleetprof.aggregator.id_set import IdSet
from fleetprof.aggregator.label_sets import ROW_LABELS, RowLabels, group_labels
from fleetprof.proto import schema
from fleetprof.proto.ingest.v1 import ingest_pb2

MAX_ID_CHARS = 256
# Agents' clocks may run a little ahead; far-future rows would escape retention.
MAX_CLOCK_SKEW = timedelta(minutes=10)
# A spool holds batches through an outage, not for ever; older rows would be sealed into
# hours long closed (a 1970 timestamp into the lake).
MAX_SAMPLE_AGE = timedelta(days=7)
_CONTROL = re.compile(schema.CONTROL_CHARACTERS)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_NO_BYTES = np.empty(0, np.uint8)
_NO_INTS = np.empty(0, np.int64)
_FREE_LABELS = tuple(label for label in ROW_LABELS if label != "event")
_TICKS_PER_SECOND = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}


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
    grouped: RowLabels | None  # the samples' label_sets.group_labels, None: not made


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
    grouped = _check_samples(samples)
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
        grouped,
    )


def check_identifier(name: str, value: str) -> None:
    """A node, agent or incarnation name: 1 to MAX_ID_CHARS characters, none a control."""
    if not value or len(value) > MAX_ID_CHARS:
        raise schema.SchemaError(f"{name} must have 1 to {MAX_ID_CHARS} characters")
    if _CONTROL.search(value):
        raise schema.SchemaError(f"{name} {value[:64]!r} has control characters")


def check_text(
    name: str, table: pa.Table, columns: Iterable[str], grouped: RowLabels | None = None
) -> None:
    """String columns without control characters (labels are names, like identifiers).
    With `grouped`, the table's label_sets.group_labels, the distinct values alone are looked
    at (a batch has a few dozen): every byte of the rows is in them unless null rows hold
    some (hostile offsets), and then the rows' bytes are. Otherwise the bytes are looked at
    together first: when all are printable ASCII, as names nearly always are, that is one
    copy and two passes for every column."""
    if grouped is not None and all(_bytes_of(table, c, grouped) for c in columns):
        for column in columns:
            if _CONTROL.search("".join(v for v in grouped.values[column] if v is not None)):
                raise schema.SchemaError(f"{name}: {column} has control characters")
        return
    texts = [(column, _utf8(chunk)) for column in columns for chunk in table[column].chunks]
    texts = [(column, text) for column, text in texts if len(text)]
    if not texts:
        return
    together = np.concatenate([text for _, text in texts]) if len(texts) > 1 else texts[0][1]
    if together.min() >= 0x20 and together.max() < 0x7F:
        return
    for column, text in texts:
        if _has_control(text):
            raise schema.SchemaError(f"{name}: {column} has control characters")


def _bytes_of(table: pa.Table, column: str, grouped: RowLabels) -> bool:
    """Whether the distinct values of `column` hold every byte of its rows' values: without
    null rows they do; with some, when the bytes the rows' offsets span are their values'
    (a client may put bytes under a null row)."""
    if not table[column].null_count:
        return True
    spanned = sum(len(_utf8(chunk)) for chunk in table[column].chunks)
    values = zip(grouped.values[column], grouped.rows, strict=True)
    return spanned == sum(len(value.encode()) * rows for value, rows in values if value)


def _utf8(strings: pa.Array) -> np.ndarray:
    """The bytes of a string array's values, as numpy (no copy)."""
    _, offsets, data = strings.buffers()
    if data is None or not len(strings):
        return _NO_BYTES
    (start,) = struct.unpack_from("<i", offsets, 4 * strings.offset)
    (end,) = struct.unpack_from("<i", offsets, 4 * (strings.offset + len(strings)))
    return np.frombuffer(data, np.uint8, end - start, start)


def _has_control(text: np.ndarray) -> bool:
    """Whether UTF-8 bytes hold a control character (a regex per value costs ~50 times
    more): C0 and DEL as bytes, C1 as 0xC2 0x80-0x9F."""
    if ((text < 0x20) | (text == 0x7F)).any():
        return True
    lead = np.flatnonzero(text[:-1] == 0xC2)
    return bool(((text[lead + 1] >= 0x80) & (text[lead + 1] <= 0x9F)).any())


def check_time_window(name: str, table: pa.Table, now: datetime | None = None) -> None:
    """Row timestamps (`ts`) within [now - MAX_SAMPLE_AGE, now + MAX_CLOCK_SKEW]: the
    column's least and greatest values against the bounds, as integers of its unit."""
    column = table["ts"]
    bounds = _min_max(column)
    if bounds is None:
        return
    earliest, latest = bounds
    per_second = _TICKS_PER_SECOND[column.type.unit]
    now_ns = time.time_ns() if now is None else (now - _EPOCH) // _MICROSECOND * 1000
    latest_ns = now_ns + MAX_CLOCK_SKEW // _MICROSECOND * 1000
    if latest > latest_ns * per_second // 10**9:
        raise schema.SchemaError(f"{name}: timestamp {_iso(latest, column.type)} is in the future")
    earliest_ns = now_ns - MAX_SAMPLE_AGE // _MICROSECOND * 1000
    if earliest < -(-earliest_ns * per_second // 10**9):  # rounded up
        raise schema.SchemaError(
            f"{name}: timestamp {_iso(earliest, column.type)} is older than "
            f"{MAX_SAMPLE_AGE.days} days"
        )


def _iso(value: int, ts_type: pa.TimestampType) -> str:
    ts = pa.scalar(value, ts_type)
    try:
        return ts.as_py().isoformat()
    except (OverflowError, ValueError):  # past datetime's years 1-9999
        return f"{value} {ts_type.unit} from 1970"


def _min_max(column: pa.ChunkedArray) -> tuple[int, int] | None:
    """The least and greatest non-null values of a 64-bit integer or timestamp column, as
    integers (None: no values)."""
    chunks = _non_null(column)
    if not chunks:
        return None
    return int(min(c.min() for c in chunks)), int(max(c.max() for c in chunks))


def _non_null(column: pa.ChunkedArray) -> list[np.ndarray]:
    """The non-empty chunks of a 64-bit integer or timestamp column, without their nulls."""
    chunks = []
    for chunk in column.chunks:
        if chunk.null_count:  # not in decoded batches (decode refuses them): the rare path
            chunk = chunk.drop_null()
        if len(chunk):
            chunks.append(_int64s(chunk))
    return chunks


def check_weights(samples: pa.Table) -> None:
    """Weights in [0, schema.MAX_WEIGHT of the event's unit]: a poisoned weight could otherwise
    dwarf a fleet's profile (or overflow sums). First one pass for all: read unsigned, a
    negative weight is past every bound."""
    chunks = _non_null(samples["weight"])
    lightest_bound = min(schema.MAX_WEIGHT.values())
    if not chunks or max(c.view(np.uint64).max() for c in chunks) <= lightest_bound:
        return
    low, high = _min_max(samples["weight"])
    if low < 0:
        raise schema.SchemaError("samples: negative weight")
    if high <= lightest_bound:
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
        used = _values(samples["stack_id"])
        if not stacks.num_rows:  # as most batches: no stacks, all of them sent before
            if not self._sent.contains_all(used):
                self._refuse(used[~self._sent.contains(used)])
            return
        new = _values(stacks["stack_id"])
        unsent = used[~self._sent.contains(used)]
        if len(unsent):
            self._refuse(unsent[~np.isin(unsent, new)])
        self._sent.add(new)

    @staticmethod
    def _refuse(unsent: np.ndarray) -> None:
        if len(unsent):
            raise schema.SchemaError(
                f"samples: stack {int(unsent[0])} was never sent on this stream"
            )


def _values(column: pa.ChunkedArray) -> np.ndarray:
    """A 64-bit column without nulls as numpy, without a copy when it is one chunk (decoded)."""
    if column.num_chunks == 1:
        return _int64s(column.chunk(0))
    return np.concatenate([_int64s(chunk) for chunk in column.chunks] or [_NO_INTS])


def _int64s(chunk: pa.Array) -> np.ndarray:
    """The values buffer of a 64-bit integer or timestamp array as int64, in place (a null's
    slot holds anything): pyarrow's to_numpy and min_max cost several times more per call."""
    if not len(chunk):
        return _NO_INTS
    return np.frombuffer(chunk.buffers()[1], np.int64, len(chunk), 8 * chunk.offset)


def _check_known(name: str, table: pa.Table, column: str, known: Iterable[str]) -> None:
    unknown = set(pc.unique(table[column].drop_null()).to_pylist()) - set(known)
    if unknown:
        raise schema.SchemaError(f"{name}: unknown {column} {sorted(unknown)[0]!r}")


def _check_lengths(name: str, table: pa.Table, columns: tuple[str, ...]) -> None:
    for column in columns:
        if (pc.max(pc.binary_length(table[column])).as_py() or 0) > schema.MAX_STRING_BYTES:
            raise schema.SchemaError(f"{name}: {column} longer than {schema.MAX_STRING_BYTES}")


def _check_samples(samples: pa.Table) -> RowLabels | None:
    """Check the rows; their label_sets.group_labels, which the store numbers (None: no
    rows, or a label that is not UTF-8: the store groups them again and fails, as before)."""
    if samples.num_rows == 0:
        return None
    check_time_window("samples", samples)
    _check_known("samples", samples, "event", schema.EVENT_UNITS)
    check_weights(samples)
    _check_lengths("samples", samples, ROW_LABELS)
    try:
        grouped: RowLabels | None = group_labels(samples)
    except UnicodeDecodeError:
        grouped = None
    # `event` is one of EVENT_UNITS' names (above): no control characters to look for
    check_text("samples", samples, _FREE_LABELS, grouped)
    return grouped


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
