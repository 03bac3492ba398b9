"""What the wait events (lock, io, offcpu) cost the workloads they watch, at high rates.

Fixed-work workloads of the bundled waits.c, timed alone and under an agent recording one
event (shipping to an aggregator, both in this process), in one run; printed as ratios of
the workload's CPU time (and wall time) to alone, medians of interleaved runs. "sched floor"
is two empty BPF programs on the tracepoints lock and offcpu use (sched_switch and
sched_exit_tp): what any per-switch tracing costs here before doing anything.
  futex     a thread pair per CPU (pinned) passing a turn through a futex, with some work
            per turn: about 200k futex waits/s in all (the rate is printed)
  syscalls  pread 4 KiB from the page cache and write it to /dev/null, over and over
  switches  the same pairs with no work per turn: context switches as fast as they go

Targets: lock and io <= 1.03 on futex; offcpu (1 ms threshold) <= 1.05 on switches.
Run as root: .venv/bin/python benchmarks/event_overhead.py [--repeats N]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bcc import BPF

from fleetprof import workloads
from fleetprof.aggregator.server import Aggregator
from fleetprof.node_agent.agent import Agent, AgentConfig

EVENTS = ("lock", "io", "offcpu")
FLOOR = "sched floor"
EMPTY_SCHED_PROGRAMS = b"""
RAW_TRACEPOINT_PROBE(sched_switch) { return 0; }
RAW_TRACEPOINT_PROBE(sched_exit_tp) { return 0; }
"""
# Work per turn of the futex workload: about 200k futex waits/s on this 2-CPU machine.
FUTEX_SPIN_NS = 2500


def run(command: list[str]) -> tuple[float, float, str]:
    """(CPU seconds, wall seconds, stdout) of one run of a workload."""
    start = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if status:
        raise RuntimeError(f"{command} failed ({status})")
    return usage.ru_utime + usage.ru_stime, time.monotonic() - start, output


@contextmanager
def agent_recording(event: str, work: Path) -> Iterator[None]:
    aggregator = Aggregator(work / f"{event}.duckdb", "127.0.0.1:0")
    aggregator.start()
    config = AgentConfig(aggregator.address, "bench", 10.0, (event,), spool_dir=str(work / "spool"))
    agent = Agent(config)
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,))
    thread.start()
    time.sleep(2)  # past start-up
    try:
        yield
    finally:
        stop.set()
        thread.join()
        aggregator.stop(grace_s=0)


@contextmanager
def empty_sched_programs() -> Iterator[None]:
    bpf = BPF(text=EMPTY_SCHED_PROGRAMS)
    try:
        yield
    finally:
        bpf.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=100_000, help="turns per thread pair")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fleetprof-events-") as work:
        benchmark(Path(work), args.repeats, args.rounds)


def benchmark(work: Path, repeats: int, rounds: int) -> None:
    binary = str(workloads.build_native(work, workloads.WAITS_SOURCE))
    data = work / "data"
    data.write_bytes(os.urandom(4096))
    commands = {
        "futex": [binary, "pingpong", str(rounds), str(FUTEX_SPIN_NS)],
        "syscalls": [binary, "syscalls", str(5 * rounds), str(data)],
        "switches": [binary, "pingpong", str(rounds), "0"],
    }
    cpu: dict[tuple[str, str], list[float]] = {}
    wall: dict[tuple[str, str], list[float]] = {}
    rates: list[float] = []

    def measure(setting: str) -> None:
        for name, command in commands.items():
            seconds, elapsed, output = run(command)
            cpu.setdefault((setting, name), []).append(seconds)
            wall.setdefault((setting, name), []).append(elapsed)
            if setting == "alone" and name == "futex":
                rates.append(float(re.findall(r"(\d+) futex waits/s", output)[0]))

    # Runs alone before every agent's, so slow drifts of the machine's load hit both.
    for _ in range(repeats):
        measure("alone")
        with empty_sched_programs():
            measure(FLOOR)
        for event in EVENTS:
            measure("alone")
            with agent_recording(event, work):
                measure(event)

    print(
        f"{repeats} runs each, medians; futex workload alone: "
        f"{statistics.median(rates):,.0f} futex waits/s"
    )
    print(f"{'':12}" + "".join(f"{name:>22}" for name in commands))
    for setting in ("alone", FLOOR, *EVENTS):
        cells = []
        for name in commands:
            cpu_ratio = statistics.median(cpu[setting, name]) / statistics.median(
                cpu["alone", name]
            )
            wall_ratio = statistics.median(wall[setting, name]) / statistics.median(
                wall["alone", name]
            )
            cells.append(f"cpu {cpu_ratio:5.3f} wall {wall_ratio:5.3f}")
        print(f"{setting:12}" + "".join(f"{cell:>22}" for cell in cells))
    # How far runs alone stray from their median: ratios closer to 1 than this are noise.
    spread = {
        name: statistics.pstdev(cpu["alone", name]) / statistics.median(cpu["alone", name])
        for name in commands
    }
    print(
        "alone: "
        + ", ".join(
            f"{name} {statistics.median(cpu['alone', name]):.2f} CPU s (sd {spread[name]:.1%})"
            for name in commands
        )
    )


if __name__ == "__main__":
    main()
