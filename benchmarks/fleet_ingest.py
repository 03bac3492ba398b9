"""Fleet-scale ingest through the real gRPC path, and a flame graph over 100M stored rows.

A synthetic fleet: `--stacks` distinct JVM-like stacks of 10 to 60 frames grown from each
other's prefixes (benchmarks/flame_query.py), shared by every node, each sample row's stack
drawn Zipf-like (P(k) ~ 1/k); `--nodes` nodes in `--jobs` jobs, one batch per node and
interval with `--batch-rows` rows. `--clients` processes each open `--streams` Ingest streams
to a real Aggregator (its own process, a DuckDB file) and send real IngestBatch messages
the way the agent's Shipper does: zstd Arrow IPC, each stack once per stream, one batch in
flight per stream, the next sent when the previous is acked (after its commit).

Printed, on this machine's load (`uptime` is printed too), latency being batch sent → acked:
1. the first pass, a fleet's cold start: every stack is new to the aggregator, which stores
   each once (and each stream sends each of its stacks once): rows/s and latency p50/p99.
2. sustained ingest, the same batches again from streams past their first batches (which
   sent their stacks then, as the Shipper's long-lived streams do):
   rows/s end to end (first batch sent → last ack) and its ratio to a bare DuckDB append of
   the same Arrow batches (one INSERT each, same columns, same process count: one); latency.
   Targets: >= 1M rows/s, >= 50% of the bare append.
   2b. sustained ingest into two aggregators, one with none of issue 18's checks (its
   per-batch checks taken out in that aggregator's process: ingest as before it), one
   with its checks and authentication (agent tokens checked on every stream, each agent
   bound to its node); `--checks-only` adds a third with its checks alone. A/B: `--runs`
   pairs, each runs them one right after the other (the first of a pair alternating), from
   the same kept client processes: per pair the rates and their ratio (target:
   auth+checks >= 95% of none), in rows/s and in rows per second of the aggregator's CPU
   (its process's, from /proc), with the cores other processes kept busy meanwhile
   (/proc/stat less this benchmark's processes) and the load average; then the ratios'
   median (min-max), middle half and a 95% interval of the median, the same over the
   quiet pairs alone (others under 0.25 cores), and the load average before and after.
   2c. the cost of the hostile-input checks every batch goes through (IPC size from
   metadata, control characters, weight bounds, time window, stacks of the stream) timed
   alone over the same batches, as a share of the sustained time per row.
3. sustained ingest while a flame graph of one job is drawn over and over through the
   QueryService: rows/s, latency. Target: p99 < 500 ms.
4. a flame graph of one job and one hour over `--rows` stored rows (default 100M, appended
   as Arrow batches through ProfileStore.append), against a bare GROUP BY stack_id of the
   same rows; bytes per stored row. Target: < 2 s.

Run: .venv/bin/python benchmarks/fleet_ingest.py [--quick] [--rows 100M] [--skip-flame]
     [--runs 3] [--only-auth] [--checks-only]   (--only-auth: the fleet, then 2b, 2c only)
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import queue
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from fleetprof.aggregator import validate
from fleetprof.aggregator.ingest_guard import IngestGuard
from fleetprof.aggregator.label_sets import ROW_LABELS, group_labels
from fleetprof.aggregator.server import Aggregator
from fleetprof.aggregator.storage import ProfileStore
from fleetprof.aggregator.validate import (
    StreamStacks,
    check_text,
    check_time_window,
    check_weights,
)
from fleetprof.proto import schema
from fleetprof.proto.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from fleetprof.proto.security import ClientSecurity, NodeGrant, ServerSecurity
from fleetprof.proto.stacks import stack_id, stacks_table
from fleetprof.query.filters import SampleFilter
from fleetprof.query.graph import write_graph
from fleetprof.query.render import RenderOptions
from fleetprof.query.source import AggregatorSource, DatabaseSource

sys.path.insert(0, str(Path(__file__).parent))
from agent_overhead import CLOCK_TICKS, process_cpu_s
from flame_query import best_of, synthetic_stacks

CHANNEL_OPTIONS = [("grpc.max_send_message_length", schema.MAX_MESSAGE_BYTES)]
FLAME_JOB = "job-0"
# With authentication on: the clients' agent token (any node) and an operator's query token.
AGENT_TOKEN, QUERY_TOKEN = "bench-agent-token", "bench-query-token"
OPTIONS = RenderOptions(title="fleet", event="cpu", unit="samples")


def parse_count(text: str) -> int:
    """100M, 5M, 250k, 1000."""
    scale = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000}.get(text[-1].lower(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


@dataclass(frozen=True)
class Fleet:
    """The shared stacks: ids in popularity order (the most used first), and their rows."""

    ids: list[int]
    stacks: pa.Table  # schema.STACKS, in the same order

    @classmethod
    def make(cls, count: int, seed: int = 7) -> Fleet:
        rng = random.Random(seed)
        rows = synthetic_stacks(count, rng)
        ids = [stack_id(row) for row in rows]
        order = list(range(count))
        rng.shuffle(order)  # popularity independent of the order stacks were grown in
        return cls([ids[i] for i in order], stacks_table({ids[i]: rows[i] for i in order}))

    def connect(self) -> duckdb.DuckDBPyConnection:
        """A DuckDB connection where `fleet_ids` maps popularity rank k to a stack id."""
        conn = duckdb.connect()
        ranks = pa.array(range(len(self.ids)), pa.int64())
        conn.register("fleet_ids", pa.table({"k": ranks, "stack_id": self.ids}))
        return conn


def sample_rows(
    conn: duckdb.DuckDBPyConnection, stacks: int, rows: int, job: str, ts: datetime
) -> pa.Table:
    """One node's batch: `rows` SAMPLES rows of 16 JVM threads, Zipf-like stack choice."""
    table = conn.sql(
        """
        SELECT $ts::TIMESTAMPTZ AS ts, 1000 + (hash(i) % 4)::INTEGER AS pid,
               2000 + (hash(i * 7) % 16)::INTEGER AS tid, 'java' AS comm, 'cpu' AS event,
               f.stack_id, (1 + hash(i * 13) % 5)::BIGINT AS weight, $job AS job,
               NULL::VARCHAR AS session_id, 'prod' AS namespace, $job || '-pod' AS pod,
               'main' AS container
        FROM (
            SELECT i, (floor(pow($stacks + 1, random())) - 1)::BIGINT AS k FROM range($rows) t(i)
        ) r JOIN fleet_ids f USING (k)
        """,
        params={"ts": ts, "rows": rows, "stacks": stacks, "job": job},
    ).to_arrow_table()
    return table.cast(schema.SAMPLES)


