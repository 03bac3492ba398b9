"""Control-plane latency of an on-demand session, on loopback with 8 agents.

Measured: from StartSession (what `fleetprof profile` calls) to every agent reporting that it
samples the job, and from the session's deadline to the merged flame graph written.
Targets: under 2 s each. Agents are real (BCC) `fleetprof agent` processes, as on separate
nodes (in one process they would also share one interpreter lock); the aggregator runs here.
Run as root: .venv/bin/python benchmarks/control_latency.py [--agents 8] [--duration 5]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from fleetprof import workloads
from fleetprof.aggregator.server import Aggregator
from fleetprof.proto.control.v1 import control_pb2, control_pb2_grpc
from fleetprof.query.filters import SampleFilter
from fleetprof.query.graph import write_graph
from fleetprof.query.render import RenderOptions
from fleetprof.query.source import AggregatorSource

SAMPLING = control_pb2.SessionState.SESSION_STATE_SAMPLING
FINISHED = control_pb2.SessionState.SESSION_STATE_FINISHED


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=8)
    parser.add_argument("--duration", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fleetprof-control-"))
    binary = workloads.build_native(work)
    aggregator = Aggregator(work / "p.duckdb", "127.0.0.1:0")
    aggregator.start()
    agents: list[subprocess.Popen[bytes]] = []
    job: subprocess.Popen[bytes] | None = None
    try:
        for i in range(args.agents):
            command = [sys.executable, "-m", "fleetprof", "agent", "--aggregator"]
            command += [aggregator.address, "--node", f"node-{i}", "--frequency", "19"]
            command += ["--spool-dir", str(work / f"spool-{i}")]
            log = (work / f"agent-{i}.log").open("wb")
            agents.append(subprocess.Popen(command, stdout=log, stderr=log))
        # Past start-up: an agent's first drain (after 10 s) symbolizes every process running.
        reader = aggregator.store.reader()
        while len(aggregator.control._agents) < args.agents or (
            reader.execute("SELECT count(DISTINCT node) FROM ingested_batches").fetchone()[0]
            < args.agents
        ):
            if any(agent.poll() is not None for agent in agents):
                raise SystemExit(f"an agent exited: see {work}/agent-*.log")
            time.sleep(0.2)
        # Started now: the agents' BPF compiles can take minutes on a loaded machine.
        job = subprocess.Popen(
            [str(binary), str(args.duration + 60)],
            env={**os.environ, "FLEETPROF_JOB": "bench-job"},
        )
        time.sleep(2)  # a running job, as when someone profiles it: agents have seen its exec
        print(f"{args.agents} agents connected; starting a {args.duration} s session", flush=True)
        measure(aggregator, args.agents, args.duration, work)
    finally:
        for agent in agents:
            agent.send_signal(signal.SIGTERM)
        for agent in agents:
            agent.wait()
        if job:
            job.kill()
        aggregator.stop()


def measure(aggregator: Aggregator, agents: int, duration: int, work: Path) -> None:
    channel = grpc.insecure_channel(aggregator.address)
    control = control_pb2_grpc.ControlServiceStub(channel)
    started = time.monotonic()
    info = control.StartSession(
        control_pb2.StartSessionRequest(job="bench-job", duration_s=duration, frequency=99)
    )
    answered = time.monotonic() - started
    all_finished = None
    sampling: dict[str, float] = {}  # node -> when it first reported SAMPLING
    for progress in control.WatchSession(
        control_pb2.WatchSessionRequest(session_id=info.session_id)
    ):
        for node in progress.nodes:
            if node.state >= SAMPLING:
                sampling.setdefault(node.node, time.monotonic() - started)
        states = [n.state for n in progress.nodes]
        if all_finished is None and len(states) == agents and all(s == FINISHED for s in states):
            all_finished = time.time() - info.deadline_unix_ms / 1000
    done = time.time() - info.deadline_unix_ms / 1000
    channel.close()
    source = AggregatorSource(aggregator.address)
    options = RenderOptions(title="bench", event="cpu", unit="samples")
    total = write_graph(
        source, SampleFilter(session=info.session_id), str(work / "job.html"), options
    )
    to_graph = time.time() - info.deadline_unix_ms / 1000
    source.close()
    each = sorted(sampling.values())
    print(
        f"profile → all {agents} agents sampling: {each[-1]:.2f} s (target < 2 s); "
        f"first {each[0]:.2f} s, median {each[len(each) // 2]:.2f} s; "
        f"StartSession answered in {answered:.2f} s"
    )
    print(
        f"deadline → all FINISHED: {all_finished:.2f} s; → session done: {done:.2f} s; "
        f"→ merged graph written: {to_graph:.2f} s (target < 2 s); {total} samples"
    )
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
