"""One fleet over several aggregators and the Parquet lake: every sample seen once.

Each aggregator keeps its open hours in DuckDB and seals closed ones into the shared lake
(aggregator/partitions.py). Its views show both, from one snapshot; `live_<view>` shows
the DuckDB part alone, and `lake_files` the files it sealed, updated in the transaction
that deletes their rows (the file is renamed into place just before).

- A query whose rows add up (a flame graph's weight per stack: `read_parts`) runs where
  the data is: the same SQL on every aggregator, over all it ever stored, and here on the
  lake files of aggregators not queried (decommissioned ones); only results travel.
- Any other SQL (`stream`) runs here, in an in-process DuckDB locked down like every query
  but allowed to read the lake: its views are the aggregators' live rows plus the lake
  files. A queried aggregator's files are read only if its `lake_files` lists them (one
  not listed yet is a seal in progress: its rows are still live); the list is read before
  and after the live rows, which are fetched again if a seal happened in between.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import duckdb
import pyarrow as pa

from fleetprof.aggregator.old_events import PARAMETERS, new_events_sql
from fleetprof.proto import lake as layout
from fleetprof.proto.security import ClientSecurity
from fleetprof.query.sandbox import (
    DEFAULT_TIMEOUT_S,
    QueryError,
    check_read_only,
    lock_down,
    run_query,
)
from fleetprof.query.source import AggregatorSource, ProfileSource

# A query racing one seal after another gives up after this many tries.
SEAL_RETRIES = 5

T = TypeVar("T")


@dataclass(frozen=True)
class Sealed:
    """An aggregator's name in the lake (None: it has sealed nothing) and the files it
    has sealed, relative to the lake."""

    name: str | None
    paths: frozenset[str]


class FleetSource:
    """The lake (optional) plus live aggregators (any number), as one profile source."""

    def __init__(
        self,
        lake: str | Path | None,
        aggregators: Sequence[str],
        security: ClientSecurity | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        memory_limit: str | None = None,
    ) -> None:
        if lake is None and not aggregators:
            raise QueryError("give --lake DIR, --aggregator HOST:PORT[,...], or both")
        if lake is not None and not Path(lake).is_dir():
            raise QueryError(f"no lake directory at {lake}")
        self._lake = Path(lake).resolve() if lake is not None else None
        self._timeout_s = timeout_s
        self._memory_limit = memory_limit
        self._live = [AggregatorSource(a, timeout_s, security) for a in aggregators]

    def close(self) -> None:
        for live in self._live:
            live.close()

    @contextmanager
    def stream(self, sql: str) -> Iterator[pa.RecordBatchReader]:
        """Any read-only SQL over the whole fleet: the aggregators' rows of the tables it
        names are fetched, then the query runs here over them and the lake."""
        with duckdb.connect() as scratch:
            check_read_only(scratch, sql)  # refused before anything is fetched
        needed = referenced_tables(sql)
        if self._lake is None:  # each aggregator's whole views: its sealed hours too
            fetched = [
                (_tables(live, needed, ""), Sealed(None, frozenset())) for live in self._live
            ]
        else:
            fetched = [
                self._consistently(live, lambda src: _tables(src, needed)) for live in self._live
            ]
        conn = self._connect(
            [tables for tables, _ in fetched],
            lambda path: all(
                sealed.name is None or _writer(path) != sealed.name or path in sealed.paths
                for _, sealed in fetched
            ),
        )
        try:
            with run_query(conn, sql, self._timeout_s) as reader:
                yield reader
        finally:
            conn.close()

    def read_parts(self, sql: str) -> pa.Table:
        """A query whose rows add up, on each aggregator and on the lake files no queried
        aggregator wrote; the results concatenated (equal keys of two parts: two rows)."""
        results = [_read(live, sql) for live in self._live]
        if self._lake is not None:
            queried = {_sealed(live).name for live in self._live}
            conn = self._connect([], lambda path: _writer(path) not in queried)
            try:
                with run_query(conn, sql, self._timeout_s) as reader:
                    results.append(reader.read_all())
            finally:
                conn.close()
        return pa.concat_tables(results, promote_options="permissive")

    def _consistently(
        self, live: AggregatorSource, run: Callable[[AggregatorSource], T]
    ) -> tuple[T, Sealed]:
        """`run` on an aggregator, and the files it had sealed then (same before and after)."""
        for _ in range(SEAL_RETRIES):
            before = _sealed(live)
            result = run(live)
            if _sealed(live) == before:
                return result, before
        raise QueryError(f"aggregator {live.address} kept sealing during the query; try again")

    def _connect(
        self, live: list[dict[str, pa.Table]], read: Callable[[str], bool]
    ) -> duckdb.DuckDBPyConnection:
        """An in-memory database whose views are the live rows and the lake files (paths
        relative to the lake) that `read` accepts."""
        conn = duckdb.connect()
        # samples last: files of old events are read with their stacks
        for table in sorted(layout.TABLES, key=lambda t: t == "samples"):
            parts = []
            if self._lake is not None:
                files = [self._lake / f for f in _lake_files(self._lake, table) if read(f)]
                parts += _lake_scans(conn, table, files) or [_empty(table)]
            for i, tables in enumerate(t for t in live if table in t):
                conn.register("fetched", tables[table])
                conn.execute(f"CREATE TABLE live_{i}_{table} AS SELECT * FROM fetched")
                conn.unregister("fetched")
                parts.append(f"SELECT {_columns(table)} FROM live_{i}_{table}")
            union = " UNION ALL ".join(parts) or _empty(table)
            if table == "stacks":  # a stack is in several aggregators' files and tables
                union = f"SELECT DISTINCT ON (stack_id) * FROM ({union})"
            conn.execute(f"CREATE VIEW {table} AS {union}")
        conn.execute(f"CREATE VIEW frames AS {layout.FRAMES_SQL.format(stacks='stacks')}")
        lock_down(conn, self._memory_limit, [self._lake] if self._lake else [])
        return conn


def referenced_tables(sql: str) -> set[str]:
    """The lake tables a query may read (a name in a comment or a string counts too: that
    only fetches more than needed)."""
    words = set(re.findall(r"[a-z_]+", sql.lower()))
    if "frames" in words:  # the view over stacks
        words.add("stacks")
    return words & set(layout.TABLES)


def _lake_scans(conn: duckdb.DuckDBPyConnection, table: str, files: list[Path]) -> list[str]:
    """The SQL reading lake files of a table; samples files of agents before events were
    split (without MARKER) are read with their events converted (aggregator/old_events.py),
    by the stacks of the view `stacks`."""
    if not files:
        return []
    old = set()
    if table == "samples":
        old = {Path(p) for (p,) in conn.execute(layout.unmarked_sql(files)).fetchall()}
    new = [f for f in files if f not in old]
    scans = [layout.scan_sql(table, new)] if new else []
    if old:
        rows = f"SELECT stack_id, event FROM {layout.read_sql(sorted(old))}"
        new_events = new_events_sql(rows, "stacks")
        conn.execute(f"CREATE TABLE old_event_stacks AS {new_events}", PARAMETERS)
        scans.append(layout.scan_sql(table, sorted(old), "old_event_stacks"))
    return scans


def _lake_files(lake: Path, table: str) -> list[str]:
    return sorted(str(Path(p).relative_to(lake)) for p in glob.glob(layout.table_glob(lake, table)))


def _writer(path: str) -> str | None:
    """The aggregator that sealed a lake file (None: not a lake file's name)."""
    parsed = layout.parse_path(path)
    return parsed.aggregator if parsed else None


def _columns(table: str) -> str:
    return ", ".join(layout.view_columns(table))


def _empty(table: str) -> str:
    """The table's columns and no row."""
    typed = ", ".join(f"NULL::{layout.COLUMN_TYPES[c]} AS {c}" for c in layout.view_columns(table))
    return f"SELECT {typed} WHERE false"


def _read(source: AggregatorSource, sql: str) -> pa.Table:
    with source.stream(sql) as reader:
        return reader.read_all()


def _tables(live: AggregatorSource, needed: set[str], prefix: str = "live_") -> dict[str, pa.Table]:
    """Some of an aggregator's tables: its rows (`live_`: those not sealed yet), its stacks."""
    views = {table: table if table == "stacks" else prefix + table for table in needed}
    return {table: _read(live, f"SELECT {_columns(table)} FROM {views[table]}") for table in needed}


def _sealed(live: AggregatorSource) -> Sealed:
    """What an aggregator has sealed. Its name comes with its files: until its first seal
    is recorded, a file of that seal is read from the lake and its rows live as well."""
    files = _read(live, "SELECT name, path FROM lake_files")
    names = set(files["name"].to_pylist())
    return Sealed(names.pop() if names else None, frozenset(files["path"].to_pylist()))


def read_parts(source: ProfileSource, sql: str) -> pa.Table:
    """The whole result of a query whose rows add up; from a fleet, each part's rows."""
    if isinstance(source, FleetSource):
        return source.read_parts(sql)
    with source.stream(sql) as reader:
        return reader.read_all()
