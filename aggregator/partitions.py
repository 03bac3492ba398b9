"""Hourly partitions: closed hours sealed into the Parquet lake, old ones downsampled or
dropped whole (retention, disk budget).

The open hours live in the DuckDB tables. A closed hour is sealed by writing its rows to
Parquet files from one snapshot, renaming them into place, then, in that same transaction,
deleting exactly those rows and recording the files in `sealed_files`, from which the views
are redefined: a reader sees each row once, before or after. Rows of a sealed hour that
arrive late stay in DuckDB until the next pass seals them into a further file. Files leave
the lake the other way round (record removed in one transaction, then unlinked), and every
file a pass may leave behind if it dies half-way is listed in `lake_pending` first, so the
next pass removes it. Neither holds ingest's write lock, except stack pruning, briefly.
Samples files sealed before events were split are rewritten with their events converted
(aggregator/old_events.py), in the same way, by the first pass.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb

from fleetprof.aggregator.database import PARTITIONED, sealed_scan_sql
from fleetprof.aggregator.storage import ProfileStore, Transaction
from fleetprof.proto import lake
from fleetprof.proto.lake import HOUR

log = logging.getLogger(__name__)

# Tables merged to one row per minute by downsampling, and the column their rows add up.
DOWNSAMPLED = {"samples": "weight", "io_latency": "count"}
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in a size such as '500MB', '10GB' (powers of 1000) or '2GiB' (of 1024)."""
    match = _SIZE.match(text.strip())
    if not match:
        raise ValueError(f"bad size {text!r}: use e.g. 500MB, 10GB, 2GiB")
    base = 1024 if match[3] else 1000
    return int(float(match[1]) * base ** " KMGT".index(match[2].upper() or " "))


@dataclass(frozen=True)
class LakePolicy:
    """When hours are sealed (this long after they end), downsampled and dropped."""

    seal_after: timedelta = timedelta(minutes=2)
    retention: timedelta | None = None
    max_disk_bytes: int | None = None
    downsample_after: timedelta | None = None


@dataclass(frozen=True)
class _NewFile:
    table: str
    hour: datetime
    final: Path
    temporary: Path
    rows: int


