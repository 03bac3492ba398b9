"""Soak: 8 agents and one aggregator for 10 minutes, with an aggregator outage in the middle.

Every agent is a real `fleetprof agent` process (its own node name and spool) sampling this
machine at 19 Hz and shipping every 10 s; a native workload keeps the CPUs busy. Halfway
through, the aggregator is killed (SIGKILL) and restarted after --outage seconds. At the
end the agents are stopped with SIGTERM (each drains its last interval) and the samples they
report having drained are compared with what the aggregator stored: they must be equal.
Reported: samples sent vs stored, peak RSS of agents and aggregator, peak spool size.
Run as root: .venv/bin/python benchmarks/soak.py [--minutes 10] [--agents 8] [--outage 60]
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import duckdb

from fleetprof import workloads


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def spool_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.glob("*.batch") if path.exists())


def start_aggregator(db: Path, port: int) -> subprocess.Popen[bytes]:
    """The aggregator logs to aggregator.log next to the database (appended across restarts)."""
    log = db.parent / "aggregator.log"
    start = log.stat().st_size if log.exists() else 0
    with log.open("ab") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "fleetprof", "aggregator", "--db", str(db),
             "--listen", f"127.0.0.1:{port}"],
            stdout=output,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + 120
    while b"listening" not in log.read_bytes()[start:]:
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the aggregator did not start: see {log}")
        time.sleep(0.1)
    return process


class AgentProcess:
    def __init__(self, address: str, node: str, spool: Path) -> None:
        self.node = node
        self.spool = spool
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fleetprof",
                "agent",
                "--aggregator",
                address,
                "--node",
                node,
                "--spool-dir",
                str(spool),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.started = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            if "sampling" in line:
                self.started.set()

    def drained_samples(self) -> int:
        final = next(line for line in self.lines if "agent stopped" in line)
        return int(final.split("agent stopped: ")[1].split()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--agents", type=int, default=8)
    parser.add_argument("--outage", type=float, default=60, help="seconds the aggregator is down")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fleetprof-soak-"))
    db, port = work / "soak.duckdb", free_port()
    address = f"127.0.0.1:{port}"
    binary = workloads.build_native(work)
    duration = args.minutes * 60
    workload = workloads.start_native(binary, duration + 30, threads=1)

    aggregator = start_aggregator(db, port)
    agents = [AgentProcess(address, f"soak-{i}", work / f"spool-{i}") for i in range(args.agents)]
    for agent in agents:
        agent.started.wait(120)
    print(f"{args.agents} agents sampling; soak for {args.minutes:g} min", flush=True)

    peak_agent_rss = peak_aggregator_rss = 0.0
    peak_spool = 0
    started = time.monotonic()
    outage_at, outage_done = duration / 2, False
    while (elapsed := time.monotonic() - started) < duration:
        time.sleep(2)
        peak_agent_rss = max(peak_agent_rss, *(peak_rss_mb(a.process.pid) for a in agents))
        peak_aggregator_rss = max(peak_aggregator_rss, peak_rss_mb(aggregator.pid))
        peak_spool = max(peak_spool, sum(spool_bytes(a.spool) for a in agents))
        if not outage_done and elapsed >= outage_at:
            print(f"t={elapsed:.0f}s: aggregator killed for {args.outage:g} s", flush=True)
            aggregator.send_signal(signal.SIGKILL)
            aggregator.wait()
            time.sleep(args.outage)
            aggregator = start_aggregator(db, port)
            outage_done = True
            print(f"t={time.monotonic() - started:.0f}s: aggregator back", flush=True)
    for agent in agents:
        agent.process.send_signal(signal.SIGTERM)
    for agent in agents:
        agent.process.wait(timeout=120)
    time.sleep(0.5)  # let the reader threads see the last lines
    workload.kill()
    aggregator.send_signal(signal.SIGTERM)
    aggregator.wait()

    sent = sum(agent.drained_samples() for agent in agents)
    with duckdb.connect(str(db), read_only=True) as conn:
        stored = int(conn.execute("SELECT sum(weight) FROM samples").fetchone()[0])
        batches = conn.execute("SELECT count(*) FROM ingested_batches").fetchone()[0]
        per_node = dict(
            conn.execute("SELECT node, sum(weight)::BIGINT FROM samples GROUP BY node").fetchall()
        )
    for agent in agents:
        # Each agent's log stays with the run, for whoever has to explain a difference.
        (work / f"{agent.node}.log").write_text("".join(agent.lines))
        if agent.drained_samples() != per_node.get(agent.node, 0):
            problems = [line for line in agent.lines if "WARNING" in line or "ERROR" in line]
            print(
                f"{agent.node}: drained {agent.drained_samples():,}, stored "
                f"{per_node.get(agent.node, 0):,}; its warnings and errors:",
                *problems[-10:],
                sep="\n  ",
            )
    print(f"logs and database in {work}")
    print(f"samples drained by the agents: {sent:,}")
    print(f"samples stored:                {stored:,}  ({'EQUAL' if sent == stored else 'DIFFER'})")
    print(f"batches stored: {batches:,}")
    print(
        f"peak agent RSS: {peak_agent_rss:.0f} MB; peak aggregator RSS: "
        f"{peak_aggregator_rss:.0f} MB; peak spool (all agents): {peak_spool / 1024:.0f} KiB"
    )


if __name__ == "__main__":
    main()