def make_batches(
    fleet: Fleet, nodes: int, jobs: int, batches: int, rows: int, seed: int
) -> list[tuple[str, pa.Table]]:
    """`batches` (node, SAMPLES table) of distinct nodes, each with its job."""
    conn = fleet.connect()
    conn.execute(f"SELECT setseed({(seed % 1000) / 1000})").fetchall()
    now = datetime.now(UTC)
    out = []
    for b in range(batches):
        node = (seed * 7919 + b) % nodes
        table = sample_rows(conn, len(fleet.ids), rows, f"job-{node % jobs}", now)
        out.append((f"node-{node:05d}", table))
    return out


def run_client(
    address: str,
    streams: list[list[tuple[str, bytes]]],
    stacks: bytes,
    warm: bool,
    rounds: int,
    token: str | None,
    ready: mp.Barrier,
    results: mp.Queue,
) -> None:
    """Send each stream's batches `rounds` times, one in flight per stream; put
    (rows acked, [(sent, acked)] per batch) on `results`. `warm`: streams past their first
    batches, which sent their stacks then (as long-lived agent streams do): each stream
    sends the stacks its batches use before the clock starts."""
    messages = _client_messages(streams, stacks, warm, rounds)
    results.put(_send(address, messages, warm, token, ready))


def serve_client(
    streams: list[list[tuple[str, bytes]]],
    stacks: bytes,
    rounds: int,
    commands: mp.Queue,
    ready: mp.Barrier,
    results: mp.Queue,
) -> None:
    """A client kept for many warm runs (ClientPool): its messages are made once; each
    command (address, token, incarnation) sends them all under that incarnation (a new
    one per run: an aggregator would take the same one's batches again for duplicates)."""
    messages = _client_messages(streams, stacks, True, rounds)
    while (command := commands.get()) is not None:
        address, token, incarnation = command
        for stream in messages:
            for message in stream:
                message.incarnation = incarnation
        results.put(_send(address, messages, True, token, ready))


