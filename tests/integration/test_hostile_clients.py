"""Hostile clients, as an attacker would probe them on loopback (issue #18): each attack is
performed against a real aggregator and the defence asserted; real agents (Shippers) keep
storing meanwhile."""

from __future__ import annotations

import http.client
import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import grpc
import pyarrow as pa
import pytest

from fleetprof.aggregator import server as aggregator_server
from fleetprof.aggregator.ingest_guard import MAX_SEQUENCE_JUMP
from fleetprof.aggregator.server import Aggregator
from fleetprof.aggregator.storage import incarnation_key
from fleetprof.cli import main
from fleetprof.node_agent.batch import Batch
from fleetprof.node_agent.shipper import Shipper
from fleetprof.node_agent.spool import Spool
from fleetprof.proto import schema
from fleetprof.proto.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from fleetprof.proto.security import AccessScope, ClientSecurity, NodeGrant, ServerSecurity
from fleetprof.proto.stacks import stacks_table
from fleetprof.query.filters import SampleFilter
from fleetprof.query.flame import load_flat
from fleetprof.query.sandbox import QueryError
from fleetprof.query.source import AggregatorSource
from tests.conftest import free_port
from tests.integration.test_sessions import cpu_seconds
from tests.unit.test_ingest import STACKS, batch, samples, send, totals

AGENT_A, AGENT_B, ADMIN, LIMITED = "agent-a", "agent-b", "admin-token", "etl-only"


def send_as(
    aggregator: Aggregator, token: str | None, *batches: ingest_pb2.IngestBatch
) -> grpc.StatusCode:
    metadata = ClientSecurity(token=token).metadata()
    with grpc.insecure_channel(aggregator.address) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        try:
            list(stub.Ingest(iter(batches), timeout=10, metadata=metadata))
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def refused(aggregator: Aggregator, message: ingest_pb2.IngestBatch) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        send(aggregator, message)
    return error.value


def stored_batches(aggregator: Aggregator, agent_id: str) -> int:
    reader = aggregator.store.reader()
    query = "SELECT count(*) FROM ingested_batches WHERE agent_id = $a"
    return reader.execute(query, {"a": agent_id}).fetchone()[0]


@pytest.fixture
def authenticated(tmp_path: Path) -> Iterator[Aggregator]:
    """Query tokens on, so ingest needs a credential: one token per node (group)."""
    security = ServerSecurity(
        tokens={ADMIN: None, LIMITED: AccessScope(jobs=frozenset({"etl"}))},
        agents={
            AGENT_A: NodeGrant("token a", ("node-a",)),
            AGENT_B: NodeGrant("token b", ("node-b*",)),
        },
    )
    server = Aggregator(
        tmp_path / "p.duckdb", "127.0.0.1:0", security=security, http_listen="127.0.0.1:0"
    )
    server.start()
    yield server
    server.stop(grace_s=0)


def test_ingest_needs_a_credential_bound_to_its_node(authenticated: Aggregator, tmp_path) -> None:
    """Hole 1 (no token on ingest) and 2 (a credential writes as another agent): an agent
    with its own credential keeps storing while another one tries to write as it."""
    real = Shipper(
        authenticated.address,
        "node-a/1",
        "node-a",
        Spool(tmp_path / "spool", 1 << 20),
        ClientSecurity(token=AGENT_A),
    )
    try:
        real.ship(Batch(samples({11: 1}), {11: STACKS[11]}))
        forged = batch(2, agent_id="node-a/1")
        assert send_as(authenticated, None, forged) == grpc.StatusCode.UNAUTHENTICATED
        assert send_as(authenticated, "guessed", forged) == grpc.StatusCode.UNAUTHENTICATED
        # token b may write node-b*: not node-a, and not agent node-a/1 under its own node
        assert send_as(authenticated, AGENT_B, forged) == grpc.StatusCode.PERMISSION_DENIED
        as_b = batch(2, agent_id="node-a/1", node="node-b1")
        assert send_as(authenticated, AGENT_B, as_b) == grpc.StatusCode.PERMISSION_DENIED
        # what token b may do: write its own nodes
        assert send_as(authenticated, AGENT_B, batch(1, node="node-b7")) == grpc.StatusCode.OK
        for weight in (2, 3, 4):
            real.ship(Batch(samples({11: weight}), {11: STACKS[11]}))
        assert real.stats == {"acked": 4, "duplicates": 0, "rejected": 0}
        assert stored_batches(authenticated, "node-a/1") == 4
        # a query token that sees everything may ingest (an operator's import)
        assert (
            send_as(authenticated, ADMIN, batch(1, agent_id="import", node="z"))
            == grpc.StatusCode.OK
        )
    finally:
        real.close()


