"""The tables are defined once, in proto/: the aggregator's DuckDB views, the lake's files
and the fleet reader's typed empty tables all have the columns and types derived there."""

from __future__ import annotations

from pathlib import Path

from fleetprof.aggregator.database import PARTITIONED
from fleetprof.aggregator.storage import ProfileStore
from fleetprof.proto import lake, schema


def test_the_aggregator_views_have_the_lake_columns_and_types(tmp_path: Path) -> None:
    store = ProfileStore(tmp_path / "p.duckdb", name="agg1")
    try:
        with store.cursor() as cur:
            for view in [*PARTITIONED, "stacks"]:
                name = f"live_{view}" if view in PARTITIONED else view
                described = cur.execute(f"DESCRIBE {name}").fetchall()
                # DuckDB describes TIMESTAMPTZ by its long name
                got = [(row[0], row[1].replace("TIMESTAMP WITH TIME ZONE", "TIMESTAMPTZ"))
                       for row in described]  # fmt: skip
                want = [(c, lake.COLUMN_TYPES[c]) for c in lake.view_columns(view)]
                assert got == want, view
    finally:
        store.close()


def test_the_lake_columns_are_the_wire_schemas_with_their_origin() -> None:
    wire = {"samples": schema.SAMPLES, "io_latency": schema.IO_LATENCY}
    for table, fields in wire.items():
        stored = set(lake.COLUMNS[table])
        assert stored == {*fields.names, *schema.ORIGIN.names}, table
    assert lake.COLUMNS["stacks"] == tuple(schema.STACKS.names)
    assert set(lake.COLUMNS["processes"]) == {*schema.PROCESSES.names, *schema.ORIGIN.names}
