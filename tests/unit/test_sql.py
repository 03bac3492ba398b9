"""Read-only SQL over profiles, through an aggregator and on a database file."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fleetprof.aggregator.server import Aggregator
from fleetprof.aggregator.storage import ProfileStore
from fleetprof.cli import main
from fleetprof.proto.stacks import stacks_table
from fleetprof.query.sandbox import QueryError
from fleetprof.query.source import AggregatorSource, DatabaseSource
from tests.unit.test_ingest import STACKS, batch, samples, send

REFUSED = [
    "INSERT INTO sample_rows SELECT * FROM sample_rows",
    "DELETE FROM sample_rows",
    "DROP TABLE sample_rows",
    "CREATE TABLE x AS SELECT 1",
    "UPDATE sample_rows SET weight = 0",
    "ATTACH '/tmp/other.duckdb' AS other",
    "COPY sample_rows TO '/tmp/stolen.csv'",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET enable_external_access = true",
    "PRAGMA enable_profiling",
    "SELECT 1; DROP TABLE sample_rows",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_text('/etc/hostname')",
    "SELECT * FROM read_parquet('/tmp/*.parquet')",
    "SELECT * FROM glob('/etc/*')",
]


@pytest.fixture
def stored(aggregator: Aggregator) -> Aggregator:
    send(aggregator, batch(1), batch(2))
    return aggregator


@pytest.mark.parametrize("sql", REFUSED)
def test_aggregator_refuses_writes_and_file_access(stored: Aggregator, sql: str) -> None:
    source = AggregatorSource(stored.address)
    with pytest.raises(QueryError) as error, source.stream(sql) as reader:
        reader.read_all()
    assert "\n" not in str(error.value)
    weight = stored.store.reader().execute("SELECT sum(weight) FROM samples").fetchone()[0]
    assert weight == 8  # nothing was changed


@pytest.mark.parametrize("sql", REFUSED)
def test_database_file_refuses_writes_and_file_access(tmp_path: Path, sql: str) -> None:
    path = tmp_path / "p.duckdb"
    store = ProfileStore(path)
    store.append("a", 1, "n", samples({11: 3}), stacks_table(STACKS))
    store.close()
    source = DatabaseSource(path)
    with pytest.raises(QueryError), source.stream(sql) as reader:
        reader.read_all()
    source.close()


def test_flame_style_query_joins_samples_and_stacks(stored: Aggregator) -> None:
    source = AggregatorSource(stored.address)
    with source.stream(
        "SELECT frames[-1] AS leaf, sum(weight) AS w FROM samples JOIN stacks USING (stack_id) "
        "GROUP BY leaf ORDER BY w DESC"
    ) as reader:
        rows = reader.read_all().to_pylist()
    assert rows == [{"leaf": "compute_alpha", "w": 6}, {"leaf": "compute_beta", "w": 2}]


def test_bad_query_gets_one_line_from_duckdb(stored: Aggregator, capsys) -> None:
    status = main(["query", "--aggregator", stored.address, "SELECT nope FROM samples"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1 and "nope" in err and "Traceback" not in err


def test_query_output_formats(stored: Aggregator, tmp_path: Path, capsys) -> None:
    sql = "SELECT node, sum(weight) AS weight FROM samples GROUP BY node"
    assert main(["query", "--aggregator", stored.address, sql]) == 0
    table = capsys.readouterr().out
    assert "node-a" in table and "8" in table and "(1 row)" in table
    assert main(["query", "--aggregator", stored.address, sql, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"node": "node-a", "weight": 8}
    assert main(["query", "--aggregator", stored.address, sql, "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ['"node","weight"', '"node-a",8']
    out = tmp_path / "r.parquet"
    assert (
        main(["query", "--aggregator", stored.address, sql, "--format", "parquet", "-o", str(out)])
        == 0
    )
    assert pq.read_table(out).to_pylist() == [{"node": "node-a", "weight": 8}]
