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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=8)
    parser.add_argument("--duration", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fleetprof-control-"))
    binary = workloads.build_native(work)
    job = subprocess.Popen(
        [str(binary), str(args.duration + 60)], env={**os.environ, "FLEETPROF_JOB": "bench-job"}
    )
    aggregator = Aggregator(work / "p.duckdb", "127.0.0.1:0")
    aggregator.start()
    stops, threads = [], []
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
        stops.append(stop)
        threads.append(thread)
    while len(aggregator.control._agents) < args.agents:
        time.sleep(0.05)
    print(f"{args.agents} agents connected; starting a {args.duration} s session", flush=True)

    channel = grpc.insecure_channel(aggregator.address)
    control = control_pb2_grpc.ControlServiceStub(channel)
    started = time.monotonic()
    info = control.StartSession(
        control_pb2.StartSessionRequest(job="bench-job", duration_s=args.duration, frequency=99)
    )
    all_sampling = None
    for progress in control.WatchSession(
        control_pb2.WatchSessionRequest(session_id=info.session_id)
    ):
        states = [n.state for n in progress.nodes]
        if (
            all_sampling is None
            and len(states) == args.agents
            and all(s >= SAMPLING for s in states)
        ):
            all_sampling = time.monotonic() - started
    deadline_passed = time.time() - info.deadline_unix_ms / 1000
    source = AggregatorSource(aggregator.address)
    options = RenderOptions(title="bench", event="cpu", unit="samples")
    total = write_graph(
        source, SampleFilter(session=info.session_id), str(work / "job.html"), options
    )
    to_graph = time.time() - info.deadline_unix_ms / 1000
    source.close()
    print(f"profile → all {args.agents} agents sampling: {all_sampling:.2f} s (target < 2 s)")
    print(
        f"deadline → session done: {deadline_passed:.2f} s; → merged graph written: "
        f"{to_graph:.2f} s (target < 2 s); {total} samples"
    )
    for stop in stops:
        stop.set()
    for thread in threads:
        thread.join()
    job.kill()
    channel.close()
    aggregator.stop()


if __name__ == "__main__":
    main()
