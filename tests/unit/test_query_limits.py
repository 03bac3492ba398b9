"""`fleetprof query` streams big results in bounded memory; the memory limit holds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fleetprof.aggregator.server import Aggregator
from fleetprof.aggregator.storage import ProfileStore
from fleetprof.cli import main
from fleetprof.query.sandbox import QueryError
from fleetprof.query.source import AggregatorSource, DatabaseSource

ROWS = 5_000_000
# ~75 bytes a row: the whole result would be ~375 MB of CSV, far more than a batch
WIDE_SQL = f"SELECT i, repeat('x', 60) || i::VARCHAR AS s FROM range({ROWS}) t(i)"
MAX_RSS_MB = 300
# list() cannot spill to disk: it needs 80 MB in memory
NEEDS_80MB = "SELECT len(list(i)) AS n FROM range(10000000) t(i)"


@pytest.fixture
def database(tmp_path: Path) -> Path:
    path = tmp_path / "p.duckdb"
    ProfileStore(path).close()
    return path


# VmHWM, not wait4's ru_maxrss: that one keeps the RSS of the forked test process (1 GB late
# in a full run) across the exec; VmHWM belongs to the new program's memory alone.
MEASURED = """
import sys
from fleetprof.cli import main
status = main(sys.argv[1:])
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")))
sys.exit(status)
"""


def run_measured(args: list[str]) -> tuple[int, float]:
    """Exit status and peak RSS (MB) of `fleetprof ARGS` in a process of its own."""
    done = subprocess.run([sys.executable, "-c", MEASURED, *args], capture_output=True, text=True)
    return done.returncode, int(done.stdout.split()[-1]) / 1024


def count_lines(path: Path) -> int:
    lines = 0
    with open(path, "rb") as data:
        while chunk := data.read(1 << 24):
            lines += chunk.count(b"\n")
    return lines


@pytest.mark.parametrize("via", ["db", "aggregator"])
def test_five_million_rows_stream_in_bounded_memory(
    database: Path, tmp_path: Path, via: str
) -> None:
    out = tmp_path / "big.csv"
    if via == "db":
        status, rss = run_measured(
            ["query", "--db", str(database), WIDE_SQL, "--format", "csv", "-o", str(out)]
        )
    else:
        aggregator = Aggregator(tmp_path / "live.duckdb", "127.0.0.1:0")
        aggregator.start()
        try:
            status, rss = run_measured(
                [
                    "query",
                    "--aggregator",
                    aggregator.address,
                    WIDE_SQL,
                    "--format",
                    "csv",
                    "-o",
                    str(out),
                ]
            )
        finally:
            aggregator.stop(grace_s=0)
    assert status == 0
    assert count_lines(out) == ROWS + 1  # the header
    assert out.stat().st_size > 2 * MAX_RSS_MB * 2**20 // 3
    assert rss < MAX_RSS_MB, f"peak RSS {rss:.0f} MB: the result was held, not streamed"


def test_memory_limit_on_a_database_file(database: Path, capsys) -> None:
    source = DatabaseSource(database, memory_limit="40MB")
    try:
        with source.stream("SELECT current_setting('memory_limit') AS m") as reader:
            assert reader.read_all()["m"].to_pylist() == ["38.1 MiB"]
    finally:
        source.close()
    status = main(["query", "--db", str(database), "--memory-limit", "40MB", NEEDS_80MB])
    err = capsys.readouterr().err
    assert status == 2 and "memory" in err.lower() and err.count("\n") == 1
    # without the limit the same query runs
    assert main(["query", "--db", str(database), NEEDS_80MB]) == 0
    with pytest.raises(QueryError, match="bad memory limit"):
        DatabaseSource(database, memory_limit="40MB'; SET x = '1")


def test_memory_limit_of_the_aggregator_bounds_its_queries(tmp_path: Path) -> None:
    aggregator = Aggregator(tmp_path / "live.duckdb", "127.0.0.1:0", memory_limit="40MB")
    aggregator.start()
    source = AggregatorSource(aggregator.address)
    try:
        with pytest.raises(QueryError, match=r"(?i)memory"), source.stream(NEEDS_80MB) as reader:
            reader.read_all()
        with source.stream("SELECT 42 AS answer") as reader:
            assert reader.read_all()["answer"].to_pylist() == [42]
    finally:
        source.close()
        aggregator.stop(grace_s=0)
