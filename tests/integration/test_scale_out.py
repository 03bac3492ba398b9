"""Scale-out: agents split over two aggregators, a shared Parquet lake, and one query that
sees every sample exactly once (query/fleet.py), on real aggregators over loopback gRPC."""

from __future__ import annotations

import itertools
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from fleetprof.aggregator.partitions import Partitions
from fleetprof.aggregator.server import Aggregator
from fleetprof.aggregator.storage import ProfileStore
from fleetprof.cli import main
from fleetprof.node_agent.assignment import assign
from fleetprof.node_agent.batch import Batch
from fleetprof.node_agent.shipper import Shipper
from fleetprof.node_agent.spool import Spool
from fleetprof.proto import lake, schema
from fleetprof.proto.stacks import StackRow, stacks_table
from fleetprof.query.filters import SampleFilter
from fleetprof.query.flame import load_flame
from fleetprof.query.fleet import FleetSource
from fleetprof.query.render.folded import PROCESS_HEADER
from fleetprof.query.source import AggregatorSource
from tests.conftest import require_ebpf

STACKS = {
    21: StackRow(("main", "parse"), ("app", "app"), ("native", "native")),
    22: StackRow(("main", "encode"), ("app", "app"), ("native", "native")),
    23: StackRow(("main", "encode", "memcpy"), ("app", "app", "libc"), ("native",) * 3),
}
NOW = datetime.now(UTC)
OLD_HOUR = lake.hour_start(NOW) - timedelta(hours=3)
PER_NODE_SQL = "SELECT node, sum(weight)::BIGINT AS weight FROM samples GROUP BY node"
_sequence = itertools.count(1)


def ship(address: str, node: str, ts: datetime, weights: dict[int, int], spool: Path) -> None:
    """One agent batch of `node` through the agent's Shipper (real gRPC, acked)."""
    samples = _samples(weights, ts)
    shipper = Shipper(address, f"{node}/{next(_sequence)}", node, Spool(spool, 1 << 20))
    shipper.ship(Batch(samples, {s: STACKS[s] for s in weights}))
    assert shipper.stats["acked"] == 1 and shipper.pending == 0
    shipper.close()


def per_node(source: AggregatorSource | FleetSource) -> dict[str, int]:
    with source.stream(PER_NODE_SQL) as reader:
        return {row["node"]: row["weight"] for row in reader.read_all().to_pylist()}


@pytest.fixture
def two_aggregators(tmp_path: Path) -> Iterator[tuple[Aggregator, Aggregator]]:
    """Aggregators "agg-a" and "agg-b" on loopback, sealing into one lake (tmp_path/lake)."""
    servers = tuple(
        Aggregator(
            tmp_path / f"{name}.duckdb", "127.0.0.1:0", lake_dir=tmp_path / "lake", name=name
        )
        for name in ("agg-a", "agg-b")
    )
    for server in servers:
        server.start()
    yield servers
    for server in servers:
        server.stop(grace_s=0)


