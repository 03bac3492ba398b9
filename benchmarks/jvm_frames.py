"""What Java frames read from the JVM's memory cost the agent, and how soon new code is named.

1. The whole agent (`fleetprof agent`, 99 Hz, its default 10 s interval, a process of its
   own) while a busy 8-thread JVM started with no flags (demo.Hotspots) runs: its CPU time from
   /proc/PID/stat over the JVM's run, as a share of one core. Target: <= 1% of a core.
2. The same with an in-process agent, in parts, in thread CPU time (other load on the
   machine does not count): naming Java frames from memory (Symbolizer.hotspot.frames) and
   reading the code caches' unwind rows (CodeCaches.update); and what it holds of the JVM's
   code cache (nmethods, methods, bytes).
3. Phases (late() first runs, and is compiled, after 4 s): per interval, late()'s samples
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
from agent_churn import running_agent
from agent_overhead import process_cpu_s
from spark_job import deep_size

PHASES = Path(__file__).parents[1] / "tests" / "integration" / "test_jvm.py"


class Timed:
    """A method of an object, replaced by itself timed in CPU seconds of the calling thread."""

    def __init__(self, owner: Any, name: str) -> None:
        self.cpu_s = 0.0
        self._method = getattr(owner, name)
        setattr(owner, name, self)

    def __call__(self, *args: Any) -> Any:
        start = time.thread_time()
        try:
            return self._method(*args)
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


def whole_agent(work: Path, classes: Path, seconds: float) -> float:
    """The agent process's CPU share of one core while an 8-thread JVM with no flags runs."""
    aggregator = Aggregator(work / f"whole-{time.monotonic_ns()}.duckdb", "127.0.0.1:0")
    aggregator.start()
    try:
        with running_agent(aggregator.address, 99, None, settle_s=5) as agent:
            java = subprocess.Popen(
                ["java", "-cp", str(classes), workloads.JAVA_MAIN, str(seconds), "8"]
            )
            before, start = process_cpu_s(agent.pid), time.monotonic()
            java.wait()
            return (process_cpu_s(agent.pid) - before) / (time.monotonic() - start)
    finally:
        aggregator.stop()


def busy_jvm(work: Path, classes: Path, seconds: float) -> dict[str, float]:
    """Naming and unwind-row costs and code cache metadata for an 8-thread JVM, no flags."""
    aggregator, agent, stop, thread = start_agent(work)
    timed = Timed(agent.symbolizer.hotspot, "frames")
    rows = Timed(agent.code_caches, "update")
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
    return {
        "share": timed.cpu_s / wall,
        "rows_share": rows.cpu_s / wall,
        "row_updates": agent.code_caches.stats["updates"],
        "lookups": agent.symbolizer.hotspot.stats["named"],
        **held,
    }


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
        wholes, shares, rows = [], [], []
        for _ in range(args.repeats):
            wholes.append(whole_agent(work, classes, args.seconds))
            print(
                f"the agent, whole: {wholes[-1]:.2%} of a core "
                f"(load average {os.getloadavg()[0]:.1f})"
            )
            run = busy_jvm(work, classes, args.seconds)
            shares.append(run["share"])
            rows.append(run["rows_share"])
            print(
                f"naming Java frames from memory: {run['share']:.3%} of a core "
                f"({run['lookups']} frames named); code cache unwind rows: "
                f"{run['rows_share']:.3%} ({run['row_updates']} updates); metadata held: "
                f"{run.get('nmethods', 0)} nmethods, {run.get('methods', 0)} methods, "
                f"{run.get('bytes', 0) / 1e3:.0f} kB (load average {os.getloadavg()[0]:.1f})"
            )
        for name, values in (("the agent, whole", wholes), ("naming", shares), ("rows", rows)):
            print(
                f"{name}: median {statistics.median(values):.3%} of a core over {args.repeats} "
                f"runs (range {min(values):.3%} to {max(values):.3%})"
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
