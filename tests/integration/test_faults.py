"""Faults injected for real: aggregator outages and crashes, a bounded spool, restarts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import duckdb
import grpc
import pytest

from fleetprof import workloads
from fleetprof.aggregator.server import Aggregator
from fleetprof.node_agent.batch import Batch
from fleetprof.node_agent.shipper import Shipper
from fleetprof.node_agent.spool import Spool
from fleetprof.proto import schema
from tests.conftest import free_port, require_ebpf
from tests.netns import Host, network_hosts
from tests.unit.test_ingest import STACKS, batch, samples, send, totals

OUTAGE_S = 30


def start_aggregator(
    db: Path,
    port: int,
    address: str = "127.0.0.1",
    host: Host | None = None,
    log: Path | None = None,
    options: Sequence[str] = (),
) -> subprocess.Popen[str]:
    """An aggregator process listening on address:port (plaintext, --insecure off loopback),
    in `host`'s network namespace if given; its log to `log` if given; more `options`."""
    command = [sys.executable, "-m", "fleetprof", "aggregator", "--db", str(db)]
    command += ["--listen", f"{address}:{port}", *options]
    if address != "127.0.0.1":
        command.append("--insecure")
    process = subprocess.Popen(
        host.command(*command) if host else command,
        stdout=subprocess.PIPE,
        stderr=log.open("w") if log else subprocess.DEVNULL,
        text=True,
    )
    assert "listening" in process.stdout.readline()
    return process


def stored_weight(db: Path) -> int:
    with duckdb.connect(str(db), read_only=True) as conn:
        return int(conn.execute("SELECT coalesce(sum(weight), 0) FROM samples").fetchone()[0])


def test_outage_and_crash_lose_nothing(tmp_path: Path, native_binary: Path) -> None:
    require_ebpf()
    from fleetprof.node_agent.agent import Agent, AgentConfig
    from fleetprof.node_agent.samplers import SamplerOptions

    db, port = tmp_path / "profiles.duckdb", free_port()
    aggregator = start_aggregator(db, port)
    agent = Agent(
        AgentConfig(
            f"127.0.0.1:{port}",
            "faulty-node",
            1.0,
            spool_dir=str(tmp_path / "spool"),
            sampling=SamplerOptions(frequency=99),
        )
    )
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,))
    thread.start()
    workload = workloads.start_native(native_binary, seconds=OUTAGE_S + 20)
    try:
        deadline = time.monotonic() + 30
        while agent.shipper.stats["acked"] < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        # A crash in the middle of ingest: SIGKILL, no chance to clean up.
        aggregator.send_signal(signal.SIGKILL)
        aggregator.wait()
        acked_before = agent.shipper.stats["acked"]
        time.sleep(OUTAGE_S)
        assert agent.shipper.pending >= OUTAGE_S - 5  # about one batch per interval, spooled
        aggregator = start_aggregator(db, port)  # the DuckDB file reopens after the crash
        workload.wait()
        deadline = time.monotonic() + 30
        while agent.shipper.pending and time.monotonic() < deadline:
            time.sleep(0.5)
        assert agent.shipper.pending == 0
    finally:
        stop.set()
        thread.join()
        workload.kill()
        aggregator.send_signal(signal.SIGTERM)
        aggregator.wait()
    assert acked_before >= 1
    # Every sample the agent drained is stored exactly once, outage or not.
    assert stored_weight(db) == agent.stats["samples"]
    assert agent.shipper.stats["rejected"] == 0