class Partitions:
    """The maintenance of one store's partitions: `maintain()` once, or every
    `interval_s` in a thread of its own (`start`/`stop`)."""

    def __init__(self, store: ProfileStore, policy: LakePolicy | None = None) -> None:
        self.store = store
        self.policy = policy or LakePolicy()
        self._stop = threading.Event()
        self._pass = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self, interval_s: float = 60.0) -> None:
        self._thread = threading.Thread(
            target=self._run, args=(interval_s,), name="partitions", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    def _run(self, interval_s: float) -> None:
        while True:
            try:
                self.maintain()
            except Exception:  # the next pass retries; nothing was lost (see the module doc)
                log.exception("partition maintenance failed")
            if self._stop.wait(interval_s):
                return

    def maintain(self, now: datetime | None = None) -> None:
        """One pass: seal, downsample, then drop what retention and the disk budget say."""
        with self._pass:  # one pass at a time: two would pick the same free file names
            self._maintain(now or datetime.now(UTC))

    def _maintain(self, now: datetime) -> None:
        policy = self.policy
        self.forget_unrecorded()
        self.convert_old_files()
        self.seal(lake.hour_start(now - policy.seal_after))
        if policy.downsample_after is not None:
            self.downsample(lake.hour_start(now - policy.downsample_after))
        if policy.retention is not None:
            self.drop_before(
                lake.hour_start(now - policy.retention), f"retention {policy.retention}"
            )
        if policy.max_disk_bytes is not None:
            self.enforce_disk_budget(policy.max_disk_bytes)

    # --- sealing -------------------------------------------------------------------------

    def seal(self, before: datetime) -> None:
        """Seal every hour that ends at or before `before` and has rows in DuckDB."""
        union = " UNION ALL ".join(f"SELECT ts FROM {table}" for table in PARTITIONED.values())
        self._each_hour(
            "SELECT DISTINCT make_timestamptz(epoch_us(ts) // 3600000000 * 3600000000) AS hour "
            f"FROM ({union}) WHERE ts < $before",
            before,
            self._seal_hour,
        )

    def _seal_hour(self, hour: datetime) -> None:
        started = time.perf_counter()
        in_hour = f"ts >= {_timestamp(hour)} AND ts < {_timestamp(hour + HOUR)}"
        written: list[_NewFile] = []
        try:
            with self.store.transaction() as transaction:
                self._seal_rows(transaction, hour, in_hour, written)
        except BaseException:
            _abandon(written)
            raise
        self._settle(written, [])
        self._prune_label_sets()
        summary = ", ".join(f"{f.table} {f.rows:,} rows" for f in written)
        log.info(
            "sealed %s into %s: %s (%.1f s)",
            _hour_name(hour),
            self.store.lake,
            summary or "nothing",
            time.perf_counter() - started,
        )

    def _seal_rows(
        self, transaction: Transaction, hour: datetime, in_hour: str, written: list[_NewFile]
    ) -> None:
        """Write the hour's rows to files, delete them from DuckDB and record the files,
        all from the transaction's snapshot; `written` gets each file as it is made."""
        cur = transaction.cursor
        for table in PARTITIONED:  # its live_ view: sample rows with their labels
            columns = ", ".join(lake.COLUMNS[table])
            select = f"SELECT {columns} FROM live_{table} WHERE {in_hour}"
            written += self._write(cur, table, hour, select)
        if any(f.table == "samples" for f in written):
            stacks = (
                f"SELECT {', '.join(lake.COLUMNS['stacks'])} FROM stack_rows WHERE stack_id "
                f"IN (SELECT stack_id FROM sample_rows WHERE {in_hour})"
            )
            written += self._write(cur, "stacks", hour, stacks)
        # Exactly the rows written: the same snapshot, so not those of a later batch.
        for table, rows in PARTITIONED.items():
            deleted = cur.execute(f"DELETE FROM {rows} WHERE {in_hour}").fetchone()[0]
            expected = sum(f.rows for f in written if f.table == table)
            if deleted != expected:
                raise RuntimeError(f"sealing {rows}: {deleted} rows deleted, {expected} written")
        self._commit(transaction, written, [], downsampled=False)

    def _write(
        self, cur: duckdb.DuckDBPyConnection, table: str, hour: datetime, select: str
    ) -> list[_NewFile]:
        """Write the rows of `select` (as of cur's snapshot) to a temporary file of the
        table's next free name; nothing if there are none."""
        final = self._free_path(cur, table, hour)
        temporary = final.with_name(f".{final.name}.tmp")
        self._pend([temporary, final])
        final.parent.mkdir(parents=True, exist_ok=True)
        order = ", ".join(lake.SORT_KEYS[table])
        rows = cur.execute(
            f"COPY ({select} ORDER BY {order}) TO {_quote(temporary)} ({lake.COPY_OPTIONS})"
        ).fetchone()[0]
        if rows == 0:
            temporary.unlink()
            self._unpend([temporary, final])
            return []
        with open(temporary, "rb") as file:
            os.fsync(file.fileno())
        return [_NewFile(table, hour, final, temporary, rows)]

    def _free_path(self, cur: duckdb.DuckDBPyConnection, table: str, hour: datetime) -> Path:
        """The first file name of this aggregator's in that partition not in use (never
        another's, never one on disk: a file in the lake is not ours to overwrite)."""
        recorded = {
            Path(root) / path
            for root, path in cur.execute(
                "SELECT lake, path FROM sealed_files WHERE table_name = $table AND hour = $hour",
                {"table": table, "hour": hour},
            ).fetchall()
        }
        number = 0
        while True:
            path = lake.file_path(self.store.lake, table, hour, self.store.name, number)
            if path not in recorded and not path.exists():
                return path
            number += 1

    # --- downsampling --------------------------------------------------------------------

    def downsample(self, before: datetime) -> None:
        """Merge the sealed rows of hours ending at or before `before` to one per minute."""
        tables = ", ".join(_quote(t) for t in DOWNSAMPLED)
        self._each_hour(
            f"SELECT DISTINCT hour FROM sealed_files WHERE table_name IN ({tables}) "
            "AND NOT downsampled AND hour < $before",
            before,
            self._downsample_hour,
        )

    def _each_hour(self, sql: str, before: datetime, action: Callable[[datetime], None]) -> None:
        """`action` on each hour (column `hour`) that `sql` finds, oldest first, until stopped."""
        with self.store.cursor() as cur:
            hours = cur.execute(f"{sql} ORDER BY hour", {"before": before}).fetchall()
        for (hour,) in hours:
            if self._stop.is_set():
                return
            action(hour.astimezone(UTC))

    def _downsample_hour(self, hour: datetime) -> None:
        written: list[_NewFile] = []
        dropped: list[str] = []
        try:
            with self.store.transaction() as transaction:
                rows_before = self._downsample_rows(transaction, hour, written, dropped)
        except BaseException:
            _abandon(written)
            raise
        self._settle(written, dropped)
        log.info(
            "downsampled %s to one row per minute: %s rows -> %s",
            _hour_name(hour),
            f"{rows_before:,}",
            f"{sum(f.rows for f in written):,}",
        )

    def _downsample_rows(
        self, transaction: Transaction, hour: datetime, written: list[_NewFile], dropped: list[str]
    ) -> int:
        """Rewrite the hour's sealed files one row per minute, in the transaction; the rows
        they held."""
        cur = transaction.cursor
        for table, measure in DOWNSAMPLED.items():
            files = [
                path
                for (path,) in cur.execute(
                    "SELECT lake || '/' || path FROM sealed_files "
                    "WHERE table_name = $table AND hour = $hour",
                    {"table": table, "hour": hour},
                ).fetchall()
            ]
            if not files:
                continue
            columns = [
                "make_timestamptz(epoch_us(ts) // 60000000 * 60000000) AS ts"
                if c == "ts"
                else f"sum({c})::BIGINT AS {c}"
                if c == measure
                else c
                for c in lake.COLUMNS[table]
            ]
            source = sealed_scan_sql(cur, table, files)  # old events converted
            select = f"SELECT {', '.join(columns)} FROM ({source}) GROUP BY ALL"
            written += self._write(cur, table, hour, select)
            dropped += files
        rows_before = self._rows(cur, dropped)
        self._commit(transaction, written, dropped, downsampled=True)
        return rows_before

    # --- converting old events ----------------------------------------------------------

    def convert_old_files(self) -> None:
        """Rewrite each samples file of events from before the split (old_event_files) with
        its events converted, as the store's views read it."""
        with self.store.cursor() as cur:
            old = cur.execute(
                "SELECT o.path, s.hour, s.downsampled FROM old_event_files o "
                "JOIN sealed_files s ON s.lake || '/' || s.path = o.path ORDER BY s.hour, o.path"
            ).fetchall()
        for path, hour, downsampled in old:
            if self._stop.is_set():
                return
            self._convert_file(path, hour.astimezone(UTC), downsampled)

    def _convert_file(self, path: str, hour: datetime, downsampled: bool) -> None:
        written: list[_NewFile] = []
        try:
            with self.store.transaction() as transaction:
                cur = transaction.cursor
                columns = ", ".join(lake.COLUMNS["samples"])
                select = f"SELECT {columns} FROM ({sealed_scan_sql(cur, 'samples', [path])})"
                written += self._write(cur, "samples", hour, select)
                self._commit(transaction, written, [path], downsampled)
        except BaseException:
            _abandon(written)
            raise
        self._settle(written, [path])
        log.info("converted the events of %s (sealed before the io/block, lock/wait split)", path)

    # --- dropping ------------------------------------------------------------------------

    def drop_before(self, cutoff: datetime, reason: str) -> None:
        """Drop every partition of hours before `cutoff`: this aggregator's files of them
        and their rows still in DuckDB."""
        with self.store.transaction() as transaction:
            cur = transaction.cursor
            files = cur.execute(
                "SELECT lake || '/' || path, hour, rows, bytes FROM sealed_files "
                "WHERE hour < $cutoff ORDER BY hour",
                {"cutoff": cutoff},
            ).fetchall()
            live_rows = sum(
                cur.execute(
                    f"DELETE FROM {rows} WHERE ts < $cutoff", {"cutoff": cutoff}
                ).fetchone()[0]
                for rows in PARTITIONED.values()
            )
            cur.execute(
                "DELETE FROM ingested_batches WHERE received_at < $cutoff", {"cutoff": cutoff}
            )
            if not files and not live_rows:
                return  # rolled back: nothing to drop
            self._commit(transaction, [], [path for path, *_ in files], downsampled=False)
        self._settle([], [path for path, *_ in files])
        hours = sorted({hour for _, hour, _, _ in files})
        log.warning(
            "%s: dropped %d hour partitions (%s): %d files, %s bytes, %s sealed rows, "
            "%s rows not sealed yet",
            reason,
            len(hours),
            f"{_hour_name(hours[0])} to {_hour_name(hours[-1])}" if hours else "none sealed",
            len(files),
            f"{sum(f[3] for f in files):,}",
            f"{sum(f[2] for f in files):,}",
            f"{live_rows:,}",
        )
        self._prune_stacks()
        self._prune_label_sets()

    def enforce_disk_budget(self, max_bytes: int) -> None:
        """Evict the oldest hours until the DuckDB file and this aggregator's lake files
        fit in `max_bytes`."""
        with self.store.cursor() as cur:
            per_hour = cur.execute(
                "SELECT hour, sum(bytes) FROM sealed_files GROUP BY hour ORDER BY hour"
            ).fetchall()
        database = self.database_bytes()
        used = database + sum(size for _, size in per_hour)
        if used <= max_bytes:
            return
        cutoff = None
        for hour, size in per_hour:
            if used <= max_bytes:
                break
            used -= size
            cutoff = hour + HOUR
        if cutoff is not None:
            self.drop_before(cutoff, f"disk budget {max_bytes:,} bytes")
        if used > max_bytes:
            log.warning(
                "disk budget %s bytes: the DuckDB file alone takes %s bytes (open hours); "
                "nothing sealed is left to evict",
                f"{max_bytes:,}",
                f"{database:,}",
            )

    def database_bytes(self) -> int:
        """The DuckDB file and its write-ahead log, as they are on disk."""
        return sum(
            path.stat().st_size
            for path in (Path(self.store.path), Path(f"{self.store.path}.wal"))
            if path.exists()
        )

    def _prune_stacks(self) -> None:
        """Forget stacks no longer referenced by any row, in DuckDB or in a sealed file."""
        with self.store.cursor() as cur:
            stack_files = [
                path
                for (path,) in cur.execute(
                    "SELECT lake || '/' || path FROM sealed_files WHERE table_name = 'stacks'"
                ).fetchall()
            ]
        pruned = self.store.prune_stacks(stack_files)
        if pruned:
            log.info("forgot %s stacks no longer referenced", f"{pruned:,}")

    def _prune_label_sets(self) -> None:
        """Forget label sets no row in DuckDB uses (sealed files keep labels as strings).
        After a seal or drop only: it scans the rows' label_set column under the write lock."""
        pruned = self.store.prune_label_sets()
        if pruned:
            log.info("forgot %s label sets of sealed or dropped rows", f"{pruned:,}")

    # --- the file life cycle -------------------------------------------------------------

    def _commit(
        self,
        transaction: Transaction,
        written: list[_NewFile],
        dropped: list[str],
        downsampled: bool,
    ) -> None:
        """Finish the transaction: rename the written files into place, record them and
        forget the dropped ones, and commit. If anything fails before the commit, the
        caller abandons; after it, the caller settles."""
        cur = transaction.cursor
        for new in written:
            os.replace(new.temporary, new.final)
        for directory in {new.final.parent for new in written}:
            _fsync_dir(directory)
        for new in written:
            cur.execute(
                "INSERT INTO sealed_files VALUES ($name, $lake, $path, $table, $hour, $rows, "
                "$bytes, $downsampled, now())",
                {
                    "name": self.store.name,
                    "lake": str(self.store.lake),
                    "path": str(new.final.relative_to(self.store.lake)),
                    "table": new.table,
                    "hour": new.hour,
                    "rows": new.rows,
                    "bytes": new.final.stat().st_size,
                    "downsampled": downsampled,
                },
            )
        if dropped:
            cur.execute(
                "DELETE FROM sealed_files WHERE list_contains($paths, lake || '/' || path)",
                {"paths": dropped},
            )
            cur.execute("INSERT INTO lake_pending SELECT unnest($paths)", {"paths": dropped})
            cur.execute(
                "DELETE FROM old_event_files WHERE list_contains($paths, path)", {"paths": dropped}
            )
            cur.execute("DELETE FROM old_event_stacks WHERE NOT EXISTS (FROM old_event_files)")
        transaction.commit()

    def _settle(self, written: list[_NewFile], dropped: list[str]) -> None:
        """After a COMMIT: unlink the dropped files, and nothing is pending any more."""
        _unlink(dropped)
        self._unpend([*(p for f in written for p in (f.temporary, f.final)), *dropped])

    def _pend(self, paths: Iterable[str | Path]) -> None:
        """Note files about to be made, committed before they exist."""
        with self.store.cursor() as cur:
            cur.execute(
                "INSERT INTO lake_pending SELECT unnest($paths)",
                {"paths": [str(p) for p in paths]},
            )

    def _unpend(self, paths: Iterable[str | Path]) -> None:
        with self.store.cursor() as cur:
            cur.execute(
                "DELETE FROM lake_pending WHERE list_contains($paths, path)",
                {"paths": [str(p) for p in paths]},
            )

    def forget_unrecorded(self) -> None:
        """Remove the files a pass that died half-way left behind (pending, not sealed)."""
        with self.store.cursor() as cur:
            leftovers = cur.execute(
                "SELECT DISTINCT path FROM lake_pending "
                "WHERE path NOT IN (SELECT lake || '/' || path FROM sealed_files)"
            ).fetchall()
            existing = [path for (path,) in leftovers if Path(path).exists()]
            _unlink(existing)
            if existing:
                log.warning("removed %d lake files of an interrupted pass", len(existing))
            cur.execute("DELETE FROM lake_pending")

    @staticmethod
    def _rows(cur: duckdb.DuckDBPyConnection, paths: list[str]) -> int:
        result = cur.execute(
            "SELECT sum(rows) FROM sealed_files WHERE list_contains($paths, lake || '/' || path)",
            {"paths": paths},
        ).fetchone()
        return int(result[0] or 0)


def _abandon(written: list[_NewFile]) -> None:
    """After a pass that failed before its commit (rolled back: the rows stay where they
    were), its files go."""
    _unlink(p for new in written for p in (new.temporary, new.final))


def _unlink(paths: Iterable[str | Path]) -> None:
    """Delete files, and their partition directories once empty (other aggregators' files
    keep them)."""
    for path in map(Path, paths):
        path.unlink(missing_ok=True)
        for directory in (path.parent, path.parent.parent):
            try:
                directory.rmdir()
            except OSError:
                break


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _timestamp(value: datetime) -> str:
    return f"'{value.astimezone(UTC).isoformat()}'::TIMESTAMPTZ"


def _quote(value: object) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _hour_name(hour: datetime) -> str:
    return f"{hour.astimezone(UTC):%Y-%m-%d %H}:00 UTC"
