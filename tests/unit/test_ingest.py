"""Ingest over real gRPC into a real DuckDB file: validation, idempotence, dedup."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import grpc
import pyarrow as pa
import pytest

from fleetprof.aggregator.server import Aggregator
from fleetprof.aggregator.storage import ProfileStore
from fleetprof.node_agent.batch import Batch
from fleetprof.node_agent.shipper import Shipper
from fleetprof.node_agent.spool import Spool
from fleetprof.node_agent.symbolize.frame import Frame
from fleetprof.proto import schema
from fleetprof.proto.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from fleetprof.proto.stacks import StackRow, stack_row, stacks_table

STACKS = {
    11: StackRow(("main", "compute_alpha"), ("app", "app"), ("native", "native")),
    12: StackRow(("main", "compute_beta"), ("app", "app"), ("native", "native")),
}


def samples(weights: dict[int, int], pid: int = 100) -> pa.Table:
    now = datetime.now(UTC)
    return schema.samples_table(
        {
            "ts": [now] * len(weights),
            "pid": [pid] * len(weights),
            "tid": [pid] * len(weights),
            "comm": ["app"] * len(weights),
            "event": ["cpu"] * len(weights),
            "stack_id": list(weights),
            "weight": list(weights.values()),
        }
    )


def batch(sequence: int, **fields: object) -> ingest_pb2.IngestBatch:
    message = ingest_pb2.IngestBatch(
        agent_id="agent-1",
        sequence=sequence,
        schema_version=schema.SCHEMA_VERSION,
        node="node-a",
        samples=schema.encode(samples({11: 3, 12: 1})),
        stacks=schema.encode(stacks_table(STACKS)),
    )
    for name, value in fields.items():
        setattr(message, name, value)
    return message


def send(aggregator: Aggregator, *batches: ingest_pb2.IngestBatch) -> list[ingest_pb2.IngestAck]:
    with grpc.insecure_channel(aggregator.address) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        return list(stub.Ingest(iter(batches), timeout=10))


def totals(aggregator: Aggregator) -> tuple[int, int, int]:
    reader = aggregator.store.reader()
    weight, rows = reader.execute(
        "SELECT coalesce(sum(weight), 0), count(*) FROM samples"
    ).fetchone()
    (stacks,) = reader.execute("SELECT count(*) FROM stacks").fetchone()
    return int(weight), rows, stacks


def test_batches_are_acked_after_storing(aggregator: Aggregator) -> None:
    acks = send(aggregator, batch(1), batch(2, stacks=b""))
    assert [(a.sequence, a.duplicate, a.rows_stored) for a in acks] == [
        (1, False, 2),
        (2, False, 2),
    ]
    assert totals(aggregator) == (8, 4, 2)
    frames = aggregator.store.reader().sql("SELECT frames FROM stacks ORDER BY stack_id").fetchall()
    assert frames == [(["main", "compute_alpha"],), (["main", "compute_beta"],)]


def test_resent_batch_is_not_counted_twice(aggregator: Aggregator) -> None:
    send(aggregator, batch(1))
    acks = send(aggregator, batch(1), batch(2))
    assert [(a.sequence, a.duplicate) for a in acks] == [(1, True), (2, False)]
    assert totals(aggregator) == (8, 4, 2)  # stacks deduplicated by id across batches


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"samples": b"\xff\x00not arrow at all"}, "malformed Arrow IPC"),
        (
            {"samples": schema.encode(pa.table({"pid": [1], "oops": ["x"]}))},
            "schema does not match",
        ),
        ({"schema_version": 99}, "unknown schema version 99"),
        ({"agent_id": ""}, "agent_id"),
        ({"samples": schema.encode(samples({11: -5}))}, "negative weight"),
    ],
)
def test_bad_batch_is_rejected_and_stored_data_survives(
    aggregator: Aggregator, fields: dict[str, object], message: str
) -> None:
    send(aggregator, batch(1))
    with pytest.raises(grpc.RpcError) as error:
        send(aggregator, batch(2, **fields))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details()
    assert totals(aggregator) == (4, 2, 2)
    # The rejected sequence was not recorded: a corrected resend is stored.
    send(aggregator, batch(2))
    assert totals(aggregator) == (8, 4, 2)


def test_shipper_resends_stacks_after_reconnect_and_keeps_order(tmp_path) -> None:
    # The aggregator is down at first: batches wait, then go in order once it is up.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    shipper = Shipper(address, "agent-9", "node-z", Spool(tmp_path / "spool", 1 << 20))
    shipper.ship(Batch(samples({11: 3}), {11: STACKS[11]}))
    shipper.ship(Batch(samples({11: 1, 12: 2}), dict(STACKS)))
    assert shipper.pending == 2
    aggregator = Aggregator(tmp_path / "profiles.duckdb", address)
    aggregator.start()
    try:
        assert shipper.drain_pending(timeout_s=15)
        assert shipper.stats["acked"] == 2
        assert totals(aggregator) == (6, 3, 2)
        shipper.ship(Batch(samples({12: 5}), {12: STACKS[12]}))  # stack 12 already sent
        assert totals(aggregator) == (11, 4, 2)
    finally:
        shipper.close()
        aggregator.stop(grace_s=0)


def test_agent_batches_with_huge_demangled_names_are_accepted(aggregator: Aggregator) -> None:
    """LLVM's longest demangled symbols pass 8k characters: the agent cuts them to fit the
    contract rather than have the aggregator refuse (and the agent drop) the whole batch."""
    template = "llvm::DenseMap<" + "std::pair<int, int>, " * 400 + ">::grow(unsigned int)"
    row = stack_row([Frame("main", "app", "native"), Frame(template, "libLLVM-15.so.1", "native")])
    assert len(row.frames[1].encode()) == schema.MAX_STRING_BYTES
    assert row.frames[1].endswith("…")
    message = batch(1, stacks=schema.encode(stacks_table({11: row, 12: STACKS[12]})))
    assert send(aggregator, message)[0].rows_stored == 2
    with aggregator.store.reader() as conn:
        stored = conn.execute("SELECT frames[2] FROM stacks WHERE stack_id = 11").fetchone()[0]
    assert stored == row.frames[1]


def test_agent_stacks_deeper_than_the_contract_keep_their_leaf_side(
    aggregator: Aggregator,
) -> None:
    """A native stack of 1024 frames under kernel frames is deeper than a batch may carry:
    the agent keeps the frames nearest the leaf under a "[truncated]" root rather than have
    the whole batch refused."""
    frames = [Frame(f"f{i}", "app", "native") for i in range(1100)]
    row = stack_row(frames)
    assert len(row.frames) == schema.MAX_FRAMES_PER_STACK
    assert row.frames[0] == "[truncated]" and row.kinds[0] == "lost"
    assert row.frames[1:] == tuple(f"f{i}" for i in range(1100 - 1023, 1100))
    message = batch(1, stacks=schema.encode(stacks_table({11: row, 12: STACKS[12]})))
    assert send(aggregator, message)[0].rows_stored == 2


def test_concurrent_batches_commit_together_each_once(tmp_path) -> None:
    """Group commit: 16 agents append at once, each batch twice; every batch is stored once
    and every caller learns whether its batch was new or a duplicate."""
    store = ProfileStore(tmp_path / "p.duckdb")
    jobs = [(f"agent-{a}", sequence) for a in range(16) for sequence in (1, 2, 3)] * 2

    def append(key: tuple[str, int]) -> bool:
        agent, sequence = key
        result = store.append(
            agent, sequence, "node-a", samples({11: sequence}), stacks_table(STACKS)
        )
        return result.duplicate

    with ThreadPoolExecutor(16) as pool:
        duplicates = list(pool.map(append, jobs))
    assert duplicates.count(False) == duplicates.count(True) == 48
    conn = store.reader()
    assert conn.execute("SELECT count(*), sum(weight) FROM samples").fetchone() == (48, 16 * 6)
    assert conn.execute("SELECT count(*) FROM stacks").fetchone() == (2,)
    assert conn.execute("SELECT count(*) FROM ingested_batches").fetchone() == (48,)
    store.close()