def test_spool_cap_drops_oldest_and_counts(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens
    probe = Spool(tmp_path / "probe", 1 << 30)
    Shipper(address, "a", "n", probe).ship(Batch(samples({11: 1}), {11: STACKS[11]}))
    cap = int(probe.bytes * 3.5)  # room for three batches
    spool = Spool(tmp_path / "spool", cap)
    shipper = Shipper(address, "agent-1", "n", spool)
    for weight in range(1, 7):
        shipper.ship(Batch(samples({11: weight}), {11: STACKS[11]}))
    assert len(spool) == 3 and spool.dropped == 3 and spool.bytes <= cap
    # The oldest went first: what is left are batches 4, 5 and 6, in order.
    assert [spool.oldest().sequence] == [4]
    shipper.close()


def test_spool_survives_agent_restart_and_delivers_in_order(tmp_path: Path, aggregator) -> None:
    address = f"127.0.0.1:{free_port()}"
    first = Shipper(address, "agent-old", "n", Spool(tmp_path / "spool", 1 << 20))
    first.ship(Batch(samples({11: 3}), {11: STACKS[11]}))
    first.ship(Batch(samples({12: 4}), {12: STACKS[12]}))
    first.close()
    # A new agent process finds the spool and delivers it before its own batches.
    second = Shipper(aggregator.address, "agent-new", "n", Spool(tmp_path / "spool", 1 << 20))
    second.ship(Batch(samples({11: 5}), {11: STACKS[11]}))
    assert second.pending == 0
    rows = (
        aggregator.store.reader()
        .execute(
            "SELECT agent_id, sequence, sample_rows FROM ingested_batches ORDER BY received_at"
        )
        .fetchall()
    )
    assert [(a, s) for a, s, _ in rows] == [("agent-old", 1), ("agent-old", 2), ("agent-new", 1)]
    second.close()


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_spool_file_is_dropped_not_fatal(tmp_path: Path, aggregator, damage: str) -> None:
    spool = Spool(tmp_path / "spool", 1 << 20)
    offline = Shipper(f"127.0.0.1:{free_port()}", "a", "n", spool)
    offline.ship(Batch(samples({11: 3}), {11: STACKS[11]}))
    offline.ship(Batch(samples({12: 4}), {12: STACKS[12]}))
    offline.close()
    first = sorted((tmp_path / "spool").glob("*.batch"))[0]
    first.write_bytes(first.read_bytes()[:7] if damage == "truncate" else b"\xff" * 50)
    shipper = Shipper(aggregator.address, "b", "n", Spool(tmp_path / "spool", 1 << 20))
    assert shipper.flush()
    weight = aggregator.store.reader().execute("SELECT sum(weight) FROM samples").fetchone()[0]
    assert weight == 4
    shipper.close()


def test_full_disk_refuses_ingest_keeps_queries_and_recovers(small_disk: Path) -> None:
    aggregator = Aggregator(small_disk / "profiles.duckdb", "127.0.0.1:0")
    aggregator.start()
    try:
        # 20,000 rows of a stack every batch carries (a sample's stack must be sent).
        payload = schema.encode(samples({11: 1}).take([0] * 20_000))
        filler = small_disk / "filler"
        filler.write_bytes(b"\0" * 3_000_000)
        sequence, error = 1, None
        while error is None and sequence < 100:
            try:
                send(aggregator, batch(sequence, samples=payload))
                sequence += 1
            except grpc.RpcError as exc:
                error = exc
        assert error is not None and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "No space left" in error.details()
        stored = totals(aggregator)
        assert stored[0] == 20_000 * (sequence - 1)  # queries work; every acked batch is there
        filler.unlink()  # space returns: the same batch now goes in
        send(aggregator, batch(sequence, samples=payload))
        assert totals(aggregator)[0] == stored[0] + 20_000
    finally:
        aggregator.stop(grace_s=0)


def agent_process(
    address: str, spool: Path, *extra: str, host: Host | None = None
) -> subprocess.Popen[str]:
    """A started agent process (past its BPF compile), in `host`'s namespace if given."""
    command = [sys.executable, "-m", "fleetprof", "agent", "--aggregator", address]
    command += ["--frequency", "99", "--spool-dir", str(spool), *extra]
    process = subprocess.Popen(
        host.command(*command) if host else command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in process.stderr:
        if "sampling" in line:
            return process
    raise AssertionError(f"agent did not start: exit code {process.wait()}")


def test_sigterm_drains_the_last_interval(tmp_path: Path, native_binary: Path) -> None:
    require_ebpf()
    db, port = tmp_path / "profiles.duckdb", free_port()
    aggregator = start_aggregator(db, port)
    # A long interval: everything the agent samples arrives with its final drain.
    agent = agent_process(f"127.0.0.1:{port}", tmp_path / "spool", "--interval", "600")
    workload = workloads.start_native(native_binary, seconds=3)
    workload.wait()
    agent.send_signal(signal.SIGTERM)
    log = agent.stderr.read()
    assert agent.wait(timeout=30) == 0
    aggregator.send_signal(signal.SIGTERM)
    aggregator.wait()
    final = next(line for line in log.splitlines() if "agent stopped" in line)
    drained = int(final.split("agent stopped: ")[1].split()[0])
    assert drained >= 3 * 99 * 0.8
    assert "0 left in the spool" in final
    assert stored_weight(db) == drained


def test_process_storm_is_survived(aggregator, running_agent) -> None:
    agent = running_agent(frequency=99, interval_s=1.0)
    rss_before = rss_mb()
    # Thousands of short-lived processes, each exec'ing and exiting within the interval.
    storm = subprocess.run(
        ["sh", "-c", "i=0; while [ $i -lt 3000 ]; do /bin/true; i=$((i+1)); done"],
        timeout=120,
        check=True,
    )
    assert storm.returncode == 0
    time.sleep(1.5)
    agent.stop()
    assert agent.shipper.stats["acked"] >= 1 and agent.shipper.pending == 0
    # Exited processes are forgotten after their last drain: memory does not grow with them.
    assert len(agent.symbolizer.exited_pids()) < 100
    stored = aggregator.store.reader().execute("SELECT sum(weight) FROM samples").fetchone()[0]
    assert stored == agent.stats["samples"]
    # Only processes that samples hit are read (most /bin/true never run when one is taken),
    # and what the agent keeps per process follows the processes alive, not those started.
    assert agent.symbolizer.stats["snapshots"] < 1500
    alive = sum(name.isdigit() for name in os.listdir("/proc"))
    assert len(agent.owners.pids()) < alive + 100
    assert agent.unwinder is None or len(agent.unwinder.pids()) < alive + 100
    # RSS: symbol tables of what else runs here may arrive meanwhile (bounded by the cache).
    assert rss_mb() - rss_before < 128


def test_what_is_kept_of_a_process_whose_exit_went_unreported_is_let_go(
    aggregator, running_agent
) -> None:
    # The kernel reports the exits of the processes whose first sample the agent read; a
    # process asked about otherwise (an ancestor of a sampled one, one a session considered)
    # exits unreported, and the drain after its exit lets go of it.
    agent = running_agent(frequency=99, interval_s=1.0)
    child = subprocess.Popen(["sleep", "0.5"])
    agent.owners.job(child.pid)
    assert child.pid in agent.owners.pids()
    child.wait(timeout=10)
    deadline = time.monotonic() + 10
    while child.pid in agent.owners.pids() and time.monotonic() < deadline:
        time.sleep(0.1)
    agent.stop()
    assert child.pid not in agent.owners.pids()


def rss_mb() -> float:
    """This process's resident memory (the agent runs in it), in MB."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


@pytest.fixture
def aggregator_host() -> Iterator[Host]:
    """A separate network host (namespace + veth pair) for the aggregator."""
    with network_hosts(1) as (host,):
        yield host


def test_network_cut_between_agent_and_aggregator(
    tmp_path: Path, native_binary: Path, aggregator_host: Host
) -> None:
    require_ebpf()
    from fleetprof.node_agent.agent import Agent, AgentConfig
    from fleetprof.node_agent.samplers import SamplerOptions
    from fleetprof.proto.security import ClientSecurity

    address = f"{aggregator_host.address}:7470"
    db = tmp_path / "profiles.duckdb"
    aggregator = start_aggregator(db, 7470, aggregator_host.address, aggregator_host)
    agent = Agent(
        AgentConfig(
            address,
            "cut-node",
            1.0,
            spool_dir=str(tmp_path / "spool"),
            security=ClientSecurity(insecure=True),
            sampling=SamplerOptions(frequency=99),
        )
    )
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,))
    thread.start()
    workload = workloads.start_native(native_binary, seconds=20)
    try:
        time.sleep(3)
        subprocess.run(["ip", "link", "set", aggregator_host.link, "down"], check=True)
        time.sleep(12)  # longer than the ack timeout: batches go to the spool
        assert agent.shipper.pending >= 1
        subprocess.run(["ip", "link", "set", aggregator_host.link, "up"], check=True)
        workload.wait()
        deadline = time.monotonic() + 30
        while agent.shipper.pending and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        stop.set()
        thread.join()
        workload.kill()
        aggregator.send_signal(signal.SIGTERM)
        aggregator.wait()
    assert agent.shipper.pending == 0
    assert stored_weight(db) == agent.stats["samples"]
