"""Lock, off-CPU and I/O profiles of real workloads, for real: BCC → Arrow/gRPC → DuckDB."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import grpc
import pyarrow as pa
import pytest

from fleetprof import workloads
from fleetprof.aggregator.partitions import Partitions
from fleetprof.aggregator.server import Aggregator
from fleetprof.aggregator.storage import ProfileStore
from fleetprof.cli import main
from fleetprof.node_agent.samplers.lock import lock_or_wait
from fleetprof.node_agent.symbolize.frame import Frame
from fleetprof.proto import lake, schema
from fleetprof.proto.pprof import profile_pb2
from fleetprof.proto.stacks import StackRow, stacks_table
from fleetprof.query.filters import SampleFilter
from fleetprof.query.flame import load_flame
from fleetprof.query.flame_tree import FlameNode
from fleetprof.query.fleet import FleetSource
from fleetprof.query.source import AggregatorSource
from tests.conftest import require, require_ebpf
from tests.integration.test_end_to_end import weight_under
from tests.unit.test_ingest import batch, send

BIOLATENCY = Path("/usr/sbin/biolatency")
NS = 1e9
EVENTS_DOC = Path(__file__).parents[2] / "docs" / "events.md"
# docs/events.md "Lock and I/O queries" (checked to be there, word for word).
PERCENTILES_PER_DEVICE = """
WITH buckets AS (
    SELECT device, bucket_le_ns, sum(count) AS n FROM io_latency GROUP BY ALL
), running AS (
    SELECT device, bucket_le_ns,
           sum(n) OVER (PARTITION BY device ORDER BY bucket_le_ns) AS below,
           sum(n) OVER (PARTITION BY device) AS requests
    FROM buckets
)
SELECT device, any_value(requests) AS requests,
       min(bucket_le_ns) FILTER (WHERE below >= 0.50 * requests) / 1e6 AS p50_ms,
       min(bucket_le_ns) FILTER (WHERE below >= 0.99 * requests) / 1e6 AS p99_ms
FROM running GROUP BY device ORDER BY device;
"""
PERCENTILES_PER_PROCESS = """
WITH buckets AS (
    SELECT comm, pid, device, bucket_le_ns, sum(count) AS n FROM io_latency
    WHERE ts > now() - INTERVAL 1 HOUR GROUP BY ALL
), running AS (
    SELECT comm, pid, device, bucket_le_ns,
           sum(n) OVER (PARTITION BY comm, pid, device ORDER BY bucket_le_ns) AS below,
           sum(n) OVER (PARTITION BY comm, pid, device) AS requests
    FROM buckets
)
SELECT comm, pid, device, any_value(requests) AS requests,
       min(bucket_le_ns) FILTER (WHERE below >= 0.50 * requests) / 1e6 AS p50_ms,
       min(bucket_le_ns) FILTER (WHERE below >= 0.99 * requests) / 1e6 AS p99_ms
