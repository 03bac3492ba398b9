"""DuckDB storage of profiles, the write path: append Arrow batches whole (group commit),
dedupe stacks by id; transactions for the hourly partitions. The tables, views, macros and
migrations are in aggregator/database.py.

One DuckDB database per aggregator. Writes go through one connection under a lock (DuckDB
has one writer); readers use their own cursors, so queries never block ingest.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from fleetprof.aggregator.agent_history import AgentHistory
from fleetprof.aggregator.database import PARTITIONED, open_database, refresh_views
from fleetprof.aggregator.label_sets import LabelledRows, LabelSet, LabelSets, RowLabels
from fleetprof.proto import lake
from fleetprof.proto.control.v1 import control_pb2


@functools.lru_cache(maxsize=4096)  # every batch of an agent asks for the same one
def incarnation_key(incarnation: str) -> int:
    """How an agent incarnation is stored: 0 for none (agents before incarnations), else a
    64-bit hash that does not give the incarnation away."""
    if not incarnation:
        return 0
    return int.from_bytes(hashlib.blake2b(incarnation.encode(), digest_size=8).digest()) or 1


def default_name() -> str:
    """This host's name, as an aggregator name (characters a file name may not have: `-`)."""
    return re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname()).strip(".-") or "aggregator"


class Transaction:
    """A transaction of ProfileStore.transaction(): statements run on `cursor`."""

    def __init__(self, cursor: duckdb.DuckDBPyConnection) -> None:
        self.cursor = cursor
        self.committed = False

    def commit(self) -> None:
        """Redefine the partitioned views over the rows and sealed files as this
        transaction leaves them (so a reader sees rows before or after it, never both or
        neither), then COMMIT. A failed COMMIT has rolled back."""
        refresh_views(self.cursor)
        self.cursor.execute("COMMIT")
        self.committed = True


class StorageUnavailable(RuntimeError):
    """The batch could not be written (typically a full disk); nothing of it was stored."""


def first_line(exc: BaseException) -> str:
    """DuckDB's message without the hints below it (SET threads, ...): not the agent's."""
    return str(exc).split("\n", 1)[0]


@dataclass(frozen=True)
class StoreResult:
    duplicate: bool
    rows_stored: int


