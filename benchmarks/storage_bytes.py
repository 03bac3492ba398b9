"""Bytes per stored sample row: in the aggregator's DuckDB file, and sealed as Parquet.

Rows as agents send them: `--nodes` nodes, each with 4 JVMs (pods) of 16 threads in 8 jobs,
sampled at 19 Hz on 8 CPUs for `--minutes` minutes in 10 s intervals; each sample's stack
drawn Zipf-like (P(k) ~ 1/k) from `--stacks` shared JVM-like stacks of 10 to 60 frames
(benchmarks/flame_query.py), then counted per (pid, tid, stack) and interval as the
kernel aggregates them. Every (node, interval) is one batch through ProfileStore.append.
The hour is then sealed into the lake (aggregator/partitions.py) and, last, downsampled to
one row per minute.

Printed: bytes per sample row of the DuckDB file (stacks included), of the sealed samples
Parquet files, of samples + stacks files, and after downsampling; Parca's figure for
comparison is ~60 bytes per sample. And the time of one job's merged stacks (a flame
graph's query) over the hour in DuckDB, then sealed, as a ratio.
Run: .venv/bin/python benchmarks/storage_bytes.py [--nodes 20] [--minutes 30] [--stacks 20000]
"""

from __future__ import annotations

import argparse
import random
import subprocess
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import numpy
import pyarrow as pa
from flame_query import best_of, synthetic_stacks

from fleetprof.aggregator.partitions import LakePolicy, Partitions
from fleetprof.aggregator.storage import ProfileStore
from fleetprof.proto import lake, schema
from fleetprof.proto.stacks import stack_id, stacks_table

PARCA_BYTES_PER_SAMPLE = 60
ONE_JOB_FLAME = (
    "SELECT stack_id, sum(weight) FROM samples WHERE event = 'cpu' AND job = 'job-3' "
    "GROUP BY stack_id"
)
SAMPLES_PER_INTERVAL = 8 * 19 * 10  # 8 CPUs at 19 Hz for 10 s


def node_intervals(
    conn: duckdb.DuckDBPyConnection, nodes: int, intervals: int, stacks: int, start: datetime
) -> pa.Table:
    """Every node's aggregated rows of every interval, ordered by batch (node, interval)."""
    return conn.sql(
        """
        SELECT d.nv AS batch, n AS node, $start::TIMESTAMPTZ + (v + 1) * INTERVAL 10 SECOND AS ts,
               1000 + j AS pid, 2000 + 16 * j + t AS tid, 'java' AS comm, 'cpu' AS event,
               f.stack_id, count(*)::BIGINT AS weight,
               'job-' || ((n * 4 + j) % 8) AS job, 'prod' AS namespace,
               job || '-' || n || '-' || j AS pod, 'main' AS container
        FROM (
            SELECT s // $per AS nv, (hash(s) % 4)::INTEGER AS j, (hash(s * 7) % 16)::INTEGER AS t,
                   (floor(pow($stacks + 1, random())) - 1)::BIGINT AS k
            FROM range($nodes * $intervals * $per) r(s)
        ) d
        JOIN fleet_ids f USING (k),
        LATERAL (SELECT d.nv // $intervals AS n, d.nv % $intervals AS v)
        GROUP BY ALL ORDER BY batch
        """,
        params={
            "start": start,
            "per": SAMPLES_PER_INTERVAL,
            "stacks": stacks,
            "nodes": nodes,
            "intervals": intervals,
        },
    ).to_arrow_table()


def store_rows(store: ProfileStore, rows: pa.Table, stack_rows: pa.Table) -> None:
    store.append("bench", 0, "node-0", schema.SAMPLES.empty_table(), stack_rows)
    batches = rows["batch"].to_numpy()
    starts = [0, *(numpy.flatnonzero(numpy.diff(batches)) + 1).tolist()]
    for sequence, (begin, end) in enumerate(
        zip(starts, [*starts[1:], rows.num_rows], strict=True), 1
    ):
        batch = rows.slice(begin, end - begin)
        node = f"node-{batch['node'][0].as_py():04d}"
        samples = schema.samples_table(
            {c: batch[c] for c in schema.SAMPLES.names if c in batch.column_names}
        )
        store.append(f"agent-{node}", sequence, node, samples, stack_rows.slice(0, 0))


def lake_bytes(store: ProfileStore, table: str) -> int:
    return sum(p.stat().st_size for p in (store.lake / table).rglob("*.parquet"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--minutes", type=int, default=30)
    parser.add_argument("--stacks", type=int, default=20_000)
    args = parser.parse_args()
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())

    stacks = synthetic_stacks(args.stacks, random.Random(7))
    ids = [stack_id(row) for row in stacks]
    random.Random(8).shuffle(ids)  # popularity independent of the order stacks were grown in
    stack_rows = stacks_table(dict(zip(ids, stacks, strict=True)))
    start = lake.hour_start(datetime.now(UTC)) - timedelta(hours=2)
    conn = duckdb.connect()
    conn.execute("SELECT setseed(0.5)").fetchall()
    conn.register("fleet_ids", pa.table({"k": range(len(ids)), "stack_id": ids}))
    rows = node_intervals(conn, args.nodes, args.minutes * 6, args.stacks, start)
    count = rows.num_rows
    print(
        f"{args.nodes} nodes x {args.minutes} min: {count:,} sample rows "
        f"({count / (args.nodes * args.minutes * 6):.0f} per batch), {args.stacks:,} stacks"
    )

    with tempfile.TemporaryDirectory() as tmp:
        store = ProfileStore(Path(tmp) / "bench.duckdb", name="bench")
        started = time.perf_counter()
        store_rows(store, rows, stack_rows)
        took = time.perf_counter() - started
        store.reader().execute("CHECKPOINT")
        partitions = Partitions(store, LakePolicy(downsample_after=timedelta(hours=1)))
        duck = partitions.database_bytes()
        print(f"appended in {took:.1f} s ({count / took:,.0f} rows/s)")

        def flame_rows() -> None:
            store.reader().execute(ONE_JOB_FLAME).fetchall()

        in_duckdb_s = best_of(3, {"flame": flame_rows})["flame"]
        started = time.perf_counter()
        partitions.seal(lake.hour_start(datetime.now(UTC)))
        sealed_s = time.perf_counter() - started
        in_parquet_s = best_of(3, {"flame": flame_rows})["flame"]
        samples, stacks_b = lake_bytes(store, "samples"), lake_bytes(store, "stacks")
        partitions.downsample(lake.hour_start(datetime.now(UTC)))
        downsampled_rows = store.reader().execute("SELECT count(*) FROM samples").fetchone()[0]
        downsampled = lake_bytes(store, "samples")
        store.close()

    print(f"sealed in {sealed_s:.1f} s")
    print(
        f"one job's flame graph rows: {in_duckdb_s * 1000:.0f} ms in DuckDB, "
        f"{in_parquet_s * 1000:.0f} ms sealed (ratio {in_parquet_s / in_duckdb_s:.2f}x)"
    )
    print(f"{'where':42} {'bytes/row':>10} {'vs Parca':>9}")
    for label, size, n in (
        ("DuckDB file (samples + stacks)", duck, count),
        ("Parquet samples files", samples, count),
        ("Parquet samples + stacks files", samples + stacks_b, count),
        (f"Parquet after downsampling ({downsampled_rows:,} rows)", downsampled, count),
    ):
        print(f"{label:42} {size / n:10.1f} {size / n / PARCA_BYTES_PER_SAMPLE:8.2f}x")
    print("(per original sample row; Parca: ~60 bytes per sample)")


if __name__ == "__main__":
    main()