FROM running GROUP BY ALL ORDER BY requests DESC;
"""
TOP_CONTENDED_LOCKS = """
SELECT comm, pid, frames[-4:] AS waiting_in, round(sum(weight) / 1e9, 3) AS blocked_s
FROM samples JOIN stacks USING (stack_id)
WHERE event = 'lock'
GROUP BY comm, pid, waiting_in
QUALIFY row_number() OVER (PARTITION BY comm, pid ORDER BY blocked_s DESC) <= 3
ORDER BY comm, pid, blocked_s DESC;
"""


def query(aggregator: Aggregator, sql: str) -> list[dict[str, object]]:
    """Run one of docs/events.md's queries through the aggregator's read-only SQL service."""
    assert sql.strip() in EVENTS_DOC.read_text(), "docs/events.md's query differs"
    source = AggregatorSource(aggregator.address)
    try:
        with source.stream(sql.strip().removesuffix(";")) as reader:
            return reader.read_all().to_pylist()
    finally:
        source.close()


@pytest.fixture(scope="session")
def waits_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require(shutil.which("gcc") is not None, "gcc is not installed")
    return workloads.build_native(tmp_path_factory.mktemp("waits"), workloads.WAITS_SOURCE)


@pytest.fixture(scope="session")
def contention_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require(shutil.which("javac") is not None, "a JDK is not installed")
    return workloads.build_java(tmp_path_factory.mktemp("java"), workloads.CONTENTION_SOURCE)


def flame(aggregator: Aggregator, event: str, pid: int) -> FlameNode:
    source = AggregatorSource(aggregator.address)
    try:
        return load_flame(source, SampleFilter(event=event, pids=(pid,)))
    finally:
        source.close()


def outermost(node: FlameNode, matches: str) -> list[FlameNode]:
    """The outermost frames whose name contains `matches`."""
    if matches in node.name:
        return [node]
    return [found for child in node.children.values() for found in outermost(child, matches)]


def run_waits(binary: Path, *args: object, realtime: bool = False) -> tuple[int, float]:
    """Run waits.c in one of its modes (at SCHED_FIFO priority 1 if `realtime`); (pid,
    wall seconds)."""
    command = [str(binary), *map(str, args)]
    start = time.monotonic()
    process = subprocess.Popen(
        ["chrt", "--fifo", "1", *command] if realtime else command, stdout=subprocess.DEVNULL
    )
    assert process.wait() == 0
    return process.pid, time.monotonic() - start


def weights_of(aggregator: Aggregator, event: str, pid: int, tids: set[int]) -> int:
    """The weight of some threads of a process in an event."""
    (total,) = (
        aggregator.store.reader()
        .execute(
            "SELECT coalesce(sum(weight), 0) FROM samples "
            "WHERE event = ? AND pid = ? AND list_contains(?, tid)",
            [event, pid, sorted(tids)],
        )
        .fetchone()
    )
    return int(total)


def test_mutex_contention_is_lock_and_the_join_is_wait(
    aggregator, running_agent, waits_binary, tmp_path: Path
) -> None:
    agent = running_agent(events=("lock", "wait"))
    threads = 4
    pid, wall = run_waits(waits_binary, "mutex", 3, threads)
    agent.stop()
    tree = flame(aggregator, "lock", pid)
    workers = weight_under(tree, "ledger_worker")
    # The lock profile is the workers' contention: glibc's frameless __lll_lock_wait and
    # pthread_mutex_lock do not hide their caller.
    assert weight_under(tree, "update_shared_ledger") >= 0.9 * tree.total
    # One thread holds the lock (asleep), the other three wait: blocked time is about
    # (threads - 1) x wall, and can never exceed threads x wall.
    assert 0.6 * (threads - 1) * wall * NS <= workers <= threads * wall * NS, workers / NS
    # main waits in pthread_join all along: a wait, not a lock.
    assert weights_of(aggregator, "lock", pid, {pid}) <= 0.01 * wall * NS
    joined = weights_of(aggregator, "wait", pid, {pid})
    assert 0.8 * wall * NS <= joined <= wall * NS, joined / NS
    # The weight is nanoseconds, shown as time; the folded export keeps the whole graph.
    out = tmp_path / "lock.folded"
    argv = ["flamegraph", "--aggregator", aggregator.address, "--event", "lock"]
    assert main([*argv, "--pid", str(pid), "-o", str(out)]) == 0
    lines = [line for line in out.read_text().splitlines() if not line.startswith("#")]
    assert sum(int(line.rsplit(" ", 1)[1]) for line in lines) == tree.total
    assert any("update_shared_ledger;pthread_mutex_lock" in line for line in lines)
    top = next(row for row in query(aggregator, TOP_CONTENDED_LOCKS) if row["pid"] == pid)
    assert "update_shared_ledger" in top["waiting_in"]


def kernel_stack_weight(aggregator: Aggregator, event: str, pid: int, function: str) -> int:
    """The weight of a process's stacks with kernel frames under `function`, in an event."""
    (total,) = (
        aggregator.store.reader()
        .execute(
            "SELECT coalesce(sum(weight), 0) FROM samples JOIN stacks USING (stack_id) "
            "WHERE event = ? AND pid = ? AND list_contains(kinds, 'kernel') "
            "AND list_contains(frames, ?)",
            [event, pid, function],
        )
        .fetchone()
    )
    return int(total)