class ProfileStore:
    """The aggregator's DuckDB file."""

    def __init__(
        self, path: str | Path, lake_dir: str | Path | None = None, name: str | None = None
    ) -> None:
        self.path = str(path)
        # Where closed hours are sealed (aggregator/partitions.py), as this aggregator's name.
        self.lake = Path(lake_dir or f"{self.path}.lake").resolve()
        self.name = lake.check_name(name or default_name())
        self._db = open_database(self.path)
        self._label_sets = LabelSets(self._db)
        self._agents = AgentHistory(self._db)
        self._write_lock = threading.Lock()
        # Times prune_stacks deleted stacks: a batch prepared before one stores all its own.
        self._stack_prunes = 0
        # Batches waiting for the next group commit (see append).
        self._queue: list[_Pending] = []
        self._queue_lock = threading.Lock()

    def lake_roots(self) -> list[Path]:
        """Directories the views read files from: the lake, and any earlier one with files."""
        recorded = self._db.cursor().execute("SELECT DISTINCT lake FROM sealed_files").fetchall()
        return sorted({self.lake, *(Path(root) for (root,) in recorded)})

    def close(self) -> None:
        self._db.close()

    def reader(self) -> duckdb.DuckDBPyConnection:
        """A cursor of its own for one reader thread (MVCC snapshot per query)."""
        return self._db.cursor()

    @contextlib.contextmanager
    def cursor(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A cursor of its own for the block, closed after it; each statement commits alone."""
        cur = self._db.cursor()
        try:
            yield cur
        finally:
            cur.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """One transaction from one snapshot, on a cursor of its own and beside ingest (not
        under the write lock: DuckDB refuses a commit that conflicts). It commits only by
        Transaction.commit(); a block left otherwise (an exception, or return) rolls it back."""
        with self.cursor() as cur:
            cur.execute("BEGIN")
            transaction = Transaction(cur)
            try:
                yield transaction
            finally:
                if not transaction.committed:
                    with contextlib.suppress(duckdb.Error):
                        cur.execute("ROLLBACK")

    def prune_stacks(self, stack_files: list[str]) -> int:
        """Delete the stacks referenced neither by a row in DuckDB nor by `stack_files`
        (the sealed stacks); returns how many. Holds the write lock only for the check
        against DuckDB's rows, so that a batch counting on a stack keeps it."""
        cur = self.reader()
        try:
            unsealed = "SELECT stack_id FROM stack_rows"
            if stack_files:
                unsealed += f" ANTI JOIN {lake.read_sql(stack_files)} f USING (stack_id)"
            cur.register("candidates", cur.sql(unsealed).to_arrow_table())
            with self._write_lock:
                pruned = cur.execute(
                    "DELETE FROM stack_rows WHERE stack_id IN (SELECT stack_id FROM candidates) "
                    "AND stack_id NOT IN (SELECT stack_id FROM sample_rows)"
                ).fetchone()[0]
                self._stack_prunes += bool(pruned)
                return pruned
        finally:
            cur.close()

    def prune_label_sets(self) -> int:
        """Delete the label sets no row in DuckDB refers to any more (sealed files keep
        their labels as strings); returns how many."""
        with self._write_lock:
            pruned = self._db.execute(
                "DELETE FROM label_sets WHERE label_set NOT IN (SELECT label_set FROM sample_rows)"
            ).fetchone()[0]
            if pruned:
                self._label_sets.reload(self._db)
            return pruned

    def record_session(self, order: control_pb2.SessionOrder, state: str) -> None:
        """Insert or update one on-demand session (the `sessions` view)."""
        with self._write_lock:
            self._db.execute(
                """
                INSERT INTO session_rows VALUES (
                    $id, $job, $events, $frequency, now(), make_timestamptz($deadline * 1000),
                    $state)
                ON CONFLICT (session_id) DO UPDATE SET state = excluded.state
                """,
                {
                    "id": order.session_id,
                    "job": order.job,
                    "events": list(order.events),
                    "frequency": order.frequency,
                    "deadline": order.deadline_unix_ms,
                    "state": state,
                },
            )

    def agent_history(self, agent_id: str, incarnation: str) -> tuple[str | None, int]:
        """The node an agent's batches were stored for (None: none stored), and the last
        sequence stored of one incarnation (0: none)."""
        return self._agents.lookup(agent_id, incarnation_key(incarnation))

    def delete(
        self,
        node: str | None,
        agent_id: str | None,
        since: datetime | None,
        until: datetime | None,
    ) -> dict[str, int]:
        """Delete the rows in DuckDB of a node and/or agent in [since, until) (None:
        unbounded), in one transaction; rows deleted per view, and the sealed files of the
        time range (kept: sealed hours go with retention)."""
        if node is None and agent_id is None:
            raise ValueError("name a node, an agent or both")
        params = {
            "node": node,
            "agent": agent_id,
            "since": since or datetime.min.replace(tzinfo=UTC),
            "until": until or datetime.max.replace(tzinfo=UTC),
        }
        match = (
            "node = coalesce($node, node) AND agent_id = coalesce($agent, agent_id) "
            "AND ts >= $since AND ts < $until"
        )
        deleted: dict[str, int] = {}
        with self._write_lock:
            cur = self._db.cursor()
            try:
                cur.execute("BEGIN")
                deleted["samples"] = cur.execute(
                    "DELETE FROM sample_rows WHERE label_set IN (SELECT label_set FROM label_sets "
                    "WHERE node = coalesce($node, node) AND agent_id = coalesce($agent, agent_id)) "
                    "AND ts >= $since AND ts < $until",
                    params,
                ).fetchone()[0]
                for view in ("processes", "io_latency"):
                    deleted[view] = cur.execute(
                        f"DELETE FROM {PARTITIONED[view]} WHERE {match}", params
                    ).fetchone()[0]
                deleted["sealed_files_kept"] = cur.execute(
                    "SELECT count(*) FROM sealed_files "
                    "WHERE hour + INTERVAL 1 HOUR > $since AND hour < $until",
                    {"since": params["since"], "until": params["until"]},
                ).fetchone()[0]
                cur.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(duckdb.Error):
                    cur.execute("ROLLBACK")
                raise
            finally:
                cur.close()
        return deleted

    def append(
        self,
        agent_id: str,
        sequence: int,
        node: str,
        samples: pa.Table,
        stacks: pa.Table,
        processes: pa.Table | None = None,
        io_latency: pa.Table | None = None,
        incarnation: str = "",
        grouped: RowLabels | None = None,
    ) -> StoreResult:
        """Store one validated batch atomically; an (agent_id, incarnation, sequence) seen
        before is a no-op. `grouped`: the samples' label_sets.group_labels, if made.

        Returns after COMMIT, so an acknowledgement sent after it is durable. Group commit:
        batches that arrive while a commit runs are stored together by the next one, in one
        transaction with one INSERT per table (a DuckDB commit costs ~20 ms of WAL write and
        fsync whatever its size; per batch, that capped ingest at ~0.1M rows/s).
        """
        prunes = self._stack_prunes
        try:
            labelled, new_stacks = self._prepare(agent_id, node, samples, stacks, grouped)
        except duckdb.OutOfMemoryException as exc:
            raise StorageUnavailable(first_line(exc)) from exc
        pending = _Pending(
            _Batch(
                agent_id,
                incarnation_key(incarnation),
                sequence,
                node,
                labelled,
                stacks,
                new_stacks,
                prunes,
                processes,
                io_latency,
            )
        )
        with self._queue_lock:
            self._queue.append(pending)
        with self._write_lock:
            if not pending.done:  # else an earlier holder of the lock committed it
                with self._queue_lock:
                    group, self._queue = self._queue, []
                self._commit_group(group)
        if isinstance(pending.outcome, StorageUnavailable):
            raise StorageUnavailable(str(pending.outcome))
        if isinstance(pending.outcome, BaseException):
            raise RuntimeError(f"cannot store the batch: {pending.outcome}") from pending.outcome
        return pending.outcome

    def _prepare(
        self,
        agent_id: str,
        node: str,
        samples: pa.Table,
        stacks: pa.Table,
        grouped: RowLabels | None,
    ) -> tuple[LabelledRows, pa.Table]:
        """A batch's rows as stored with their label sets, and its stacks not stored yet
        (by this snapshot): the per-row work, done before the write lock so that batches
        prepare in parallel while a group commits."""
        cur = self.reader()
        try:
            labelled = self._label_sets.label(cur, samples, node, agent_id, grouped)
            if stacks.num_rows:
                cur.register("batch_stacks", stacks.select(["stack_id"]))
                stored = cur.sql(
                    "SELECT stack_id FROM batch_stacks SEMI JOIN stack_rows USING (stack_id)"
                )
                known = pc.is_in(stacks["stack_id"], value_set=stored.to_arrow_table()["stack_id"])
                stacks = stacks.filter(pc.invert(known))
        finally:
            cur.close()
        return labelled, stacks

    def _commit_group(self, group: list[_Pending]) -> None:
        """One transaction for every batch of `group`; each gets its outcome."""
        cur = self._db.cursor()
        cur.execute("BEGIN")
        try:
            fresh = _fresh_batches(cur, [p.batch for p in group])
            new_label_sets = (
                _insert(cur, self._label_sets, self._stack_prunes, fresh) if fresh else {}
            )
            cur.execute("COMMIT")
            self._label_sets.committed(new_label_sets)
            for batch in fresh:
                self._agents.record(batch.agent_id, batch.node, batch.incarnation, batch.sequence)
            stored_now = set(fresh)
            for p in group:
                stored = p.batch in stored_now
                rows = p.batch.samples.rows.num_rows if stored else 0
                p.outcome = StoreResult(not stored, rows)
        except BaseException as exc:
            # A failed COMMIT (disk full) has already rolled back: nothing to undo then.
            with contextlib.suppress(duckdb.Error):
                cur.execute("ROLLBACK")
            # Out of memory: a query holds the instance's memory limit for now.
            storage = isinstance(
                exc,
                duckdb.IOException | duckdb.TransactionException | duckdb.OutOfMemoryException,
            )
            for p in group:
                p.outcome = StorageUnavailable(first_line(exc)) if storage else exc
        finally:
            cur.close()


@dataclass(frozen=True, eq=False)
class _Batch:
    agent_id: str
    incarnation: int  # incarnation_key()
    sequence: int
    node: str
    samples: LabelledRows
    stacks: pa.Table
    new_stacks: pa.Table  # those not stored when the batch was prepared
    stack_prunes: int  # ProfileStore._stack_prunes then
    processes: pa.Table | None
    io_latency: pa.Table | None


@dataclass(eq=False)
class _Pending:
    batch: _Batch
    outcome: StoreResult | BaseException | None = None

    @property
    def done(self) -> bool:
        return self.outcome is not None


def _fresh_batches(cur: duckdb.DuckDBPyConnection, batches: list[_Batch]) -> list[_Batch]:
    """The batches neither stored before nor repeated earlier in the group."""
    keys = pa.table(
        {
            "agent_id": [b.agent_id for b in batches],
            "incarnation": pa.array([b.incarnation for b in batches], pa.uint64()),
            "sequence": pa.array([b.sequence for b in batches], pa.uint64()),
        }
    )
    cur.register("group_keys", keys)
    stored = set(
        cur.execute(
            "SELECT agent_id, incarnation, sequence FROM ingested_batches SEMI JOIN group_keys "
            "USING (agent_id, incarnation, sequence)"
        ).fetchall()
    )
    cur.unregister("group_keys")
    fresh = []
    for batch in batches:
        key = (batch.agent_id, batch.incarnation, batch.sequence)
        if key not in stored:
            stored.add(key)
            fresh.append(batch)
    return fresh


def _insert(
    cur: duckdb.DuckDBPyConnection, label_sets: LabelSets, stack_prunes: int, batches: list[_Batch]
) -> dict[LabelSet, int]:
    """Every row of `batches`, one INSERT per table; the label sets stored new. A stack
    known when a batch was prepared may have been pruned since (`stack_prunes` is then past
    the batch's): the batch stores all the stacks it carries."""
    samples = [b.samples for b in batches if b.samples.rows.num_rows]
    new_label_sets: dict[LabelSet, int] = {}
    if samples:
        rows, new_label_sets = label_sets.number(cur, samples)
        cur.register("group_rows", rows)
        cur.execute("INSERT INTO sample_rows BY NAME SELECT * FROM group_rows")
        cur.unregister("group_rows")
    for view, parts in (
        ("processes", [(b, b.processes) for b in batches if b.processes is not None]),
        ("io_latency", [(b, b.io_latency) for b in batches if b.io_latency is not None]),
    ):
        tables = [_with_origin(table, b) for b, table in parts if table.num_rows]
        if tables:
            cur.register("group_rows", pa.concat_tables(tables))
            cur.execute(f"INSERT INTO {PARTITIONED[view]} BY NAME SELECT * FROM group_rows")
            cur.unregister("group_rows")
    stacks = [b.new_stacks if b.stack_prunes == stack_prunes else b.stacks for b in batches]
    stacks = [table for table in stacks if table.num_rows]
    if stacks:  # set-based dedup: only stacks this database has never seen
        cur.register("group_stacks", pa.concat_tables(stacks))
        cur.execute(
            """
            INSERT INTO stack_rows
            SELECT DISTINCT ON (b.stack_id) b.stack_id, b.frames, b.modules, b.kinds
            FROM group_stacks b
            ANTI JOIN stack_rows s ON s.stack_id = b.stack_id
            """
        )
        cur.unregister("group_stacks")
    cur.register(
        "group_batches",
        pa.table(
            {
                "agent_id": [b.agent_id for b in batches],
                "incarnation": pa.array([b.incarnation for b in batches], pa.uint64()),
                "sequence": pa.array([b.sequence for b in batches], pa.uint64()),
                "node": [b.node for b in batches],
                "sample_rows": [b.samples.rows.num_rows for b in batches],
            }
        ),
    )
    cur.execute(
        "INSERT INTO ingested_batches "
        "SELECT agent_id, incarnation, sequence, node, now(), sample_rows FROM group_batches"
    )
    cur.unregister("group_batches")
    return new_label_sets


def _with_origin(rows: pa.Table, batch: _Batch) -> pa.Table:
    count = rows.num_rows
    return rows.append_column("node", pa.repeat(batch.node, count)).append_column(
        "agent_id", pa.repeat(batch.agent_id, count)
    )