def _client_messages(
    streams: list[list[tuple[str, bytes]]], stacks: bytes, warm: bool, rounds: int
) -> list[list[ingest_pb2.IngestBatch]]:
    # Every message is made before the start: the clients share the aggregator's CPUs.
    all_stacks = schema.decode(stacks, schema.STACKS)
    return [
        _messages(f"bench-{os.getpid()}-{i}", batches, rounds, all_stacks, warm)
        for i, batches in enumerate(streams)
    ]


def _send(
    address: str,
    messages: list[list[ingest_pb2.IngestBatch]],
    warm: bool,
    token: str | None,
    ready: mp.Barrier,
) -> tuple[int, list[tuple[float, float]]]:
    """One stream per list of messages (`warm`: its first is sent before `ready`)."""
    import grpc

    channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    stub = ingest_pb2_grpc.IngestServiceStub(channel)
    metadata = ClientSecurity(token=token).metadata()
    opened = []
    for stream in messages:
        requests: queue.Queue[ingest_pb2.IngestBatch | None] = queue.Queue()
        acks = stub.Ingest(iter(requests.get, None), metadata=metadata)
        if warm:
            requests.put(stream[0])
            next(acks)
        opened.append((requests, acks, stream[1:] if warm else stream))
    ready.wait()
    timings: list[tuple[float, float]] = []
    acked = [0]
    lock = threading.Lock()

    def one_stream(
        requests: queue.Queue[ingest_pb2.IngestBatch | None],
        acks: Iterator[ingest_pb2.IngestAck],
        stream: list[ingest_pb2.IngestBatch],
    ) -> None:
        for message in stream:
            sent = time.time()
            requests.put(message)
            ack = next(acks)
            with lock:
                timings.append((sent, time.time()))
                acked[0] += ack.rows_stored
        requests.put(None)

    threads = [threading.Thread(target=one_stream, args=opened_stream) for opened_stream in opened]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    channel.close()
    return acked[0], timings


def _messages(
    stream_id: str,
    batches: list[tuple[str, bytes]],
    rounds: int,
    stacks: pa.Table,
    warm: bool,
) -> list[ingest_pb2.IngestBatch]:
    """One stream's messages: its batches `rounds` times, each stack in the first batch
    that uses it, as the Shipper sends them; `warm`: all the stacks first, in a batch
    without samples. A stream carries several nodes' batches, each node as its own agent
    (an agent writes one node), each agent counting its own sequence."""
    messages, sent = [], pa.array([], pa.int64())
    sequences: dict[str, int] = {}
    if warm:
        used = pc.unique(
            pa.chunked_array(
                [schema.decode(samples, schema.SAMPLES)["stack_id"] for _, samples in batches]
            )
        )
        node = batches[0][0]
        messages.append(_message(f"{node}/{stream_id}", 1, node, b"", stacks, used))
        sequences[node] = 1
        sent = used.combine_chunks() if isinstance(used, pa.ChunkedArray) else used
    for node, samples in batches * rounds:
        used = pc.unique(schema.decode(samples, schema.SAMPLES)["stack_id"])
        new = pc.filter(used, pc.invert(pc.is_in(used, value_set=sent)))
        sent = pa.concat_arrays([sent, new])
        sequences[node] = sequences.get(node, 0) + 1
        messages.append(
            _message(f"{node}/{stream_id}", sequences[node], node, samples, stacks, new)
        )
    return messages


def _message(
    agent_id: str, sequence: int, node: str, samples: bytes, stacks: pa.Table, new: pa.Array
) -> ingest_pb2.IngestBatch:
    return ingest_pb2.IngestBatch(
        agent_id=agent_id,
        sequence=sequence,
        incarnation="bench",
        schema_version=schema.SCHEMA_VERSION,
        node=node,
        samples=samples,
        stacks=schema.encode(stacks.filter(pc.is_in(stacks["stack_id"], value_set=new)))
        if len(new)
        else b"",
    )


