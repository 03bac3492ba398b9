"""Per-job access: a token limited to some jobs or namespaces sees only their samples, over
gRPC SQL, the HTTP API and the web UI's flame graph, and profiles only those jobs."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pyarrow as pa
import pytest

from fleetprof.aggregator.partitions import Partitions
from fleetprof.aggregator.server import Aggregator
from fleetprof.proto import schema
from fleetprof.proto.control.v1 import control_pb2, control_pb2_grpc
from fleetprof.proto.security import AccessScope, ClientSecurity, ServerSecurity, parse_tokens
from fleetprof.proto.stacks import StackRow, stack_id, stacks_table
from fleetprof.query.sandbox import QueryError
from fleetprof.query.source import AggregatorSource

ADMIN, ETL_ONLY, TEAM_WEB = "admin-token", "etl-token", "team-web-token"
TOKEN_FILE = f"""
# operators see everything
{ADMIN}
{ETL_ONLY} jobs=etl-42
{TEAM_WEB} namespaces=web   # a namespace's pods, whatever their job
"""
# (job, phase) -> stack; the sealed hour ran each job's start-up, the open hour its work.
STACKS = {
    (job, phase): StackRow(("main", f"{job}.{phase}"), ("app", "app"), ("native", "native"))
    for job in ("etl-42", "frontend", "batch-7")
    for phase in ("startup", "work")
}
IDS = {key: stack_id(row) for key, row in STACKS.items()}
# job -> (namespace, weight, process)
JOBS = {
    "etl-42": (None, 30, 100),
    "frontend": ("web", 50, 200),
    "batch-7": ("batch", 70, 300),
}


@pytest.fixture
def limited_aggregator(tmp_path: Path) -> Iterator[Aggregator]:
    security = ServerSecurity(tokens=parse_tokens(TOKEN_FILE.splitlines()))
    server = Aggregator(
        tmp_path / "p.duckdb", "127.0.0.1:0", security=security, http_listen="127.0.0.1:0"
    )
    # Each job in a closed hour (sealed into the lake below) and in the open one.
    now = datetime.now(UTC)
    batches = [
        (ts, job, phase)
        for ts, phase in ((now - timedelta(hours=3), "startup"), (now, "work"))
        for job in JOBS
    ]
    for sequence, (ts, job, phase) in enumerate(batches, start=1):
        namespace, weight, pid = JOBS[job]
        samples = pa.Table.from_pylist(
            [
                {"ts": ts, "pid": pid, "tid": pid, "comm": job, "event": "cpu",
                 "stack_id": IDS[job, phase], "weight": weight, "job": job, "namespace": namespace}
            ],
            schema=schema.SAMPLES,
        )  # fmt: skip
        writes = pa.Table.from_pylist(
            [{"ts": ts, "pid": pid, "comm": job, "device": "vda", "op": "write",
              "bucket_le_ns": 1 << 17, "count": weight}],
            schema=schema.IO_LATENCY,
        )  # fmt: skip
        stacks = stacks_table({IDS[job, phase]: STACKS[job, phase]})
        server.store.append("agent-1", sequence, "node-1", samples, stacks, io_latency=writes)
    Partitions(server.store).maintain(now)
    assert list(server.store.lake.rglob("*.parquet"))
    server.start()
    yield server
    server.stop(grace_s=0)


def sql(aggregator: Aggregator, token: str, query: str) -> list[dict[str, object]]:
    source = AggregatorSource(aggregator.address, security=ClientSecurity(token=token))
    try:
        with source.stream(query) as reader:
            return reader.read_all().to_pylist()
    finally:
        source.close()


def jobs_seen(aggregator: Aggregator, token: str, query: str) -> set[str]:
    return {row["job"] for row in sql(aggregator, token, query)}


def test_token_file_rules() -> None:
    tokens = parse_tokens(TOKEN_FILE.splitlines())
    assert tokens == {
        ADMIN: None,
        ETL_ONLY: AccessScope(jobs=frozenset({"etl-42"})),
        TEAM_WEB: AccessScope(namespaces=frozenset({"web"})),
    }
    with pytest.raises(ValueError, match="line 1: expected jobs="):
        parse_tokens(["t0ken job=etl"])


def test_sql_sees_only_the_tokens_jobs(limited_aggregator: Aggregator) -> None:
    everything = "SELECT DISTINCT job FROM samples"
    assert jobs_seen(limited_aggregator, ADMIN, everything) == set(JOBS)
    assert jobs_seen(limited_aggregator, ETL_ONLY, everything) == {"etl-42"}
    assert jobs_seen(limited_aggregator, TEAM_WEB, everything) == {"frontend"}
    # The tables behind the views, the macros and the other views are limited alike.
    assert jobs_seen(limited_aggregator, ETL_ONLY, "SELECT DISTINCT job FROM label_sets") == {
        "etl-42"
    }
    rows = "SELECT count(*) AS n, sum(weight) AS weight FROM sample_rows"  # the open hour's
    assert sql(limited_aggregator, ETL_ONLY, rows) == [{"n": 1, "weight": 30}]
    flame = sql(limited_aggregator, ETL_ONLY, "SELECT folded, weight FROM flame('cpu')")
    assert flame == [
        {"folded": "etl-42;main;etl-42.startup", "weight": 30},
        {"folded": "etl-42;main;etl-42.work", "weight": 30},
    ]
    functions = sql(limited_aggregator, TEAM_WEB, "SELECT DISTINCT function FROM frames")
    assert {row["function"] for row in functions} == {"main", "frontend.startup", "frontend.work"}
    writes = sql(
        limited_aggregator, ETL_ONLY, "SELECT comm, sum(count) AS n FROM io_latency GROUP BY comm"
    )
    assert writes == [{"comm": "etl-42", "n": 60}]
    assert sql(limited_aggregator, ETL_ONLY, "SELECT count(*) AS n FROM ingested_batches") == [
        {"n": 0}
    ]


@pytest.mark.parametrize(
    "escape",
    [
        "SELECT * FROM p.main.sample_rows",
        "SELECT * FROM p.sample_rows",
        'SELECT (SELECT sum(weight) FROM "p".main.samples) AS w',
        "SELECT * FROM query_table('p.main.sample_rows')",
        "SELECT * FROM query('SELECT * FROM p.main.sample_rows')",
        "SELECT * FROM p.main.flame('cpu')",
        "SELECT * FROM duckdb_tables()",
    ],
)
def test_a_limited_token_cannot_reach_past_its_views(
    limited_aggregator: Aggregator, escape: str
) -> None:
    with pytest.raises(QueryError, match="refused"):
        sql(limited_aggregator, ETL_ONLY, escape)
    # the same query is fine for an unlimited token (it may fail for its own reasons)
    if "flame" in escape:
        assert sql(limited_aggregator, ADMIN, escape)


def http(aggregator: Aggregator, path: str, token: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body else None
    request = urllib.request.Request(
        f"{aggregator.web.url}{path}",
        data=data,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.load(answer)


def test_http_api_and_flame_graph_see_only_the_tokens_jobs(
    limited_aggregator: Aggregator,
) -> None:
    def functions(token: str) -> set[str]:
        flame = http(limited_aggregator, "api/flame?event=cpu", token)
        return {name for name, *_ in flame["frames"]} - {"all", "main"}

    def of(*jobs: str) -> set[str]:
        return {f"{job}{phase}" for job in jobs for phase in ("", ".startup", ".work")}

    assert functions(ETL_ONLY) == of("etl-42")
    assert functions(ADMIN) == of(*JOBS)
    answer = http(limited_aggregator, "api/sql", TEAM_WEB, {"sql": "SELECT job FROM samples"})
    assert "frontend" in json.dumps(answer) and "batch-7" not in json.dumps(answer)
    with pytest.raises(urllib.error.HTTPError) as refused:
        http(limited_aggregator, "api/sql", ETL_ONLY, {"sql": "SELECT * FROM p.main.samples"})
    assert refused.value.code == 400


def test_a_limited_token_profiles_only_its_jobs(limited_aggregator: Aggregator) -> None:
    channel = grpc.insecure_channel(limited_aggregator.address)
    control = control_pb2_grpc.ControlServiceStub(channel)

    def start(job: str, token: str) -> control_pb2.SessionInfo:
        return control.StartSession(
            control_pb2.StartSessionRequest(job=job, duration_s=1),
            metadata=ClientSecurity(token=token).metadata(),
        )

    try:
        with pytest.raises(grpc.RpcError) as denied:
            start("batch-7", ETL_ONLY)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        theirs = start("batch-7", ADMIN)
        mine = start("etl-42", ETL_ONLY)

        def watch(session: control_pb2.SessionInfo) -> list[control_pb2.SessionProgress]:
            request = control_pb2.WatchSessionRequest(session_id=session.session_id)
            metadata = ClientSecurity(token=ETL_ONLY).metadata()
            return list(control.WatchSession(request, metadata=metadata))

        with pytest.raises(grpc.RpcError) as denied:
            watch(theirs)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert watch(mine)[-1].done
    finally:
        channel.close()
