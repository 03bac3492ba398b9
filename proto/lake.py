"""The lake: closed hours of profiles as Parquet files, the storage contract shared by
aggregators (which write it) and every reader of it (fleetprof query, Spark).

    LAKE/<table>/date=YYYY-MM-DD/hour=HH/<aggregator>.parquet      first file of that hour
    LAKE/<table>/date=YYYY-MM-DD/hour=HH/<aggregator>_<n>.parquet  later ones (late batches,
                                                                   downsampled rewrites)

Dates and hours are UTC; the hour is the hour of `ts` (for stacks: of the samples that
reference them). Each file is written once under a hidden temporary name in its directory
and renamed into place, so a reader listing `*.parquet` never sees a partial file. An
aggregator writes and deletes only files carrying its own name. Each file carries the
Parquet key-value metadata MARKER: a samples file without it was written before events
were split (io/block, lock/wait: docs/events.md "Older data"), and its readers convert its
events as they read it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa

from fleetprof.proto import schema


def _stored(wire: pa.Schema) -> list[pa.Field]:
    """A wire table's fields as stored: ts, then who sent it (schema.ORIGIN's node), the
    wire's other fields, then the agent."""
    node, agent = schema.ORIGIN
    return [wire.field("ts"), node, *(f for f in wire if f.name != "ts"), agent]


# The fields of each table's files, in order: those of the SQL views of the same name.
# (Samples of schema version 1 come first, as they did before version 2's labels.)
FIELDS: dict[str, list[pa.Field]] = {
    "samples": _stored(schema.SAMPLES_V1)
    + [f for f in schema.SAMPLES if f.name not in schema.SAMPLES_V1.names],
    # The stacks referenced by the same hour's samples: one stack is in many files, so
    # readers keep one row per stack_id (stack ids are hashes of the frames).
    "stacks": list(schema.STACKS),
    "io_latency": _stored(schema.IO_LATENCY),
    "processes": _stored(schema.PROCESSES),
}
COLUMNS: dict[str, tuple[str, ...]] = {
    table: tuple(f.name for f in fields) for table, fields in FIELDS.items()
}
TABLES = tuple(COLUMNS)
# Columns the SQL views add to a table's files, each with the DuckDB expression over a
# file's columns (as `f`) that makes it. `flame_key` names a (stack_id, comm) pair with one
# integer, the key flame graphs group rows by: aggregators store it with each row, so that
# grouping costs what GROUP BY stack_id does (grouping by both cost a quarter more). Any two
# pairs sharing a key would be as unlikely as two stacks sharing an id.
COMM_KEY = "(hash(f.comm) >> 1)::BIGINT"
DERIVED: dict[str, dict[str, str]] = {
    "samples": {"flame_key": f"xor(f.stack_id, {COMM_KEY})"},
}
# The DuckDB type of every column of the views (a name has one type in all).
COLUMN_TYPES: dict[str, str] = {
    **{f.name: schema.sql_type(f) for fields in FIELDS.values() for f in fields},
    "flame_key": "BIGINT",
}
# The frames view over a table of stacks: one row per frame, depth 0 the root.
FRAMES_SQL = """
    SELECT stack_id,
           unnest(range(len(frames)))::INTEGER AS depth,
           unnest(frames) AS function,
           unnest(modules) AS module,
           unnest(kinds) AS kind
    FROM {stacks}"""
# Row order inside a file: groups equal values (compression) and lets readers skip row
# groups of other events and jobs by their min/max statistics.
SORT_KEYS: dict[str, tuple[str, ...]] = {
    "samples": ("event", "job", "stack_id", "node", "pid", "tid", "ts"),
    "stacks": ("stack_id",),
    "io_latency": ("node", "device", "op", "pid", "bucket_le_ns", "ts"),
    "processes": ("node", "pid", "ts"),
}
HOUR = timedelta(hours=1)
# Key-value metadata of every file written since `io`/`block` and `lock`/`wait` are apart.
MARKER = ("fleetprof_events", "split")
# DuckDB's COPY options of a lake file.
COPY_OPTIONS = f"FORMAT parquet, COMPRESSION zstd, KV_METADATA {{{MARKER[0]}: '{MARKER[1]}'}}"
# Aggregator names: host-name characters, so `_` can separate the file number.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,127}$")
_FILE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9.-]*)(?:_(?P<n>[1-9]\d*))?\.parquet$")
_DIR = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")
_HOUR_DIR = re.compile(r"^hour=(\d{2})$")