# Settings of 2b: (authentication, the hostile-input checks of issue 18).
BASELINE, CHECKS, ALL_ON = (False, False), (False, True), (True, True)
SETTING_NAMES = {BASELINE: "none", CHECKS: "checks", ALL_ON: "auth+checks"}


def without_checks() -> None:
    """The baseline of 2b, in its aggregator process only: ingest as before issue 18, none
    of its per-batch checks (names, time window, weights, text, decoded size, stacks of
    the stream, agent id bound to node and incarnation sequences)."""

    def nothing(*_args: object, **_kwargs: object) -> None:
        return None

    for name in ("check_identifier", "check_text", "check_time_window", "check_weights"):
        setattr(validate, name, nothing)
    schema.check_decoded_size = nothing
    validate.StreamStacks.check = nothing  # type: ignore[method-assign]
    IngestGuard.admit = nothing  # type: ignore[method-assign]


def run_aggregator(
    db: str, port: mp.Queue, stop: mp.Event, auth: bool, checks: bool = True
) -> None:
    if not checks:
        without_checks()
    security = ServerSecurity(
        tokens={QUERY_TOKEN: None}, agents={AGENT_TOKEN: NodeGrant("bench agents")}
    )
    aggregator = Aggregator(db, "127.0.0.1:0", security=security if auth else None)
    aggregator.start()
    port.put(aggregator.address)
    stop.wait()
    aggregator.stop(grace_s=0)


def ingest(
    address: str,
    per_client: list[list[list[tuple[str, bytes]]]],
    stacks: bytes,
    warm: bool,
    rounds: int,
    token: str | None = None,
    server_pid: int | None = None,
) -> tuple[int, float, list[float], float]:
    """Run the clients once; (rows acked, seconds, latencies in seconds, CPU seconds of
    process `server_pid` meanwhile: nan without one). Seconds count from the clients'
    start together (after their warm-up batches) to the last ack."""
    ctx = mp.get_context("spawn")
    ready = ctx.Barrier(len(per_client) + 1)
    results = ctx.Queue()
    clients = [
        ctx.Process(
            target=run_client,
            args=(address, streams, stacks, warm, rounds, token, ready, results),
        )
        for streams in per_client
    ]
    for client in clients:
        client.start()
    measured = _measure(ready, results, len(clients), server_pid)
    for client in clients:
        client.join()
    return measured.rows, measured.seconds, measured.latencies, measured.server_cpu_s


@dataclass(frozen=True)
class Measured:
    rows: int
    seconds: float  # the clients' start together to the last ack
    latencies: list[float]  # batch sent -> acked, sorted
    server_cpu_s: float  # the aggregator process's CPU meanwhile (nan: not asked)
    machine_cpu_s: float  # every CPU's busy time meanwhile (/proc/stat)
    own_cpu_s: float  # the aggregator's and the clients' share of machine_cpu_s

    @property
    def others_cores(self) -> float:
        """Cores other processes (other sessions' tests...) kept busy meanwhile."""
        return max(0.0, self.machine_cpu_s - self.own_cpu_s) / self.seconds


def _measure(
    ready: mp.Barrier, results: mp.Queue, clients: int, server_pid: int | None, pids: tuple = ()
) -> Measured:
    """Start the clients waiting on `ready` together; collect their results. `pids`: the
    clients' processes (kept ones), counted as this benchmark's CPU with the server."""
    ours = (server_pid, *pids) if server_pid else pids
    ready.wait()
    started = time.time()
    machine_before = machine_busy_s()
    own_before = [process_cpu_s(pid) for pid in ours]
    rows, timings = 0, []
    for _ in range(clients):
        acked, times = results.get()
        rows += acked
        timings += times
    own = [process_cpu_s(pid) - before for pid, before in zip(ours, own_before, strict=True)]
    machine = machine_busy_s() - machine_before
    took = max(acked for _, acked in timings) - started
    return Measured(
        rows,
        took,
        sorted(acked - sent for sent, acked in timings),
        own[0] if server_pid else math.nan,
        machine,
        sum(own),
    )


