"""Hourly partitions on real DuckDB files and a real Parquet lake: sealing, late batches,
retention, disk budget and downsampling keep every row exactly once or drop exactly the
partitions they should."""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fleetprof.aggregator import storage as storage_module
from fleetprof.aggregator.partitions import LakePolicy, Partitions, parse_size
from fleetprof.aggregator.server import Aggregator
from fleetprof.aggregator.storage import ProfileStore
from fleetprof.cli import main
from fleetprof.proto import lake, schema
from fleetprof.proto.stacks import StackRow, stacks_table
from fleetprof.query.sandbox import QueryError
from fleetprof.query.source import AggregatorSource, DatabaseSource

STACKS = {
    11: StackRow(("main", "compute_alpha"), ("app", "app"), ("native", "native")),
    12: StackRow(("main", "compute_beta"), ("app", "app"), ("native", "native")),
    13: StackRow(("main", "io_wait"), ("app", "app"), ("native", "native")),
}
NOW = lake.hour_start(datetime.now(UTC)) + timedelta(minutes=30)
HOURS = [NOW - timedelta(hours=h) for h in range(8, -1, -1)]  # 8 hours ago .. this one
_sequence = itertools.count(1)


def append_interval(store: ProfileStore, ts: datetime, weights: dict[int, int]) -> None:
    """One agent batch: one row per (stack, pid) at `ts`, as agents send every interval."""
    pids = [100, 200]
    rows = [(stack, pid) for stack in weights for pid in pids]
    table = schema.samples_table(
        {
            "ts": pa.array([ts] * len(rows), pa.timestamp("us", tz="UTC")),
            "pid": [pid for _, pid in rows],
            "tid": [pid for _, pid in rows],
            "comm": ["app"] * len(rows),
            "event": ["cpu"] * len(rows),
            "stack_id": [stack for stack, _ in rows],
            "weight": [weights[stack] for stack, _ in rows],
            "job": ["etl"] * len(rows),
        }
    )
    used = {stack: STACKS[stack] for stack in weights}
    store.append("agent-1", next(_sequence), "node-a", table, stacks_table(used))


def fill_hours(store: ProfileStore, hours: list[datetime]) -> None:
    """Six 10 s intervals in each hour (one minute), stacks 11:3, 12:1 (x2 pids)."""
    for hour in hours:
        start = lake.hour_start(hour) + timedelta(minutes=5)
        for i in range(6):
            append_interval(store, start + timedelta(seconds=10 * i), {11: 3, 12: 1})


def per_hour(store: ProfileStore, view: str = "samples") -> dict[datetime, tuple[int, int]]:
    """(rows, weight) per UTC hour as SQL sees them."""
    rows = (
        store.reader()
        .execute(
            f"SELECT epoch_us(ts) // 3600000000 AS h, count(*), sum(weight) FROM {view} "
            "GROUP BY h ORDER BY h"
        )
        .fetchall()
    )
    return {datetime.fromtimestamp(h * 3600, UTC): (n, int(w)) for h, n, w in rows}


def live_rows(store: ProfileStore) -> int:
    return store.reader().execute("SELECT count(*) FROM sample_rows").fetchone()[0]


@pytest.fixture
def store(tmp_path: Path) -> ProfileStore:
    store = ProfileStore(tmp_path / "p.duckdb", name="agg1")
    yield store
    store.close()