@dataclass(frozen=True)
class LakeFile:
    """One file of the lake, as its path names it."""

    table: str
    hour: datetime  # UTC start of the hour
    aggregator: str
    number: int  # 0 for `<aggregator>.parquet`


def check_name(name: str) -> str:
    """An aggregator name fit for file names (letters, digits, `.`, `-`), or ValueError."""
    if not _NAME.match(name):
        raise ValueError(
            f"bad aggregator name {name!r}: use letters, digits, '.' and '-' (a host name)"
        )
    return name


def hour_start(ts: datetime) -> datetime:
    """The UTC hour a timestamp falls in."""
    return ts.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def partition_dir(lake: str | Path, table: str, hour: datetime) -> Path:
    hour = hour.astimezone(UTC)
    return Path(lake) / table / f"date={hour:%Y-%m-%d}" / f"hour={hour:%H}"


def file_path(lake: str | Path, table: str, hour: datetime, aggregator: str, number: int) -> Path:
    name = f"{aggregator}.parquet" if number == 0 else f"{aggregator}_{number}.parquet"
    return partition_dir(lake, table, hour) / name


def parse_path(path: str | Path) -> LakeFile | None:
    """What a lake file's path says (None for anything else, e.g. a temporary file)."""
    path = Path(path)
    file, hour_dir, date_dir = _FILE.match(path.name), _HOUR_DIR.match(path.parent.name), None
    if path.parent.parent.name:
        date_dir = _DIR.match(path.parent.parent.name)
    table = path.parent.parent.parent.name
    if not (file and hour_dir and date_dir and table in COLUMNS):
        return None
    hour = datetime.fromisoformat(date_dir[1]).replace(hour=int(hour_dir[1]), tzinfo=UTC)
    return LakeFile(table, hour, file["name"], int(file["n"] or 0))


def table_glob(lake: str | Path, table: str) -> str:
    """Every file of one table, as a glob for DuckDB's read_parquet or Spark's load."""
    return f"{Path(lake)}/{table}/date=*/hour=*/*.parquet"


def read_sql(files: str | Sequence[str | Path]) -> str:
    """DuckDB's read_parquet over a glob or a list of files of one table (without the
    date/hour columns of the directory names)."""
    source = _quote(files) if isinstance(files, str) else _list(files)
    return f"read_parquet({source}, hive_partitioning = false)"


def view_columns(table: str) -> tuple[str, ...]:
    """The columns of a table's SQL view: its files' and the DERIVED ones."""
    return COLUMNS[table] + tuple(DERIVED.get(table, {}))


def scan_sql(table: str, files: str | Sequence[str | Path], new_events: str | None = None) -> str:
    """DuckDB SQL selecting one table's view columns (qualified, so the query can sit in a
    view that table macros with same-named parameters use) from a glob or a list of files;
    stacks keep one row per stack_id. `new_events` names a table (stack_id, event,
    new_event) of the samples' events to replace (files without MARKER)."""
    distinct = "DISTINCT ON (f.stack_id) " if table == "stacks" else ""
    columns = [f"f.{c}" for c in COLUMNS[table]]
    columns += [f"{sql} AS {name}" for name, sql in DERIVED.get(table, {}).items()]
    join = ""
    if new_events is not None:
        columns[COLUMNS[table].index("event")] = "coalesce(n.new_event, f.event) AS event"
        join = f" LEFT JOIN {new_events} n ON n.stack_id = f.stack_id AND n.event = f.event"
    return f"SELECT {distinct}{', '.join(columns)} FROM {read_sql(files)} f{join}"


def unmarked_sql(files: Sequence[str | Path]) -> str:
    """DuckDB SQL listing those of `files` (non-empty) that lack MARKER (`path` column)."""
    marked = (
        f"SELECT file_name FROM parquet_kv_metadata({_list(files)}) "
        f"WHERE decode(key) = {_quote(MARKER[0])} AND decode(value) = {_quote(MARKER[1])}"
    )
    return f"SELECT unnest({_list(files)}) AS path EXCEPT {marked}"


def _list(files: Sequence[str | Path]) -> str:
    return "[" + ", ".join(_quote(str(f)) for f in files) + "]"


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
