"""The aggregator's DuckDB database: its tables (derived from the contract's schemas in
proto/), the documented views and macros (docs/sql.md), and the migrations of databases of
earlier releases. The write path is aggregator/storage.py."""

from __future__ import annotations

import duckdb
import pyarrow as pa

from fleetprof.aggregator.label_sets import LABELS, convert_wide_rows
from fleetprof.aggregator.old_events import convert_old_events
from fleetprof.proto import lake, schema
from fleetprof.query.filters import saturating

_SAMPLE_FIELDS = {f.name: f for f in lake.FIELDS["samples"]}
_LABEL_SET = pa.field("label_set", pa.int32(), nullable=False)
# The row tables, from the contract's schemas (proto/): a sample row's labels (those of its
# process and batch) once per distinct set (aggregator/label_sets.py), the rest of it with
# lake.DERIVED's flame_key and its set's number; stacks, processes and I/O histograms as in
# the lake. Positional INSERTs (label_sets.py) rely on these column orders.
_ROW_TABLES = {
    "label_sets": [_LABEL_SET, *(_SAMPLE_FIELDS[name] for name in LABELS)],
    "sample_rows": [
        *(f for name, f in _SAMPLE_FIELDS.items() if name not in LABELS),
        pa.field("flame_key", pa.int64(), nullable=False),
        _LABEL_SET,
    ],
    "stack_rows": lake.FIELDS["stacks"],
    "process_rows": lake.FIELDS["processes"],
    "io_latency_rows": lake.FIELDS["io_latency"],
}
_DDL = (
    "".join(
        f"CREATE TABLE IF NOT EXISTS {table} (\n{schema.sql_columns(fields)}\n);\n"
        for table, fields in _ROW_TABLES.items()
    )
    + f"""
-- incarnation: incarnation_key() of the batch's, never the secret itself (a reader could
-- otherwise send batches as that agent process).
CREATE TABLE IF NOT EXISTS ingested_batches (
    agent_id VARCHAR NOT NULL,
    incarnation UBIGINT NOT NULL,
    sequence UBIGINT NOT NULL,
    node VARCHAR NOT NULL,
    received_at TIMESTAMPTZ NOT NULL,
    sample_rows BIGINT NOT NULL,
    PRIMARY KEY (agent_id, incarnation, sequence)
);
CREATE TABLE IF NOT EXISTS session_rows (
    session_id VARCHAR PRIMARY KEY,
    job VARCHAR NOT NULL,
    events VARCHAR[] NOT NULL,
    frequency INTEGER NOT NULL,
    started_at TIMESTAMPTZ NOT NULL,
    deadline TIMESTAMPTZ NOT NULL,
    state VARCHAR NOT NULL
);
-- Files sealed into the lake (aggregator/partitions.py), recorded in the transaction that
-- deletes their rows from the tables above; the views below read the tables and these.
CREATE TABLE IF NOT EXISTS sealed_files (
    name VARCHAR NOT NULL,  -- the aggregator's, in the file name
    lake VARCHAR NOT NULL,  -- the lake's root directory
    path VARCHAR NOT NULL,  -- relative to it (proto/lake.py)
    table_name VARCHAR NOT NULL,
    hour TIMESTAMPTZ NOT NULL,
    rows BIGINT NOT NULL,
    bytes BIGINT NOT NULL,
    downsampled BOOLEAN NOT NULL,
    sealed_at TIMESTAMPTZ NOT NULL
);
-- Files that may exist on disk and must go unless they are in sealed_files (a seal or
-- drop that crashed half-way): absolute paths, cleared by the next maintenance pass.
CREATE TABLE IF NOT EXISTS lake_pending (path VARCHAR NOT NULL);
-- The documented, stable SQL surface (docs/sql.md): samples, processes, io_latency and
-- their live_ twins are views made by refresh_views().
CREATE OR REPLACE VIEW lake_files AS
    SELECT name, table_name, hour, path, rows, bytes, downsampled FROM sealed_files;
CREATE OR REPLACE VIEW stacks AS
    SELECT stack_id, frames, modules, kinds FROM stack_rows;
-- On-demand per-job sessions (fleetprof profile): state is 'running' or 'done'.
CREATE OR REPLACE VIEW sessions AS
    SELECT session_id, job, events, frequency, started_at, deadline, state FROM session_rows;
-- One row per frame of a stack: depth 0 is the root (the outermost caller).
CREATE OR REPLACE VIEW frames AS {lake.FRAMES_SQL.format(stacks="stack_rows")};
"""
)
# Macros over the views (made after them).
_MACROS = f"""
-- The samples of one event in [since, until) (NULL: unbounded), optionally of one node,
-- pid or process name; the table macros below all select through it. The samples view
-- qualifies its columns: DuckDB would bind unqualified ones to these parameters.
CREATE OR REPLACE MACRO selected_samples(
    event, since := NULL, until := NULL, node := NULL, pid := NULL, comm := NULL
) AS TABLE
    SELECT s.* FROM samples s
    WHERE s.event = event
      AND s.ts >= coalesce(since::TIMESTAMPTZ, '-infinity'::TIMESTAMPTZ)
      AND s.ts < coalesce(until::TIMESTAMPTZ, 'infinity'::TIMESTAMPTZ)
      AND s.node = coalesce(node, s.node)
      AND s.pid = coalesce(pid, s.pid)
      AND s.comm = coalesce(comm, s.comm);
-- A flame graph as rows: one per distinct (process, stack), heaviest first; `folded` is
-- the flamegraph.pl line (process name as the root frame) without its weight.
CREATE OR REPLACE MACRO flame(
    event, since := NULL, until := NULL, node := NULL, pid := NULL, comm := NULL
) AS TABLE
    SELECT m.comm, m.stack_id, st.frames, st.kinds,
           array_to_string(list_prepend(m.comm, st.frames), ';') AS folded, m.weight
    FROM (
        SELECT s.comm, s.stack_id, {saturating("sum(s.weight)")} AS weight
        FROM selected_samples(event, since := since, until := until,
                              node := node, pid := pid, comm := comm) s
        GROUP BY ALL
    ) m
    JOIN stacks st USING (stack_id)
    ORDER BY m.weight DESC, folded;
-- Self (leaf) and total (inclusive) weight per function, heaviest self first; a function
-- recurring in a stack counts once in its total. Percentages are of the selection's total.
CREATE OR REPLACE MACRO top_functions(
    event, since := NULL, until := NULL, node := NULL, pid := NULL, comm := NULL
) AS TABLE
    WITH per_stack AS (
        SELECT s.stack_id, sum(s.weight) AS weight
        FROM selected_samples(event, since := since, until := until,
                              node := node, pid := pid, comm := comm) s
        GROUP BY s.stack_id
    )
    SELECT f AS function,
           {saturating("coalesce(sum(p.weight) FILTER (WHERE f = st.frames[-1]), 0)")} AS self,
           {saturating("sum(p.weight)")} AS total,
           round(100.0 * self / (SELECT sum(weight) FROM per_stack), 2) AS self_percent,
           round(100.0 * total / (SELECT sum(weight) FROM per_stack), 2) AS total_percent
    FROM per_stack p JOIN stacks st USING (stack_id), unnest(list_distinct(st.frames)) AS t(f)
    GROUP BY f
    ORDER BY self DESC, total DESC, function;
"""
# The hour-partitioned views: (lake table, DuckDB table of its rows not sealed yet).
PARTITIONED = {
    "samples": "sample_rows",
    # Block I/O latency histograms (event block): requests per (interval, process, device, op)
    # whose latency was in (bucket_le_ns / 2, bucket_le_ns].
    "io_latency": "io_latency_rows",
    # What agents learned about processes (JVMs), one row each time: latest per (node, pid).
    "processes": "process_rows",
}