def test_sealing_moves_closed_hours_to_the_lake_and_sql_sees_each_row_once(
    store: ProfileStore,
) -> None:
    fill_hours(store, HOURS[-4:])  # three closed hours and the open one
    before = per_hour(store)
    flame_before = store.reader().execute("SELECT folded, weight FROM flame('cpu')").fetchall()

    Partitions(store).maintain(NOW)

    assert per_hour(store) == before
    assert store.reader().execute("SELECT folded, weight FROM flame('cpu')").fetchall() == (
        flame_before
    )
    assert live_rows(store) == before[lake.hour_start(NOW)][0]  # only the open hour is left
    for hour in map(lake.hour_start, HOURS[-4:-1]):
        path = lake.file_path(store.lake, "samples", hour, "agg1", 0)
        assert path == store.lake / "samples" / f"date={hour:%Y-%m-%d}" / f"hour={hour:%H}" / (
            "agg1.parquet"
        )
        table = pq.read_table(path)
        assert tuple(table.column_names) == lake.COLUMNS["samples"]
        assert (table.num_rows, pa.compute.sum(table["weight"]).as_py()) == before[hour]
        assert pq.ParquetFile(path).metadata.row_group(0).column(0).compression == "ZSTD"
        stacks = pq.read_table(lake.file_path(store.lake, "stacks", hour, "agg1", 0))
        assert tuple(stacks.column_names) == lake.COLUMNS["stacks"]
        assert sorted(stacks["stack_id"].to_pylist()) == [11, 12]
        assert lake.parse_path(path) == lake.LakeFile("samples", hour, "agg1", 0)
    assert not list(store.lake.rglob(".*"))  # no temporary file left
    sealed = store.reader().execute("SELECT name, path FROM lake_files ORDER BY path").fetchall()
    assert len(sealed) == 6 and {name for name, _ in sealed} == {"agg1"}


def test_late_batch_for_a_sealed_hour_is_sealed_into_a_further_file(store: ProfileStore) -> None:
    fill_hours(store, HOURS[-3:-1])
    partitions = Partitions(store)
    partitions.maintain(NOW)
    late_hour = lake.hour_start(HOURS[-3])
    append_interval(store, late_hour + timedelta(minutes=59), {13: 5})
    assert per_hour(store)[late_hour] == (12 * 2 + 2, 6 * 8 + 10)  # live and sealed, once

    partitions.maintain(NOW)

    assert live_rows(store) == 0
    late = pq.read_table(lake.file_path(store.lake, "samples", late_hour, "agg1", 1))
    assert late["stack_id"].to_pylist() == [13, 13]
    late_stacks = pq.read_table(lake.file_path(store.lake, "stacks", late_hour, "agg1", 1))
    assert late_stacks["stack_id"].to_pylist() == [13]
    assert per_hour(store)[late_hour] == (12 * 2 + 2, 6 * 8 + 10)


def test_ingest_while_sealing_loses_and_doubles_nothing(store: ProfileStore) -> None:
    """Batches for the hour being sealed keep arriving: every one is counted once."""
    fill_hours(store, HOURS[-3:-1])
    partitions = Partitions(store)
    stop = threading.Event()
    sent = []

    def ingest() -> None:
        for i in itertools.count():
            if stop.is_set():
                return
            ts = lake.hour_start(HOURS[-2 - i % 2]) + timedelta(seconds=i % 3600)
            append_interval(store, ts, {13: 1})
            sent.append(ts)

    writer = threading.Thread(target=ingest)
    writer.start()
    try:
        for _ in range(5):
            partitions.maintain(NOW)
    finally:
        stop.set()
        writer.join()
    partitions.maintain(NOW)

    io_wait = (
        store.reader().execute("SELECT count(*) FROM samples WHERE stack_id = 13").fetchone()[0]
    )
    assert io_wait == 2 * len(sent)
    assert live_rows(store) == 0
    assert sum(n for n, _ in per_hour(store).values()) == 2 * 24 + 2 * len(sent)


