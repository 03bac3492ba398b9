"""Read-only, sandboxed SQL over profiles.

Only single SELECT (or EXPLAIN) statements run; the database they run on has external
access (files, network, ATTACH, extensions) disabled and its configuration locked, so a
query can neither write nor read anything but the profile tables.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pyarrow as pa

DEFAULT_TIMEOUT_S = 60.0
ALLOWED_STATEMENTS = frozenset({duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN})


class QueryError(ValueError):
    """A query that was refused or failed; str() is one line for the user."""


def one_line(exc: BaseException) -> str:
    """DuckDB messages can span lines (hints, a caret under the query); users get one."""
    text = str(exc).split("\nLINE ")[0]
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


_MEMORY = re.compile(r"^\d+(\.\d+)?\s*([KMGT]i?B|B)$", re.IGNORECASE)


def lock_down(
    conn: duckdb.DuckDBPyConnection,
    memory_limit: str | None = None,
    readable_dirs: Iterable[str | Path] = (),
    max_spill_bytes: int | None = None,
) -> None:
    """Forbid file/network access and freeze settings for the whole database instance.

    `memory_limit` (e.g. "2GB") is DuckDB's: it bounds the buffer memory of the whole
    instance, every connection and query on it together, not one query (DuckDB's
    per-connection `operator_memory_limit` cannot be set globally, nor on a query's cursor
    once the configuration is locked). Sorts, joins and aggregates past it spill to the
    temporary directory, at most `max_spill_bytes` (DuckDB's `max_temp_directory_size`).
    `readable_dirs` stay accessible (the Parquet lake the views read).
    """
    if readable_dirs:
        # The trailing slash keeps a sibling such as `lake2` out.
        dirs = ", ".join(
            "'" + f"{Path(d).resolve()}/".replace("'", "''") + "'" for d in readable_dirs
        )
        conn.execute(f"SET allowed_directories = [{dirs}]")
    if memory_limit:
        if not _MEMORY.match(memory_limit):
            raise QueryError(f"bad memory limit {memory_limit!r}: use e.g. 512MB, 2GB, 1.5GiB")
        conn.execute(f"SET memory_limit = '{memory_limit}'")
    if max_spill_bytes is not None:
        conn.execute(f"SET max_temp_directory_size = '{int(max_spill_bytes)}B'")
    conn.execute("SET enable_external_access = false")
    conn.execute("SET lock_configuration = true")


def open_read_only(path: str | Path, memory_limit: str | None = None) -> duckdb.DuckDBPyConnection:
    """Open a profile database file for queries only."""
    if not Path(path).exists():
        raise QueryError(f"no profile database at {path}")
    try:
        conn = duckdb.connect(str(path), read_only=True)
    except duckdb.Error as exc:
        raise QueryError(
            f"cannot open {path}: {one_line(exc)} "
            "(is an aggregator writing it? query it with --aggregator instead)"
        ) from exc
    try:
        lock_down(conn, memory_limit, _sealed_lake_roots(conn))
    except QueryError:
        conn.close()
        raise
    return conn


def _sealed_lake_roots(conn: duckdb.DuckDBPyConnection) -> list[str]:
    """The lake directories holding files the database's views read (aggregator/storage.py)."""
    try:
        return [
            root for (root,) in conn.execute("SELECT DISTINCT lake FROM sealed_files").fetchall()
        ]
    except duckdb.CatalogException:  # not a profile database, or one from before the lake
        return []


def check_read_only(conn: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Refuse anything but exactly one SELECT/EXPLAIN statement."""
    try:
        statements = conn.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryError(one_line(exc)) from exc
    if len(statements) != 1:
        raise QueryError(f"expected exactly one SQL statement, got {len(statements)}")
    kind = statements[0].type
    if kind not in ALLOWED_STATEMENTS:
        # DuckDB files INSTALL under LOAD and CHECKPOINT under CALL: the user's own keyword
        # says what was refused (but not WITH, which opens a DELETE as well as a SELECT)
        words = statements[0].query.upper().split(maxsplit=2)[:2]
        word = " ".join(words) if words[:1] == ["FORCE"] else "".join(words[:1])
        name = word if word.replace(" ", "").isalpha() and word != "WITH" else kind.name
        raise QueryError(f"refused: {name} statements are not allowed; queries are read-only")


@contextmanager
def run_query(
    conn: duckdb.DuckDBPyConnection,
    sql: str,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    rows_per_batch: int = 65_536,
    prepare: Callable[[duckdb.DuckDBPyConnection, str], None] | None = None,
    on_end: Callable[[Callable[[], None]], object] | None = None,
) -> Iterator[pa.RecordBatchReader]:
    """Run a read-only query on a cursor of its own and stream its result as Arrow batches.

    The timeout covers the whole run, including the caller consuming the stream.
    `prepare(cursor, sql)` runs on that cursor first (query.access limits it to a scope).
    `on_end(interrupt)` registers a function that stops the query for when its client goes
    away (gRPC's context.add_callback; it also runs when the server stops).
    """
    cursor = conn.cursor()
    timed_out = threading.Event()

    def interrupt() -> None:
        with contextlib.suppress(duckdb.Error):  # the cursor may be closed by then
            cursor.interrupt()

    def time_out() -> None:
        timed_out.set()
        interrupt()

    if on_end:
        on_end(interrupt)
    timer = threading.Timer(timeout_s, time_out)
    try:
        check_read_only(cursor, sql)
        if prepare:
            prepare(cursor, sql)
        timer.start()
        try:
            reader = cursor.sql(sql).to_arrow_reader(rows_per_batch)
        except duckdb.Error as exc:
            raise _query_error(exc, timeout_s, timed_out.is_set()) from exc
        try:
            yield reader
        except (duckdb.Error, pa.ArrowException) as exc:
            raise _query_error(exc, timeout_s, timed_out.is_set()) from exc
        except OSError as exc:
            if exc.errno is not None:
                raise  # the caller's own (a closed pipe, a full disk)
            # pyarrow's reader raises DuckDB's errors while streaming as OSError
            raise _query_error(exc, timeout_s, timed_out.is_set()) from exc
    finally:
        timer.cancel()
        cursor.close()


OUT_OF_MEMORY = "Out of Memory Error"


def _query_error(exc: BaseException, timeout_s: float, timed_out: bool) -> QueryError:
    if timed_out or isinstance(exc, duckdb.InterruptException):
        reading = "(reading its result counts)"
        return QueryError(f"query stopped after the {timeout_s:g} s timeout {reading}")
    first = str(exc).split("\n", 1)[0]
    if first.startswith(OUT_OF_MEMORY):
        # DuckDB's hints (SET threads, SET memory_limit) are not the user's to follow.
        if "offload" in first:  # writing to the temporary directory failed: its cap
            problem = "it would spill more to disk than allowed (aggregator --max-spill)"
        else:
            problem = "it needs more memory than the memory limit allows (--memory-limit)"
        return QueryError(f"query stopped: {problem}; select less: {first}")
    return QueryError(one_line(exc))
