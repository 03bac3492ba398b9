"""DuckDB storage of profiles: append Arrow batches whole, dedupe stacks by id.

One DuckDB database per aggregator. Writes go through one connection under a lock (DuckDB
has one writer); readers use their own cursors, so queries never block ingest.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa

_DDL = """
CREATE TABLE IF NOT EXISTS sample_rows (
    ts TIMESTAMPTZ NOT NULL,
    node VARCHAR NOT NULL,
    agent_id VARCHAR NOT NULL,
    pid INTEGER NOT NULL,
    tid INTEGER NOT NULL,
    comm VARCHAR NOT NULL,
    event VARCHAR NOT NULL,
    stack_id BIGINT NOT NULL,
    weight BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS stack_rows (
    stack_id BIGINT NOT NULL,
    frames VARCHAR[] NOT NULL,
    modules VARCHAR[] NOT NULL,
    kinds VARCHAR[] NOT NULL
);
CREATE TABLE IF NOT EXISTS ingested_batches (
    agent_id VARCHAR NOT NULL,
    sequence UBIGINT NOT NULL,
    node VARCHAR NOT NULL,
    received_at TIMESTAMPTZ NOT NULL,
    sample_rows BIGINT NOT NULL,
    PRIMARY KEY (agent_id, sequence)
);
-- The documented, stable SQL surface (README "SQL").
CREATE OR REPLACE VIEW samples AS
    SELECT ts, node, pid, tid, comm, event, stack_id, weight, agent_id FROM sample_rows;
CREATE OR REPLACE VIEW stacks AS
    SELECT stack_id, frames, modules, kinds FROM stack_rows;
"""


class StorageUnavailable(RuntimeError):
    """The batch could not be written (typically a full disk); nothing of it was stored."""


@dataclass(frozen=True)
class StoreResult:
    duplicate: bool
    rows_stored: int


class ProfileStore:
    """The aggregator's DuckDB file."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._db = duckdb.connect(self.path)
        self._db.execute(_DDL)
        self._write_lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    def reader(self) -> duckdb.DuckDBPyConnection:
        """A cursor of its own for one reader thread (MVCC snapshot per query)."""
        return self._db.cursor()

    def append(
        self, agent_id: str, sequence: int, node: str, samples: pa.Table, stacks: pa.Table
    ) -> StoreResult:
        """Store one validated batch atomically; a (agent_id, sequence) seen before is a no-op.

        Returns after COMMIT, so an acknowledgement sent after it is durable.
        """
        with self._write_lock:
            cur = self._db.cursor()
            cur.execute("BEGIN")
            try:
                if cur.execute(
                    "SELECT 1 FROM ingested_batches WHERE agent_id = ? AND sequence = ?",
                    [agent_id, sequence],
                ).fetchone():
                    cur.execute("ROLLBACK")
                    return StoreResult(duplicate=True, rows_stored=0)
                cur.register("batch_samples", samples)
                cur.register("batch_stacks", stacks)
                cur.execute(
                    """
                    INSERT INTO sample_rows
                    SELECT ts, $node, $agent, pid, tid, comm, event, stack_id, weight
                    FROM batch_samples
                    """,
                    {"node": node, "agent": agent_id},
                )
                # Set-based dedup: only stacks this database has never seen.
                cur.execute(
                    """
                    INSERT INTO stack_rows
                    SELECT DISTINCT ON (b.stack_id) b.stack_id, b.frames, b.modules, b.kinds
                    FROM batch_stacks b
                    ANTI JOIN stack_rows s ON s.stack_id = b.stack_id
                    """
                )
                cur.execute(
                    "INSERT INTO ingested_batches VALUES (?, ?, ?, now(), ?)",
                    [agent_id, sequence, node, samples.num_rows],
                )
                cur.execute("COMMIT")
            except BaseException as exc:
                # A failed COMMIT (disk full) has already rolled back: nothing to undo then.
                with contextlib.suppress(duckdb.Error):
                    cur.execute("ROLLBACK")
                if isinstance(exc, duckdb.IOException | duckdb.TransactionException):
                    raise StorageUnavailable(str(exc)) from exc
                raise
            finally:
                cur.close()
        return StoreResult(duplicate=False, rows_stored=samples.num_rows)