def test_a_failed_seal_keeps_the_rows_and_leaves_no_file(
    store: ProfileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill_hours(store, HOURS[-2:-1])
    before = per_hour(store)

    def fail(cur: object) -> None:
        raise OSError("disk gone")

    with monkeypatch.context() as patched:
        patched.setattr(storage_module, "refresh_views", fail)
        with pytest.raises(OSError):
            Partitions(store).maintain(NOW)
    assert per_hour(store) == before and live_rows(store) == 24
    assert not [p for p in store.lake.rglob("*") if p.is_file()]

    Partitions(store).maintain(NOW)
    assert per_hour(store) == before and live_rows(store) == 0


def test_files_of_a_pass_that_died_are_removed_by_the_next(store: ProfileStore) -> None:
    """A crash after the rename but before COMMIT leaves a file the database never
    recorded: it is pending, so the next pass deletes it (its rows are still live)."""
    fill_hours(store, HOURS[-2:-1])
    orphan = lake.file_path(store.lake, "samples", lake.hour_start(HOURS[-2]), "agg1", 0)
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"half a seal")
    store.reader().execute("INSERT INTO lake_pending VALUES (?)", [str(orphan)])
    foreign = orphan.with_name("other.parquet")  # another aggregator's: never touched
    foreign.write_bytes(b"theirs")

    Partitions(store).maintain(NOW)

    assert pq.read_table(orphan).num_rows == 24  # the real seal, not the orphan
    assert foreign.read_bytes() == b"theirs"
    assert live_rows(store) == 0


def test_retention_drops_exactly_the_hours_older_than_it(
    store: ProfileStore, caplog: pytest.LogCaptureFixture
) -> None:
    fill_hours(store, HOURS)
    partitions = Partitions(store, LakePolicy(retention=timedelta(hours=4)))
    partitions.seal(lake.hour_start(NOW) - timedelta(hours=2))  # two closed hours stay live
    before = per_hour(store)
    cutoff = lake.hour_start(NOW - timedelta(hours=4))
    old_dir = lake.partition_dir(store.lake, "samples", cutoff - timedelta(hours=1))
    foreign = old_dir / "other.parquet"
    foreign.write_bytes(b"theirs")

    with caplog.at_level(logging.WARNING):
        partitions.maintain(NOW)

    assert per_hour(store) == {h: c for h, c in before.items() if h >= cutoff}
    assert len(before) == 9 and len(per_hour(store)) == 5
    for hour in before:
        exists = lake.file_path(store.lake, "samples", hour, "agg1", 0).exists()
        assert exists == (cutoff <= hour < lake.hour_start(NOW))
    assert foreign.read_bytes() == b"theirs"  # not ours to drop
    assert "retention 4:00:00: dropped 4 hour partitions" in caplog.text
    # Stacks stay while a retained row uses them; a stack no row uses any more goes.
    assert store.reader().execute("SELECT count(*) FROM stacks").fetchone()[0] == 2


def test_retention_forgets_stacks_only_old_hours_used(store: ProfileStore) -> None:
    fill_hours(store, HOURS[-2:])
    append_interval(store, HOURS[0], {13: 1})  # 8 hours ago, alone on stack 13
    partitions = Partitions(store, LakePolicy(retention=timedelta(hours=4)))

    partitions.maintain(NOW)

    stacks = store.reader().execute("SELECT stack_id FROM stacks ORDER BY 1").fetchall()
    assert stacks == [(11,), (12,)]
    assert store.reader().execute("SELECT sum(weight) FROM flame('cpu')").fetchone()[0] == 96


def test_disk_budget_evicts_the_oldest_hours_until_everything_fits(
    store: ProfileStore, caplog: pytest.LogCaptureFixture
) -> None:
    fill_hours(store, HOURS)
    partitions = Partitions(store)
    partitions.maintain(NOW)
    store.reader().execute("CHECKPOINT")
    before = per_hour(store)
    sizes = dict(
        store.reader()
        .execute("SELECT hour, sum(bytes) FROM sealed_files GROUP BY hour ORDER BY hour")
        .fetchall()
    )
    newest = sorted(sizes)[-3:]
    budget = partitions.database_bytes() + sum(sizes[h] for h in newest) + min(sizes.values()) // 2

    with caplog.at_level(logging.WARNING):
        partitions.enforce_disk_budget(budget)

    kept = set(newest) | {lake.hour_start(NOW)}
    assert per_hour(store) == {h: c for h, c in before.items() if h in kept}
    assert f"disk budget {budget:,} bytes: dropped 5 hour partitions" in caplog.text
    assert sorted(h for (h,) in store.reader().execute(
        "SELECT DISTINCT hour FROM sealed_files"
    ).fetchall()) == newest  # fmt: skip