def test_forged_sequences_never_make_an_agents_batches_duplicates(aggregator: Aggregator, tmp_path):
    """Hole 2 on an open (loopback, tokenless) aggregator: a client reads an agent's last
    sequence and sends the next 30 under its id. They land in an incarnation of their own;
    the agent's next batches are stored, not acked as duplicates."""
    real = Shipper(aggregator.address, "agent-1", "node-a", Spool(tmp_path / "s", 1 << 20))
    try:
        real.ship(Batch(samples({11: 1}), {11: STACKS[11]}))
        reader = aggregator.store.reader()
        (last, stored_incarnation) = reader.execute(
            "SELECT max(sequence), any_value(incarnation) FROM ingested_batches"
        ).fetchone()
        # What SQL shows is a hash: it cannot be sent back as the agent's incarnation.
        assert stored_incarnation == incarnation_key(real._incarnation)
        assert str(stored_incarnation) != real._incarnation
        forged = [batch(last + n, incarnation=str(stored_incarnation)) for n in range(1, 31)]
        assert len(send(aggregator, *forged)) == 30
        for weight in range(2, 6):
            real.ship(Batch(samples({11: weight}), {11: STACKS[11]}))
        assert real.stats == {"acked": 5, "duplicates": 0, "rejected": 0}
        # Claiming sequences far ahead is refused outright.
        far = refused(aggregator, batch(last + 31 + MAX_SEQUENCE_JUMP, incarnation="mine"))
        assert far.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "new incarnation" in far.details()
    finally:
        real.close()


def test_restarted_agent_is_not_mistaken_for_a_forger(aggregator: Aggregator, tmp_path) -> None:
    """The same agent id after a restart counts from 1 again in a new incarnation: stored.
    A shipper whose sequence jumped (its spool dropped many batches) starts a new one."""
    first = Shipper(aggregator.address, "agent-r", "node-r", Spool(tmp_path / "1", 1 << 20))
    for weight in (1, 2, 3):
        first.ship(Batch(samples({11: weight}), {11: STACKS[11]}))
    first.close()
    second = Shipper(aggregator.address, "agent-r", "node-r", Spool(tmp_path / "2", 1 << 20))
    try:
        for weight in (4, 5):
            second.ship(Batch(samples({11: weight}), {11: STACKS[11]}))
        assert second.stats == {"acked": 2, "duplicates": 0, "rejected": 0}
        second._next_sequence += 2 * MAX_SEQUENCE_JUMP  # as if 20k batches were dropped
        old_incarnation = second._incarnation
        second.ship(Batch(samples({11: 6}), {11: STACKS[11]}))
        second.ship(Batch(samples({11: 7}), {11: STACKS[11]}))
        assert second._incarnation != old_incarnation
        assert second.stats == {"acked": 4, "duplicates": 0, "rejected": 0}
        assert totals(aggregator)[0] == sum(range(1, 8))
    finally:
        second.close()