def machine_busy_s() -> float:
    """CPU seconds every CPU of the machine has been busy since boot (/proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / CLOCK_TICKS


class ClientPool:
    """`per_client` client processes kept for many warm runs (2b): a run costs no process
    start, and each run's clients are the same processes with the same messages."""

    def __init__(self, per_client: list, stacks: bytes, rounds: int) -> None:
        ctx = mp.get_context("spawn")
        self._ready = ctx.Barrier(len(per_client) + 1)
        self._results = ctx.Queue()
        self._commands = [ctx.Queue() for _ in per_client]
        self._clients = [
            ctx.Process(
                target=serve_client,
                args=(streams, stacks, rounds, commands, self._ready, self._results),
            )
            for streams, commands in zip(per_client, self._commands, strict=True)
        ]
        for client in self._clients:
            client.start()
        self._runs = 0

    def run(self, address: str, token: str | None, server_pid: int) -> Measured:
        self._runs += 1
        for commands in self._commands:
            commands.put((address, token, f"bench-{self._runs}"))
        pids = tuple(client.pid for client in self._clients)
        return _measure(self._ready, self._results, len(self._clients), server_pid, pids)

    def close(self) -> None:
        for commands in self._commands:
            commands.put(None)
        for client in self._clients:
            client.join()


def bare_append(db: Path, tables: list[pa.Table], rounds: int) -> tuple[int, float]:
    """The same Arrow batches appended to a bare DuckDB table, one INSERT (commit) each."""
    conn = duckdb.connect(str(db))
    columns = ", ".join(f"{f.name} {_duck_type(f.type)}" for f in schema.SAMPLES)
    conn.execute(f"CREATE TABLE sample_rows (node VARCHAR, agent_id VARCHAR, {columns})")
    rows = 0
    started = time.perf_counter()
    for _ in range(rounds):
        for table in tables:
            conn.register("batch", table)
            conn.execute("INSERT INTO sample_rows SELECT 'node', 'agent', * FROM batch")
            conn.unregister("batch")
            rows += table.num_rows
    took = time.perf_counter() - started
    conn.close()
    return rows, took


def _duck_type(arrow_type: pa.DataType) -> str:
    return {
        pa.int32(): "INTEGER",
        pa.int64(): "BIGINT",
        pa.string(): "VARCHAR",
    }.get(arrow_type, "TIMESTAMPTZ")