def test_lake_and_live_aggregators_count_every_row_once(
    two_aggregators: tuple[Aggregator, Aggregator], tmp_path: Path
) -> None:
    a, b = two_aggregators
    lake_dir = tmp_path / "lake"
    spool = tmp_path / "spool"
    # an old hour and the current one on each aggregator
    for server, node, weights in ((a, "node-1", {21: 5, 22: 2}), (b, "node-2", {22: 7, 23: 1})):
        ship(server.address, node, OLD_HOUR + timedelta(minutes=10), weights, spool)
        ship(server.address, node, NOW, weights, spool)
    ship(a.address, "node-3", NOW, {23: 4}, spool)
    # a decommissioned aggregator whose sealed hour only the lake still has
    gone = ProfileStore(tmp_path / "gone.duckdb", lake_dir, "agg-gone")
    old = _samples({21: 11}, OLD_HOUR + timedelta(minutes=10))
    gone.append("old", 1, "node-9", old, stacks_table({21: STACKS[21]}))
    Partitions(gone).seal(lake.hour_start(NOW))
    gone.close()
    for server in (a, b):
        Partitions(server.store).seal(lake.hour_start(NOW))  # the old hour goes to the lake
    expected = {"node-1": 14, "node-2": 16, "node-3": 4, "node-9": 11}
    # each aggregator still answers for what it sealed
    assert {**per_node(AggregatorSource(a.address)), **per_node(AggregatorSource(b.address))} == {
        n: w for n, w in expected.items() if n != "node-9"
    }

    # A seal of agg-a caught half-way: its file renamed into place, not recorded yet, its
    # rows still live. Made like partitions.py does, from agg-a's live rows.
    half_sealed = lake.file_path(lake_dir, "samples", lake.hour_start(NOW), "agg-a", 7)
    half_sealed.parent.mkdir(parents=True, exist_ok=True)
    with AggregatorSource(a.address).stream(
        f"SELECT {', '.join(lake.COLUMNS['samples'])} FROM live_samples"
    ) as reader:
        live_rows = reader.read_all()
    with duckdb.connect() as conn:
        conn.register("live_rows", live_rows)
        conn.execute(f"COPY live_rows TO '{half_sealed}' (FORMAT parquet)")

    fleet = FleetSource(lake_dir, [a.address, b.address])
    try:
        assert per_node(fleet) == expected  # any SQL: live rows fetched, lake read here
        flame = load_flame(fleet, SampleFilter())  # pushed down to each part
        assert flame.total == sum(expected.values())
        encode = flame.children["app"].children["main"].children["encode"]
        assert (encode.total, encode.self_weight) == (24, 18)
    finally:
        fleet.close()

    # agg-b gone from the list: its sealed hour is still in the lake, its live hour is not
    fleet = FleetSource(lake_dir, [a.address])
    try:
        assert per_node(fleet) == {**expected, "node-2": 8}
    finally:
        fleet.close()

    # the command line: `--lake` and a list of aggregators
    out = tmp_path / "nodes.json"
    addresses = f"{a.address},{b.address}"
    argv = ["query", "--lake", str(lake_dir), "--aggregator", addresses, PER_NODE_SQL]
    assert main([*argv, "--format", "json", "-o", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["node"]: r["weight"] for r in rows} == expected
    folded = tmp_path / "fleet.folded"
    argv = ["flamegraph", "--lake", str(lake_dir), "--aggregator", addresses, "-o", str(folded)]
    assert main(argv) == 0
    assert sorted(folded.read_text().splitlines()) == [
        PROCESS_HEADER,
        "app;main;encode 18",
        "app;main;encode;memcpy 6",
        "app;main;parse 21",
    ]


def _samples(weights: dict[int, int], ts: datetime) -> pa.Table:
    return schema.samples_table(
        {
            "ts": pa.array([ts] * len(weights), pa.timestamp("us", tz="UTC")),
            "pid": [100] * len(weights),
            "tid": [100] * len(weights),
            "comm": ["app"] * len(weights),
            "event": ["cpu"] * len(weights),
            "stack_id": list(weights),
            "weight": list(weights.values()),
        }
    )


def _files(lake_dir: Path, table: str) -> list[str]:
    return sorted(str(p.relative_to(lake_dir)) for p in lake_dir.glob(f"{table}/*/*/*.parquet"))


def test_four_agents_split_over_two_aggregators_counted_once(
    two_aggregators: tuple[Aggregator, Aggregator], tmp_path: Path, native_binary: Path
) -> None:
    """Four real agents (BCC) given the same list of two aggregators: each node ships to
    the one its name hashes to; one query over both and the lake counts each node once."""
    require_ebpf()
    from fleetprof.node_agent.agent import Agent, AgentConfig
    from fleetprof.node_agent.samplers import SamplerOptions

    a, b = two_aggregators
    addresses = f"{a.address},{b.address}"
    # two node names for each aggregator (the ports are new each run)
    names = (f"scale-node-{i}" for i in itertools.count())
    chosen = {a.address: [], b.address: []}
    for name in names:
        home = chosen[assign(name, [a.address, b.address])]
        if len(home) < 2:
            home.append(name)
        if all(len(nodes) == 2 for nodes in chosen.values()):
            break
    nodes = sorted(chosen[a.address] + chosen[b.address])
    workload = subprocess.Popen([str(native_binary), "30"])
    agents, stops, threads = [], [], []
    try:
        for node in nodes:
            config = AgentConfig(
                addresses,
                node,
                1.0,
                spool_dir=str(tmp_path / f"spool-{node}"),
                sampling=SamplerOptions(frequency=49),
            )
            agent, stop = Agent(config), threading.Event()
            thread = threading.Thread(target=agent.run, args=(stop,), name=f"agent-{node}")
            thread.start()
            agents.append(agent)
            stops.append(stop)
            threads.append(thread)
        deadline = time.monotonic() + 90
        while min(agent.stats["drains"] for agent in agents) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        for stop in stops:
            stop.set()
        for thread in threads:
            thread.join()
        workload.kill()
        workload.wait()
    assert {agent.config.node: agent.aggregator for agent in agents} == {
        node: address for address, names in chosen.items() for node in names
    }

    own = [per_node(AggregatorSource(server.address)) for server in (a, b)]
    assert set(own[0]) == set(chosen[a.address]) and set(own[1]) == set(chosen[b.address])
    assert all(weight > 0 for totals in own for weight in totals.values())
    expected = own[0] | own[1]
    # agg-a seals everything it has (the current hour too): its rows are now in the lake
    Partitions(a.store).seal(lake.hour_start(datetime.now(UTC)) + timedelta(hours=1))
    assert _files(tmp_path / "lake", "samples")
    with AggregatorSource(a.address).stream("SELECT count(*) AS n FROM live_samples") as r:
        assert r.read_all()["n"][0].as_py() == 0
    fleet = FleetSource(tmp_path / "lake", [a.address, b.address])
    try:
        assert per_node(fleet) == expected
        assert load_flame(fleet, SampleFilter()).total == sum(expected.values())
    finally:
        fleet.close()
    assert sorted(expected) == nodes  # four nodes, each once
