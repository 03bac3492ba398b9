"""The SQL surface: the frames view, the table macros, and every SQL query of docs/."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from fleetprof.aggregator.server import Aggregator
from fleetprof.aggregator.storage import ProfileStore
from fleetprof.proto import schema
from fleetprof.proto.stacks import StackRow, stack_id, stacks_table
from fleetprof.query.source import AggregatorSource, DatabaseSource

DOCS = Path(__file__).resolve().parents[2] / "docs"


def stack(*frames: str) -> StackRow:
    """`name@kind` frames, root first (kind defaults to jit, module follows the kind)."""
    names, kinds = zip(*(f.split("@") if "@" in f else (f, "jit") for f in frames), strict=True)
    module = {"kernel": "[kernel]", "native": "libjvm.so", "python": "etl.py:12"}
    modules = tuple(module.get(k, "[jit]") for k in kinds)
    return StackRow(tuple(names), modules, tuple(kinds))


APP = ("java.lang.Thread.run", "com.acme.Server.handle")
STACKS = {
    "resize": stack(*APP, "com.acme.Cache.put", "java.util.HashMap.resize"),
    "hash": stack(*APP, "com.acme.Cache.get", "java.util.HashMap.hash"),
    "write": stack(*APP, "com.acme.Log.write", "ksys_write@kernel", "ext4_file_write_iter@kernel"),
    "gc": stack("GCTaskThread::run@native", "G1ParScanThreadState::trim_queue@native"),
    "recursive": stack(*APP, "com.acme.Tree.walk", "com.acme.Tree.walk", "com.acme.Tree.walk"),
    "postgres": stack("main@native", "PostgresMain@native", "ExecScan@native"),
}
# A Python job's stack, stored only for the docs' queries (docs/python.md).
PYTHON = stack("Py_RunMain@native", "<module>@python", "transform@python")
IDS = {name: stack_id(row) for name, row in STACKS.items()}


def rows(
    ts: datetime, node: str, comm: str, pid: int, weights: dict[str, int]
) -> list[dict[str, object]]:
    return [
        {"ts": ts, "pid": pid, "tid": pid + i, "comm": comm, "event": "cpu",
         "stack_id": IDS[name], "weight": weight}
        for i, (name, weight) in enumerate(weights.items())
    ]  # fmt: skip


def fill(store: ProfileStore) -> None:
    """Two nodes, two processes, two 5-minute windows; resize grows from one to the other,
    node-b collects garbage far more than node-a."""
    now = datetime.now(UTC)
    before, after = now - timedelta(minutes=7), now - timedelta(minutes=2)
    batches = [
        ("node-a", rows(before, "node-a", "java", 100, {"resize": 10, "hash": 30, "gc": 5})),
        ("node-a", rows(after, "node-a", "java", 100, {"resize": 40, "hash": 30, "write": 8})),
        ("node-a", rows(after, "node-a", "java", 100, {"recursive": 6, "gc": 2})),
        ("node-b", rows(before, "node-b", "java", 200, {"resize": 5, "gc": 50, "write": 4})),
        ("node-b", rows(after, "node-b", "postgres", 300, {"postgres": 20})),
    ]
    for sequence, (node, batch_rows) in enumerate(batches, start=1):
        samples = pa.Table.from_pylist(batch_rows, schema=schema.SAMPLES)
        stacks = stacks_table({IDS[name]: row for name, row in STACKS.items()})
        store.append(f"agent-{node}", sequence, node, samples, stacks)
    # What node-a's agent learned of its JVM (docs/jvm.md): it runs without frame pointers.
    jvm = {
        "ts": now,
        "pid": 100,
        "nspid": 100,
        "comm": "java",
        "exe": "/usr/bin/java",
        "runtime": "jvm",
        "frame_pointers": False,
        "attach": "ok",
        "perf_map_entries": 900,
    }
    processes = pa.Table.from_pylist([jvm], schema=schema.PROCESSES)
    empty = schema.SAMPLES.empty_table(), schema.STACKS.empty_table()
    store.append("agent-node-a", len(batches) + 1, "node-a", *empty, processes)
    # What node-b's agent saw of postgres with --events lock,io (docs/events.md): 4 ms
    # blocked in a lock, and 100 block writes, 90 of them under 128 µs.
    blocked = rows(after, "node-b", "postgres", 300, {"postgres": 4_000_000})
    blocked[0]["event"] = "lock"
    writes = [
        {"ts": after, "pid": 300, "comm": "postgres", "device": "vda", "op": "write",
         "bucket_le_ns": bucket, "count": count}
        for bucket, count in ((1 << 17, 90), (1 << 22, 10))
    ]  # fmt: skip
    store.append(
        "agent-node-b",
        len(batches) + 2,
        "node-b",
        pa.Table.from_pylist(blocked, schema=schema.SAMPLES),
        stacks_table({IDS["postgres"]: STACKS["postgres"]}),
        io_latency=pa.Table.from_pylist(writes, schema=schema.IO_LATENCY),
    )


def filled_database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A database file holding `fill`'s samples (for module-scoped fixtures)."""
    path = tmp_path_factory.mktemp("profiles") / "profiles.duckdb"
    store = ProfileStore(path)
    fill(store)
    store.close()
    return path


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return filled_database(tmp_path_factory)