def open_database(path: str) -> duckdb.DuckDBPyConnection:
    """The aggregator's DuckDB file, its tables made or migrated from an earlier release and
    its views and macros defined, in one transaction."""
    db = duckdb.connect(path)
    # Rows have no order but the one a query asks for. Without this DuckDB appends an
    # Arrow table on one thread; with it, on all, and a group of batches past a row
    # group (122,880 rows) goes straight to compressed blocks: twice the append rate.
    db.execute("SET preserve_insertion_order = false")
    db.execute("BEGIN")
    wide = _set_aside_wide_rows(db)
    old_batches = _set_aside_batches_without_incarnation(db)
    db.execute(_DDL)
    if old_batches:  # incarnation 0: what batches without one get
        db.execute(
            "INSERT INTO ingested_batches SELECT agent_id, 0, sequence, node, received_at, "
            "sample_rows FROM old_ingested_batches"
        )
        db.execute("DROP TABLE old_ingested_batches")
    if wide:  # converted in the transaction that makes the new tables
        convert_wide_rows(db, "wide_sample_rows")
        db.execute("DROP TABLE wide_sample_rows")
    convert_old_events(db)
    refresh_views(db)
    db.execute("COMMIT")
    db.execute(_MACROS)
    return db


def refresh_views(cur: duckdb.DuckDBPyConnection) -> None:
    """(Re)define the partitioned views as the rows in DuckDB plus the sealed files that
    sealed_files lists, in the caller's transaction: a reader sees rows before or after a
    seal, never both or neither. `live_<view>` is the DuckDB part alone."""
    sealed = dict(
        cur.execute(
            "SELECT table_name, list(lake || '/' || path ORDER BY hour, path) "
            "FROM sealed_files GROUP BY table_name"
        ).fetchall()
    )
    for view in PARTITIONED:
        live = _live_sql(view)
        cur.execute(f"CREATE OR REPLACE VIEW live_{view} AS {live}")
        files = sealed.get(view)
        union = f"{live} UNION ALL {sealed_scan_sql(cur, view, files)}" if files else live
        cur.execute(f"CREATE OR REPLACE VIEW {view} AS {union}")


