"""What naming Java frames from the JVM's memory costs the agent, and how soon new code is named.

1. Agent CPU with a busy 8-thread JVM started with no flags (demo.Hotspots, 8 threads):
   the agent (a subprocess, 99 Hz, 2 s intervals) sampling it, its CPU share over a steady
   window, against the same agent over the same window with no JVM running. Target: what the
   JVM adds <= 1% of one core.
2. How soon code compiled mid-run is named: Phases (late() first runs, and is compiled, after
   4 s) under an in-process agent at 1 s intervals; per interval, late()'s samples and those
   left `[jit 0x…]`. Target: late() named in the interval it first runs.

The load average is printed with every figure. Run as root:
.venv/bin/python benchmarks/jvm_frames.py [--seconds 30] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from fleetprof import workloads
from fleetprof.aggregator.server import Aggregator
from fleetprof.node_agent.agent import Agent, AgentConfig
from fleetprof.node_agent.samplers import SamplerOptions
from fleetprof.query.source import AggregatorSource

VENV_BIN = Path(sys.executable).parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PHASES = Path(__file__).parents[1] / "tests" / "test_jvm.py"


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def agent_share(address: str, window_s: float, java: list[str] | None) -> float:
    """The agent's CPU share of one core over window_s, after its start-up (and the JVM's)."""
    agent = subprocess.Popen(
        [str(VENV_BIN / "fleetprof"), "agent", "--aggregator", address, "--frequency", "99",
         "--interval", "2", "--spool-dir", tempfile.mkdtemp(prefix="fleetprof-spool-")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    jvm = subprocess.Popen(java) if java else None
    try:
        time.sleep(30)  # BCC compiles, the JVM warms up, the agent reads its code cache
        before, start = cpu_s(agent.pid), time.monotonic()
        time.sleep(window_s)
        return (cpu_s(agent.pid) - before) / (time.monotonic() - start)
    finally:
        for process in (jvm, agent):
            if process is not None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=60)


def naming_delay(work: Path) -> list[dict[str, object]]:
    """Per interval of a Phases run: its samples, late()'s, and those left [jit 0x…]."""
    source = PHASES.read_text().split('PHASES = """', 1)[1].split('"""', 1)[0]
    (work / "Phases.java").write_text(source)
    subprocess.run(["javac", "-d", str(work), str(work / "Phases.java")], check=True)
    aggregator = Aggregator(work / "phases.duckdb", "127.0.0.1:0")
    aggregator.start()
    agent = Agent(
        AgentConfig(aggregator.address, "bench", 1.0, spool_dir=str(work / "spool"),
                    sampling=SamplerOptions(frequency=99))
    )  # fmt: skip
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,))
    thread.start()
    try:
        time.sleep(15)  # compiled and loaded
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
            "sum(weight) FILTER (WHERE len(list_filter(frames, f -> f LIKE '[jit 0x%')) > 0)"
            f"::BIGINT AS unnamed FROM samples JOIN stacks USING (stack_id) "
            f"WHERE pid = {java.pid} GROUP BY ts ORDER BY ts"
        ) as reader:
            return reader.read_all().to_pylist()
    finally:
        client.close()
        aggregator.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="measured window")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fleetprof-jvm-bench-"))
    try:
        classes = workloads.build_java(work)
        java = ["java", "-cp", str(classes), workloads.JAVA_MAIN, "600", "8"]
        aggregator = Aggregator(work / "bench.duckdb", "127.0.0.1:0")
        aggregator.start()
        try:
            added = []
            for _ in range(args.repeats):
                idle = agent_share(aggregator.address, args.seconds, None)
                busy = agent_share(aggregator.address, args.seconds, java)
                added.append(busy - idle)
                print(
                    f"agent CPU: {busy:.2%} of a core with an 8-thread JVM, {idle:.2%} without "
                    f"(load average {os.getloadavg()[0]:.1f})"
                )
        finally:
            aggregator.stop()
        print(
            f"the JVM adds {statistics.median(added):.2%} of a core to the agent "
            f"(median of {args.repeats}; range {min(added):.2%} to {max(added):.2%})"
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