def test_identifiers_time_and_stacks_are_checked(aggregator: Aggregator) -> None:
    """Control characters in names, a 1970 timestamp and a sample of a stack never sent are
    refused; stacks sent earlier on the same stream are known."""
    old = samples({11: 1}).set_column(
        0,
        schema.SAMPLES.field("ts"),
        pa.array([datetime(1970, 1, 2, tzinfo=UTC)], pa.timestamp("us", tz="UTC")),
    )
    comm = samples({11: 1}).set_column(3, schema.SAMPLES.field("comm"), pa.array(["evil\nname"]))

    def offcpu(weight: int) -> bytes:
        rows = samples({11: weight})
        event = rows.schema.get_field_index("event")
        field = schema.SAMPLES.field("event")
        return schema.encode(rows.set_column(event, field, pa.array(["offcpu"])))

    cases = {
        "node": (batch(1, node="<b>x</b>\x00\n../../etc"), "control characters"),
        "agent id": (batch(1, agent_id="a\x1b[2J"), "control characters"),
        "comm": (batch(1, samples=schema.encode(comm)), "control characters"),
        "1970": (batch(1, samples=schema.encode(old)), "older than"),
        "unknown stack": (
            batch(1, samples=schema.encode(samples({99: 1})), stacks=b""),
            "never sent",
        ),
        "cpu weight": (batch(1, samples=schema.encode(samples({11: 2**63 - 1}))), "exceeds"),
        # a time event: at most one thread for an hour (ns), scaled by host sampling
        "offcpu weight": (batch(1, samples=offcpu(schema.MAX_WEIGHT["ns"] + 1)), "exceeds"),
    }
    for name, (message, problem) in cases.items():
        error = refused(aggregator, message)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert problem in error.details(), name
    assert totals(aggregator) == (0, 0, 0)
    # batch 2 uses stacks batch 1 sent on this stream: accepted; and the heaviest weight
    # a time event may have is stored
    heaviest = batch(3, samples=offcpu(schema.MAX_WEIGHT["ns"]), stacks=b"")
    acks = send(aggregator, batch(1), batch(2, stacks=b""), heaviest)
    assert [a.duplicate for a in acks] == [False, False, False]
    # ... but not on a stream of its own
    assert "never sent" in refused(aggregator, batch(4, stacks=b"")).details()
    # the agent replaces control characters a process put in its own name
    assert schema.printable("evil\nname\x00") == "evil?name?"


def test_poisoned_weights_cannot_break_graphs_and_can_be_deleted(
    authenticated: Aggregator, caplog: pytest.LogCaptureFixture
) -> None:
    """Hole 1: rows of weight 2^63-1 (stored before the bound, straight into the store)
    make sums overflow BIGINT. Every view and endpoint still answers; a flame graph of them
    says what to do; an admin deletes them (audited) and graphs are back."""
    store = authenticated.store
    good = samples({11: 5})
    store.append("node-a/1", 1, "node-a", good, stacks_table(STACKS))
    poison = samples({12: 2**63 - 1}, pid=666)
    for sequence in (1, 2):
        store.append("evil/1", sequence, "node-evil", poison, stacks_table({}))
    reader = store.reader()
    flame = reader.execute("SELECT sum(weight) FROM flame('cpu')").fetchone()[0]
    assert flame >= 2**63 - 1
    assert reader.execute("SELECT count(*) FROM top_functions('cpu')").fetchone()[0] > 0
    headers = {"Authorization": f"Bearer {ADMIN}"}
    base = authenticated.web.url

    def get(path: str) -> tuple[int, dict]:
        request = urllib.request.Request(base + path, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc)

    status, meta = get("api/meta")
    assert status == 200 and meta["events"][0]["weight"] == 2**63 - 1
    assert get("api/top?event=cpu")[0] == 200
    status, answer = get("api/flame?event=cpu")
    assert status == 400 and "fleetprof admin delete" in answer["error"]
    status, answer = get("api/diff?event=cpu&base_node=node-a")
    assert status == 400 and "fleetprof admin delete" in answer["error"]
    source = AggregatorSource(authenticated.address, security=ClientSecurity(token=ADMIN))
    try:
        with pytest.raises(QueryError, match="admin delete"):
            load_flat(source, SampleFilter(event="cpu"))
    finally:
        source.close()
    # Only a token that sees everything may delete; refusals are audited too.
    address = authenticated.address
    caplog.set_level(logging.WARNING, logger="fleetprof.aggregator.admin_service")
    args = ["admin", "delete", "--aggregator", address, "--node", "node-evil"]
    assert main([*args, "--token", AGENT_A]) == 2  # not a query token at all
    assert main([*args, "--token", LIMITED]) == 2
    assert main([*args, "--token", ADMIN]) == 0
    audit = [r.getMessage() for r in caplog.records if "AUDIT" in r.getMessage()]
    assert len(audit) == 2 and "node='node-evil'" in audit[1] and "2 samples" in audit[1]
    status, answer = get("api/flame?event=cpu")
    assert status == 200
    assert totals(authenticated)[0] == 5


