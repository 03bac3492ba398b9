"""`fleetprof query`'s default table output against CSV, on a large result.

The same 2M rows (an integer, a frame-like string, a double) are streamed from DuckDB as
Arrow batches, as `fleetprof query` gets them, and written by each writer of
query/result_formats.py to a discarding sink. Prints seconds per run and the ratio
table / CSV, with the load average (the machine is shared). Before the table writer went
column-wise it was ~30x CSV (63 s against 2 s through an aggregator).
Run: .venv/bin/python benchmarks/table_output.py [--rows N] [--repeats N]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import time

import duckdb

from fleetprof.query.result_formats import WRITERS

SQL = "SELECT range AS n, 'frame_' || range AS s, range * 1.5 AS d FROM range({rows})"


class Discard(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        return len(data)


def once(conn: duckdb.DuckDBPyConnection, rows: int, fmt: str) -> float:
    started = time.perf_counter()
    reader = conn.sql(SQL.format(rows=rows)).to_arrow_reader(65_536)
    WRITERS[fmt](reader, Discard())
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    conn = duckdb.connect()
    times: dict[str, list[float]] = {"table": [], "csv": []}
    for _ in range(args.repeats):
        for fmt in times:  # interleaved, so load changes hit both alike
            times[fmt].append(once(conn, args.rows, fmt))
    ratios = [t / c for t, c in zip(times["table"], times["csv"], strict=True)]
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{args.rows:,} rows, {args.repeats} runs, load average {load}")
    for fmt, runs in times.items():
        print(f"  {fmt:5}: " + ", ".join(f"{t:.2f}" for t in runs) + " s")
    print(
        f"  table / csv: median {statistics.median(ratios):.2f}x "
        f"(min {min(ratios):.2f}, max {max(ratios):.2f})"
    )


if __name__ == "__main__":
    main()