def test_downsampling_keeps_totals_per_stack_and_minute_with_fewer_rows(
    store: ProfileStore,
) -> None:
    fill_hours(store, HOURS[-4:])
    partitions = Partitions(store, LakePolicy(downsample_after=timedelta(hours=1)))
    by_stack = "SELECT stack_id, pid, sum(weight) FROM samples GROUP BY ALL ORDER BY ALL"
    by_minute = (
        "SELECT epoch_us(ts) // 60000000, sum(weight) FROM samples GROUP BY ALL ORDER BY ALL"
    )
    stacks_before = store.reader().execute(by_stack).fetchall()
    minutes_before = store.reader().execute(by_minute).fetchall()
    rows_before = per_hour(store)

    partitions.maintain(NOW)

    assert store.reader().execute(by_stack).fetchall() == stacks_before
    assert store.reader().execute(by_minute).fetchall() == minutes_before
    rows_after = per_hour(store)
    old = [lake.hour_start(h) for h in HOURS[-4:-2]]
    for hour, (rows, weight) in rows_before.items():
        # six 10 s intervals of one minute: one row per (stack, pid) is left of them
        assert rows_after[hour] == ((rows // 6, weight) if hour in old else (rows, weight))
    downsampled = (
        store.reader()
        .execute("SELECT hour, path FROM lake_files WHERE downsampled ORDER BY hour, path")
        .fetchall()
    )
    assert [(h, Path(p).name) for h, p in downsampled] == [(h, "agg1_1.parquet") for h in old]
    assert not lake.file_path(store.lake, "samples", old[0], "agg1", 0).exists()


def test_queries_read_the_sealed_hours_through_the_sandbox(tmp_path: Path) -> None:
    # Hours of the clock now, not of the module's import: the aggregator below seals on its
    # own by the clock, and this test may run after an hour turned.
    now = lake.hour_start(datetime.now(UTC)) + timedelta(minutes=30)
    hours = [now - timedelta(hours=h) for h in (2, 1, 0)]
    db = tmp_path / "p.duckdb"
    store = ProfileStore(db, name="agg1")
    fill_hours(store, hours)
    Partitions(store).maintain(now)
    store.close()
    source = DatabaseSource(db)
    with source.stream("SELECT sum(weight) AS w FROM samples") as reader:
        assert reader.read_all()["w"].to_pylist() == [144]
    for refused in ("SELECT * FROM read_parquet('/tmp/*.parquet')", "SELECT * FROM glob('/*')"):
        with pytest.raises(QueryError), source.stream(refused) as reader:
            reader.read_all()
    source.close()

    server = Aggregator(db, "127.0.0.1:0", lake_policy=LakePolicy())
    server.start()
    try:
        # sealing on the locked-down instance: it may write the lake, queries may read it
        append_interval(server.store, lake.hour_start(hours[-2]), {13: 4})
        server.partitions.maintain(now)
        assert live_rows(server.store) == 24
        with AggregatorSource(server.address).stream(
            "SELECT sum(weight) AS w FROM flame('cpu')"
        ) as reader:
            assert reader.read_all()["w"].to_pylist() == [152]
    finally:
        server.stop(grace_s=0)


def test_storage_flags_refuse_bad_values_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    db = str(tmp_path / "p.duckdb")
    for flag, value in (("--retention", "14x"), ("--max-disk", "lots")):
        with pytest.raises(SystemExit):
            main(["aggregator", "--db", db, flag, value])
        assert value in capsys.readouterr().err.strip().splitlines()[-1]
    assert main(["aggregator", "--db", db, "--name", "a_b", "--listen", "127.0.0.1:0"]) == 2
    assert "bad aggregator name 'a_b'" in capsys.readouterr().err
    assert parse_size("10GB") == 10_000_000_000 and parse_size("2GiB") == 2 * 1024**3


def test_a_full_lake_disk_fails_the_seal_and_loses_nothing(
    tmp_path: Path,
    small_disk: Path,
) -> None:
    store = ProfileStore(tmp_path / "p.duckdb", small_disk / "lake", name="agg1")
    fill_hours(store, HOURS[-3:-1])
    before = per_hour(store)
    filler = small_disk / "filler"
    with open(filler, "wb") as file, contextlib.suppress(OSError):
        while True:
            file.write(b"\0" * 65536)
            file.flush()

    with pytest.raises(duckdb.Error):
        Partitions(store).maintain(NOW)
    assert per_hour(store) == before and live_rows(store) == 48
    assert [p.name for p in small_disk.rglob("*") if p.is_file()] == ["filler"]

    filler.unlink()
    Partitions(store).maintain(NOW)
    assert per_hour(store) == before and live_rows(store) == 0
    store.close()


def test_label_sets_of_sealed_rows_are_forgotten_and_made_anew_when_used_again(
    store: ProfileStore,
) -> None:
    """Rows refer to their labels by number; sealing an hour forgets the label sets only
    its rows used (its files keep the labels as text), and a batch with those labels
    later gets a new set, with every row still showing its own labels."""
    fill_hours(store, HOURS[-3:-2])  # job "etl", closed two hours ago
    other = schema.samples_table(
        {
            "ts": pa.array([NOW], pa.timestamp("us", tz="UTC")),
            "pid": [300],
            "tid": [300],
            "comm": ["other"],
            "event": ["cpu"],
            "stack_id": [13],
            "weight": [5],
            "job": ["batch"],
        }
    )
    store.append("agent-2", 1, "node-b", other, stacks_table({13: STACKS[13]}))
    labels = "SELECT node, agent_id, comm, job FROM label_sets ORDER BY ALL"
    assert store.reader().execute(labels).fetchall() == [
        ("node-a", "agent-1", "app", "etl"),
        ("node-b", "agent-2", "other", "batch"),
    ]

    Partitions(store).maintain(NOW)

    assert store.reader().execute(labels).fetchall() == [("node-b", "agent-2", "other", "batch")]
    append_interval(store, NOW, {11: 2})  # the sealed hour's labels again, in the open hour
    assert store.reader().execute(labels).fetchall() == [
        ("node-a", "agent-1", "app", "etl"),
        ("node-b", "agent-2", "other", "batch"),
    ]
    per_labels = (
        "SELECT node, comm, job, count(*), sum(weight) FROM samples GROUP BY ALL ORDER BY ALL"
    )
    assert store.reader().execute(per_labels).fetchall() == [
        ("node-a", "app", "etl", 24 + 2, 6 * 2 * 4 + 2 * 2),
        ("node-b", "other", "batch", 1, 5),
    ]


def test_a_stack_forgotten_while_a_batch_waits_is_stored_with_it(
    store: ProfileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch leaves out the stacks it carries that are stored already (looked up before
    the write lock); should retention forget one before the batch commits, the batch
    stores it again, and its rows keep their frames."""
    store.append("agent-1", next(_sequence), "node-a", schema.SAMPLES.empty_table(),
                 stacks_table({11: STACKS[11]}))  # fmt: skip
    prepare = ProfileStore._prepare

    def prepare_then_forget(self: ProfileStore, *args: object) -> object:
        prepared = prepare(self, *args)
        assert self.prune_stacks([]) == 1  # stack 11: no row uses it yet
        return prepared

    monkeypatch.setattr(ProfileStore, "_prepare", prepare_then_forget)
    append_interval(store, NOW, {11: 3})
    flame = store.reader().execute("SELECT folded, weight FROM flame('cpu')").fetchall()
    assert flame == [("app;main;compute_alpha", 6)]