def percentile(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


def start_aggregator(db: Path, auth: bool, checks: bool = True) -> tuple[mp.Process, mp.Event, str]:
    ctx = mp.get_context("spawn")
    port, stop = ctx.Queue(), ctx.Event()
    server = ctx.Process(target=run_aggregator, args=(str(db), port, stop, auth, checks))
    server.start()
    return server, stop, port.get()


def auth_on_and_off(
    work: Path,
    per_client: list,
    stacks: bytes,
    rounds: int,
    pairs: int = 3,
    settings: tuple[tuple[bool, bool], ...] = (BASELINE, ALL_ON),
) -> float:
    """Sustained ingest into an aggregator with none of issue 18's checks and one with its
    checks and authentication (`settings`: and others), A/B: each pair runs them one right
    after the other, the first of a pair alternating, the same kept client processes
    sending the same messages, so that the machine's load falls on both alike; each pair's
    ratio to `none` is one measurement. Rates are rows per second and rows per second of
    the aggregator process's CPU (/proc). Returns the median rate without them."""
    servers = {
        setting: start_aggregator(work / f"{SETTING_NAMES[setting]}.duckdb", *setting)
        for setting in settings
    }
    clients = ClientPool(per_client, stacks, rounds)
    runs: list[dict[tuple[bool, bool], Measured]] = []
    load_before = os.getloadavg()
    names = [SETTING_NAMES[setting] for setting in settings]
    print(
        f"2b. {pairs} pairs of sustained runs ({', '.join(names)}), each the same "
        f"{len(per_client)} client processes' messages; per pair, rows/s and ratio to none, "
        "the same per aggregator CPU-second, cores other processes kept busy, load (1 min):"
    )
    for pair in range(pairs):
        order = settings if pair % 2 == 0 else settings[::-1]
        load = os.getloadavg()[0]
        measured = {}
        for setting in order:
            server, _, address = servers[setting]
            token = AGENT_TOKEN if setting[0] else None
            measured[setting] = clients.run(address, token, server.pid)
        runs.append(measured)
        print(
            f"    {pair + 1:2d} ({SETTING_NAMES[order[0]]} first): "
            + "; ".join(
                f"{SETTING_NAMES[s]} {measured[s].rows / measured[s].seconds / 1e6:.2f}M"
                + (
                    ""
                    if s == BASELINE
                    else f" {_rate(measured[s]) / _rate(measured[BASELINE]):.1%}"
                    f" (CPU {_cpu_rate(measured[s]) / _cpu_rate(measured[BASELINE]):.1%})"
                )
                for s in settings
            )
            + f"; others {statistics.mean(m.others_cores for m in measured.values()):.2f} "
            f"cores; load {load:.1f}",
            flush=True,
        )
    load_after = os.getloadavg()
    clients.close()
    for server, stop, _ in servers.values():
        stop.set()
        server.join()

    others = [statistics.mean(m.others_cores for m in run.values()) for run in runs]
    for setting in settings[1:]:
        name = SETTING_NAMES[setting]
        for label, rate in (("rows/s", _rate), ("rows per aggregator CPU-second", _cpu_rate)):
            ratios = [rate(run[setting]) / rate(run[BASELINE]) for run in runs]
            quiet = [r for r, busy in zip(ratios, others, strict=True) if busy < QUIET_CORES]
            print(
                f"2b. {name}/none, {label}, {pairs} pairs: {_spread(ratios)}"
                + (
                    f"; the {len(quiet)} pairs with other processes under {QUIET_CORES} "
                    f"cores: {_spread(quiet)}"
                    if quiet and len(quiet) < len(ratios)
                    else ""
                )
                + (" (target >= 95%)" if setting == ALL_ON and label == "rows/s" else "")
            )
    print(
        "2b. rows/s, median (min-max): "
        + ", ".join(
            f"{SETTING_NAMES[s]} {statistics.median(_rate(r[s]) for r in runs) / 1e6:.2f}M "
            f"({min(_rate(r[s]) for r in runs) / 1e6:.2f}-"
            f"{max(_rate(r[s]) for r in runs) / 1e6:.2f}M)"
            for s in settings
        )
        + f"; other processes kept {statistics.median(others):.2f} cores busy "
        f"({min(others):.2f}-{max(others):.2f}); load average (1/5/15 min) "
        f"{' '.join(f'{v:.1f}' for v in load_before)} before, "
        f"{' '.join(f'{v:.1f}' for v in load_after)} after"
    )
    return statistics.median(_rate(run[BASELINE]) for run in runs)


# A pair is "quiet" when other processes kept fewer cores than this busy during it.
QUIET_CORES = 0.25


def _rate(measured: Measured) -> float:
    return measured.rows / measured.seconds


def _cpu_rate(measured: Measured) -> float:
    return measured.rows / measured.server_cpu_s


def _spread(ratios: list[float]) -> str:
    """Median (min-max), the middle half, and a 95% interval of the median (order
    statistics: distribution-free) when there are 6 values or more."""
    values = sorted(ratios)
    n = len(values)
    text = f"median {statistics.median(values):.1%} ({values[0]:.1%}-{values[-1]:.1%})"
    if n >= 4:
        q1, _, q3 = statistics.quantiles(values, n=4)
        text += f", middle half {q1:.1%}-{q3:.1%}"
    low = median_interval_rank(n)
    if low is not None:
        text += f", 95% interval of the median {values[low]:.1%}-{values[n - 1 - low]:.1%}"
    return text


def median_interval_rank(n: int) -> int | None:
    """The largest k (0-based) with P(Binomial(n, 1/2) <= k) <= 2.5%: the values of sorted
    ranks k and n-1-k bound the median with >= 95% confidence; None below 6 values."""
    below, k = 0.0, None
    for j in range(n):
        below += math.comb(n, j) / 2**n
        if below > 0.025:
            break
        k = j
    return k


def check_costs(per_client: list, stacks: pa.Table, rate: float) -> None:
    """The hostile-input checks of issue 18 alone, over the same batches."""
    payloads = [samples for streams in per_client for batch in streams for _, samples in batch]
    decoded = [schema.decode(samples, schema.SAMPLES) for samples in payloads]
    # the labels' grouping is the store's work (before issue 18 too): made before the clock
    grouped = [group_labels(table) for table in decoded]
    rows = sum(table.num_rows for table in decoded)
    stream = StreamStacks()
    stream.check(schema.SAMPLES.empty_table(), stacks)
    started = time.perf_counter()
    for payload, table, labels in zip(payloads, decoded, grouped, strict=True):
        schema.check_decoded_size("samples", payload)
        check_time_window("samples", table)
        check_weights(table)
        check_text("samples", table, ROW_LABELS, labels)
        stream.check(table, stacks.slice(0, 0))
    took = time.perf_counter() - started
    print(
        f"2c. the new checks alone over {rows:,} rows: {took:.2f} s, {rows / took / 1e6:.1f}M "
        f"rows/s on one core: {rate * took / rows:.1%} of the sustained time per row"
    )


def flame_loop(address: str, out: Path, stop: threading.Event, times: list[float]) -> None:
    """Draw one job's flame graph (HTML) through the QueryService until stopped."""
    source = AggregatorSource(address)
    while not stop.is_set():
        started = time.perf_counter()
        write_graph(source, SampleFilter(jobs=(FLAME_JOB,)), str(out), OPTIONS)
        times.append(time.perf_counter() - started)
    source.close()


def flame_over_stored(work: Path, fleet: Fleet, rows: int, batch_rows: int = 1_000_000) -> None:
    """Store `rows` rows of one job in one hour through ProfileStore.append, then time
    its flame graph against a bare GROUP BY stack_id."""
    path = work / "flame.duckdb"
    store = ProfileStore(path)
    store.append("flame", 0, "node-0", schema.SAMPLES.empty_table(), fleet.stacks)
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    conn = fleet.connect()
    started = time.perf_counter()
    # a few distinct batches appended over and over: generation must not dominate
    distinct = [sample_rows(conn, len(fleet.ids), batch_rows, FLAME_JOB, hour) for _ in range(4)]
    count = 0
    for sequence in range(1, rows // batch_rows + 1):
        table = distinct[sequence % len(distinct)]
        later = pa.scalar(timedelta(seconds=(sequence * 37) % 3600), pa.duration("us"))
        table = table.set_column(0, "ts", pc.add(table["ts"], later))
        store.append(
            "flame", sequence, f"node-{sequence % 997:05d}", table, fleet.stacks.slice(0, 0)
        )
        count += table.num_rows
    store.close()
    took = time.perf_counter() - started
    size = path.stat().st_size
    print(
        f"stored {count:,} rows in {took:.0f} s ({count / took / 1e6:.2f}M rows/s in "
        f"{batch_rows:,}-row appends): {size / count:.1f} bytes per row on disk"
    )

    selection = SampleFilter(jobs=(FLAME_JOB,), since=hour, until=hour + timedelta(hours=1))
    source = DatabaseSource(path)

    def bare() -> None:
        sql = (
            f"SELECT stack_id, sum(weight) FROM samples WHERE {selection.where()} GROUP BY stack_id"
        )
        with source.stream(sql) as reader:
            reader.read_all()

    def flame() -> None:
        write_graph(source, selection, str(work / "flame.html"), OPTIONS)

    first_s = best_of(1, {"flame": flame})["flame"]  # reads the stacks into the path index
    times = best_of(3, {"bare": bare, "flame": flame})
    bare_s, flame_s = times["bare"], times["flame"]
    source.close()
    print(
        f"4. flame graph (HTML) of {FLAME_JOB}, one hour, {count:,} rows: {flame_s:.2f} s "
        f"(target < 2 s; the first after start {first_s:.2f} s); bare GROUP BY stack_id "
        f"{bare_s:.2f} s; ratio {flame_s / bare_s:.2f}x"
    )


def arms(args: argparse.Namespace) -> tuple[tuple[bool, bool], ...]:
    return (BASELINE, CHECKS, ALL_ON) if args.checks_only else (BASELINE, ALL_ON)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few minutes: smaller everything")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--streams", type=int, default=2, help="Ingest streams per client")
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--stacks", type=int, default=100_000)
    parser.add_argument("--batch-rows", type=int, default=10_000)
    parser.add_argument("--batches", type=int, default=16, help="distinct batches per stream")
    parser.add_argument("--rounds", type=int, default=4, help="times each batch is sent")
    parser.add_argument("--rows", type=parse_count, default=100_000_000, help="for the flame graph")
    parser.add_argument("--skip-flame", action="store_true")
    parser.add_argument("--runs", type=int, default=3, help="A/B pairs of 2b")
    parser.add_argument(
        "--checks-only", action="store_true", help="2b: a third aggregator, checks without auth"
    )
    parser.add_argument("--only-auth", action="store_true", help="only 2b and 2c (issue 18's cost)")
    args = parser.parse_args()
    if args.quick:
        args.stacks, args.batches, args.rounds = 20_000, 8, 2
        args.rows = min(args.rows, 10_000_000)

    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    with tempfile.TemporaryDirectory(prefix="fleetprof-fleet-") as tmp:  # GBs: not left
        run(args, Path(tmp))
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


def run(args: argparse.Namespace, work: Path) -> None:
    fleet = Fleet.make(args.stacks)
    stacks = schema.encode(fleet.stacks)
    per_client = []
    tables = []
    for c in range(args.clients):
        streams = []
        for s in range(args.streams):
            batches = make_batches(
                fleet, args.nodes, args.jobs, args.batches, args.batch_rows, seed=c * 100 + s
            )
            tables += [table for _, table in batches]
            streams.append([(node, schema.encode(table)) for node, table in batches])
        per_client.append(streams)
    print(
        f"fleet: {args.stacks:,} stacks, {args.nodes:,} nodes, {args.jobs} jobs; "
        f"{args.clients} clients x {args.streams} streams, {args.batch_rows:,} rows/batch"
    )

    if args.only_auth:
        check_costs(
            per_client,
            fleet.stacks,
            auth_on_and_off(work, per_client, stacks, args.rounds, args.runs, arms(args)),
        )
        return
    server, stop, address = start_aggregator(work / "agg.duckdb", auth=False)
    rows, took, latencies, _ = ingest(address, per_client, stacks, False, args.rounds)
    print(
        f"1. first pass, every stack new to the aggregator ({args.stacks:,} stacks, "
        f"{len(stacks) / 1e6:.0f} MB of Arrow IPC, each sent once per stream): "
        f"{rows:,} rows in {took:.1f} s = {rows / took / 1e6:.2f}M rows/s, "
        f"latency p50 {percentile(latencies, 50) * 1000:.0f} ms, "
        f"p99 {percentile(latencies, 99) * 1000:.0f} ms"
    )
    rows, took, latencies, _ = ingest(address, per_client, stacks, True, args.rounds)
    bare_rows, bare_s = bare_append(work / "bare.duckdb", tables, args.rounds)
    rate, bare_rate = rows / took, bare_rows / bare_s
    print(
        f"2. sustained (the same batches again, from streams past their first batches, "
        f"so without stacks): "
        f"{rows:,} rows in {took:.1f} s = {rate / 1e6:.2f}M rows/s end to end "
        f"(target >= 1M); bare DuckDB append {bare_rate / 1e6:.2f}M rows/s; "
        f"ratio {rate / bare_rate:.0%} (target >= 50%); "
        f"latency p50 {percentile(latencies, 50) * 1000:.0f} ms, "
        f"p99 {percentile(latencies, 99) * 1000:.0f} ms"
    )

    stop_flames, flame_times = threading.Event(), []
    flames = threading.Thread(
        target=flame_loop, args=(address, work / "live.html", stop_flames, flame_times)
    )
    flames.start()
    rows, took, latencies, _ = ingest(address, per_client, stacks, True, args.rounds)
    stop_flames.set()
    flames.join()
    print(
        f"3. sustained ingest while {len(flame_times)} flame graphs of {FLAME_JOB} were drawn "
        f"(median {statistics.median(flame_times):.2f} s each): {rows / took / 1e6:.2f}M rows/s, "
        f"latency p50 {percentile(latencies, 50) * 1000:.0f} ms, "
        f"p99 {percentile(latencies, 99) * 1000:.0f} ms (target < 500 ms)"
    )
    stop.set()
    server.join()
    baseline = auth_on_and_off(work, per_client, stacks, args.rounds, args.runs, arms(args))
    check_costs(per_client, fleet.stacks, baseline)
    if not args.skip_flame:
        flame_over_stored(work, fleet, args.rows)


if __name__ == "__main__":
    main()