def test_kernel_lock_contention_is_lock(aggregator, running_agent, waits_binary) -> None:
    agent = running_agent(events=("lock", "wait"))
    threads = 4
    # Threads mapping and unmapping memory: they contend for the mmap lock (a rwsem).
    pid, wall = run_waits(waits_binary, "mmap", 3, threads)
    agent.stop()
    contended = kernel_stack_weight(aggregator, "lock", pid, "remap_scratch")
    # Mostly one thread holds the lock while the others wait (seen here: 1.4 x wall).
    assert contended >= 0.5 * wall * NS, contended / NS
    # The lock profile is that contention, in the kernel under the program's own function
    # (kernel frames such as down_write_killable, rwsem_down_write_slowpath below it)...
    assert contended >= 0.9 * flame(aggregator, "lock", pid).total
    # ...and none of it is a wait.
    assert kernel_stack_weight(aggregator, "wait", pid, "remap_scratch") == 0


def test_sampled_short_waits_keep_their_total(waits_binary) -> None:
    require_ebpf()
    from fleetprof.node_agent.samplers import SamplerOptions
    from fleetprof.node_agent.samplers.switches import SwitchSampler

    # The same waits, seen by the default sampler (waits under 1 ms sampled, weighing 1 ms)
    # and by one that records every wait of 1 µs or more as it is.
    sampled = SwitchSampler(SamplerOptions(), ("lock", "wait"))
    exact = SwitchSampler(SamplerOptions(wait_sample_us=1), ("lock", "wait"))
    try:
        # A thread pair per CPU passing a turn through a futex: waits of microseconds.
        pid, wall = run_waits(waits_binary, "pingpong", 200_000, 2500)
        # The players' waits (the main thread waits for them in one long wait).
        totals = [
            sum(s.weight for s in sampler.drain().samples if s.pid == pid != s.tid)
            for sampler in (sampled, exact)
        ]
    finally:
        sampled.close()
        exact.close()
    # Most of the time one player of each pair waits (less when others preempt them).
    assert totals[1] >= 0.3 * (os.cpu_count() or 1) * wall * NS, totals[1] / NS
    # Thousands of 1 ms samples: within 6% (3.5 standard deviations) of the real total.
    assert abs(totals[0] - totals[1]) <= 0.06 * totals[1], [total / NS for total in totals]


def threads_named(pid: int, prefix: str) -> set[int]:
    """The tids of a process's threads whose name starts with `prefix`."""
    tids = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if (task / "comm").read_text().startswith(prefix):
                tids.add(int(task.name))
        except OSError:
            continue  # exited meanwhile
    return tids


