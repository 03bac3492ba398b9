"""Control-plane latency of an on-demand session, on loopback with 8 agents.

Measured: from StartSession (what `fleetprof profile` calls) to every agent reporting that it
samples the job, and from the session's deadline to the merged flame graph written.
Targets: under 2 s each. Agents are real (BCC) and run in this process, one thread each.
Run as root: .venv/bin/python benchmarks/control_latency.py [--agents 8] [--duration 5]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import grpc

from fleetprof import workloads
from fleetprof.aggregator.server import Aggregator
from fleetprof.commands.flamegraph import write_graph
from fleetprof.node_agent.agent import Agent, AgentConfig
from fleetprof.node_agent.samplers import SamplerOptions
from fleetprof.proto.control.v1 import control_pb2, control_pb2_grpc
from fleetprof.query.filters import SampleFilter
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
    agents, stops, threads, job = [], [], [], None
    try:
        for i in range(args.agents):
            config = AgentConfig(
                aggregator.address,
                f"node-{i}",
                10.0,
                spool_dir=str(work / f"spool-{i}"),
                sampling=SamplerOptions(frequency=19),
            )
            agent, stop = Agent(config), threading.Event()
            thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
            thread.start()
            agents.append(agent)
            stops.append(stop)
            threads.append(thread)
        # Past start-up: an agent's first drain symbolizes every process already running.
        while len(aggregator.control._agents) < args.agents or not all(
            agent.stats["drains"] for agent in agents
        ):
            time.sleep(0.05)
        # Started now: the agents' BPF compiles can take minutes on a loaded machine.
        job = subprocess.Popen(
            [str(binary), str(args.duration + 60)],
            env={**os.environ, "FLEETPROF_JOB": "bench-job"},
        )
        print(f"{args.agents} agents connected; starting a {args.duration} s session", flush=True)
        measure(aggregator, args.agents, args.duration, work)
    finally:
        for stop in stops:
            stop.set()
        for thread in threads:
            thread.join()
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
    all_sampling = all_finished = None
    for progress in control.WatchSession(
        control_pb2.WatchSessionRequest(session_id=info.session_id)
    ):
        states = [n.state for n in progress.nodes]
        if all_sampling is None and len(states) == agents and all(s >= SAMPLING for s in states):
            all_sampling = time.monotonic() - started
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
    print(f"profile → all {agents} agents sampling: {all_sampling:.2f} s (target < 2 s)")
    print(
        f"deadline → all FINISHED: {all_finished:.2f} s; → session done: {done:.2f} s; "
        f"→ merged graph written: {to_graph:.2f} s (target < 2 s); {total} samples"
    )
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
