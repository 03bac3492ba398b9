"""What naming Java frames from the JVM's memory costs the agent, and how soon new code is named.

One in-process agent (99 Hz, 1 s intervals) profiles:
1. a busy 8-thread JVM started with no flags (demo.Hotspots): the CPU time the agent's
   drain thread spends naming Java frames from memory (Symbolizer.hotspot.frames, thread CPU
   time, so other load on the machine does not count), as a share of one core; and what it
   holds of the JVM's code cache (nmethods, methods, bytes). Target: <= 1% of a core.
2. Phases (late() first runs, and is compiled, after 4 s): per interval, late()'s samples
   and those left `[jit 0x…]`. Target: late() named in the interval it first runs.

The load average is printed with every figure. Run as root:
.venv/bin/python benchmarks/jvm_frames.py [--seconds 30] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from fleetprof import workloads
from fleetprof.aggregator.server import Aggregator
from fleetprof.node_agent.agent import Agent, AgentConfig
from fleetprof.node_agent.samplers import SamplerOptions
from fleetprof.query.source import AggregatorSource

sys.path.insert(0, str(Path(__file__).parent))  # benchmarks is not a package
from spark_job import deep_size

PHASES = Path(__file__).parents[1] / "tests" / "test_jvm.py"


class TimedFrames:
    """Symbolizer.hotspot.frames, timed in CPU seconds of the thread calling it."""

    def __init__(self, agent: Agent) -> None:
        self.cpu_s = 0.0
        self._frames = agent.symbolizer.hotspot.frames
        agent.symbolizer.hotspot.frames = self  # type: ignore[method-assign]

    def __call__(self, *args: Any) -> Any:
        start = time.thread_time()
        try:
            return self._frames(*args)
        finally:
            self.cpu_s += time.thread_time() - start


def start_agent(work: Path) -> tuple[Aggregator, Agent, threading.Event, threading.Thread]:
    aggregator = Aggregator(work / f"bench-{time.monotonic_ns()}.duckdb", "127.0.0.1:0")
    aggregator.start()
    agent = Agent(
        AgentConfig(aggregator.address, "bench", 1.0, spool_dir=str(work / "spool"),
                    sampling=SamplerOptions(frequency=99))
    )  # fmt: skip
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,))
    thread.start()
    time.sleep(15)  # compiled and loaded
    return aggregator, agent, stop, thread


def busy_jvm(work: Path, classes: Path, seconds: float) -> dict[str, float]:
    """Naming cost and code cache metadata for an 8-thread JVM with no flags."""
    aggregator, agent, stop, thread = start_agent(work)
    timed = TimedFrames(agent)
    try:
        java = subprocess.Popen(
            ["java", "-cp", str(classes), workloads.JAVA_MAIN, str(seconds), "8"]
        )
        start = time.monotonic()
        java.wait()
        wall = time.monotonic() - start
        process = agent.symbolizer.hotspot.process_of(java.pid)
        held = {**process.held(), "bytes": deep_size(process)} if process else {}
        time.sleep(2)
    finally:
        stop.set()
        thread.join()
        aggregator.stop()
    return {"share": timed.cpu_s / wall, "lookups": agent.symbolizer.hotspot.stats["named"], **held}


def naming_delay(work: Path) -> list[dict[str, Any]]:
    """Per interval of a Phases run: its samples, late()'s, and those left [jit 0x…]."""
    source = PHASES.read_text().split('PHASES = """', 1)[1].split('"""', 1)[0]
    (work / "Phases.java").write_text(source)
    subprocess.run(["javac", "-d", str(work), str(work / "Phases.java")], check=True)
    aggregator, _, stop, thread = start_agent(work)
    try:
        java = subprocess.Popen(["java", "-cp", str(work), "Phases", "4", "6"])
        java.wait()
        time.sleep(2)
    finally:
        stop.set()
        thread.join()
    client = AggregatorSource(aggregator.address)
    try:
        with client.stream(
            "SELECT ts, sum(weight)::BIGINT AS samples, "
            "sum(weight) FILTER (WHERE list_contains(frames, 'Phases.late'))::BIGINT AS late, "
            "sum(weight) FILTER (WHERE len(list_filter(frames, lambda f: f LIKE '[jit 0x%')) > 0)"
            f"::BIGINT AS unnamed FROM samples JOIN stacks USING (stack_id) "
            f"WHERE pid = {java.pid} GROUP BY ts ORDER BY ts"
        ) as reader:
            return reader.read_all().to_pylist()
    finally:
        client.close()
        aggregator.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="how long the JVM runs")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fleetprof-jvm-bench-"))
    try:
        classes = workloads.build_java(work)
        shares = []
        for _ in range(args.repeats):
            run = busy_jvm(work, classes, args.seconds)
            shares.append(run["share"])
            print(
                f"naming Java frames from memory: {run['share']:.3%} of a core "
                f"({run['lookups']} stacks' frames named so far); code cache metadata held: "
                f"{run.get('nmethods', 0)} nmethods, {run.get('methods', 0)} methods, "
                f"{run.get('bytes', 0) / 1e3:.0f} kB (load average {os.getloadavg()[0]:.1f})"
            )
        print(
            f"median {statistics.median(shares):.3%} of a core over {args.repeats} runs "
            f"(range {min(shares):.3%} to {max(shares):.3%})"
        )
        for row in naming_delay(work):
            print(
                f"  {row['ts']:%H:%M:%S.%f}  {row['samples']:4d} samples, late() "
                f"{row['late'] or 0:4d}, [jit 0x…] {row['unnamed'] or 0:3d}"
            )
        print(f"(load average {os.getloadavg()[0]:.1f})")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