def start_aggregator_process(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, str]:
    address = f"127.0.0.1:{free_port()}"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleetprof",
            "aggregator",
            "--db",
            str(tmp_path / "p.duckdb"),
            "--listen",
            address,
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with grpc.insecure_channel(address) as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=1)
                return process, address
            except grpc.FutureTimeoutError:
                assert process.poll() is None, process.stdout.read()
    process.kill()
    raise AssertionError("the aggregator did not start")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


ENDLESS = "SELECT count(*) FROM range(1000000000) a, range(1000000000) b"


def test_sql_limits_are_the_servers(tmp_path: Path) -> None:
    """Hole 3: a client asking for a 2e9 ms timeout gets the server's maximum; a query whose
    client went away stops; SIGTERM interrupts queries and exits within seconds."""
    process, address = start_aggregator_process(tmp_path, "--max-query-seconds", "2")
    try:
        with grpc.insecure_channel(address) as channel:
            stub = ingest_pb2_grpc.QueryServiceStub(channel)
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as error:
                list(stub.Sql(ingest_pb2.SqlRequest(sql=ENDLESS, timeout_ms=2_000_000_000)))
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "2 s timeout" in error.value.details()
            assert time.monotonic() - started < 30
    finally:
        process.terminate()
        process.wait(timeout=30)
    process, address = start_aggregator_process(tmp_path, "--max-query-seconds", "3600")
    try:
        with grpc.insecure_channel(address) as channel:
            stub = ingest_pb2_grpc.QueryServiceStub(channel)
            call = stub.Sql(ingest_pb2.SqlRequest(sql=ENDLESS))
            time.sleep(1.5)
            before = cpu_seconds(process.pid)
            assert before > 0.5, "the query did not run"
            call.cancel()
            time.sleep(1.0)  # the interrupt lands
            idle_from = cpu_seconds(process.pid)
            time.sleep(2.0)
            assert cpu_seconds(process.pid) - idle_from < 0.5, "the query kept running"
            # SIGTERM while a query runs: it is interrupted, the process exits
            running = stub.Sql(ingest_pb2.SqlRequest(sql=ENDLESS))
            time.sleep(1.0)
            stopped = time.monotonic()
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=15) == 0
            assert time.monotonic() - stopped < 10
            with pytest.raises(grpc.RpcError):
                list(running)
        duckdb.connect(str(tmp_path / "p.duckdb")).close()  # the lock is released
    finally:
        if process.poll() is None:
            process.kill()


# ~900 MB in one string: an aggregate DuckDB cannot spill to disk
HUNGRY = "SELECT length(string_agg(i::VARCHAR, ',')) AS n FROM range(100000000) t(i)"
# ~400 MB of strings to sort: spilled past a 256 MB memory limit
SPILLING = (
    "SELECT count(*) AS n FROM "
    "(SELECT i::VARCHAR || 'xxxxxxxxxxxxxxxxxxxx' AS s FROM range(10000000) t(i) ORDER BY s)"
)