# The workers contend for a monitor (synchronized) or a java.util.concurrent ReentrantLock,
# in the method named.
@pytest.mark.parametrize(
    ("lock", "method"), [("monitor", "appendToJournal"), ("reentrant", "postToLedger")]
)
def test_java_lock_contention_is_lock_and_an_idle_pool_is_wait(
    aggregator, running_agent, contention_classes, lock: str, method: str
) -> None:
    agent = running_agent(events=("lock", "wait"))
    seconds, threads, idle_threads = 8, 4, 3
    process = workloads.start_java(
        contention_classes, seconds, threads, main=workloads.CONTENTION_MAIN, arguments=[lock]
    )
    # The idle pool's threads, by name, once the JVM has started them.
    deadline = time.monotonic() + seconds
    idle: set[int] = set()
    while len(idle) < idle_threads and time.monotonic() < deadline:
        time.sleep(0.2)
        idle = threads_named(process.pid, "idle-pool-")
    assert process.wait() == 0
    agent.stop()
    assert len(idle) == idle_threads, idle
    tree = flame(aggregator, "lock", process.pid)
    # Three of the four writers wait for the lock at any time; the JVM's own threads
    # (GC, compiler, ...) wait too, elsewhere.
    contended = sum(node.total for node in outermost(tree, method))
    assert contended >= 0.3 * (threads - 1) * seconds * NS, contended / NS
    # Entering a monitor or a ReentrantLock parks in pthread_cond_wait, as waits do: it is
    # still lock.
    waiting = flame(aggregator, "wait", process.pid)
    assert sum(node.total for node in outermost(waiting, method)) <= 0.05 * contended
    # The idle pool's threads wait for tasks all along: wait, never lock.
    parked = weights_of(aggregator, "wait", process.pid, idle)
    assert parked >= 0.5 * idle_threads * seconds * NS, parked / NS
    assert weights_of(aggregator, "lock", process.pid, idle) <= 0.01 * parked


def block_device(path: Path) -> str:
    """The disk (not partition) holding `path`, as /sys/block names it."""
    dev = os.stat(path).st_dev
    sys_dev = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    require(sys_dev.exists(), f"{path} is not on a block device")
    real = sys_dev.resolve()
    return real.parent.name if (real / "partition").exists() else real.name