@pytest.fixture(scope="module")
def source(database: Path) -> DatabaseSource:
    db = DatabaseSource(database)
    yield db
    db.close()


@pytest.fixture(scope="module")
def docs_source(tmp_path_factory: pytest.TempPathFactory) -> DatabaseSource:
    """`fill`'s samples and a Python job's, for the queries of every page of docs/."""
    path = tmp_path_factory.mktemp("docs") / "profiles.duckdb"
    store = ProfileStore(path)
    fill(store)
    row = {"ts": datetime.now(UTC), "pid": 400, "tid": 400, "comm": "python3", "event": "cpu",
           "stack_id": stack_id(PYTHON), "weight": 12, "job": "etl-7"}  # fmt: skip
    samples = pa.Table.from_pylist([row], schema=schema.SAMPLES)
    store.append("agent-node-c", 1, "node-c", samples, stacks_table({stack_id(PYTHON): PYTHON}))
    store.close()
    db = DatabaseSource(path)
    yield db
    db.close()


def query(source: DatabaseSource | AggregatorSource, sql: str) -> list[dict[str, object]]:
    with source.stream(sql) as reader:
        return reader.read_all().to_pylist()


def test_frames_view_has_one_row_per_frame_root_first(source: DatabaseSource) -> None:
    got = query(
        source,
        f"SELECT depth, function, module, kind FROM frames WHERE stack_id = {IDS['write']} "
        "ORDER BY depth",
    )
    row = STACKS["write"]
    assert got == [
        {"depth": d, "function": f, "module": m, "kind": k}
        for d, (f, m, k) in enumerate(zip(row.frames, row.modules, row.kinds, strict=True))
    ]


def test_top_functions_self_total_and_recursion_counted_once(source: DatabaseSource) -> None:
    top = {r["function"]: r for r in query(source, "FROM top_functions('cpu', node := 'node-a')")}
    whole = 10 + 30 + 5 + 40 + 30 + 8 + 6 + 2
    assert top["java.util.HashMap.resize"]["self"] == 50
    assert top["java.lang.Thread.run"]["self"] == 0
    assert top["java.lang.Thread.run"]["total"] == whole - 7  # all but the gc stacks
    # walk recurses three deep but its total is its stacks' weight, once
    assert top["com.acme.Tree.walk"]["self"] == top["com.acme.Tree.walk"]["total"] == 6
    assert top["java.util.HashMap.resize"]["self_percent"] == round(100 * 50 / whole, 2)
    assert "ExecScan" not in top  # another node's process


def test_top_functions_filters_time_pid_and_comm(source: DatabaseSource) -> None:
    recent = query(
        source,
        "SELECT function, self FROM top_functions('cpu', now() - INTERVAL 5 MINUTE, now(), "
        "comm := 'java') WHERE function = 'java.util.HashMap.resize'",
    )
    assert recent == [{"function": "java.util.HashMap.resize", "self": 40}]
    by_pid = query(source, "SELECT sum(self) AS s FROM top_functions('cpu', pid := 300)")
    assert by_pid == [{"s": 20}]


def test_flame_macro_merges_per_process_and_stack(source: DatabaseSource) -> None:
    got = query(source, "SELECT folded, weight FROM flame('cpu', node := 'node-a') LIMIT 2")
    assert got == [
        {"folded": "java;" + ";".join(STACKS["hash"].frames), "weight": 60},
        {"folded": "java;" + ";".join(STACKS["resize"].frames), "weight": 50},
    ]
    empty = query(source, "SELECT count(*) AS n FROM flame('cpu', '2000-01-01', '2000-01-02')")
    assert empty == [{"n": 0}]


def test_aggregator_serves_the_same_views(tmp_path: Path) -> None:
    aggregator = Aggregator(tmp_path / "live.duckdb", "127.0.0.1:0")
    fill(aggregator.store)
    aggregator.start()
    remote = AggregatorSource(aggregator.address)
    try:
        got = query(
            remote,
            "SELECT total FROM top_functions('cpu') WHERE function = 'java.lang.Thread.run'",
        )
        assert got == [{"total": 133}]
        assert query(remote, "SELECT count(*) AS n FROM frames") == [
            {"n": sum(len(s.frames) for s in STACKS.values())}
        ]
    finally:
        remote.close()
        aggregator.stop(grace_s=0)


def docs_queries() -> list[tuple[str, str]]:
    """(question, SQL) of every statement in the ```sql blocks of docs/*.md."""
    text = "\n".join(page.read_text("utf-8") for page in sorted(DOCS.glob("*.md")))
    found = []
    parser = duckdb.connect()
    for block in re.findall(r"```sql\n(.*?)```", text, re.S):
        for statement in parser.extract_statements(block):
            sql = statement.query.strip()
            question = re.match(r"--\s*(.*)", sql)
            found.append((question[1] if question else sql.splitlines()[0], sql))
    return found


def test_docs_have_a_cookbook() -> None:
    assert len(docs_queries()) >= 10


@pytest.mark.parametrize(
    ("question", "sql"), [pytest.param(q, sql, id=q[:50]) for q, sql in docs_queries()]
)
def test_docs_query_runs_and_answers(docs_source: DatabaseSource, question: str, sql: str) -> None:
    result = query(docs_source, sql)
    assert result, f"no rows for: {question}"