def test_a_memory_hungry_query_is_stopped_while_ingest_keeps_storing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Memory per query: DuckDB caps the instance (--memory-limit), spilling sorts, joins
    and aggregates to disk up to --max-spill. A query past either stops with a one-line
    error; an agent shipping meanwhile loses nothing (a batch that finds the memory taken
    is refused as retryable and sent again)."""
    db = tmp_path / "p.duckdb"
    aggregator = Aggregator(db, "127.0.0.1:0", memory_limit="256MB", max_spill_bytes=16 << 20)
    aggregator.start()
    shipper = Shipper(aggregator.address, "agent-m", "node-m", Spool(tmp_path / "s", 1 << 24))
    shipped: list[int] = []
    done = threading.Event()

    def ship() -> None:
        while not done.is_set():
            shipped.append(len(shipped) + 1)
            shipper.ship(Batch(samples({11: shipped[-1]}), {11: STACKS[11]}))
            time.sleep(0.02)

    shipping = threading.Thread(target=ship)
    shipping.start()
    source = AggregatorSource(aggregator.address)
    try:
        for sql, problem in ((HUNGRY, "--memory-limit"), (SPILLING, "--max-spill")):
            with pytest.raises(QueryError, match=problem) as error, source.stream(sql) as reader:
                reader.read_all()
            assert "\n" not in str(error.value) and "SET " not in str(error.value)
        # what a user of `fleetprof query` sees: one line, exit status 2
        assert main(["query", "--aggregator", aggregator.address, HUNGRY]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "needs more memory" in err
        done.set()
        shipping.join(timeout=60)
        deadline = time.monotonic() + 60
        while not shipper.flush() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert shipper.stats == {"acked": len(shipped), "duplicates": 0, "rejected": 0}
        assert len(shipped) > 10
        assert totals(aggregator)[0] == sum(shipped)
    finally:
        done.set()
        shipping.join(timeout=60)
        shipper.close()
        source.close()
        aggregator.stop(grace_s=0)
    # The same memory limit with room to spill: the sort runs, in bounded memory.
    aggregator = Aggregator(db, "127.0.0.1:0", memory_limit="256MB")
    aggregator.start()
    source = AggregatorSource(aggregator.address)
    try:
        with source.stream(SPILLING) as reader:
            assert reader.read_all()["n"].to_pylist() == [10_000_000]
        assert totals(aggregator)[0] == sum(shipped)
    finally:
        source.close()
        aggregator.stop(grace_s=0)


def test_a_batch_that_finds_no_memory_is_refused_as_retryable(tmp_path: Path) -> None:
    """Ingest past the memory limit (queries hold it): RESOURCE_EXHAUSTED, which agents
    retry (not INVALID_ARGUMENT, which they drop), and nothing of the batch stored."""
    aggregator = Aggregator(tmp_path / "p.duckdb", "127.0.0.1:0", memory_limit="2MB")
    aggregator.start()
    try:
        rows = pa.concat_tables([samples({11: 1})] * 300_000).combine_chunks()
        error = refused(aggregator, batch(1, samples=schema.encode(rows)))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "Out of Memory" in error.details() and "\n" not in error.details()
        assert totals(aggregator) == (0, 0, 0)
    finally:
        aggregator.stop(grace_s=0)


def test_decompression_bomb_is_refused_from_metadata(tmp_path: Path) -> None:
    """Hole 5: ~60 MB of zstd holding 10M identical rows (~700 MB decoded) is refused from
    its IPC metadata; the aggregator's peak memory does not grow by its decoded size."""
    rows = 10_000_000
    bomb = schema.samples_table(
        {
            "ts": pa.array([datetime.now(UTC)] * 1, pa.timestamp("us", tz="UTC")),
            "pid": [1],
            "tid": [1],
            "comm": ["x"],
            "event": ["cpu"],
            "stack_id": [11],
            "weight": [1],
        }
    )
    # 10M copies of one row as 10 batches of the same 1M rows (held once): each column a
    # run of one value, which zstd squeezes 12 to 1.
    million = pa.concat_tables([bomb] * 1_000_000).combine_chunks().to_batches()[0]
    payload = schema.encode(pa.Table.from_batches([million] * (rows // 1_000_000)))
    del bomb, million
    assert len(payload) < schema.MAX_MESSAGE_BYTES
    process, address = start_aggregator_process(tmp_path)
    try:
        before = peak_rss_mb(process.pid)
        with grpc.insecure_channel(
            address, options=[("grpc.max_send_message_length", schema.MAX_MESSAGE_BYTES)]
        ) as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            with pytest.raises(grpc.RpcError) as error:
                list(stub.Ingest(iter([batch(1, samples=payload)]), timeout=60))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "more than 5000000 rows" in error.value.details()
        grown = peak_rss_mb(process.pid) - before
        # the message itself is held (a few MB, twice); 20M decoded rows are ~1.5 GB
        assert grown < 3 * len(payload) / 2**20 + 100, grown
    finally:
        process.terminate()
        process.wait(timeout=30)


def assert_queries_answer(address: str) -> None:
    source = AggregatorSource(address)
    try:
        with source.stream("SELECT 42 AS answer") as reader:
            assert reader.read_all()["answer"].to_pylist() == [42]
    finally:
        source.close()


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_idle_streams_and_half_open_connections_cannot_starve_queries(tmp_path: Path) -> None:
    """Hole 4: hundreds of idle Ingest streams from one client and hundreds of half-open
    HTTP connections: streams past the per-peer cap are refused at once, threads stay
    bounded, queries answer, and client disconnects are one log line, not a traceback."""
    web = f"127.0.0.1:{free_port()}"
    process, address = start_aggregator_process(
        tmp_path, "--http", web, "--max-streams-per-peer", "16"
    )
    idle: list[queue.Queue] = []
    calls = []
    sockets: list[socket.socket] = []
    try:
        with grpc.insecure_channel(address) as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            for _ in range(300):
                requests: queue.Queue = queue.Queue()
                idle.append(requests)
                calls.append(stub.Ingest(iter(requests.get, None)))
            deadline = time.monotonic() + 30
            while sum(c.done() for c in calls) < 300 - 16 and time.monotonic() < deadline:
                time.sleep(0.2)
            done = [c for c in calls if c.done()]
            assert len(done) == 300 - 16
            assert {c.code() for c in done} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
            for _ in range(500):
                half_open = socket.create_connection(tuple(web.rsplit(":", 1)))  # type: ignore[arg-type]
                half_open.sendall(b"GET /api/meta HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                sockets.append(half_open)
            threads = thread_count(process.pid)
            assert threads < 150, threads
            # one address cannot take the web UI's pool: a user from another one is served
            host, port = web.rsplit(":", 1)
            user = http.client.HTTPConnection(
                host, int(port), timeout=30, source_address=("127.0.0.2", 0)
            )
            try:
                user.request("GET", "/api/meta", headers={"Host": "127.0.0.1"})
                assert user.getresponse().status == 200
            finally:
                user.close()
            # queries still answer, from another client as from this one
            assert_queries_answer(address)
            for half_open in sockets:
                half_open.close()
            sockets.clear()
            for requests in idle:
                requests.put(None)
            for call in calls:
                call.cancel()
        # the web UI answers again once the attackers are gone
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://{web}/api/meta", timeout=5) as response:
                    assert response.status == 200
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert time.monotonic() < deadline, "the web UI did not come back"
                time.sleep(0.5)
    finally:
        for half_open in sockets:
            half_open.close()
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert "Traceback" not in output and "BrokenPipeError" not in output
    assert "refused stream" in output


# Opens one Ingest stream per batch read (hex, a line each), waits for its ack, and keeps
# the streams open.
HOLDER = """
import queue, sys, threading, grpc
from fleetprof.proto.ingest.v1 import ingest_pb2, ingest_pb2_grpc
stub = ingest_pb2_grpc.IngestServiceStub(grpc.insecure_channel(sys.argv[1]))
calls = []
for line in sys.stdin:
    requests = queue.Queue()
    requests.put(ingest_pb2.IngestBatch.FromString(bytes.fromhex(line)))
    calls.append(stub.Ingest(iter(requests.get, None)))
    next(calls[-1])
print("holding", len(calls), flush=True)
threading.Event().wait(120)
"""


def test_the_total_stream_cap_holds_across_peers(tmp_path: Path) -> None:
    """Past --max-streams in all (whatever the per-peer cap), streams are refused at once
    and queries still answer; once the streams close, new ones are taken again."""
    aggregator = Aggregator(
        tmp_path / "p.duckdb", "127.0.0.1:0", max_streams=8, max_streams_per_peer=64
    )
    aggregator.start()
    idle: list[queue.Queue] = []
    try:
        with grpc.insecure_channel(aggregator.address) as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            calls = []
            for _ in range(20):
                idle.append(queue.Queue())
                calls.append(stub.Ingest(iter(idle[-1].get, None)))
            deadline = time.monotonic() + 30
            while sum(c.done() for c in calls) < 12 and time.monotonic() < deadline:
                time.sleep(0.1)
            done = [c for c in calls if c.done()]
            assert len(done) == 12
            assert {c.code() for c in done} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
            assert "8 streams open already" in done[0].details()
            assert_queries_answer(aggregator.address)
            for requests in idle:
                requests.put(None)
            for call in calls:  # the 8 taken end when their client closes them
                if call not in done:
                    assert list(call) == []
        assert [a.duplicate for a in send(aggregator, batch(1))] == [False]
    finally:
        for requests in idle:
            requests.put(None)
        aggregator.stop(grace_s=0)


def test_streams_of_a_vanished_client_are_released(tmp_path: Path, monkeypatch) -> None:
    """A client host that vanishes (here a process stopped with SIGSTOP: its TCP connection
    stays open, nothing answers on it) holds its streams until the aggregator's keepalive
    ping goes unanswered; then the per-peer cap has room again. The aggregator's 60 s
    ping and 20 s wait for its answer are shortened to 1 s here."""
    shortened = (
        "grpc.keepalive_time_ms",
        "grpc.keepalive_timeout_ms",
        "grpc.http2.ping_timeout_ms",
    )
    options = [o for o in aggregator_server.GRPC_OPTIONS if o[0] not in shortened]
    options += [(name, 1000) for name in shortened]
    monkeypatch.setattr(aggregator_server, "GRPC_OPTIONS", options)
    aggregator = Aggregator(tmp_path / "p.duckdb", "127.0.0.1:0", max_streams_per_peer=4)
    aggregator.start()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, aggregator.address],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    probes = iter(range(1, 1000))

    def probe() -> grpc.StatusCode:
        return send_as(aggregator, None, batch(1, agent_id=f"probe-{next(probes)}"))

    try:
        held = [batch(1, agent_id=f"holder-{n}").SerializeToString().hex() for n in range(4)]
        assert holder.stdin is not None and holder.stdout is not None
        holder.stdin.write("\n".join(held) + "\n")
        holder.stdin.close()
        assert holder.stdout.readline().split() == ["holding", "4"]
        assert probe() == grpc.StatusCode.RESOURCE_EXHAUSTED
        holder.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 30
        while probe() != grpc.StatusCode.OK:
            assert time.monotonic() < deadline, "the vanished client's streams were kept"
            time.sleep(0.2)
    finally:
        holder.kill()
        holder.wait(timeout=30)
        aggregator.stop(grace_s=0)


def test_insecure_off_loopback_warns_and_keeps_a_host_check(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    server = Aggregator(
        tmp_path / "p.duckdb",
        "0.0.0.0:0",
        security=ServerSecurity(insecure=True),
        http_listen="0.0.0.0:0",
    )
    server.start()
    try:
        warnings = [r.getMessage() for r in caplog.records if "INSECURE" in r.getMessage()]
        assert len(warnings) == 2  # gRPC and the web UI
        port = server.web.address.rsplit(":", 1)[1]

        def status(host: str) -> int:
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/api/meta", headers={"Host": host}
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return response.status
            except urllib.error.HTTPError as exc:
                return exc.code

        assert status("rebound.attacker.example") == 400
        assert status(f"127.0.0.1:{port}") == 200
        assert status(socket.gethostname()) == 200
    finally:
        server.stop(grace_s=0)