def test_direct_writes_weigh_their_time_once_in_io_and_block(aggregator, tmp_path: Path) -> None:
    require_ebpf()
    require(BIOLATENCY.exists(), "libbpf-tools' biolatency is not installed")
    from fleetprof.node_agent.agent import Agent, AgentConfig

    device = block_device(tmp_path)
    writes = 3000
    # Drained by hand: the agent's window is cut right after biolatency starts and right
    # after it stops, so both count the disk's requests (everyone's) over the same time.
    events = ("io", "block")
    agent = Agent(AgentConfig(aggregator.address, "test-node", 3600, events, str(tmp_path)))
    try:
        # What the agent saw since it started (all syscalls of a busy machine) drained now,
        # so that the drain right after biolatency attaches is quick.
        agent.drain_once()
        # Line-buffered, so its "Tracing" line says it is attached.
        biolatency = subprocess.Popen(
            ["stdbuf", "-oL", str(BIOLATENCY), "-d", device],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert biolatency.stdout is not None
        assert "Tracing" in biolatency.stdout.readline()
        agent.drain_once()
        target = tmp_path / "direct.dat"
        start = time.monotonic()
        dd = subprocess.Popen(
            ["dd", "if=/dev/zero", f"of={target}", "bs=4k", f"count={writes}", "oflag=direct"],
            stderr=subprocess.DEVNULL,
        )
        assert dd.wait() == 0
        wall = time.monotonic() - start
        biolatency.send_signal(signal.SIGINT)
        report, _ = biolatency.communicate(timeout=30)
        agent.drain_once()
    finally:
        agent.close()
    theirs = sum(int(n) for n in re.findall(r"^\s*\d+ -> \d+\s*: (\d+)", report, re.M))

    reader = aggregator.store.reader()
    (ours,) = reader.execute(
        "SELECT sum(count) FROM io_latency WHERE device = ? "
        "AND ts = (SELECT max(ts) FROM io_latency)",
        [device],
    ).fetchone()
    buckets = reader.execute(
        "SELECT bucket_le_ns, sum(count) FROM io_latency WHERE pid = ? AND op = 'write' "
        "GROUP BY ALL ORDER BY 1",
        [dd.pid],
    ).fetchall()
    # Every 4 KiB O_DIRECT write is one request, counted for dd in a latency histogram
    # (requests are matched by device and sector: a rare one is missed).
    assert 0.98 * writes <= sum(n for _, n in buckets) <= 1.02 * writes
    assert all(bucket & (bucket - 1) == 0 for bucket, _ in buckets)
    assert abs(ours - theirs) <= 0.1 * theirs, (ours, theirs)
    # dd's time in write(2) is its io; the device's part of it is block, apart: each adds
    # up to at most the real time (io is short of dd's wall time by its start and exit).
    io = flame(aggregator, "io", dd.pid)
    assert 0.5 * wall * NS <= io.total <= 1.2 * wall * NS, (io.total / NS, wall)
    assert weight_under(io, "[syscall write]") >= 0.95 * io.total
    # The same requests weigh on dd's stacks, under a leaf naming the device and op.
    block = flame(aggregator, "block", dd.pid)
    assert weight_under(block, f"[block write {device}]") >= 0.95 * block.total > 0
    assert block.total <= io.total, (block.total / NS, io.total / NS)


def test_fsync_time_lands_under_the_commit_path(
    aggregator, running_agent, waits_binary, tmp_path: Path
) -> None:
    agent = running_agent(events=("io",))
    pid, wall = run_waits(waits_binary, "fsync", 2, tmp_path / "journal.dat")
    agent.stop()
    tree = flame(aggregator, "io", pid)
    fsync = weight_under(tree, "[syscall fsync]")
    # The loop spends its time in fsync, called from commit_record (whose frame glibc's
    # frameless fsync wrapper would hide from a plain frame-pointer walk).
    assert fsync >= 0.5 * wall * NS, fsync / NS
    commit = outermost(tree, "commit_record")
    assert sum(weight_under(node, "[syscall fsync]") for node in commit) >= 0.99 * fsync


# Alone, and with lock and wait in the same programs (one pair for all three).
@pytest.mark.parametrize("events", [("offcpu",), ("offcpu", "lock", "wait")])
def test_offcpu_counts_long_sleeps_only(
    aggregator, running_agent, waits_binary, events: tuple[str, ...]
) -> None:
    agent = running_agent(events=events)
    sleeper = subprocess.Popen(["sleep", "0.5"])
    # A thread pair per CPU passing a turn: each thread waits for it half the time, in
    # waits of microseconds, far below the 1 ms threshold. At real-time priority, so that
    # other load cannot keep a woken player from its CPU for milliseconds; for less than
    # the real-time share of a second (0.95 s), so that it is not throttled either.
    switcher, wall = run_waits(waits_binary, "pingpong", 30_000, 0, realtime=True)
    assert wall < 0.9, wall
    assert sleeper.wait() == 0
    agent.stop()
    slept = weight_under(flame(aggregator, "offcpu", sleeper.pid), "do_nanosleep")
    assert 0.45 * NS <= slept <= 0.7 * NS, slept / NS
    # (Where each player waits for its turn: wait_for_turn is inlined there.)
    waiting = weight_under(flame(aggregator, "offcpu", switcher), "play")
    threads = 2 * (os.cpu_count() or 1)
    assert waiting < 0.2 * 0.5 * threads * wall * NS, waiting / NS
    if "lock" in events:
        # A sleep is no futex wait; the players' short futex waits are counted (sampled).
        assert weights_of(aggregator, "wait", sleeper.pid, {sleeper.pid}) == 0
        assert weights_of(aggregator, "lock", sleeper.pid, {sleeper.pid}) == 0
        players = flame(aggregator, "lock", switcher).total
        assert players >= 0.2 * 0.5 * threads * wall * NS, players / NS


def latency_rows(*rows: tuple[int, str, str, str, int, int]) -> bytes:
    columns = list(zip(*rows, strict=True))
    now = datetime.now(UTC)
    names = schema.IO_LATENCY.names[1:]
    table = pa.table(
        {"ts": [now] * len(rows), **dict(zip(names, columns, strict=True))},
        schema=schema.IO_LATENCY,
    )
    return schema.encode(table)


def test_io_latency_is_validated_stored_and_queried(aggregator) -> None:
    send(
        aggregator,
        batch(1, io_latency=latency_rows((7, "dd", "vda", "write", 1 << 16, 98))),
        batch(2, io_latency=latency_rows((7, "dd", "vda", "write", 1 << 24, 2))),
    )
    for row, message in [
        ((7, "dd", "vda", "write", 1 << 16, -1), "negative count"),
        ((7, "dd", "vda", "write", 3000, 1), "power of two"),
        ((7, "dd", "vda", "erase", 1 << 16, 1), "unknown op 'erase'"),
    ]:
        with pytest.raises(grpc.RpcError) as error:
            send(aggregator, batch(3, io_latency=latency_rows(row)))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in error.value.details()
    p50, p99 = 65536 / 1e6, (1 << 24) / 1e6
    assert query(aggregator, PERCENTILES_PER_DEVICE) == [
        {"device": "vda", "requests": 100, "p50_ms": p50, "p99_ms": p99}
    ]
    assert query(aggregator, PERCENTILES_PER_PROCESS) == [
        {"comm": "dd", "pid": 7, "device": "vda", "requests": 100, "p50_ms": p50, "p99_ms": p99}
    ]


def old_stack(*frames: str, kind: str = "native") -> StackRow:
    return StackRow(frames, ("app",) * len(frames), (kind,) * len(frames))


# Stacks of agents before the split, by id: (event they sent, event they are).
OLD_STACKS = {
    1: (old_stack("main", "copy_file", "[syscall write]"), "io", "io"),
    2: (old_stack("main", "copy_file", "[block write vda]"), "io", "block"),
    3: (old_stack("worker", "update", "pthread_mutex_lock", "__lll_lock_wait"), "lock", "lock"),
    4: (old_stack("main", "pthread_join", "__futex_abstimed_wait_common"), "lock", "wait"),
    5: (
        old_stack("run", "ObjectSynchronizer::enter", "ObjectMonitor::EnterI", "pthread_cond_wait"),
        "lock",
        "lock",
    ),
    6: (old_stack("getTask", "Parker::park", "___pthread_cond_timedwait64"), "lock", "wait"),
    7: (old_stack("main", "[unknown]"), "lock", "lock"),  # nothing says: stays
}


def old_samples(ts: datetime) -> pa.Table:
    """One row per stack of OLD_STACKS as an agent before the split sent it (weight 1000 x id)."""
    ids = list(OLD_STACKS)
    return schema.samples_table(
        {
            "ts": pa.array([ts] * len(ids), pa.timestamp("us", tz="UTC")),
            "pid": [7] * len(ids),
            "tid": [7] * len(ids),
            "comm": ["app"] * len(ids),
            "event": [OLD_STACKS[i][1] for i in ids],
            "stack_id": ids,
            "weight": [1000 * i for i in ids],
        }
    )


def test_old_databases_convert_when_opened(tmp_path: Path) -> None:
    path = tmp_path / "old.duckdb"
    server = Aggregator(path, "127.0.0.1:0")
    server.start()
    samples = schema.encode(old_samples(datetime.now(UTC)))
    rows = {i: stack for i, (stack, _, _) in OLD_STACKS.items()}
    send(server, batch(1, samples=samples, stacks=schema.encode(stacks_table(rows))))
    server.stop(grace_s=0)
    # What a database of an earlier release lacks: the record of its conversion.
    with duckdb.connect(str(path)) as db:
        db.execute("DROP TABLE converted_events")
    for _ in range(2):  # converted once; opened again, it stays as it is
        store = ProfileStore(path)
        try:
            found = dict(store.reader().execute("SELECT stack_id, event FROM samples").fetchall())
            (total,) = store.reader().execute("SELECT sum(weight) FROM samples").fetchone()
        finally:
            store.close()
        assert found == {i: new for i, (_, _, new) in OLD_STACKS.items()}
        assert total == 1000 * sum(OLD_STACKS)
    # Exports say each event's unit: time, in nanoseconds.
    pprof, speedscope = tmp_path / "block.pb.gz", tmp_path / "wait.json"
    assert main(["flamegraph", "--db", str(path), "--event", "block", "-o", str(pprof)]) == 0
    profile = profile_pb2.Profile.FromString(gzip.decompress(pprof.read_bytes()))
    strings = profile.string_table
    types = [(strings[t.type], strings[t.unit]) for t in profile.sample_type]
    assert types == [("block", "nanoseconds")]
    assert sum(sample.value[0] for sample in profile.sample) == 2000
    assert main(["flamegraph", "--db", str(path), "--event", "wait", "-o", str(speedscope)]) == 0
    (waits,) = json.loads(speedscope.read_text())["profiles"]
    assert (waits["unit"], sum(waits["weights"])) == ("nanoseconds", 4000 + 6000)


def events_of(source: FleetSource | ProfileStore) -> dict[tuple[int, str], int]:
    """Weight per (stack, event) of the `samples` view."""
    sql = "SELECT stack_id, event, sum(weight) AS w FROM samples GROUP BY ALL"
    if isinstance(source, ProfileStore):
        rows = source.reader().execute(sql).fetchall()
    else:
        with source.stream(sql) as reader:
            rows = [tuple(row.values()) for row in reader.read_all().to_pylist()]
    return {(stack, event): int(weight) for stack, event, weight in rows}


# The old file rewritten by the first maintenance pass, or by downsampling before that.
@pytest.mark.parametrize("rewrite", ["maintain", "downsample"])
def test_old_lake_files_read_converted_and_are_rewritten(tmp_path: Path, rewrite: str) -> None:
    path, lake_dir, name = tmp_path / "old.duckdb", tmp_path / "lake", "old-aggregator"
    now = datetime.now(UTC)
    sealed_hour = lake.hour_start(now) - timedelta(hours=2)
    stacks = stacks_table({i: stack for i, (stack, _, _) in OLD_STACKS.items()})
    # An hour sealed and one still open, as an earlier release left them: the same rows
    # (old agents' events), files without the marker, no record of any conversion.
    store = ProfileStore(path, lake_dir, name)
    for sequence, ts in enumerate((sealed_hour + timedelta(minutes=5), now), 1):
        store.append("old-agent", sequence, "node-a", old_samples(ts), stacks)
    Partitions(store).seal(lake.hour_start(now))
    files = [
        Path(p)
        for (p,) in store.reader()
        .execute("SELECT lake || '/' || path FROM sealed_files WHERE table_name = 'samples'")
        .fetchall()
    ]
    store.close()
    assert len(files) == 1
    with duckdb.connect(str(path)) as db:
        for file in files:  # as the earlier release's seal wrote it
            copy = file.with_name(f".{file.name}.tmp")
            db.execute(f"COPY (FROM '{file}') TO '{copy}' (FORMAT parquet, COMPRESSION zstd)")
            copy.replace(file)
        db.execute("DROP TABLE converted_events")
        db.execute("DROP TABLE old_event_files")
        db.execute("DROP TABLE old_event_stacks")
    raw = duckdb.sql(f"SELECT DISTINCT event FROM read_parquet('{files[0]}')").fetchall()
    assert sorted(raw) == [("io",), ("lock",)]
    assert duckdb.sql(lake.unmarked_sql(files)).fetchall() == [(str(files[0]),)]

    expected = {(i, new): 1000 * i for i, (_, _, new) in OLD_STACKS.items()}
    # The lake alone, its aggregator gone: files of old events are read converted.
    fleet = FleetSource(lake_dir, [])
    try:
        assert events_of(fleet) == expected
    finally:
        fleet.close()
    # Opened by this release: the open hour's rows and the sealed file's read converted, and
    # so does a fleet query over the aggregator and the lake, before maintenance runs.
    server = Aggregator(path, "127.0.0.1:0", lake_dir=lake_dir, name=name)
    server.start()
    fleet = FleetSource(lake_dir, [server.address])
    try:
        assert events_of(server.store) == {k: 2 * w for k, w in expected.items()}
        assert events_of(fleet) == {k: 2 * w for k, w in expected.items()}
        # The file is rewritten with its events converted.
        partitions = Partitions(server.store)
        if rewrite == "maintain":
            partitions.maintain()
        else:
            partitions.downsample(lake.hour_start(now))
        assert events_of(server.store) == {k: 2 * w for k, w in expected.items()}
        assert events_of(fleet) == {k: 2 * w for k, w in expected.items()}
        (rewritten,) = (
            server.store.reader()
            .execute("SELECT lake || '/' || path FROM sealed_files WHERE table_name = 'samples'")
            .fetchall()
        )
        assert not files[0].exists()
        raw = duckdb.sql(
            f"SELECT stack_id, event, sum(weight) FROM read_parquet('{rewritten[0]}') GROUP BY ALL"
        ).fetchall()
        assert {(i, e): w for i, e, w in raw} == expected
        assert server.store.reader().execute("FROM old_event_files").fetchall() == []
        assert duckdb.sql(lake.unmarked_sql([rewritten[0]])).fetchall() == []
    finally:
        fleet.close()
        server.stop(grace_s=0)


def native(*names: str) -> list[Frame]:
    return [Frame(name, "lib", "native") for name in names]


FUTEX_WAIT, FUTEX_WAIT_BITSET = 0, 9


@pytest.mark.parametrize(
    ("command", "frames", "event"),
    [
        # What the program asked for decides, above what the runtime built it from.
        (
            FUTEX_WAIT_BITSET,
            native(
                "run",
                "ObjectSynchronizer::enter",
                "ObjectMonitor::EnterI",
                "os::PlatformEvent::park",
                "pthread_cond_wait",
            ),
            "lock",
        ),
        (
            FUTEX_WAIT_BITSET,
            native(
                "java.lang.Object.wait",
                "ObjectMonitor::wait",
                "os::PlatformEvent::park",
                "pthread_cond_wait",
            ),
            "wait",
        ),
        # A ReentrantLock.lock inlined into its caller leaves AQS's exclusive acquire.
        (
            FUTEX_WAIT_BITSET,
            native(
                "demo.Ledger.post",
                "java.util.concurrent.locks.AbstractQueuedSynchronizer.acquire",
                "Parker::park",
                "__pthread_cond_wait",
            ),
            "lock",
        ),
        (
            FUTEX_WAIT_BITSET,
            native(
                "demo.Batch.run",
                "java.util.concurrent.CountDownLatch.await",
                "java.util.concurrent.locks.AbstractQueuedSynchronizer.acquire",
                "Parker::park",
            ),
            "wait",
        ),
        (FUTEX_WAIT, native("worker", "___pthread_mutex_lock", "__lll_lock_wait"), "lock"),
        (FUTEX_WAIT_BITSET, native("reader", "__pthread_rwlock_rdlock_full64"), "lock"),
        (FUTEX_WAIT_BITSET, native("main", "__pthread_clockjoin_ex"), "wait"),
        # Frames that say nothing: the futex command.
        (FUTEX_WAIT, native("play", "syscall"), "lock"),
        (FUTEX_WAIT_BITSET, native("Interpreter", "Parker::park"), "wait"),
        (FUTEX_WAIT_BITSET, [], "wait"),
    ],
)
def test_a_wait_is_lock_or_wait_by_its_outermost_lock_or_wait_frame(
    command: int, frames: list[Frame], event: str
) -> None:
    assert lock_or_wait(command, frames) == event
