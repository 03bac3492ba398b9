"""Spark SQL over the Parquet lake (query/spark.py) draws the same flame graph as DuckDB."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from fleetprof.aggregator.partitions import Partitions
from fleetprof.aggregator.storage import ProfileStore
from fleetprof.proto import lake, schema
from fleetprof.proto.schema import EVENT_UNITS
from fleetprof.proto.stacks import StackRow, stacks_table
from fleetprof.query.filters import SampleFilter
from fleetprof.query.flame import load_flame
from fleetprof.query.fleet import FleetSource
from fleetprof.query.render import RenderOptions
from fleetprof.query.render.folded import FoldedRenderer
from tests.conftest import require

JAVA_17 = "/usr/lib/jvm/java-17-openjdk-amd64"
HOUR = lake.hour_start(datetime.now(UTC)) - timedelta(hours=5)
JVM = ("start_thread", "JavaThread::run", "java.lang.Thread.run")
STACKS = {
    1: (*JVM, "com.acme.Orders.process", "com.acme.Orders.validate"),
    2: (*JVM, "com.acme.Orders.process", "java.util.HashMap.get"),
    3: (*JVM, "com.acme.Codec.encode;v2", "memcpy"),  # a ';' in a name
    4: (*JVM, "Größe::berechnen", "multi\nline"),  # non-ASCII, a newline
    5: (),  # an empty stack: the process name alone
    6: tuple(f"com.acme.deep.Level{i}.call" for i in range(40)),
    7: (*JVM, "com.acme.Orders.process"),  # a prefix of 1 and 2: self weight mid-path
}


def stack_rows(ids: list[int]) -> pa.Table:
    return stacks_table(
        {i: StackRow(STACKS[i], ("app",) * len(STACKS[i]), ("jit",) * len(STACKS[i])) for i in ids}
    )


def batch(rows: list[tuple[Any, ...]], ts: datetime) -> pa.Table:
    """rows: (comm, event, stack_id, weight, job)."""
    comm, event, stack, weight, job = (list(c) for c in zip(*rows, strict=True))
    return schema.samples_table(
        {
            "ts": pa.array([ts] * len(rows), pa.timestamp("us", tz="UTC")),
            "pid": [10 + i for i in range(len(rows))],
            "tid": [10 + i for i in range(len(rows))],
            "comm": comm,
            "event": event,
            "stack_id": stack,
            "weight": weight,
            "job": job,
        }
    )


@pytest.fixture(scope="module")
def lake_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two aggregators' sealed hours, a late batch's second file, shared stacks."""
    work = tmp_path_factory.mktemp("lake")
    rows_a = [
        ("java", "cpu", 1, 50, "etl"),
        ("java", "cpu", 2, 20, "etl"),
        ("java", "cpu", 7, 9, "etl"),
        ("java", "cpu", 3, 5, "web"),
        ("py;thon", "cpu", 4, 3, None),
        ("java", "cpu", 5, 2, "web"),
        ("java", "lock", 6, 1_500_000, "etl"),
    ]
    rows_b = [
        ("java", "cpu", 1, 30, "web"),
        ("java", "cpu", 6, 4, "etl"),
        ("java", "lock", 2, 700_000, "web"),
        ("java", "lock", 6, 300_000, "etl"),
    ]
    for name, rows in (("agg-a", rows_a), ("agg-b", rows_b)):
        store = ProfileStore(work / f"{name}.duckdb", work / "lake", name)
        for hour in range(2):
            ts = HOUR + timedelta(hours=hour, minutes=20)
            store.append(name, 1 + hour, f"{name}-node", batch(rows, ts), stack_rows(list(STACKS)))
        Partitions(store).seal(lake.hour_start(datetime.now(UTC)))
        # a late batch of a sealed hour: sealed again, into a second file
        late = batch(rows[:2], HOUR + timedelta(minutes=50))
        store.append(name, 3, f"{name}-node", late, stack_rows([]))
        Partitions(store).seal(lake.hour_start(datetime.now(UTC)))
        store.close()
    assert any(lake.parse_path(p).number for p in (work / "lake").rglob("*.parquet"))
    return work / "lake"


@pytest.fixture(scope="module")
def spark() -> Iterator[Any]:
    require(_importable("pyspark"), "pyspark (the [spark] extra) is not installed")
    require(Path(JAVA_17).exists(), "Java 17 is not installed")
    os.environ.setdefault("JAVA_HOME", JAVA_17)
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[1]")
        .appName("fleetprof-test")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.sql.session.timeZone", "UTC")
        .getOrCreate()
    )
    yield session
    session.stop()


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def duckdb_folded(lake_dir: Path, selection: SampleFilter) -> str:
    source = FleetSource(lake_dir, [])
    try:
        tree = load_flame(source, selection)
    finally:
        source.close()
    out = io.BytesIO()
    options = RenderOptions("t", selection.event, EVENT_UNITS[selection.event])
    FoldedRenderer().render(tree, options, out)
    return out.getvalue().decode()


SELECTIONS = [
    SampleFilter(),
    SampleFilter(jobs=("etl",)),
    SampleFilter(event="lock", since=HOUR + timedelta(hours=1), until=HOUR + timedelta(hours=2)),
    SampleFilter(nodes=("agg-b-node",), comms=("java",), pids=(10, 11)),
]


@pytest.mark.slow
@pytest.mark.parametrize("selection", SELECTIONS, ids=lambda s: s.where())
def test_spark_and_duckdb_give_identical_folded_output(
    spark: Any, lake_dir: Path, selection: SampleFilter
) -> None:
    from fleetprof.query import spark as fleetprof_spark

    fleetprof_spark.register_views(spark, str(lake_dir))
    expected = duckdb_folded(lake_dir, selection)
    assert expected.count("\n") >= 2  # a real graph, not two empty ones
    lines = fleetprof_spark.folded(spark, **vars(selection))
    assert "".join(lines) == expected


@pytest.mark.slow
def test_spark_views_have_the_aggregator_columns(spark: Any, lake_dir: Path) -> None:
    from fleetprof.query import spark as fleetprof_spark

    fleetprof_spark.register_views(spark, str(lake_dir))
    for table in lake.TABLES:
        assert tuple(spark.table(table).columns) == lake.COLUMNS[table]
    # stacks once each, though both aggregators sealed them every hour
    assert spark.sql("SELECT count(*) AS n FROM stacks").first().n == len(STACKS)
    depth = spark.sql("SELECT max(depth) AS d FROM frames WHERE stack_id = 6").first().d
    assert depth == 39