def sealed_scan_sql(cur: duckdb.DuckDBPyConnection, table: str, files: list[str]) -> str:
    """lake.scan_sql of some of the store's sealed files (non-empty), those of old events
    (aggregator/old_events.py) with their events converted."""
    old = {path for (path,) in cur.execute("SELECT path FROM old_event_files").fetchall()}
    scans = [
        lake.scan_sql(table, part, new_events)
        for part, new_events in (
            ([f for f in files if f not in old], None),
            ([f for f in files if f in old], "old_event_stacks"),
        )
        if part
    ]
    return " UNION ALL ".join(scans)


def _live_sql(view: str) -> str:
    """The view's columns from its rows in DuckDB (sample rows joined to their labels:
    dense integer label sets make that a perfect-hash join, almost free)."""
    columns = ", ".join(
        f"l.{c}" if view == "samples" and c in LABELS else f"r.{c}" for c in lake.view_columns(view)
    )
    if view == "samples":
        return f"SELECT {columns} FROM sample_rows r JOIN label_sets l ON l.label_set = r.label_set"
    return f"SELECT {columns} FROM {PARTITIONED[view]} r"


def _set_aside_wide_rows(cur: duckdb.DuckDBPyConnection) -> bool:
    """Rename sample_rows of an earlier release, which kept each row's labels in its own
    columns (schema version 1 had no job, session or pod), to wide_sample_rows; whether
    there were any."""
    columns = {
        name
        for (name,) in cur.execute(
            "SELECT column_name FROM duckdb_columns() "
            "WHERE table_name = 'sample_rows' AND database_name = current_database()"
        ).fetchall()
    }
    if "node" not in columns:
        return False
    for name in LABELS:
        cur.execute(f"ALTER TABLE sample_rows ADD COLUMN IF NOT EXISTS {name} VARCHAR")
    cur.execute("ALTER TABLE sample_rows RENAME TO wide_sample_rows")
    return True


def _set_aside_batches_without_incarnation(cur: duckdb.DuckDBPyConnection) -> bool:
    """Rename ingested_batches of an earlier release, keyed (agent_id, sequence) without an
    incarnation, to old_ingested_batches; whether there was one."""
    columns = {
        name
        for (name,) in cur.execute(
            "SELECT column_name FROM duckdb_columns() "
            "WHERE table_name = 'ingested_batches' AND database_name = current_database()"
        ).fetchall()
    }
    if not columns or "incarnation" in columns:
        return False
    cur.execute("ALTER TABLE ingested_batches RENAME TO old_ingested_batches")
    return True
