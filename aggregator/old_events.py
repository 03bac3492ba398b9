"""Sample rows of agents older than the io/block and lock/wait split, converted once when a
database is opened (docs/events.md "Older data"):

- `io` rows on a block request's stack (leaf frame `[block OP DEVICE]`) become `block`:
  the device time was in `io` with the syscall time it overlaps.
- `lock` rows of futex waits (no kernel frames) whose outermost lock-or-wait function is a
  wait's (pthread_cond_wait, pthread_join, Object.wait, ...) become `wait`, by the rule the
  agent applies (node_agent/samplers/lock.py); those the frames do not decide stay `lock`
  (old rows do not say their futex command).

Each conversion moves rows to a twin of their label set with the new event, in the
transaction that opens the store, and is recorded in converted_events so it runs once.

Samples files sealed into the lake before (those without lake.MARKER) are converted as
they are read: the same rule gives, in a table (stack_id, event, new_event), the events
of their stacks that change (`new_events_sql`), and lake.scan_sql replaces them. The
store lists its own such files in old_event_files (read so until partition maintenance
rewrites them, aggregator/partitions.py); fleet queries check the files they read.
The rule changes nothing in rows of agents after the split (their `io` stacks end in a
syscall, their `lock` stacks' outermost lock-or-wait frame is a lock's), so a file taken
for old by mistake reads the same.
"""

from __future__ import annotations

import duckdb

from fleetprof.aggregator.label_sets import LABELS
from fleetprof.proto import lake
from fleetprof.proto.wait_frames import LOCKING_PATTERN, WAITING_PATTERN

_MARKER = "regexp_full_match(ltrim(f, '_'), $locking) OR regexp_full_match(ltrim(f, '_'), $waiting)"
# new event: (old event, condition on the row's stack `st`)
CONVERSIONS = {
    "block": ("io", "st.frames[-1] LIKE '[block %'"),
    "wait": (
        "lock",
        "NOT list_contains(st.kinds, 'kernel') AND regexp_full_match("
        f"ltrim(list_filter(st.frames, lambda f: {_MARKER})[1], '_'), $waiting)",
    ),
}


PARAMETERS = {"locking": LOCKING_PATTERN, "waiting": WAITING_PATTERN}
# The store's sealed samples files of old events (lake || '/' || path, as sealed_files
# names them), and the events of their stacks that change.
_LAKE_DDL = """
CREATE TABLE IF NOT EXISTS old_event_files (path VARCHAR PRIMARY KEY);
CREATE TABLE IF NOT EXISTS old_event_stacks (
    stack_id BIGINT NOT NULL, event VARCHAR NOT NULL, new_event VARCHAR NOT NULL
);
"""


def convert_old_events(cur: duckdb.DuckDBPyConnection) -> None:
    """Run the conversions this database has not had, in the caller's transaction."""
    cur.execute("CREATE TABLE IF NOT EXISTS converted_events (event VARCHAR PRIMARY KEY)")
    cur.execute(_LAKE_DDL)
    done = {event for (event,) in cur.execute("SELECT event FROM converted_events").fetchall()}
    for new, (old, condition) in CONVERSIONS.items():
        if new not in done:
            _move(cur, old, new, condition)
            cur.execute("INSERT INTO converted_events VALUES (?)", [new])
    if "lake" not in done:
        _list_old_files(cur)
        cur.execute("INSERT INTO converted_events VALUES ('lake')")


def new_events_sql(samples: str, stacks: str) -> str:
    """DuckDB SQL of (stack_id, event, new_event): the events that change of the rows of
    `samples` (SQL with stack_id and event columns), by their stacks in `stacks`; takes
    PARAMETERS."""
    cases = " ".join(
        f"WHEN r.event = '{old}' AND ({condition}) THEN '{new}'"
        for new, (old, condition) in CONVERSIONS.items()
    )
    return f"""
        SELECT * FROM (
            SELECT r.stack_id, r.event, CASE {cases} END AS new_event
            FROM (SELECT DISTINCT stack_id, event FROM ({samples})) r
            JOIN {stacks} st ON st.stack_id = r.stack_id
        ) WHERE new_event IS NOT NULL
    """


def _list_old_files(cur: duckdb.DuckDBPyConnection) -> None:
    """Note the sealed samples files without lake.MARKER, and how their events change."""
    files = [
        path
        for (path,) in cur.execute(
            "SELECT lake || '/' || path FROM sealed_files WHERE table_name = 'samples'"
        ).fetchall()
    ]
    if not files:
        return
    cur.execute(f"INSERT OR IGNORE INTO old_event_files {lake.unmarked_sql(files)}")
    old = [path for (path,) in cur.execute("SELECT path FROM old_event_files").fetchall()]
    if old:
        rows = f"SELECT stack_id, event FROM {lake.read_sql(old)}"
        cur.execute(
            f"INSERT INTO old_event_stacks {new_events_sql(rows, 'stack_rows')}", PARAMETERS
        )


def _move(cur: duckdb.DuckDBPyConnection, old: str, new: str, condition: str) -> None:
    parameters = {"old": old}
    if "$locking" in condition:
        parameters |= PARAMETERS
    cur.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE moved_stacks AS
        SELECT DISTINCT r.label_set, r.stack_id
        FROM sample_rows r JOIN label_sets l USING (label_set)
        WHERE l.event = $old AND EXISTS (
            SELECT 1 FROM stack_rows st WHERE st.stack_id = r.stack_id AND ({condition})
        )
        """,
        parameters,
    )
    others = ", ".join(f"l.{name}" if name != "event" else "$new AS event" for name in LABELS)
    cur.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE twin_sets AS
        SELECT l.label_set AS old_set,
               ((SELECT max(label_set) FROM label_sets) + row_number() OVER ())::INTEGER
                   AS new_set,
               {others}
        FROM label_sets l WHERE l.label_set IN (SELECT label_set FROM moved_stacks)
        """,
        {"new": new},
    )
    cur.execute(
        f"INSERT INTO label_sets (label_set, {', '.join(LABELS)}) "
        f"SELECT new_set, * EXCLUDE (old_set, new_set) FROM twin_sets"
    )
    cur.execute(
        """
        UPDATE sample_rows r SET label_set = t.new_set
        FROM twin_sets t, moved_stacks m
        WHERE r.label_set = m.label_set AND r.stack_id = m.stack_id AND t.old_set = m.label_set
        """
    )
    cur.execute("DROP TABLE moved_stacks")
    cur.execute("DROP TABLE twin_sets")
